"""Async client for the Vodacom M-Pesa Mozambique API: wire fields in, typed results or errors out.

The only module that sends requests: the hosts, the headers and each operation's ``input_*``
fields. ``operations`` lists the operations (ports, paths, retry policies), ``results`` parses
answers and ``answers`` decides what they mean. A call is attempts, each one exchange and its
classification, repeated while the operation's retry policy allows. It knows nothing of the
database or FastAPI.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx

from .. import metrics
from ..config import PROVIDER_HOSTS, PaymentSettings
from ..exceptions import (
    InvalidPaymentRequestError,
    PaymentConfigurationError,
    PaymentProviderError,
)
from ..logger import payment_logger
from ..redaction import sanitize
from .answers import Undecided, classify, error_for_answer, refusal_error, transport_error
from .auth import MpesaAuth
from .codes import AUTH_CODES, ResponseCodeTable
from .operations import (
    NEVER_SENT,
    OPERATIONS,
    Operation,
    OperationSpec,
    RetryPolicy,
    backoff_delay,
    should_retry,
)
from .results import (
    CustomerNameResult,
    ProviderExchange,
    ProviderResult,
    R,
    TransactionStatusResult,
    parse_body,
)
from .transport import AiohttpTransport
from .values import (
    Msisdn,
    format_amount,
    parse_amount,
    validate_provider_id,
    validate_reference,
    validate_shortcode,
)

# The names hosts and tests import from here, wherever they are defined now.
__all__ = [
    "OPERATIONS",
    "USER_AGENT",
    "ClientConfig",
    "CustomerNameResult",
    "MpesaClient",
    "Operation",
    "OperationSpec",
    "ProviderExchange",
    "ProviderResult",
    "R",
    "RetryPolicy",
    "TransactionStatusResult",
    "backoff_delay",
    "error_for_answer",
    "refusal_error",
    "should_retry",
]

USER_AGENT = "payments-mpesa-mz/0.1"


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
        fields = self._wallet_payment_fields(
            msisdn, amount, transaction_reference, third_party_reference
        )
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
        fields = self._wallet_payment_fields(
            msisdn, amount, transaction_reference, third_party_reference
        )
        return await self._call(Operation.B2C, fields, ProviderResult)

    def _wallet_payment_fields(
        self,
        msisdn: Msisdn,
        amount: Decimal,
        transaction_reference: str,
        third_party_reference: str,
    ) -> dict[str, str]:
        """C2B and B2C send the same fields, in this order, to their own paths."""
        return {
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
                never_sent = isinstance(answer, NEVER_SENT)
                if should_retry(
                    retry, attempt=attempt, max_attempts=max_attempts, never_sent=never_sent
                ):
                    await self._backoff(attempt)
                    continue
                raise transport_error(operation, answer, never_sent, exchanges) from answer
            response, body = answer
            decided = classify(operation, response, body, result_type, exchanges, self.config.codes)
            if not isinstance(decided, Undecided):
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
                request_sent=not isinstance(exc, NEVER_SENT),
            )
            return exc

        elapsed_ms = (time.perf_counter() - started) * 1000
        body = parse_body(response)
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

    async def _backoff(self, attempt: int) -> None:
        config = self.config
        await self._sleep(
            backoff_delay(attempt, config.backoff_base, config.backoff_max, self._jitter())
        )
