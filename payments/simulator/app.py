"""A stateful, fault-injecting simulator of the Vodacom M-Pesa Mozambique API.

It speaks the wire protocol of ``vodacom-mz-api.md`` §2: the same paths (all on one app, so no
port per operation), RSA bearer-token authentication, ``input_*`` fields, ``output_*`` answers, the
portal's response codes with their HTTP statuses, duplicate detection on
``input_ThirdPartyReference`` and status queries over everything it has recorded. C2B waits for the
"customer's PIN" (``pin_delay_seconds``) with ``asyncio.sleep``, so thousands of payments can wait
at once.

Use it in-process through ``transport.SimulatorTransport`` (tests, demo) or as a real server with
:func:`run_simulator` / ``python -m payments simulator --port 8001``.

Scripted outcomes by MSISDN (C2B and B2C; any amount):

| MSISDN | Outcome |
|---|---|
| any other valid `2588[45]XXXXXXX` | success INS-0 (201); recorded Completed |
| `258841000005` | INS-5 cancelled by customer (401); recorded Cancelled |
| `258841000006` | INS-6 transaction failed / wrong PIN (401); recorded Cancelled |
| `258841002006` | INS-2006 insufficient balance (422); recorded Cancelled |
| `258841000009` | INS-9 request timeout (408) after the PIN delay; recorded Expired |
| `258841000004` | INS-4 user is not active (401); not recorded |
| `258841000996` | INS-996 customer account not active (400); not recorded |
| `258841000001` | INS-1 internal error (500), but the payment was committed: recorded Completed |
| `258841000016` | INS-16 overloaded (503); not recorded |
| `258842000001` | fault: recorded Completed, then the connection is dropped with no response |
| `258842000002` | fault: recorded Completed, answer delayed by `slow_response_seconds` |
| `258842000003` | fault: recorded Completed, answer is HTTP 502 with an HTML page |
| `258842000004` | fault: recorded Completed, answer is HTTP 200 with truncated (malformed) JSON |
| `258842000005` | fault: HTTP 500 with an HTML body; not recorded |

Rules worth knowing (choices where the real provider's behaviour is not documented):

- Outcomes that need the customer (success, INS-5/6/9/2006/1 and faults 1-4) come after the PIN
  delay on C2B; refusals the provider can make up front (INS-4/996/16, fault 5) come at once.
  B2C never waits.
- The "customer" side of a C2B runs on its own: a client that gives up while the PIN is pending
  does not stop the payment, it is recorded when the delay ends. Until then a status query answers
  ``N/A`` and the reference is already taken (INS-10).
- Recorded entries (including Cancelled/Expired) consume their third-party reference; requests
  that were not recorded (validation errors, INS-4/996/16, fault 5) do not.
- A reversal is recorded as its own transaction (operation ``reversal``); a fully reversed payment
  still reports ``Completed``. Reversing more than what remains (including anything on a fully
  reversed payment) is INS-15; only Completed C2B/B2C/B2B payments can be reversed (else INS-18).
- A status query found by reference answers with the original payment's ConversationID and echoes
  the query's own ThirdPartyReference; it never carries a TransactionID.
- Absent, ``null`` and empty fields count as missing (INS-20). With ``check_origin`` a wrong or
  missing ``Origin`` header is INS-26 "Not authorized".
- Error bodies of money-moving calls carry an empty ``output_TransactionID``; auth failures carry
  only the code and description.

Control endpoints (not M-Pesa, no auth) live under ``/simulator/``: ``GET public-key``,
``GET stats``, ``GET transactions``, ``POST reset`` and ``PUT config``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import string
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ..mpesa.auth import decrypt_bearer_token
from ..mpesa.client import Operation
from ..mpesa.codes import ResponseCodeTable
from ..mpesa.values import mask_msisdn
from .keys import (
    SIMULATOR_API_KEY,
    SIMULATOR_INITIATOR_IDENTIFIER,
    SIMULATOR_PRIVATE_KEY_PEM,
    SIMULATOR_SECURITY_CREDENTIAL,
    SIMULATOR_SERVICE_PROVIDER_CODE,
)

__all__ = [
    "OPERATIONS",
    "SCRIPTED_OUTCOMES",
    "MpesaSimulator",
    "ScriptedOutcome",
    "SimulatedDisconnect",
    "SimulatedTransaction",
    "SimulatorConfig",
    "create_simulator_app",
    "run_simulator",
]

logger = logging.getLogger(__name__)

TransactionStatus = Literal["Completed", "Cancelled", "Expired"]
Fault = Literal["drop", "slow", "html_502", "malformed_json", "html_500"]

#: The provider operations (the SDK's list), in the order ``stats`` reports them.
OPERATIONS: tuple[Operation, ...] = tuple(Operation)

ALLOWED_ORIGINS = frozenset({"developer.mpesa.vm.co.mz", "*"})

_MSISDN = re.compile(r"2588[45]\d{7}")
_REFERENCE = re.compile(r"[A-Za-z0-9]{1,20}")
_AMOUNT_TEXT = re.compile(r"\d+(\.\d{1,2})?")
_PARTY_CODE = re.compile(r"\d{5,6}")
_ID_ALPHABET = string.ascii_lowercase + string.digits
_CENT = Decimal("0.01")
_INVALID_RECEIVER = "999999"
_TOKEN_CACHE_LIMIT = 4096

_CODES = ResponseCodeTable.default()


@dataclass
class SimulatorConfig:
    api_key: str = SIMULATOR_API_KEY
    private_key_pem: str = SIMULATOR_PRIVATE_KEY_PEM
    service_provider_code: str = SIMULATOR_SERVICE_PROVIDER_CODE
    initiator_identifier: str = SIMULATOR_INITIATOR_IDENTIFIER
    security_credential: str = SIMULATOR_SECURITY_CREDENTIAL
    pin_delay_seconds: float = 0.0  # how long C2B waits for the "customer's PIN"
    slow_response_seconds: float = 300.0  # delay of the scripted slow number
    check_origin: bool = False
    # Switches for behaviour the wire reference leaves open (§8); the defaults are the guesses
    # the module must not depend on. Each has a test of the module's behaviour under it.
    #: False: a third-party reference is no query reference (§8 Q2): such a query is not found.
    query_by_third_party_reference: bool = True
    #: INS-10 also needs the same ``input_TransactionReference`` (§8 Q4: which fields?).
    duplicates_match_transaction_reference: bool = False
    #: INS-10 only within this many seconds of the earlier request (§8 Q4: window?); None: forever.
    duplicate_window_seconds: float | None = None
    #: Not found answers INS-23 (400) instead of INS-0 with status N/A.
    not_found_as_ins_23: bool = False
    #: A status answer carries its own ConversationID, not the original's (§2.2 vs §2.6 examples).
    status_answer_own_conversation_id: bool = False
    #: Every API call is refused with ``{"output_error": <this text>}`` (HTTP 401), no code.
    refusal_output_error: str | None = None
    #: Every answer carries a header with non-ASCII bytes (§1: strict parsers reject them).
    non_ascii_header: bool = False
    #: The gateway's own C2B timeout (the real one: about 66 s, §5.1): a customer slower than
    #: this gets INS-9 at this time, and the payment is recorded Expired. None: no timeout.
    c2b_server_timeout_seconds: float | None = None
    #: queryCustomerName answers INS-26 "Not authorized", as the real sandbox does (§2.7).
    customer_name_not_authorized: bool = False
    #: ConversationIDs shaped like the portal's example ``AG_20180206_00005e7dccc6da08efa8``.
    portal_conversation_ids: bool = False


@dataclass(frozen=True, slots=True)
class ScriptedOutcome:
    """What the simulator does for one MSISDN (see the module docstring's table)."""

    code: str  # the answer's response code ("" for faults that answer with no M-Pesa body)
    recorded_status: TransactionStatus | None  # None: nothing is recorded
    after_pin: bool  # C2B answers only after the PIN delay
    fault: Fault | None = None


_SUCCESS = ScriptedOutcome("INS-0", "Completed", after_pin=True)
_SERVER_TIMEOUT = ScriptedOutcome("INS-9", "Expired", after_pin=True)

SCRIPTED_OUTCOMES: Mapping[str, ScriptedOutcome] = {
    "258841000005": ScriptedOutcome("INS-5", "Cancelled", after_pin=True),
    "258841000006": ScriptedOutcome("INS-6", "Cancelled", after_pin=True),
    "258841002006": ScriptedOutcome("INS-2006", "Cancelled", after_pin=True),
    "258841000009": ScriptedOutcome("INS-9", "Expired", after_pin=True),
    "258841000004": ScriptedOutcome("INS-4", None, after_pin=False),
    "258841000996": ScriptedOutcome("INS-996", None, after_pin=False),
    "258841000001": ScriptedOutcome("INS-1", "Completed", after_pin=True),
    "258841000016": ScriptedOutcome("INS-16", None, after_pin=False),
    "258842000001": ScriptedOutcome("", "Completed", after_pin=True, fault="drop"),
    "258842000002": ScriptedOutcome("INS-0", "Completed", after_pin=True, fault="slow"),
    "258842000003": ScriptedOutcome("", "Completed", after_pin=True, fault="html_502"),
    "258842000004": ScriptedOutcome("INS-0", "Completed", after_pin=True, fault="malformed_json"),
    "258842000005": ScriptedOutcome("", None, after_pin=False, fault="html_500"),
}


@dataclass
class SimulatedTransaction:
    operation: Operation
    transaction_id: str
    conversation_id: str
    third_party_reference: str
    msisdn: str | None
    amount: Decimal
    status: TransactionStatus
    reversed_amount: Decimal = Decimal("0.00")
    created: datetime = field(default_factory=lambda: datetime.now(UTC))
    transaction_reference: str | None = None
    response_code: str = "INS-0"
    receiver_party_code: str | None = None
    original_transaction_id: str | None = None  # reversals: the payment they reverse

    @property
    def remaining_amount(self) -> Decimal:
        return self.amount - self.reversed_amount

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["amount"] = f"{self.amount:.2f}"
        data["reversed_amount"] = f"{self.reversed_amount:.2f}"
        data["created"] = self.created.isoformat()
        return data


class SimulatedDisconnect(Exception):
    """Raised by the simulator after starting a response it will never finish.

    A real server (uvicorn) then aborts the connection; :class:`SimulatorTransport` turns it into
    ``httpx.RemoteProtocolError``.
    """


class _ProviderError(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class _DroppedConnectionResponse(Response):
    """Starts a response promising a body, then drops the connection without sending it."""

    def __init__(self) -> None:
        super().__init__(status_code=200, media_type="application/json")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"4096"),
                ],
            }
        )
        raise SimulatedDisconnect("simulated connection drop")


#: A header value a strict parser rejects: "Transação aceite" in Latin-1 (not ASCII, not UTF-8).
NON_ASCII_HEADER = (b"x-gateway-note", "Transação aceite".encode("latin-1"))


class _NonAsciiHeaderMiddleware:
    """Adds ``NON_ASCII_HEADER`` to every answer while ``non_ascii_header`` is on."""

    def __init__(self, app: ASGIApp, simulator: MpesaSimulator) -> None:
        self.app = app
        self.simulator = simulator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.simulator.config.non_ascii_header:
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), NON_ASCII_HEADER]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class _QuietDisconnectFilter(logging.Filter):
    """Keeps uvicorn from logging a traceback for every deliberate connection drop."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, SimulatedDisconnect)


def _install_quiet_disconnect_filter() -> None:
    uvicorn_logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietDisconnectFilter) for f in uvicorn_logger.filters):
        uvicorn_logger.addFilter(_QuietDisconnectFilter())


def _new_transaction_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))


def _new_conversation_id() -> str:
    return secrets.token_hex(16)


def _parse_amount(value: object) -> Decimal:
    """A positive amount with at most two decimals, as a JSON string or number; else INS-15."""
    if isinstance(value, bool):
        raise _ProviderError("INS-15")
    try:
        if isinstance(value, str):
            if not _AMOUNT_TEXT.fullmatch(value):
                raise _ProviderError("INS-15")
            amount = Decimal(value)
        elif isinstance(value, int):
            amount = Decimal(value)
        elif isinstance(value, float):
            amount = Decimal(repr(value))
        else:
            raise _ProviderError("INS-15")
    except InvalidOperation:
        raise _ProviderError("INS-15") from None
    if not amount.is_finite() or amount <= 0 or amount != amount.quantize(_CENT):
        raise _ProviderError("INS-15")
    return amount.quantize(_CENT)


def _text(value: object) -> str:
    """A field value as text: strings as they are, integers tolerated; anything else INS-21."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise _ProviderError("INS-21")


def _require(payload: Mapping[str, object], *names: str) -> None:
    for name in names:
        value = payload.get(name)
        if value is None or value == "":
            raise _ProviderError("INS-20")


def _check(pattern: re.Pattern[str], value: str, code: str) -> str:
    if not pattern.fullmatch(value):
        raise _ProviderError(code)
    return value


_FIRST_NAMES = ("Joao", "Maria", "Carlos", "Ana", "Jose", "Fatima", "Antonio", "Lurdes", "Paulo")
_SURNAMES = ("Macamo", "Sitoe", "Mondlane", "Cossa", "Tembe", "Chissano", "Nhantumbo", "Langa")


def _mask_word(word: str, *, keep_last: bool) -> str:
    if keep_last and len(word) >= 4:
        return word[:2] + "*" * (len(word) - 3) + word[-1]
    return word[:2] + "*" * max(len(word) - 2, 1)


def masked_customer_name(msisdn: str) -> str:
    """A deterministic, obfuscated name for a number, e.g. ``Jo*o Ma****``."""
    digest = hashlib.sha256(msisdn.encode()).digest()
    first = _FIRST_NAMES[digest[0] % len(_FIRST_NAMES)]
    last = _SURNAMES[digest[1] % len(_SURNAMES)]
    return f"{_mask_word(first, keep_last=True)} {_mask_word(last, keep_last=False)}"


_HTML_502 = (
    "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1>"
    "</center><hr><center>nginx</center></body></html>"
)
_HTML_500 = (
    "<html><head><title>500 Internal Server Error</title></head><body><h1>Internal Server Error"
    "</h1><p>The server encountered an internal error.</p></body></html>"
)
_MALFORMED_JSON = '{"output_ResponseCode": "INS-0", '


class MpesaSimulator:
    """The simulator's state (recorded transactions, call counters) and its FastAPI app."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self._app: FastAPI | None = None
        self._private_key: rsa.RSAPrivateKey | None = None
        self._private_key_pem: str | None = None
        self._decrypted_tokens: dict[str, str] = {}
        self._settlements: set[asyncio.Task[SimulatedTransaction | None]] = set()
        self.reset()

    # ----------------------------------------------------------------------------- inspection

    def calls(self, operation: str | None = None) -> int:
        """Provider calls received: all of them, or those of one operation (see OPERATIONS)."""
        if operation is None:
            return sum(self._calls.values())
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}; expected one of {OPERATIONS}")
        return self._calls[operation]

    def calls_for_reference(self, third_party_reference: str) -> int:
        """Money-moving calls (accepted or not) that carried this ``input_ThirdPartyReference``."""
        return self._reference_calls[third_party_reference]

    def transactions(self) -> list[SimulatedTransaction]:
        return list(self._transactions)

    def find(
        self, reference: str, *, by_third_party_reference: bool = True
    ) -> SimulatedTransaction | None:
        """A recorded transaction by TransactionID, ConversationID or ThirdPartyReference."""
        return (
            self._by_transaction_id.get(reference)
            or self._by_conversation_id.get(reference)
            or (self._by_reference.get(reference) if by_third_party_reference else None)
        )

    def reset(self) -> None:
        """Forget every transaction and counter (pending PINs are abandoned)."""
        for task in self._settlements:
            task.cancel()
        self._settlements = set()
        self._calls: Counter[str] = Counter()
        self._reference_calls: Counter[str] = Counter()
        self._transactions: list[SimulatedTransaction] = []
        self._by_transaction_id: dict[str, SimulatedTransaction] = {}
        self._by_conversation_id: dict[str, SimulatedTransaction] = {}
        self._by_reference: dict[str, SimulatedTransaction] = {}
        self._claims: dict[tuple[str, str | None], SimulatedTransaction] = {}
        self._pending_claims: set[tuple[str, str | None]] = set()

    def stats(self) -> dict[str, Any]:
        return {"calls": {op: self._calls[op] for op in OPERATIONS}, "total": self.calls()}

    # ------------------------------------------------------------------------------------ app

    def app(self) -> FastAPI:
        """The simulator's FastAPI app (built once; ``app.state.simulator`` is this object)."""
        if self._app is None:
            self._app = self._build_app()
        return self._app

    def _build_app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(_: FastAPI) -> Any:
            _install_quiet_disconnect_filter()
            yield

        app = FastAPI(
            title="M-Pesa Mozambique simulator",
            redirect_slashes=False,
            lifespan=lifespan,
            docs_url="/simulator/docs",
            openapi_url="/simulator/openapi.json",
            redoc_url=None,
        )
        app.state.simulator = self
        app.add_middleware(_NonAsciiHeaderMiddleware, simulator=self)

        app.add_api_route(
            "/ipg/v1x/c2bPayment/singleStage/", self._c2b, methods=["POST"], name="c2b"
        )
        app.add_api_route("/ipg/v1x/b2cPayment/", self._b2c, methods=["POST"], name="b2c")
        app.add_api_route("/ipg/v1x/b2bPayment/", self._b2b, methods=["POST"], name="b2b")
        app.add_api_route("/ipg/v1x/reversal/", self._reversal, methods=["PUT"], name="reversal")
        app.add_api_route(
            "/ipg/v1x/queryTransactionStatus/",
            self._query_status,
            methods=["GET"],
            name="query_status",
        )
        app.add_api_route(
            "/ipg/v1x/queryCustomerName/",
            self._query_customer_name,
            methods=["GET"],
            name="query_customer_name",
        )
        app.add_api_route("/simulator/public-key", self._public_key_endpoint, methods=["GET"])
        app.add_api_route("/simulator/stats", self._stats_endpoint, methods=["GET"])
        app.add_api_route("/simulator/transactions", self._transactions_endpoint, methods=["GET"])
        app.add_api_route("/simulator/reset", self._reset_endpoint, methods=["POST"])
        app.add_api_route("/simulator/config", self._config_endpoint, methods=["PUT"])
        return app

    # ----------------------------------------------------------------------------------- auth

    def private_key(self) -> rsa.RSAPrivateKey:
        if self._private_key is None or self._private_key_pem != self.config.private_key_pem:
            key = serialization.load_pem_private_key(
                self.config.private_key_pem.encode(), password=None
            )
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ValueError("the simulator's private key must be an RSA key")
            self._private_key = key
            self._private_key_pem = self.config.private_key_pem
            self._decrypted_tokens.clear()
        return self._private_key

    def public_key_base64(self) -> str:
        der = (
            self.private_key()
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return base64.b64encode(der).decode("ascii")

    def _decrypt(self, token: str) -> str | None:
        private_key = self.private_key()
        cached = self._decrypted_tokens.get(token)
        if cached is not None:
            return cached
        try:
            api_key = decrypt_bearer_token(token, private_key)
        except (ValueError, TypeError):
            return None
        if len(self._decrypted_tokens) >= _TOKEN_CACHE_LIMIT:
            self._decrypted_tokens.clear()
        self._decrypted_tokens[token] = api_key
        return api_key

    def _auth_error(self, request: Request) -> Response | None:
        if self.config.refusal_output_error:
            return JSONResponse({"output_error": self.config.refusal_output_error}, status_code=401)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        api_key = self._decrypt(token) if scheme.lower() == "bearer" and token else None
        if api_key is None or not hmac.compare_digest(
            api_key.encode("utf-8"), self.config.api_key.encode("utf-8")
        ):
            code = _CODES.lookup("INS-2")
            return JSONResponse(
                {"output_ResponseCode": code.code, "output_ResponseDesc": code.description},
                status_code=code.http_status,
            )
        if self.config.check_origin and request.headers.get("origin") not in ALLOWED_ORIGINS:
            code = _CODES.lookup("INS-26")
            return JSONResponse(
                {"output_ResponseCode": code.code, "output_ResponseDesc": code.description},
                status_code=code.http_status,
            )
        return None

    # ------------------------------------------------------------------------------ responses

    @staticmethod
    def _body(code: str, **outputs: str) -> tuple[dict[str, str], int]:
        entry = _CODES.lookup(code)
        body = {"output_ResponseCode": entry.code, "output_ResponseDesc": entry.description}
        body.update({f"output_{name}": value for name, value in outputs.items()})
        return body, entry.http_status

    def _money_answer(
        self,
        code: str,
        *,
        conversation_id: str,
        reference: str,
        transaction_id: str = "",
        success_status: int = 200,
    ) -> JSONResponse:
        body, status = self._body(
            code,
            TransactionID=transaction_id,
            ConversationID=conversation_id,
            ThirdPartyReference=reference,
        )
        return JSONResponse(body, status_code=success_status if code == "INS-0" else status)

    # ---------------------------------------------------------------------- money-moving calls

    async def _read_object(self, request: Request) -> dict[str, object] | None:
        raw = await request.body()
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None
        return payload if isinstance(payload, dict) else None

    async def _money_call(
        self,
        request: Request,
        operation: Operation,
        handle: Callable[[dict[str, object]], Awaitable[Response]],
    ) -> Response:
        self._calls[operation] += 1
        payload = await self._read_object(request)
        raw_reference = payload.get("input_ThirdPartyReference") if payload else None
        echo = raw_reference if isinstance(raw_reference, str) else ""
        if echo:
            self._reference_calls[echo] += 1
        denied = self._auth_error(request)
        if denied is not None:
            return denied
        try:
            if payload is None:
                raise _ProviderError("INS-21")
            return await handle(payload)
        except _ProviderError as error:
            return self._money_answer(
                error.code,
                conversation_id=self._conversation_id(),
                reference=echo,
            )

    def _claim_key(
        self, reference: str, transaction_reference: str | None
    ) -> tuple[str, str | None]:
        """What INS-10 compares: the third-party reference, and with
        ``duplicates_match_transaction_reference`` the transaction reference too."""
        if self.config.duplicates_match_transaction_reference:
            return reference, transaction_reference
        return reference, None

    def _claim_reference(self, reference: str, transaction_reference: str | None = None) -> None:
        key = self._claim_key(reference, transaction_reference)
        if key in self._pending_claims:
            raise _ProviderError("INS-10")
        earlier = self._claims.get(key)
        if earlier is None:
            return
        window = self.config.duplicate_window_seconds
        if window is None or (datetime.now(UTC) - earlier.created).total_seconds() <= window:
            raise _ProviderError("INS-10")

    def _record(self, transaction: SimulatedTransaction) -> SimulatedTransaction:
        self._transactions.append(transaction)
        self._by_transaction_id[transaction.transaction_id] = transaction
        self._by_conversation_id[transaction.conversation_id] = transaction
        self._by_reference[transaction.third_party_reference] = transaction
        key = self._claim_key(transaction.third_party_reference, transaction.transaction_reference)
        self._claims[key] = transaction
        return transaction

    def _conversation_id(self) -> str:
        if self.config.portal_conversation_ids:
            return f"AG_{datetime.now(UTC):%Y%m%d}_{secrets.token_hex(10)}"
        return _new_conversation_id()

    async def _c2b(self, request: Request) -> Response:
        return await self._money_call(
            request, Operation.C2B, lambda payload: self._customer_payment(payload, Operation.C2B)
        )

    async def _b2c(self, request: Request) -> Response:
        return await self._money_call(
            request, Operation.B2C, lambda payload: self._customer_payment(payload, Operation.B2C)
        )

    async def _customer_payment(self, payload: dict[str, object], operation: Operation) -> Response:
        _require(
            payload,
            "input_TransactionReference",
            "input_CustomerMSISDN",
            "input_Amount",
            "input_ThirdPartyReference",
            "input_ServiceProviderCode",
        )
        msisdn = _check(_MSISDN, _text(payload["input_CustomerMSISDN"]), "INS-2051")
        amount = _parse_amount(payload["input_Amount"])
        transaction_reference = _check(
            _REFERENCE, _text(payload["input_TransactionReference"]), "INS-17"
        )
        reference = _check(_REFERENCE, _text(payload["input_ThirdPartyReference"]), "INS-19")
        if _text(payload["input_ServiceProviderCode"]) != self.config.service_provider_code:
            raise _ProviderError("INS-13")
        self._claim_reference(reference, transaction_reference)

        script = SCRIPTED_OUTCOMES.get(msisdn, _SUCCESS)
        delay = self.config.pin_delay_seconds if operation is Operation.C2B else 0.0
        server_timeout = self.config.c2b_server_timeout_seconds
        if operation is Operation.C2B and server_timeout is not None and script.after_pin:
            if script.code == "INS-9" or delay > server_timeout:
                # The customer did not answer in time: the gateway gives up and says so.
                script, delay = _SERVER_TIMEOUT, server_timeout
        conversation_id = self._conversation_id()
        if script.fault == "html_500":
            return HTMLResponse(_HTML_500, status_code=500)
        if script.recorded_status is None:
            return self._money_answer(
                script.code, conversation_id=conversation_id, reference=reference
            )

        transaction = SimulatedTransaction(
            operation=operation,
            transaction_id=_new_transaction_id(),
            conversation_id=conversation_id,
            third_party_reference=reference,
            msisdn=msisdn,
            amount=amount,
            status=script.recorded_status,
            transaction_reference=transaction_reference,
            response_code=script.code or "INS-0",
        )
        if delay > 0:
            # The customer side runs on its own: a client giving up does not stop the payment.
            self._pending_claims.add(self._claim_key(reference, transaction_reference))
            task = asyncio.get_running_loop().create_task(self._settle(transaction, delay))
            self._settlements.add(task)
            task.add_done_callback(self._settlements.discard)
            await asyncio.shield(task)
        else:
            self._record(transaction)
        return await self._answer(script, transaction)

    async def _settle(self, transaction: SimulatedTransaction, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
            transaction.created = datetime.now(UTC)
            self._record(transaction)
        finally:
            reference = transaction.third_party_reference
            self._pending_claims.discard(
                self._claim_key(reference, transaction.transaction_reference)
            )

    async def _answer(self, script: ScriptedOutcome, transaction: SimulatedTransaction) -> Response:
        if script.fault == "drop":
            logger.info("simulator: dropping the connection of %s", transaction.transaction_id)
            return _DroppedConnectionResponse()
        if script.fault == "html_502":
            return HTMLResponse(_HTML_502, status_code=502)
        if script.fault == "malformed_json":
            return Response(_MALFORMED_JSON, status_code=200, media_type="application/json")
        if script.fault == "slow":
            await asyncio.sleep(self.config.slow_response_seconds)
        succeeded = script.code == "INS-0"
        return self._money_answer(
            script.code,
            conversation_id=transaction.conversation_id,
            reference=transaction.third_party_reference,
            transaction_id=transaction.transaction_id if succeeded else "",
            success_status=201,
        )

    async def _b2b(self, request: Request) -> Response:
        return await self._money_call(
            request, Operation.B2B, lambda payload: self._business_payment(payload)
        )

    async def _business_payment(self, payload: dict[str, object]) -> Response:
        _require(
            payload,
            "input_TransactionReference",
            "input_Amount",
            "input_ThirdPartyReference",
            "input_PrimaryPartyCode",
            "input_ReceiverPartyCode",
        )
        amount = _parse_amount(payload["input_Amount"])
        transaction_reference = _check(
            _REFERENCE, _text(payload["input_TransactionReference"]), "INS-17"
        )
        reference = _check(_REFERENCE, _text(payload["input_ThirdPartyReference"]), "INS-19")
        if _text(payload["input_PrimaryPartyCode"]) != self.config.service_provider_code:
            raise _ProviderError("INS-13")
        receiver = _text(payload["input_ReceiverPartyCode"])
        if not _PARTY_CODE.fullmatch(receiver) or receiver == _INVALID_RECEIVER:
            raise _ProviderError("INS-2002")
        self._claim_reference(reference, transaction_reference)
        transaction = self._record(
            SimulatedTransaction(
                operation=Operation.B2B,
                transaction_id=_new_transaction_id(),
                conversation_id=self._conversation_id(),
                third_party_reference=reference,
                msisdn=None,
                amount=amount,
                status="Completed",
                transaction_reference=transaction_reference,
                receiver_party_code=receiver,
            )
        )
        return self._money_answer(
            "INS-0",
            conversation_id=transaction.conversation_id,
            reference=reference,
            transaction_id=transaction.transaction_id,
            success_status=201,
        )

    async def _reversal(self, request: Request) -> Response:
        return await self._money_call(
            request, Operation.REVERSAL, lambda payload: self._reverse(payload)
        )

    async def _reverse(self, payload: dict[str, object]) -> Response:
        _require(
            payload,
            "input_TransactionID",
            "input_SecurityCredential",
            "input_InitiatorIdentifier",
            "input_ThirdPartyReference",
            "input_ServiceProviderCode",
        )
        reference = _check(_REFERENCE, _text(payload["input_ThirdPartyReference"]), "INS-19")
        if _text(payload["input_ServiceProviderCode"]) != self.config.service_provider_code:
            raise _ProviderError("INS-13")
        if not hmac.compare_digest(
            _text(payload["input_InitiatorIdentifier"]).encode(),
            self.config.initiator_identifier.encode(),
        ):
            raise _ProviderError("INS-24")
        if not hmac.compare_digest(
            _text(payload["input_SecurityCredential"]).encode(),
            self.config.security_credential.encode(),
        ):
            raise _ProviderError("INS-25")
        raw_amount = payload.get("input_ReversalAmount")
        requested = None if raw_amount in (None, "") else _parse_amount(raw_amount)
        self._claim_reference(reference)
        original = self._by_transaction_id.get(_text(payload["input_TransactionID"]))
        if (
            original is None
            or original.operation == Operation.REVERSAL
            or original.status != "Completed"
        ):
            raise _ProviderError("INS-18")
        amount = original.remaining_amount if requested is None else requested
        if amount <= 0 or amount > original.remaining_amount:
            raise _ProviderError("INS-15")
        original.reversed_amount += amount
        reversal = self._record(
            SimulatedTransaction(
                operation=Operation.REVERSAL,
                transaction_id=_new_transaction_id(),
                conversation_id=self._conversation_id(),
                third_party_reference=reference,
                msisdn=original.msisdn,
                amount=amount,
                status="Completed",
                original_transaction_id=original.transaction_id,
            )
        )
        return self._money_answer(
            "INS-0",
            conversation_id=reversal.conversation_id,
            reference=reference,
            transaction_id=reversal.transaction_id,
        )

    # -------------------------------------------------------------------------------- queries

    async def _query_status(self, request: Request) -> Response:
        self._calls[Operation.QUERY_STATUS] += 1
        denied = self._auth_error(request)
        if denied is not None:
            return denied
        params = dict(request.query_params)
        echo = params.get("input_ThirdPartyReference", "")
        try:
            _require(
                params,
                "input_ThirdPartyReference",
                "input_QueryReference",
                "input_ServiceProviderCode",
            )
            _check(_REFERENCE, echo, "INS-19")
            if params["input_ServiceProviderCode"] != self.config.service_provider_code:
                raise _ProviderError("INS-13")
        except _ProviderError as error:
            body, status = self._body(
                error.code, ConversationID=self._conversation_id(), ThirdPartyReference=echo
            )
            return JSONResponse(body, status_code=status)
        found = self.find(
            params["input_QueryReference"],
            by_third_party_reference=self.config.query_by_third_party_reference,
        )
        if found is None and self.config.not_found_as_ins_23:
            body, status = self._body(
                "INS-23", ConversationID=self._conversation_id(), ThirdPartyReference=echo
            )
            return JSONResponse(body, status_code=status)
        conversation_id = (
            found.conversation_id
            if found is not None and not self.config.status_answer_own_conversation_id
            else self._conversation_id()
        )
        body, _ = self._body(
            "INS-0",
            ResponseTransactionStatus=found.status if found else "N/A",
            ConversationID=conversation_id,
            ThirdPartyReference=echo,
        )
        return JSONResponse(body, status_code=200)

    async def _query_customer_name(self, request: Request) -> Response:
        self._calls[Operation.QUERY_CUSTOMER_NAME] += 1
        denied = self._auth_error(request)
        if denied is not None:
            return denied
        params = dict(request.query_params)
        echo = params.get("input_ThirdPartyReference", "")
        conversation_id = self._conversation_id()
        try:
            _require(
                params,
                "input_CustomerMSISDN",
                "input_ThirdPartyReference",
                "input_ServiceProviderCode",
            )
            msisdn = _check(_MSISDN, params["input_CustomerMSISDN"], "INS-2051")
            _check(_REFERENCE, echo, "INS-19")
            if params["input_ServiceProviderCode"] != self.config.service_provider_code:
                raise _ProviderError("INS-13")
            if self.config.customer_name_not_authorized:
                raise _ProviderError("INS-26")
        except _ProviderError as error:
            body, status = self._body(
                error.code,
                ConversationID=conversation_id,
                ThirdPartyReference=echo,
                CustomerName="N/A",
            )
            return JSONResponse(body, status_code=status)
        body, _ = self._body(
            "INS-0",
            ConversationID=conversation_id,
            ThirdPartyReference=echo,
            CustomerName=masked_customer_name(msisdn),
        )
        return JSONResponse(body, status_code=200)

    # ----------------------------------------------------------------------- control endpoints

    async def _public_key_endpoint(self, request: Request) -> Response:
        return JSONResponse(
            {
                "public_key": self.public_key_base64(),
                "api_key": self.config.api_key,
                "api_key_hint": "the simulator's demo API key (not a secret; never use it with"
                " Vodacom): encrypt it with public_key (RSA PKCS#1 v1.5) for the bearer token",
                "service_provider_code": self.config.service_provider_code,
            }
        )

    async def _stats_endpoint(self, request: Request) -> Response:
        return JSONResponse(self.stats())

    async def _transactions_endpoint(self, request: Request) -> Response:
        # Full numbers stay inside the process; what the simulator shows is masked.
        return JSONResponse(
            [
                {**entry, "msisdn": mask_msisdn(entry["msisdn"]) if entry["msisdn"] else None}
                for entry in (t.to_dict() for t in self._transactions)
            ]
        )

    async def _reset_endpoint(self, request: Request) -> Response:
        self.reset()
        return JSONResponse({"reset": True})

    def _public_config(self) -> dict[str, object]:
        settable = {name: getattr(self.config, name) for name in _SETTABLE}
        return settable | {"service_provider_code": self.config.service_provider_code}

    async def _config_endpoint(self, request: Request) -> Response:
        payload = await self._read_object(request)
        if payload is None:
            return JSONResponse({"detail": "body must be a JSON object"}, status_code=400)
        unknown = set(payload) - set(_SETTABLE)
        if unknown:
            return JSONResponse({"detail": f"unknown settings: {sorted(unknown)}"}, status_code=400)
        changes: dict[str, Any] = {}
        for name, value in payload.items():
            kind = _SETTABLE[name]
            if value is None and kind.endswith("?"):
                changes[name] = None
            elif kind.startswith("seconds"):
                if (
                    isinstance(value, bool)
                    or not isinstance(value, int | float)
                    or not 0 <= value < float("inf")
                ):
                    return JSONResponse(
                        {"detail": f"{name} must be a non-negative number"}, status_code=400
                    )
                changes[name] = float(value)
            elif kind == "flag":
                if not isinstance(value, bool):
                    return JSONResponse({"detail": f"{name} must be a boolean"}, status_code=400)
                changes[name] = value
            else:  # text?
                if not isinstance(value, str) or not value:
                    return JSONResponse(
                        {"detail": f"{name} must be a non-empty string or null"}, status_code=400
                    )
                changes[name] = value
        for name, value in changes.items():
            setattr(self.config, name, value)
        return JSONResponse(self._public_config())


#: What ``PUT /simulator/config`` may change, and its kind (``?``: may be null).
_SETTABLE: dict[str, str] = {
    "pin_delay_seconds": "seconds",
    "slow_response_seconds": "seconds",
    "check_origin": "flag",
    "query_by_third_party_reference": "flag",
    "duplicates_match_transaction_reference": "flag",
    "duplicate_window_seconds": "seconds?",
    "not_found_as_ins_23": "flag",
    "status_answer_own_conversation_id": "flag",
    "refusal_output_error": "text?",
    "non_ascii_header": "flag",
    "c2b_server_timeout_seconds": "seconds?",
    "customer_name_not_authorized": "flag",
    "portal_conversation_ids": "flag",
}


def create_simulator_app(config: SimulatorConfig | None = None) -> FastAPI:
    """A new simulator app; ``app.state.simulator`` is its :class:`MpesaSimulator`."""
    return MpesaSimulator(config).app()


def run_simulator(
    host: str = "127.0.0.1", port: int = 8001, config: SimulatorConfig | None = None
) -> None:
    """Serve the simulator with uvicorn (blocks until stopped)."""
    _install_quiet_disconnect_filter()
    # No access log: GET query strings carry full MSISDNs.
    uvicorn.run(create_simulator_app(config), host=host, port=port, access_log=False)
