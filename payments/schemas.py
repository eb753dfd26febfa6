"""Request and response shapes of the module's Python and HTTP API (JSON names as in the original
README). Provider wire fields (``input_*``/``output_*``) never appear here."""

from __future__ import annotations

import json
import re
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    field_serializer,
    field_validator,
    model_validator,
)

from .exceptions import PaymentValidationError
from .models import as_utc
from .mpesa.values import (
    MONEY_TEXT_PATTERN,
    PROVIDER_ID_PATTERN,
    Msisdn,
    money_text,
    parse_amount,
)
from .redaction import sanitize_text


def _amount(value: Any) -> Decimal:
    try:
        return parse_amount(value)
    except PaymentValidationError as exc:
        raise ValueError(exc.message) from None


#: Text a database can store and look up: no NUL character (PostgreSQL refuses it). The route
#: class answers NUL in a path or query with 422 before validation; the pattern makes the
#: OpenAPI document say so, so a schema-valid request is an accepted one.
NO_NUL_PATTERN = r"^[^\x00]*$"
PlainText = Annotated[str, Field(pattern=NO_NUL_PATTERN)]


#: What ``parse_amount`` accepts, for the OpenAPI document (the deployment's
#: PAYMENT_MIN_AMOUNT/PAYMENT_MAX_AMOUNT apply on top).
AMOUNT_JSON_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "number", "exclusiveMinimum": 0, "maximum": 9999999999.99, "multipleOf": 0.01},
        {"type": "string", "pattern": r"^(?=[0-9.]*[1-9])[0-9]{1,10}(?:\.[0-9]{1,2})?$"},
    ]
}

#: How money looks in every answer: the exact decimal with two places, as a string.
MONEY_JSON_SCHEMA: dict[str, Any] = {
    "type": "string",
    "pattern": MONEY_TEXT_PATTERN,
    "examples": ["100.00"],
    "description": 'Exact amount with two decimals (never a float), e.g. "100.00"',
}

_money_out = PlainSerializer(money_text, return_type=str, when_used="json")

#: Exact cents in (a number or a string, as ``parse_amount`` takes), ``"100.00"`` out.
Amount = Annotated[
    Decimal,
    BeforeValidator(_amount),
    _money_out,
    WithJsonSchema(AMOUNT_JSON_SCHEMA, mode="validation"),
    WithJsonSchema(MONEY_JSON_SCHEMA, mode="serialization"),
]
#: Money in answers: serialised by ``values.money_text`` (``"100.00"``). Reuse it in any model
#: that carries money (event payloads, reports).
Money = Annotated[
    Decimal,
    _money_out,
    WithJsonSchema(MONEY_JSON_SCHEMA, mode="serialization"),
    WithJsonSchema(MONEY_JSON_SCHEMA, mode="validation"),
]
ShortText = Annotated[str, Field(min_length=1, max_length=100)]
Email = Annotated[str, Field(max_length=255, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")]
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=255)]

#: ``metadata`` is the caller's own small JSON object: bounded, so no log masker, audit row or
#: database chokes on it.
METADATA_MAX_DEPTH = 8
METADATA_MAX_BYTES = 8 * 1024

#: The one date rule of the API: ``YYYY-MM-DD``, within what every database and a "to the end
#: of the day" bound can hold.
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)
FIRST_DATE = date(1970, 1, 1)
LAST_DATE = date(9999, 12, 30)


def _api_date(value: Any) -> date:
    if isinstance(value, date) and not isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str) and _ISO_DATE.fullmatch(value.strip()):
        try:
            parsed = date.fromisoformat(value.strip())
        except ValueError:
            raise ValueError("must be a real calendar date (YYYY-MM-DD)") from None
    else:
        raise ValueError("must be a date written YYYY-MM-DD")
    if not FIRST_DATE <= parsed <= LAST_DATE:
        raise ValueError(f"must be between {FIRST_DATE} and {LAST_DATE}")
    return parsed


ApiDate = Annotated[date, BeforeValidator(_api_date)]


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value, without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if level > METADATA_MAX_DEPTH:
                return level
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


class _Request(BaseModel):
    # Unknown fields are refused: a misspelt "ammount" must not turn into a silent default.
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    @model_validator(mode="after")
    def _storable(self) -> Self:
        """Refuse what a database cannot store (NUL characters, NaN/Infinity in JSON) here, as
        input errors, rather than as database errors after the fact."""
        for name, value in self:
            if isinstance(value, str) and "\x00" in value:
                raise ValueError(f"{name} must not contain NUL characters")
        metadata = getattr(self, "metadata", None)
        if metadata is not None:
            if _depth(metadata) > METADATA_MAX_DEPTH:
                raise ValueError(f"metadata may be nested at most {METADATA_MAX_DEPTH} deep")
            try:
                text = json.dumps(metadata, allow_nan=False)
            except (TypeError, ValueError, RecursionError):
                raise ValueError("metadata must be plain JSON (no NaN or Infinity)") from None
            if "\\u0000" in text:
                raise ValueError("metadata must not contain NUL characters")
            if len(text) > METADATA_MAX_BYTES:
                raise ValueError(f"metadata must be at most {METADATA_MAX_BYTES} bytes as JSON")
        return self


class _MoneyRequest(_Request):
    """What every money-moving request carries."""

    amount: Amount
    account_reference: ShortText | None = None
    description: Annotated[str, Field(max_length=255)] | None = None
    entity_type: Annotated[str, Field(max_length=50)] | None = None
    entity_id: Annotated[str, Field(max_length=50)] | None = None
    idempotency_key: IdempotencyKey | None = None
    metadata: dict[str, Any] | None = None


class PaymentInitiateRequest(_MoneyRequest):
    """C2B single stage: the customer pays the business after a PIN prompt on the handset."""

    phone_number: Msisdn
    customer_name: Annotated[str, Field(max_length=255)] | None = None
    customer_email: Email | None = None


class PayoutRequest(_MoneyRequest):
    """B2C: the business pays a customer's wallet."""

    phone_number: Msisdn
    customer_name: Annotated[str, Field(max_length=255)] | None = None


class TransferRequest(_MoneyRequest):
    """B2B: the business pays another business's shortcode."""

    receiver_party_code: Annotated[str, Field(pattern=r"^[0-9]{5,6}$")]


class ReversalRequest(_Request):
    """Reverse a completed payment; without ``amount``, everything not yet reversed."""

    amount: Amount | None = None
    reason: Annotated[str, Field(max_length=255)] | None = None
    idempotency_key: IdempotencyKey | None = None


#: The characters ``str.strip()`` removes, as a regex class body that Python, Rust (pydantic-core)
#: and ECMAScript (JSON Schema) read alike.
_STRIPPED_WHITESPACE = (
    r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
)
ProviderTransactionId = Annotated[str, Field(pattern=rf"^{PROVIDER_ID_PATTERN}$")]


class ResolveRequest(_Request):
    """An operator's decision on a payment M-Pesa's answers cannot settle."""

    status: Literal["completed", "failed"] | None = None
    provider_transaction_id: ProviderTransactionId | None = None
    # The schema says what the API accepts: no NUL (the database cannot store it), and at least
    # one character that is not whitespace (requests are stripped first, as Python strips).
    reason: Annotated[
        str,
        Field(
            min_length=1,
            max_length=500,
            pattern=rf"^[^\x00]*[^\x00{_STRIPPED_WHITESPACE}][^\x00]*$",
        ),
    ]


class PaymentResponse(BaseModel):
    """A payment as callers see it: the initiate answer and the status answer alike."""

    success: bool
    transaction_id: str
    operation: str
    status: str
    message: str
    provider_transaction_id: str | None = None
    conversation_id: str | None = None
    #: Exactly what was sent to M-Pesa as ``input_ThirdPartyReference`` (for support tickets).
    third_party_reference: str
    #: The caller's own reference, echoed back.
    account_reference: str | None = None
    phone_number: str | None = None  # masked: 2588412*****
    receiver_party_code: str | None = None
    amount: Money
    reversed_amount: Money = Decimal("0")
    currency: str
    response_code: str | None = None
    response_description: str | None = None
    status_description: str | None = None
    entity_type: str | None = None
    entity_id: str | None = None
    original_transaction_id: str | None = None
    attention_required: bool = False
    #: Waiting for an operator's decision (``POST /payments/{id}/resolve``): no answer of
    #: M-Pesa's settles it.
    operator_hold: bool = False
    created_at: datetime
    updated_at: datetime | None = None
    completed_at: datetime | None = None

    @field_serializer("account_reference")
    def _masked_reference(self, value: str | None) -> str | None:
        # A caller may put a phone number there; answers show numbers masked.
        return sanitize_text(value) if value is not None else None


class CustomerNameResponse(BaseModel):
    phone_number: str  # masked
    customer_name: str | None
    response_code: str
    response_description: str


class PaymentListResponse(BaseModel):
    items: list[PaymentResponse]
    total: int
    page: int
    per_page: int
    pages: int
    #: Pass as ``cursor`` to get the next page (keyset: as fast deep as on page 2); ``None`` on
    #: the last page.
    next_cursor: str | None = None


class PaymentFilters(BaseModel):
    status: PlainText | None = None
    operation: PlainText | None = None
    phone_number: Msisdn | None = None
    entity_type: PlainText | None = None
    entity_id: PlainText | None = None
    user_id: PlainText | None = None
    attention_required: bool | None = None
    from_date: ApiDate | None = None
    to_date: ApiDate | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.from_date and self.to_date and self.from_date > self.to_date:
            raise ValueError("from_date must not be after to_date")
        return self


class SummaryBucket(BaseModel):
    count: int
    amount: Money


class OperationSummary(SummaryBucket):
    """One operation: every payment (``count``/``amount``, whatever its status), the completed
    ones, and the success rate among the settled ones (``None`` when none is settled yet)."""

    completed_count: int = 0
    completed_amount: Money = Decimal("0")
    success_rate: float | None = None


class PaymentSummary(BaseModel):
    """Money in and money out are reported apart (``received``: C2B completed, ``paid_out``:
    B2C, ``transferred``: B2B, ``reversed``: completed reversals); ``total_amount`` is only the
    sum of every amount asked for, in any direction and status."""

    from_date: date | None
    to_date: date | None
    total_count: int
    total_amount: Money
    received: SummaryBucket
    paid_out: SummaryBucket
    transferred: SummaryBucket
    reversed: SummaryBucket
    #: Customer payments completed in the period, less what completed reversals gave back.
    net_received: Money
    #: Completed among settled payments, per operation (``None``: nothing settled yet).
    success_rate_by_operation: dict[str, float | None]
    #: Kept for earlier readers: the same as ``received.amount``.
    completed_amount: Money = Field(
        description="Deprecated: the same as received.amount (customer payments only)"
    )
    #: Kept for earlier readers: the C2B success rate (``success_rate_by_operation["c2b"]``).
    success_rate: float | None = Field(
        description='Deprecated: the same as success_rate_by_operation["c2b"]'
    )
    attention_required: int
    by_status: dict[str, SummaryBucket]
    by_operation: dict[str, OperationSummary]


class ErrorItem(BaseModel):
    field: str
    reason: str


class ErrorDetails(BaseModel):
    """``errors`` on every 422; other errors add what they know (``payment``,
    ``provider_code``, ``variable``, ``max_bytes``)."""

    model_config = ConfigDict(extra="allow")

    errors: list[ErrorItem] | None = None


class ErrorResponse(BaseModel):
    """Every error answer of the API (except the callback, which answers in M-Pesa's shape)."""

    error_code: str
    message: str
    details: ErrorDetails


class AuditLogEntry(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    action: str
    status_before: str | None
    status_after: str | None
    request_body: Any | None
    response_body: Any | None
    http_status: int | None
    error_message: str | None
    response_time_ms: int | None
    actor: str | None
    created_at: datetime

    _utc = field_validator("created_at")(as_utc)


class AuditTrailResponse(BaseModel):
    transaction_id: str
    entries: list[AuditLogEntry]


class ReplayResult(BaseModel):
    webhook_id: int
    processed: bool
    transaction_id: str | None
    status: str | None
    error: str | None


class HealthReport(BaseModel):
    model_config = {"extra": "allow"}

    status: str
    database: str
    provider_configuration: str
    environment: str | None = None
    provider_ports: dict[str, str] | None = None
    provider_access: str | None = None


class WebhookEntry(BaseModel):
    model_config = {"from_attributes": True}

    id: int
    source: str
    raw_body: str
    remote_ip: str | None
    received_at: Any
    is_valid: bool
    validation_error: str | None
    is_processed: bool
    processed_at: Any | None
    processing_error: str | None
    attempts: int
    #: The payment's row id (JSON ``transaction_id``, as shipped).
    payment_id: int | None = Field(serialization_alias="transaction_id")


class WebhookListResponse(BaseModel):
    items: list[WebhookEntry]
    total: int
    page: int
    per_page: int


# -- payment events (events.py) ------------------------------------------------------------------


class EventAttemptResponse(BaseModel):
    attempted_at: datetime
    status_code: int | None = None
    duration_ms: int | None = None
    error: str | None = None
    response_body: str | None = None


class EventDeliveryResponse(BaseModel):
    kind: str
    consumer: str  # "hooks", or the endpoint's URL
    status: str
    attempts: int
    next_attempt_at: datetime | None = None
    last_attempt_at: datetime | None = None
    delivered_at: datetime | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    attempt_log: list[EventAttemptResponse] = []


class EventResponse(BaseModel):
    id: str
    type: str
    transaction_id: str
    created_at: datetime
    data: dict[str, Any]
    deliveries: list[EventDeliveryResponse] | None = None


class EventListResponse(BaseModel):
    items: list[EventResponse]
    #: More events follow the last one: ask again with ``after`` = its id.
    has_more: bool


class EventPayload(BaseModel):
    """The body POSTed to each ``PAYMENT_WEBHOOK_URLS`` endpoint."""

    id: str
    type: str
    created_at: datetime
    #: The payment as ``GET /payments/status/{id}`` shows it (``payment.resolved`` adds
    #: ``status_before`` and ``resolution``).
    data: dict[str, Any]
