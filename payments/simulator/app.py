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

from collections.abc import Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..mpesa.operations import Operation
from ..mpesa.values import mask_msisdn
from . import operations
from .auth import ALLOWED_ORIGINS, BearerTokens, auth_refusal, public_key_base64
from .config import SimulatorConfig, apply_settings, public_settings
from .faults import NON_ASCII_HEADER, NonAsciiHeaderMiddleware, SimulatedDisconnect
from .operations import Handler, masked_customer_name
from .scripts import SCRIPTED_OUTCOMES, Fault, ScriptedOutcome, TransactionStatus
from .serving import install_quiet_disconnect_filter, serve
from .state import OPERATIONS, SimulatedTransaction, SimulatorState
from .wire import ProviderError, answer_body, read_json_object, require

__all__ = [
    "ALLOWED_ORIGINS",
    "NON_ASCII_HEADER",
    "OPERATIONS",
    "PROVIDER_ROUTES",
    "SCRIPTED_OUTCOMES",
    "Fault",
    "MpesaSimulator",
    "ProviderRoute",
    "ScriptedOutcome",
    "SimulatedDisconnect",
    "SimulatedTransaction",
    "SimulatorConfig",
    "TransactionStatus",
    "create_simulator_app",
    "masked_customer_name",
    "run_simulator",
]


@dataclass(frozen=True, slots=True)
class ProviderRoute:
    """One provider operation on the wire: where it is, what it needs, who handles it."""

    operation: Operation
    path: str
    method: Literal["GET", "POST", "PUT"]
    required: tuple[str, ...]  # INS-20 unless each is present and not empty
    handler: Handler
    #: The ``output_*`` fields of a refusal, in order (see ``MpesaSimulator._refusal``).
    refusal_outputs: tuple[str, ...]

    @property
    def moves_money(self) -> bool:
        """Money-moving calls send a JSON body and count per third-party reference; queries
        send query parameters."""
        return self.method != "GET"


_CUSTOMER_PAYMENT_FIELDS = (
    "input_TransactionReference",
    "input_CustomerMSISDN",
    "input_Amount",
    "input_ThirdPartyReference",
    "input_ServiceProviderCode",
)
_MONEY_REFUSAL = ("TransactionID", "ConversationID", "ThirdPartyReference")
_QUERY_REFUSAL = ("ConversationID", "ThirdPartyReference")

PROVIDER_ROUTES: tuple[ProviderRoute, ...] = (
    ProviderRoute(
        Operation.C2B,
        "/ipg/v1x/c2bPayment/singleStage/",
        "POST",
        _CUSTOMER_PAYMENT_FIELDS,
        operations.customer_payment,
        _MONEY_REFUSAL,
    ),
    ProviderRoute(
        Operation.B2C,
        "/ipg/v1x/b2cPayment/",
        "POST",
        _CUSTOMER_PAYMENT_FIELDS,
        operations.customer_payment,
        _MONEY_REFUSAL,
    ),
    ProviderRoute(
        Operation.B2B,
        "/ipg/v1x/b2bPayment/",
        "POST",
        (
            "input_TransactionReference",
            "input_Amount",
            "input_ThirdPartyReference",
            "input_PrimaryPartyCode",
            "input_ReceiverPartyCode",
        ),
        operations.business_payment,
        _MONEY_REFUSAL,
    ),
    ProviderRoute(
        Operation.REVERSAL,
        "/ipg/v1x/reversal/",
        "PUT",
        (
            "input_TransactionID",
            "input_SecurityCredential",
            "input_InitiatorIdentifier",
            "input_ThirdPartyReference",
            "input_ServiceProviderCode",
        ),
        operations.reverse,
        _MONEY_REFUSAL,
    ),
    ProviderRoute(
        Operation.QUERY_STATUS,
        "/ipg/v1x/queryTransactionStatus/",
        "GET",
        ("input_ThirdPartyReference", "input_QueryReference", "input_ServiceProviderCode"),
        operations.query_status,
        _QUERY_REFUSAL,
    ),
    ProviderRoute(
        Operation.QUERY_CUSTOMER_NAME,
        "/ipg/v1x/queryCustomerName/",
        "GET",
        ("input_CustomerMSISDN", "input_ThirdPartyReference", "input_ServiceProviderCode"),
        operations.query_customer_name,
        (*_QUERY_REFUSAL, "CustomerName"),
    ),
)


class MpesaSimulator(SimulatorState):
    """The simulator: its state (recorded transactions, call counters) and its FastAPI app."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        super().__init__(config)
        self._app: FastAPI | None = None
        self._tokens = BearerTokens()

    def private_key(self) -> rsa.RSAPrivateKey:
        return self._tokens.private_key(self.config.private_key_pem)

    def public_key_base64(self) -> str:
        return public_key_base64(self.private_key())

    # ------------------------------------------------------------------------------------ app

    def app(self) -> FastAPI:
        """The simulator's FastAPI app (built once; ``app.state.simulator`` is this object)."""
        if self._app is None:
            self._app = self._build_app()
        return self._app

    def _build_app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(_: FastAPI) -> Any:
            install_quiet_disconnect_filter()
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
        app.add_middleware(NonAsciiHeaderMiddleware, enabled=lambda: self.config.non_ascii_header)
        for route in PROVIDER_ROUTES:
            app.add_api_route(
                route.path,
                self._endpoint(route),
                methods=[route.method],
                name=route.operation.value,
            )
        app.add_api_route("/simulator/public-key", self._public_key_endpoint, methods=["GET"])
        app.add_api_route("/simulator/stats", self._stats_endpoint, methods=["GET"])
        app.add_api_route("/simulator/transactions", self._transactions_endpoint, methods=["GET"])
        app.add_api_route("/simulator/reset", self._reset_endpoint, methods=["POST"])
        app.add_api_route("/simulator/config", self._config_endpoint, methods=["PUT"])
        return app

    # -------------------------------------------------------------------- provider operations

    def _endpoint(self, route: ProviderRoute) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await self._serve(route, request)

        return endpoint

    async def _serve(self, route: ProviderRoute, request: Request) -> Response:
        self._calls[route.operation] += 1
        fields: Mapping[str, object] | None = (
            await read_json_object(request) if route.moves_money else dict(request.query_params)
        )
        raw_reference = fields.get("input_ThirdPartyReference") if fields else None
        echo = raw_reference if isinstance(raw_reference, str) else ""
        if echo and route.moves_money:
            self._reference_calls[echo] += 1
        denied = auth_refusal(request, self.config, self._tokens)
        if denied is not None:
            return denied
        try:
            if fields is None:
                raise ProviderError("INS-21")
            require(fields, *route.required)
            return await route.handler(self, route.operation, fields)
        except ProviderError as error:
            return self._refusal(route, error.code, echo)

    def _refusal(self, route: ProviderRoute, code: str, echo: str) -> Response:
        """The refusal's body: a new ConversationID, the request's own ThirdPartyReference
        echoed, and no TransactionID or customer name to give."""
        values = {
            "TransactionID": "",
            "ConversationID": self.conversation_id(),
            "ThirdPartyReference": echo,
            "CustomerName": "N/A",
        }
        body, status = answer_body(code, **{name: values[name] for name in route.refusal_outputs})
        return JSONResponse(body, status_code=status)

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

    async def _config_endpoint(self, request: Request) -> Response:
        payload = await read_json_object(request)
        if payload is None:
            return JSONResponse({"detail": "body must be a JSON object"}, status_code=400)
        problem = apply_settings(self.config, payload)
        if problem is not None:
            return JSONResponse({"detail": problem}, status_code=400)
        return JSONResponse(public_settings(self.config))


def create_simulator_app(config: SimulatorConfig | None = None) -> FastAPI:
    """A new simulator app; ``app.state.simulator`` is its :class:`MpesaSimulator`."""
    return MpesaSimulator(config).app()


def run_simulator(
    host: str = "127.0.0.1", port: int = 8001, config: SimulatorConfig | None = None
) -> None:
    """Serve the simulator with uvicorn (blocks until stopped)."""
    serve(create_simulator_app(config), host=host, port=port)
