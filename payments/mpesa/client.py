"""Async client for the Vodacom M-Pesa Mozambique API: wire fields in, typed results or errors out.

The only module that knows hosts, ports, paths and ``input_*``/``output_*`` names. It knows nothing
of the database or FastAPI. Every HTTP exchange is described by a ``ProviderExchange`` (sanitised),
attached to the result or the error, so callers can audit it.

Retries follow business semantics: queries retry with capped, jittered backoff;
C2B/B2C/B2B retry only when the request provably never left (connect failure); a reversal never
retries. A timeout or dropped connection on a money-moving call is ``PaymentOutcomeUnknownError``.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any, TypeVar

import httpx

from .. import metrics
from ..config import PROVIDER_HOSTS, PaymentSettings
from ..exceptions import (
    DuplicateTransactionError,
    InsufficientFundsError,
    InvalidPaymentRequestError,
    PaymentCancelledError,
    PaymentConfigurationError,
    PaymentOutcomeUnknownError,
    PaymentProviderError,
    ProviderUnavailableError,
)
from ..logger import payment_logger
from ..redaction import sanitize
from .auth import MpesaAuth
from .codes import AUTH_CODES, NOT_FOUND_CODES, Disposition, ResponseCode, ResponseCodeTable
from .transport import AiohttpTransport
from .values import (
    PROVIDER_ID,
    Msisdn,
    format_amount,
    parse_amount,
    validate_provider_id,
    validate_reference,
    validate_shortcode,
)

USER_AGENT = "payments-mpesa-mz/0.1"


class Operation(StrEnum):
    C2B = "c2b"
    B2C = "b2c"
    B2B = "b2b"
    REVERSAL = "reversal"
    QUERY_STATUS = "query_status"
    QUERY_CUSTOMER_NAME = "query_customer_name"


class RetryPolicy(StrEnum):
    QUERY = "query"  # safe to repeat: retry transport errors, 5xx and overload
    PRE_SEND_ONLY = "pre_send_only"  # money moves: retry only if the request never left
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class OperationSpec:
    method: str
    port: int
    path: str
    retry: RetryPolicy

    @property
    def moves_money(self) -> bool:
        return self.retry is not RetryPolicy.QUERY


OPERATIONS: dict[Operation, OperationSpec] = {
    Operation.C2B: OperationSpec(
        "POST", 18352, "/ipg/v1x/c2bPayment/singleStage/", RetryPolicy.PRE_SEND_ONLY
    ),
    Operation.B2C: OperationSpec("POST", 18345, "/ipg/v1x/b2cPayment/", RetryPolicy.PRE_SEND_ONLY),
    Operation.B2B: OperationSpec("POST", 18349, "/ipg/v1x/b2bPayment/", RetryPolicy.PRE_SEND_ONLY),
    Operation.REVERSAL: OperationSpec("PUT", 18354, "/ipg/v1x/reversal/", RetryPolicy.NEVER),
    Operation.QUERY_STATUS: OperationSpec(
        "GET", 18353, "/ipg/v1x/queryTransactionStatus/", RetryPolicy.QUERY
    ),
    Operation.QUERY_CUSTOMER_NAME: OperationSpec(
        "GET", 19323, "/ipg/v1x/queryCustomerName/", RetryPolicy.QUERY
    ),
}

# Errors raised before a single byte of the request could reach the provider.
_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


#: What to check when the gateway refuses a request in its own words (``output_error``, no code).
_REFUSAL_ACTION = (
    "Check MPESA_API_KEY, MPESA_PUBLIC_KEY and MPESA_ORIGIN (the portal app's settings):"
    " the gateway refused the request before processing it"
)


@dataclass(frozen=True, slots=True)
class ProviderExchange:
    """One HTTP attempt, sanitised, for logs and the audit trail."""

    operation: Operation
    method: str
    url: str
    attempt: int
    request_fields: dict[str, Any]
    http_status: int | None
    response_body: Any
    elapsed_ms: float
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ProviderResult:
    """A successful (INS-0) answer."""

    operation: Operation
    response_code: str
    response_description: str
    http_status: int
    #: M-Pesa's ``output_TransactionID``.
    provider_transaction_id: str | None
    conversation_id: str | None
    third_party_reference: str | None
    raw: dict[str, Any]
    exchanges: tuple[ProviderExchange, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class TransactionStatusResult(ProviderResult):
    """A status answer: INS-0 with a status, or a not-found answer (``NOT_FOUND_CODES``)."""

    #: ``Completed``, ``Cancelled``, ``Expired`` or ``N/A`` (documented values).
    transaction_status: str | None = None

    @property
    def found(self) -> bool:
        """False when M-Pesa says it cannot find the transaction asked for: a not-found code,
        or a status of ``N/A`` (or none)."""
        if self.response_code in NOT_FOUND_CODES:
            return False
        return (self.transaction_status or "").strip().upper() not in ("", "N/A")


@dataclass(frozen=True, slots=True)
class CustomerNameResult(ProviderResult):
    #: The masked name as M-Pesa returns it (e.g. ``Jo*o Ma****``).
    customer_name: str | None = None


@dataclass(frozen=True, slots=True)
class ClientConfig:
    api_key: str
    public_key: str
    service_provider_code: str
    environment: str = "sandbox"
    base_url: str | None = None
    origin: str = "developer.mpesa.vm.co.mz"
    initiator_identifier: str | None = None
    security_credential: str | None = None
    c2b_timeout: float = 120.0
    request_timeout: float = 30.0
    connect_timeout: float = 10.0
    query_max_attempts: int = 3
    backoff_base: float = 0.5
    backoff_max: float = 5.0
    max_connections: int = 1000
    codes: ResponseCodeTable = field(default_factory=ResponseCodeTable.default)

    @classmethod
    def from_settings(cls, settings: PaymentSettings) -> ClientConfig:
        return cls(
            api_key=settings.api_key,
            public_key=settings.public_key,
            service_provider_code=settings.mpesa_service_provider_code,
            environment=settings.mpesa_environment,
            base_url=settings.mpesa_base_url,
            origin=settings.mpesa_origin,
            initiator_identifier=settings.mpesa_initiator_identifier,
            security_credential=settings.security_credential,
            c2b_timeout=settings.payment_c2b_timeout,
            request_timeout=settings.payment_request_timeout,
            connect_timeout=settings.payment_connect_timeout,
            query_max_attempts=settings.payment_query_max_attempts,
            backoff_base=settings.payment_retry_backoff_base,
            backoff_max=settings.payment_retry_backoff_max,
            max_connections=settings.payment_max_connections,
            codes=settings.response_codes(),
        )

    def url_for(self, operation: Operation) -> str:
        spec = OPERATIONS[operation]
        if self.base_url:
            return f"{self.base_url}{spec.path}"
        if self.environment == "simulator":
            return f"http://simulator{spec.path}"
        return f"https://{PROVIDER_HOSTS[self.environment]}:{spec.port}{spec.path}"


def backoff_delay(attempt: int, base: float, cap: float, jitter: float) -> float:
    """Capped exponential backoff; ``jitter`` in [0, 1) scales it into [50 %, 100 %)."""
    return min(cap, base * 2 ** (attempt - 1)) * (0.5 + jitter / 2)


def should_retry(policy: RetryPolicy, *, attempt: int, max_attempts: int, never_sent: bool) -> bool:
    """Whether a failed attempt may be repeated. ``never_sent``: provably not delivered."""
    if attempt >= max_attempts or policy is RetryPolicy.NEVER:
        return False
    return policy is RetryPolicy.QUERY or never_sent


_ERROR_BY_DISPOSITION: dict[Disposition, type[PaymentProviderError]] = {
    Disposition.CUSTOMER_DECLINED: PaymentCancelledError,
    Disposition.INSUFFICIENT_FUNDS: InsufficientFundsError,
    Disposition.INVALID_REQUEST: InvalidPaymentRequestError,
    Disposition.DUPLICATE: DuplicateTransactionError,
}


def error_for_answer(
    operation: Operation,
    entry: ResponseCode,
    http_status: int,
    description: str,
    *,
    body: Any = None,
    exchanges: tuple[ProviderExchange, ...] = (),
) -> PaymentProviderError:
    """The one place that turns a non-success provider answer into an exception (with every ID
    the answer carried and the exchanges that led to it)."""
    error_type = _ERROR_BY_DISPOSITION.get(entry.disposition)
    if error_type is None:  # overloaded or ambiguous
        error_type = (
            PaymentOutcomeUnknownError
            if OPERATIONS[operation].moves_money
            else ProviderUnavailableError
        )
    code = entry.code or None
    message = f"M-Pesa answered {code or 'without a response code'}: {description}"
    if error_type is PaymentOutcomeUnknownError:
        message += " (the outcome is unknown until a status query settles it)"
    return error_type(
        message,
        provider_code=code,
        provider_description=description,
        http_status=http_status,
        details={"action": entry.action, "disposition": entry.disposition.value},
        exchanges=exchanges,
        **_ids_in(body),
    )


def refusal_error(
    http_status: int,
    text: str,
    *,
    body: Any = None,
    exchanges: tuple[ProviderExchange, ...] = (),
) -> InvalidPaymentRequestError:
    """The gateway refused the request in its own words (``output_error``, no response code, a
    4xx status: "Origin not allowed", a wrong API key on some gateways). Nothing was processed,
    so the payment fails; the cause is this deployment's configuration, not the caller's input."""
    return InvalidPaymentRequestError(
        f"M-Pesa refused the request: {text}. {_REFUSAL_ACTION}",
        provider_description=text,
        http_status=http_status,
        error_code="configuration_refused",
        details={"action": _REFUSAL_ACTION, "disposition": Disposition.INVALID_REQUEST.value},
        exchanges=exchanges,
        **_ids_in(body),
    )


R = TypeVar("R", bound=ProviderResult)


@dataclass(frozen=True, slots=True)
class _Undecided:
    """An answer that is not a result: the error it is, and whether repeating may help."""

    error: PaymentProviderError
    retryable: bool


class MpesaClient:
    """One method per operation over one shared connection pool. Use as an async context manager
    or call ``aclose()``. ``transport`` is injectable (respx, MockTransport, the simulator)."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        if transport is None and config.environment == "simulator" and not config.base_url:
            from ..simulator.app import create_simulator_app
            from ..simulator.transport import SimulatorTransport

            transport = SimulatorTransport(create_simulator_app())
        if transport is None:
            transport = AiohttpTransport(max_connections=config.max_connections)
        # Requests go straight to the transport: an httpx.AsyncClient adds cookie, redirect and
        # URL-merging work per call that this API never needs (a third of the client's CPU).
        self._transport = transport
        self._auth = MpesaAuth(config.api_key, config.public_key)
        self._headers = {
            "Content-Type": "application/json",
            "Origin": config.origin,
            "User-Agent": USER_AGENT,
        }
        self._urls = {operation: httpx.URL(config.url_for(operation)) for operation in Operation}
        self._sleep = sleep
        self._jitter = jitter

    @classmethod
    def from_settings(
        cls, settings: PaymentSettings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> MpesaClient:
        return cls(ClientConfig.from_settings(settings), transport=transport)

    async def __aenter__(self) -> MpesaClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()

    # -- operations ---------------------------------------------------------------------------

    async def c2b_payment(
        self,
        *,
        msisdn: Msisdn,
        amount: Decimal,
        transaction_reference: str,
        third_party_reference: str,
    ) -> ProviderResult:
        """Customer pays the business. Blocks until the customer answers the PIN prompt."""
        fields = {
            "input_TransactionReference": validate_reference(
                transaction_reference, field="transaction_reference"
            ),
            "input_CustomerMSISDN": msisdn.digits,
            "input_Amount": format_amount(parse_amount(amount)),
            "input_ThirdPartyReference": validate_reference(
                third_party_reference, field="third_party_reference"
            ),
            "input_ServiceProviderCode": self.config.service_provider_code,
        }
        return await self._call(Operation.C2B, fields, ProviderResult)

    async def b2c_payment(
        self,
        *,
        msisdn: Msisdn,
        amount: Decimal,
        transaction_reference: str,
        third_party_reference: str,
    ) -> ProviderResult:
        """Business pays a customer's wallet."""
        fields = {
            "input_TransactionReference": validate_reference(
                transaction_reference, field="transaction_reference"
            ),
            "input_CustomerMSISDN": msisdn.digits,
            "input_Amount": format_amount(parse_amount(amount)),
            "input_ThirdPartyReference": validate_reference(
                third_party_reference, field="third_party_reference"
            ),
            "input_ServiceProviderCode": self.config.service_provider_code,
        }
        return await self._call(Operation.B2C, fields, ProviderResult)

    async def b2b_payment(
        self,
        *,
        receiver_party_code: str,
        amount: Decimal,
        transaction_reference: str,
        third_party_reference: str,
    ) -> ProviderResult:
        """Business pays another business (shortcode to shortcode)."""
        fields = {
            "input_TransactionReference": validate_reference(
                transaction_reference, field="transaction_reference"
            ),
            "input_Amount": format_amount(parse_amount(amount)),
            "input_ThirdPartyReference": validate_reference(
                third_party_reference, field="third_party_reference"
            ),
            "input_PrimaryPartyCode": self.config.service_provider_code,
            "input_ReceiverPartyCode": validate_shortcode(
                receiver_party_code, field="receiver_party_code"
            ),
        }
        return await self._call(Operation.B2B, fields, ProviderResult)

    async def reversal(
        self,
        *,
        provider_transaction_id: str,
        third_party_reference: str,
        amount: Decimal | None = None,
    ) -> ProviderResult:
        """Reverse a completed transaction, fully or (with ``amount``) partially. Never retried."""
        self.check_reversal_configured()
        fields = {
            "input_TransactionID": validate_provider_id(
                provider_transaction_id, field="transaction_id"
            ),
            "input_SecurityCredential": self.config.security_credential,
            "input_InitiatorIdentifier": self.config.initiator_identifier,
            "input_ThirdPartyReference": validate_reference(
                third_party_reference, field="third_party_reference"
            ),
            "input_ServiceProviderCode": self.config.service_provider_code,
        }
        if amount is not None:
            fields["input_ReversalAmount"] = format_amount(parse_amount(amount))
        return await self._call(Operation.REVERSAL, fields, ProviderResult)

    async def query_transaction_status(
        self, *, query_reference: str, third_party_reference: str
    ) -> TransactionStatusResult:
        """Status of an earlier transaction by its transaction ID, conversation ID or the
        third-party reference it was sent with."""
        fields = {
            "input_ThirdPartyReference": validate_reference(
                third_party_reference, field="third_party_reference"
            ),
            "input_QueryReference": validate_provider_id(query_reference, field="query_reference"),
            "input_ServiceProviderCode": self.config.service_provider_code,
        }
        return await self._call(Operation.QUERY_STATUS, fields, TransactionStatusResult)

    async def query_customer_name(
        self, *, msisdn: Msisdn, third_party_reference: str
    ) -> CustomerNameResult:
        """The wallet holder's masked name, to confirm a payout's recipient."""
        fields = {
            "input_CustomerMSISDN": msisdn.digits,
            "input_ThirdPartyReference": validate_reference(
                third_party_reference, field="third_party_reference"
            ),
            "input_ServiceProviderCode": self.config.service_provider_code,
        }
        return await self._call(Operation.QUERY_CUSTOMER_NAME, fields, CustomerNameResult)

    async def check_access(self) -> str | None:
        """Ask M-Pesa one status query for a made-up reference: ``None`` when the gateway accepts
        this deployment's credentials and Origin (any answer but a refusal), else what it said."""
        try:
            await self.query_transaction_status(
                query_reference="HEALTHCHECK", third_party_reference="H" + secrets.token_hex(9)
            )
        except InvalidPaymentRequestError as error:
            if error.error_code == "configuration_refused" or error.provider_code in AUTH_CODES:
                return error.message
        except PaymentProviderError as error:
            return error.message
        return None

    def check_reversal_configured(self) -> None:
        """Reversals need the portal's initiator identifier and security credential."""
        for variable, value in (
            ("MPESA_INITIATOR_IDENTIFIER", self.config.initiator_identifier),
            ("MPESA_SECURITY_CREDENTIAL", self.config.security_credential),
        ):
            if not value:
                raise PaymentConfigurationError(
                    f"{variable} is required for reversals", details={"variable": variable}
                )

    # -- transport ----------------------------------------------------------------------------

    def _timeout_for(self, operation: Operation) -> httpx.Timeout:
        config = self.config
        read = config.c2b_timeout if operation is Operation.C2B else config.request_timeout
        return httpx.Timeout(read, connect=self.config.connect_timeout)

    async def _send(
        self, operation: Operation, method: str, fields: dict[str, str]
    ) -> httpx.Response:
        """One HTTP exchange: query string for GET, JSON body otherwise, read in full."""
        request = httpx.Request(
            method,
            self._urls[operation],
            params=fields if method == "GET" else None,
            json=None if method == "GET" else fields,
            headers={**self._headers, "Authorization": f"Bearer {self._auth.token}"},
            extensions={"timeout": self._timeout_for(operation).as_dict()},
        )
        response = await self._transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    async def _call(self, operation: Operation, fields: dict[str, str], result_type: type[R]) -> R:
        """Attempt, classify the answer, and repeat while the operation's retry policy allows."""
        retry = OPERATIONS[operation].retry
        max_attempts = self.config.query_max_attempts
        exchanges: list[ProviderExchange] = []
        attempt = 0
        while True:
            attempt += 1
            answer = await self._attempt(operation, fields, attempt, exchanges)
            if isinstance(answer, httpx.TransportError):
                never_sent = isinstance(answer, _NEVER_SENT)
                if should_retry(
                    retry, attempt=attempt, max_attempts=max_attempts, never_sent=never_sent
                ):
                    await self._backoff(attempt)
                    continue
                raise self._transport_error(operation, answer, never_sent, exchanges) from answer
            response, body = answer
            decided = self._classify(operation, response, body, result_type, exchanges)
            if not isinstance(decided, _Undecided):
                return decided
            if decided.retryable and should_retry(
                retry, attempt=attempt, max_attempts=max_attempts, never_sent=False
            ):
                await self._backoff(attempt)
                continue
            raise decided.error

    async def _attempt(
        self,
        operation: Operation,
        fields: dict[str, str],
        attempt: int,
        exchanges: list[ProviderExchange],
    ) -> tuple[httpx.Response, Any] | httpx.TransportError:
        """One exchange, logged, measured and added to ``exchanges``: the response with its
        parsed body, or the transport error that ended it."""
        spec = OPERATIONS[operation]
        url = str(self._urls[operation])
        audit_fields = sanitize(fields)
        payment_logger.api_request(
            spec.method,
            url,
            operation=operation.value,
            third_party_reference=fields.get("input_ThirdPartyReference"),
            attempt=attempt if attempt > 1 else None,
        )
        started = time.perf_counter()
        try:
            response = await self._send(operation, spec.method, fields)
        except httpx.TransportError as exc:
            elapsed_ms = (time.perf_counter() - started) * 1000
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            exchanges.append(
                ProviderExchange(
                    operation,
                    spec.method,
                    url,
                    attempt,
                    audit_fields,
                    None,
                    None,
                    elapsed_ms,
                    error=reason,
                )
            )
            metrics.observe_mpesa_transport_error(operation.value, elapsed_ms / 1000)
            payment_logger.warning(
                "API call failed",
                operation=operation.value,
                error=reason,
                duration_ms=round(elapsed_ms),
                request_sent=not isinstance(exc, _NEVER_SENT),
            )
            return exc

        elapsed_ms = (time.perf_counter() - started) * 1000
        body = _parse_body(response)
        code = body.get("output_ResponseCode") if isinstance(body, dict) else None
        exchanges.append(
            ProviderExchange(
                operation,
                spec.method,
                url,
                attempt,
                audit_fields,
                response.status_code,
                sanitize(body),
                elapsed_ms,
            )
        )
        payment_logger.api_response(
            response.status_code, elapsed_ms, operation=operation.value, code=code
        )
        metrics.observe_mpesa_request(operation.value, code, elapsed_ms / 1000)
        return response, body

    def _classify(
        self,
        operation: Operation,
        response: httpx.Response,
        body: Any,
        result_type: type[R],
        exchanges: list[ProviderExchange],
    ) -> R | _Undecided:
        """What an answer means: the result, or the error it is and whether a retry may help."""
        code = body.get("output_ResponseCode") if isinstance(body, dict) else None
        description = (body.get("output_ResponseDesc") if isinstance(body, dict) else None) or ""
        entry = self.config.codes.lookup(
            code if isinstance(code, str) else None, response.status_code
        )
        refusal = _refusal_text(body)
        if refusal is not None:
            description = refusal  # the provider's own words, whatever is decided below
            if 400 <= response.status_code < 500:
                refused = refusal_error(
                    response.status_code, refusal, body=body, exchanges=tuple(exchanges)
                )
                return _Undecided(refused, retryable=False)
        if not isinstance(body, dict):
            entry = self.config.codes.lookup(None, response.status_code)
            description = "The response was not a JSON object"
        elif response.status_code >= 500 and entry.disposition is not Disposition.OVERLOADED:
            entry = _as_ambiguous(entry)
        if entry.disposition is Disposition.SUCCESS and response.is_success:
            return _build_result(result_type, operation, response.status_code, body, exchanges)
        if (
            operation is Operation.QUERY_STATUS
            and entry.code in NOT_FOUND_CODES
            and response.status_code < 500
        ):  # a definite answer about what was asked for: no retry, the caller decides
            return _build_result(result_type, operation, response.status_code, body, exchanges)
        if entry.disposition is Disposition.SUCCESS:  # INS-0 with an error status: untrusted
            entry = _as_ambiguous(entry)
        error = error_for_answer(
            operation,
            entry,
            response.status_code,
            description or entry.description,
            body=body,
            exchanges=tuple(exchanges),
        )
        retryable = entry.disposition in (Disposition.OVERLOADED, Disposition.AMBIGUOUS)
        return _Undecided(error, retryable=retryable)

    async def _backoff(self, attempt: int) -> None:
        config = self.config
        await self._sleep(
            backoff_delay(attempt, config.backoff_base, config.backoff_max, self._jitter())
        )

    def _transport_error(
        self,
        operation: Operation,
        exc: httpx.TransportError,
        never_sent: bool,
        exchanges: list[ProviderExchange],
    ) -> PaymentProviderError:
        error: PaymentProviderError
        if never_sent:
            error = ProviderUnavailableError(
                f"could not reach M-Pesa ({type(exc).__name__}); the request was not sent."
                " If this persists, check that outbound port"
                f" {OPERATIONS[operation].port} is open",
                details={"reason": type(exc).__name__},
                exchanges=tuple(exchanges),
            )
        elif OPERATIONS[operation].moves_money:
            error = PaymentOutcomeUnknownError(
                f"no answer from M-Pesa ({type(exc).__name__}) after the request was sent;"
                " the outcome is unknown until a status query settles it",
                details={"reason": type(exc).__name__},
                exchanges=tuple(exchanges),
            )
        else:
            error = ProviderUnavailableError(
                f"M-Pesa did not answer the {operation.value} request ({type(exc).__name__})",
                details={"reason": type(exc).__name__},
                exchanges=tuple(exchanges),
            )
        return error


def _parse_body(response: httpx.Response) -> Any:
    """JSON object when the body is one, otherwise the (truncated) text: HTML pages happen."""
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text[:2000]


def _refusal_text(body: Any) -> str | None:
    """The text of an ``output_error`` answer that carries no response code."""
    if not isinstance(body, dict) or body.get("output_ResponseCode") not in (None, ""):
        return None
    text = body.get("output_error")
    if not isinstance(text, str) or not text.strip():
        return None
    return text.strip()[:255]


def _ids_in(body: Any) -> dict[str, str | None]:
    """Every ID an answer carried (error answers count too), for the error built from it."""
    if not isinstance(body, dict):
        return {}
    return {
        "provider_transaction_id": _id_in(body, "output_TransactionID"),
        "conversation_id": _id_in(body, "output_ConversationID"),
    }


def _id_in(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    text = value.strip() if isinstance(value, str) else ""
    return text if PROVIDER_ID.fullmatch(text) else None


def _as_ambiguous(entry: ResponseCode) -> ResponseCode:
    return ResponseCode(
        entry.code,
        entry.http_status,
        entry.description,
        "Query the status; the outcome is unknown",
        Disposition.AMBIGUOUS,
    )


def _build_result(
    result_type: type[R],
    operation: Operation,
    http_status: int,
    body: dict[str, Any],
    exchanges: list[ProviderExchange],
) -> R:
    def text(key: str) -> str | None:
        value = body.get(key)
        return str(value) if value not in (None, "") else None

    extra: dict[str, Any] = {}
    if result_type is TransactionStatusResult:
        extra["transaction_status"] = text("output_ResponseTransactionStatus")
    elif result_type is CustomerNameResult:
        extra["customer_name"] = text("output_CustomerName")
    return result_type(
        operation=operation,
        response_code=str(body.get("output_ResponseCode")),
        response_description=text("output_ResponseDesc") or "",
        http_status=http_status,
        provider_transaction_id=text("output_TransactionID"),
        conversation_id=text("output_ConversationID"),
        third_party_reference=text("output_ThirdPartyReference"),
        raw=body,
        exchanges=tuple(exchanges),
        **extra,
    )
