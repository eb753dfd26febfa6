"""Request and response shapes of the module's Python and HTTP API (JSON names as in the original
README). Provider wire fields (``input_*``/``output_*``) never appear here."""

from __future__ import annotations

import json
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)

from .exceptions import PaymentValidationError
from .models import as_utc
from .values import Msisdn, parse_amount


def _amount(value: Any) -> Decimal:
    try:
        return parse_amount(value)
    except PaymentValidationError as exc:
        raise ValueError(exc.message) from None


#: Exact cents in, a JSON number out (as the original README's examples show).
Amount = Annotated[
    Decimal,
    BeforeValidator(_amount),
    PlainSerializer(lambda value: float(value), return_type=float, when_used="json"),
]
Money = Annotated[
    Decimal, PlainSerializer(lambda value: float(value), return_type=float, when_used="json")
]
ShortText = Annotated[str, Field(min_length=1, max_length=100)]
Email = Annotated[str, Field(max_length=255, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")]
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=255)]


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
            try:
                text = json.dumps(metadata, allow_nan=False)
            except (TypeError, ValueError):
                raise ValueError("metadata must be plain JSON (no NaN or Infinity)") from None
            if "\\u0000" in text:
                raise ValueError("metadata must not contain NUL characters")
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


ProviderTransactionId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,100}$")]


class ResolveRequest(_Request):
    """An operator's decision on a payment M-Pesa's answers cannot settle."""

    status: Literal["completed", "failed"] | None = None
    provider_transaction_id: ProviderTransactionId | None = None
    reason: Annotated[str, Field(min_length=1, max_length=500)]


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


class PaymentFilters(BaseModel):
    status: str | None = None
    operation: str | None = None
    phone_number: Msisdn | None = None
    entity_type: str | None = None
    entity_id: str | None = None
    user_id: str | None = None
    attention_required: bool | None = None
    from_date: date | None = None
    to_date: date | None = None


class SummaryBucket(BaseModel):
    count: int
    amount: Money


class PaymentSummary(BaseModel):
    from_date: date | None
    to_date: date | None
    total_count: int
    total_amount: Money
    completed_amount: Money
    success_rate: float | None
    attention_required: int
    by_status: dict[str, SummaryBucket]
    by_operation: dict[str, SummaryBucket]


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
