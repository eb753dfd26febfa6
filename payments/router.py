"""HTTP in and out: parse, authorize, call one service method, map errors to HTTP in one place.

Mount it with ``app.include_router(payment_router, prefix="/api")``. Every endpoint except
``/payments/health`` and ``/payments/callback/c2b`` is authenticated. Two roles:

- *customer* (``customer_auth``): ``POST /payments/initiate`` (C2B) and
  ``GET /payments/status/{id}`` of a payment this customer started;
- *staff* (``staff_auth``): everything else (payouts, transfers, reversals, refresh, resolution,
  lists, summary, audit, customer names, webhooks, ``health?deep=true``) and the status of any
  payment.

Both default to ``require_api_key`` (``X-API-Key`` against ``PAYMENT_ADMIN_API_KEY``); ``auth``
sets both at once. Hosts swap them, the session and the service through
``create_payment_router(...)`` or ``app.dependency_overrides``.
"""

import asyncio
import hmac
import inspect
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from functools import lru_cache
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from pydantic import AfterValidator, BaseModel, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import Message

from . import metrics as prometheus_metrics
from .config import get_settings
from .console import create_console_router
from .database import DATABASE_ERRORS, DbSession, get_db
from .exceptions import (
    DuplicateTransactionError,
    IdempotencyConflictError,
    InsufficientFundsError,
    InvalidCursorError,
    InvalidPaymentRequestError,
    InvalidStateTransitionError,
    PaymentCancelledError,
    PaymentConfigurationError,
    PaymentError,
    PaymentInitiationError,
    PaymentNotFoundError,
    PaymentOutcomeUnknownError,
    PaymentStorageError,
    PaymentValidationError,
    ProviderUnavailableError,
    UnauthorizedError,
)
from .health import health_report
from .logger import payment_logger
from .models import EventType
from .mpesa.values import MSISDN_PATTERN, Msisdn
from .notifications import NotificationProcessor, ProviderAnswer, client_ip, read_capped
from .paging import MAX_CURSOR_LENGTH
from .schemas import (
    ApiDate,
    AuditTrailResponse,
    CustomerNameResponse,
    ErrorResponse,
    EventListResponse,
    EventResponse,
    HealthReport,
    PaymentFilters,
    PaymentInitiateRequest,
    PaymentListResponse,
    PaymentResponse,
    PaymentSummary,
    PayoutRequest,
    ReplayResult,
    ResolveRequest,
    ReversalRequest,
    TransferRequest,
    WebhookListResponse,
)
from .service import PaymentService

#: Exception type → HTTP status; the most specific class listed first wins.
ERROR_STATUS: tuple[tuple[type[PaymentError], int], ...] = (
    (UnauthorizedError, 401),
    (PaymentValidationError, 422),
    (InvalidCursorError, 400),
    (PaymentNotFoundError, 404),
    (IdempotencyConflictError, 409),
    (InvalidStateTransitionError, 409),
    (DuplicateTransactionError, 409),
    (PaymentCancelledError, 402),
    (InsufficientFundsError, 402),
    (InvalidPaymentRequestError, 400),
    (PaymentInitiationError, 402),
    (PaymentOutcomeUnknownError, 504),
    (ProviderUnavailableError, 503),
    (PaymentStorageError, 503),
    (PaymentConfigurationError, 500),
    (PaymentError, 502),
)


def error_response(error: PaymentError) -> JSONResponse:
    """The one mapping from domain errors to HTTP. An unknown outcome of a recorded payment is
    202 with the payment itself (status ``unknown``): the request was accepted, not failed."""
    payment: PaymentResponse | None = getattr(error, "payment", None)
    if payment is not None and not error.outcome_known:
        # Recorded, and M-Pesa may have moved the money: accepted, not failed (never retry it
        # with a new idempotency key); reconciliation settles it.
        return JSONResponse(payment.model_dump(mode="json"), status_code=202)
    status = next(code for kind, code in ERROR_STATUS if isinstance(error, kind))
    body = error.to_dict()
    if isinstance(error, PaymentConfigurationError):
        body["details"] = {"variable": error.details.get("variable")}
    if isinstance(error, PaymentValidationError):
        # One shape for every 422, whether FastAPI or the module found the problem.
        details = {key: value for key, value in body["details"].items() if key != "field"}
        details["errors"] = [{"field": error.field or "", "reason": error.message}]
        body["details"] = details
    if payment is not None:
        body["details"]["payment"] = payment.model_dump(mode="json")
    return JSONResponse(body, status_code=status)


def validation_response(error: RequestValidationError) -> JSONResponse:
    errors = [
        {
            "field": ".".join(str(part) for part in item.get("loc", ()) if part != "body"),
            "reason": str(item.get("msg", "invalid")).removeprefix("Value error, "),
        }
        for item in error.errors()
    ]
    return _validation_errors(errors)


def _validation_errors(errors: list[dict[str, str]]) -> JSONResponse:
    message = "; ".join(f"{e['field'] or 'body'}: {e['reason']}" for e in errors) or "invalid"
    return JSONResponse(
        {"error_code": "validation_error", "message": message, "details": {"errors": errors}},
        status_code=422,
    )


def _error(status_code: int, error_code: str, message: str, **details: Any) -> JSONResponse:
    return JSONResponse(
        {"error_code": error_code, "message": message, "details": details},
        status_code=status_code,
    )


class _BodyTooLarge(Exception):
    pass


#: Marks the dependency that makes a route authenticate first (see ``_actor_dependency``).
_AUTH_MARK = "_payments_auth"
#: Endpoints that read (and bound) their body themselves: the callback.
_OWN_BODY_MARK = "_payments_reads_own_body"
_BODY_METHODS = {"POST", "PUT", "PATCH"}
_FLAG = TypeAdapter(bool)


class _NoApp:
    """Stands for "no app" (no dependency overrides) as a weak-referenceable key."""

    dependency_overrides: dict[Any, Any] = {}


_NO_APP = _NoApp()


class _AuthRule:
    """Who may call a route: ``roles`` tried in order (dependency, role name)."""

    __slots__ = ("only_with_flag", "roles")

    def __init__(
        self, roles: list[tuple[Callable[..., Any], str]], only_with_flag: str | None
    ) -> None:
        self.roles = roles
        self.only_with_flag = only_with_flag


class PaymentRoute(APIRoute):
    """Maps errors inside the router itself, so hosts need no exception handlers of their own.

    It also runs the checks that must come before FastAPI reads and parses a body: NUL
    characters in the path or query are refused, the caller is authenticated (a request without
    a valid key costs no body read), and the body is capped at ``PAYMENT_MAX_BODY_BYTES``, by
    ``Content-Length`` and while it streams in."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()
        auth_rule: _AuthRule | None = next(
            (
                getattr(dependency.call, _AUTH_MARK)
                for dependency in self.dependant.dependencies
                if hasattr(dependency.call, _AUTH_MARK)
            ),
            None,
        )
        authenticate = self._authenticator(auth_rule) if auth_rule is not None else None
        reads_own_body = getattr(self.endpoint, _OWN_BODY_MARK, False)

        async def route(request: Request) -> Response:
            try:
                refused = _nul_in_request(request)
                if refused is not None:
                    return refused
                if authenticate is not None:
                    await authenticate(request)
                if request.method in _BODY_METHODS and not reads_own_body:
                    request = await _with_capped_body(request)
                return await handler(request)
            except _BodyTooLarge:
                limit = get_settings().payment_max_body_bytes
                return _error(
                    413,
                    "payload_too_large",
                    f"the body is larger than {limit} bytes",
                    max_bytes=limit,
                )
            except RequestValidationError as error:
                return validation_response(error)
            except PaymentError as error:
                return error_response(error)
            except HTTPException as error:
                if not _is_body_parse_error(error):
                    # The host's own (its auth answering 401/403, its session dependency): its
                    # status, detail and headers, rendered by the host app's handlers.
                    raise
                return _error(error.status_code, "bad_request", str(error.detail))
            except DATABASE_ERRORS as error:
                payment_logger.error(
                    "Database unavailable", path=request.url.path, error=type(error).__name__
                )
                return error_response(PaymentStorageError("the payment database is unavailable"))

        return route

    def _authenticator(self, rule: _AuthRule) -> Callable[[Request], Awaitable[None]]:
        """Runs the rule's dependencies (or their overrides) through FastAPI's own dependency
        machinery, on probe routes without a body, and leaves the caller's identity and role in
        ``request.state`` for the real endpoint. The first role whose dependency accepts the
        caller wins; when none does, the last one's error is the answer."""
        methods = list(self.methods or ["GET"])
        # One probe per app and role: its dependency overrides (the app serving the request).
        probes: weakref.WeakKeyDictionary[Any, list[Callable[[Request], Awaitable[Response]]]]
        probes = weakref.WeakKeyDictionary()

        def probe_route(auth: Callable[..., Any], role: str) -> Callable[..., Any]:
            async def probe(request: Request, identity: Annotated[Any, Depends(auth)]) -> Response:
                request.state.payments_actor = identity_of(identity)
                request.state.payments_role = role
                return Response(status_code=204)

            return probe

        def probes_for(app: Any) -> list[Callable[[Request], Awaitable[Response]]]:
            handlers = probes.get(app)
            if handlers is None:
                handlers = probes[app] = [
                    APIRoute(
                        self.path,
                        probe_route(auth, role),
                        methods=methods,
                        dependency_overrides_provider=app,
                    ).get_route_handler()
                    for auth, role in rule.roles
                ]
            return handlers

        async def authenticate(request: Request) -> None:
            if rule.only_with_flag is not None:
                try:
                    flag = request.query_params.get(rule.only_with_flag, "0")
                    wanted = _FLAG.validate_python(flag)
                except ValidationError:
                    return  # the endpoint's own parameter check answers 422
                if not wanted:
                    return
            app = request.scope.get("app") or _NO_APP
            overrides = getattr(app, "dependency_overrides", {})
            handlers: list[Callable[[Request], Awaitable[Response]]] | None = None
            for index, (auth, role) in enumerate(rule.roles):
                try:
                    if auth is require_api_key and require_api_key not in overrides:
                        # The default key check, not overridden: called as FastAPI would call
                        # it (the header's first value), without a probe route's dependency
                        # solving on every request.
                        identity = await require_api_key(request.headers.get("x-api-key"))
                        request.state.payments_actor = identity_of(identity)
                        request.state.payments_role = role
                        return
                    if handlers is None:
                        handlers = probes_for(app)
                    await handlers[index](request)
                    return
                except (UnauthorizedError, HTTPException):
                    if index == len(rule.roles) - 1:
                        raise

        return authenticate


#: The longest identity that fits ``user_id`` and the audit trail's ``actor``.
IDENTITY_MAX_LENGTH = 100


def identity_of(value: Any) -> str:
    """What an auth dependency returned, as the identity recorded on payments (``user_id``) and
    audit entries (``actor``): a non-empty ``str`` of at most 100 characters (an ``int`` is
    taken as its digits). ``None`` means "not authenticated"; anything else is the host's
    mistake, answered 500 with a message saying so rather than guessed at."""
    if value is None:
        raise UnauthorizedError("not authenticated")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip() or len(value) > IDENTITY_MAX_LENGTH:
        raise PaymentConfigurationError(
            "the payments auth dependency must return the caller's identity as a non-empty str"
            f" of at most {IDENTITY_MAX_LENGTH} characters (e.g. str(user.id)), not"
            f" {type(value).__name__}",
            details={"variable": "customer_auth/staff_auth"},
        )
    return value


def _is_body_parse_error(error: HTTPException) -> bool:
    """FastAPI's own answer to a body it could not read (``fastapi.routing`` raises it from the
    parse error); every other ``HTTPException`` came from the host and passes through."""
    return (
        error.status_code == 400
        and error.detail == "There was an error parsing the body"
        and error.__cause__ is not None
    )


def _nul_in_request(request: Request) -> JSONResponse | None:
    """NUL characters cannot be stored or looked up in PostgreSQL: an input error, found here,
    not a storage alarm later."""
    errors = [
        {"field": name, "reason": "must not contain NUL characters"}
        for name, value in request.path_params.items()
        if "\x00" in str(value)
    ]
    errors += [
        {"field": name, "reason": "must not contain NUL characters"}
        for name, value in request.query_params.multi_items()
        if "\x00" in value or "\x00" in name
    ]
    return _validation_errors(errors) if errors else None


async def _with_capped_body(request: Request) -> Request:
    """The request with its body read, at most ``PAYMENT_MAX_BODY_BYTES`` of it."""
    limit = get_settings().payment_max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise _BodyTooLarge
    body = await read_capped(request.stream(), limit)
    if body is None:
        raise _BodyTooLarge
    delivered = False
    receive = request.receive

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return Request(request.scope, replay)


# -- dependencies (each replaceable with app.dependency_overrides) ------------------------------

#: Documents the admin key as what it is; ``require_api_key`` does the checking.
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False)


async def require_api_key(x_api_key: Annotated[str | None, Header()] = None) -> str:
    """Default authorization: ``X-API-Key`` must equal ``PAYMENT_ADMIN_API_KEY``.

    A coroutine only so that FastAPI calls it on the event loop, not through its thread pool.

    Without a configured key everything is denied, in every environment (the demo gateway
    generates one). Returns the actor name recorded in the audit trail."""
    expected = get_settings().admin_api_key
    if expected is None:
        raise UnauthorizedError(
            "PAYMENT_ADMIN_API_KEY is not configured: the payments API is closed"
        )
    if x_api_key is None or not hmac.compare_digest(x_api_key.encode(), expected.encode()):
        raise UnauthorizedError("missing or wrong X-API-Key")
    return "admin-api-key"


@lru_cache(maxsize=1)
def default_payment_service() -> PaymentService:
    """The process's service (and so its one provider connection pool)."""
    return PaymentService()


async def get_payment_service() -> PaymentService:
    """FastAPI dependency giving the service; override it to use a subclass with hooks.
    (Async, so FastAPI calls it without a thread-pool hop per request.)"""
    return default_payment_service()


def _client_ip(request: Request, payments: PaymentService) -> str | None:
    """The caller's valid address (through trusted proxies), or ``None``."""
    return client_ip(
        request.client.host if request.client else None, request.headers, payments.settings
    )


CUSTOMER = "customer"
STAFF = "staff"


def _actor_dependency(
    roles: list[tuple[Callable[..., Any], str]], *, only_with_flag: str | None = None
) -> Callable[..., Awaitable[str | None]]:
    """The caller's identity, as ``PaymentRoute`` found it with the first of ``roles`` that
    accepted the caller, before the body was read. Every route that declares this dependency is
    authenticated first; ``only_with_flag``: only when that query flag is true
    (``/health?deep=true``)."""

    async def actor(request: Request) -> str | None:
        found = getattr(request.state, "payments_actor", None)
        if isinstance(found, str):
            return found
        if only_with_flag is not None:
            return None
        raise UnauthorizedError("not authenticated")

    async def actor_with_key(
        request: Request, _: Annotated[str | None, Security(api_key_scheme)] = None
    ) -> str | None:
        return await actor(request)

    # The default key is declared as a security scheme in the OpenAPI document; a host's own
    # auth documents itself.
    uses_key = any(auth is require_api_key for auth, _ in roles)
    dependency = actor_with_key if uses_key else actor
    setattr(dependency, _AUTH_MARK, _AuthRule(roles, only_with_flag))
    return dependency


def _role(request: Request) -> str | None:
    return getattr(request.state, "payments_role", None)


def _not_blank(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("must not be empty or whitespace")
    return value.strip() if value is not None else None


def _awaitable(factory: Callable[[], Any]) -> Callable[[], Any]:
    """A plain factory (``lambda: my_service``) as an async dependency: FastAPI runs sync
    dependencies in a thread pool, a hop per request for a value that is already there."""
    if inspect.iscoroutinefunction(factory):
        return factory

    async def provide() -> Any:
        return factory()

    return provide


def _json(model: BaseModel) -> Response:
    """Serialise once: a ``Response`` skips FastAPI's second validation of the return value
    (the route's ``response_model`` still documents the shape)."""
    return Response(model.model_dump_json(), media_type="application/json")


def create_payment_router(
    *,
    get_session: Callable[..., Any] = get_db,
    customer_auth: Callable[..., Any] | None = None,
    staff_auth: Callable[..., Any] | None = None,
    auth: Callable[..., Any] | None = None,
    service: Callable[[], PaymentService] = get_payment_service,
    console: bool = True,
) -> APIRouter:
    """Build the router.

    ``get_session`` yields a ``Session`` or an ``AsyncSession``; ``service`` returns the
    ``PaymentService`` to use. ``customer_auth`` guards ``initiate`` and the status of the
    caller's own payments; ``staff_auth`` guards everything else (and the status of any payment).
    Each is a FastAPI dependency that returns the caller's identity, a non-empty ``str`` of at
    most 100 characters (a customer's is recorded as the payment's ``user_id`` and compared on
    ``status``; every identity is the ``actor`` of audit entries), or raises (an
    ``HTTPException`` passes through as it is). ``auth`` is the earlier single dependency: it
    sets whichever of the two is not given. Without any, both are ``require_api_key``.
    ``console``: mount the operator console at ``/payments/console/`` (staff, like ``staff_auth``).

    Its lifespan runs the event dispatcher (``dispatcher.dispatch_forever``) with the app that
    includes it, on that service and those sessions (or their ``app.dependency_overrides``),
    unless ``PAYMENT_DISPATCH_IN_APP=false``."""
    staff = staff_auth or auth or require_api_key
    customer = customer_auth or auth or require_api_key
    router = APIRouter(
        prefix="/payments",
        tags=["payments"],
        route_class=PaymentRoute,
        lifespan=dispatcher_lifespan(get_session=get_session, service=service),
    )
    Db = Annotated[DbSession, Depends(get_session)]
    Actor = Annotated[str, Depends(_actor_dependency([(staff, STAFF)]))]
    # A staff member's credentials are tried first, so staff read any payment's status with
    # their own; the same dependency for both roles means one call, as staff.
    either: list[tuple[Callable[..., Any], str]] = (
        [(staff, STAFF)] if customer is staff else [(staff, STAFF), (customer, CUSTOMER)]
    )
    # One dependency for both roles (the admin key, or ``auth=``): its callers are staff, as
    # before the roles were split (replays and status reads are not limited to their own).
    customer_role = STAFF if customer is staff else CUSTOMER
    CustomerActor = Annotated[str, Depends(_actor_dependency([(customer, customer_role)]))]
    AnyActor = Annotated[str, Depends(_actor_dependency(either))]
    Service = Annotated[PaymentService, Depends(_awaitable(service))]
    IdempotencyHeader = Annotated[
        str | None, Header(alias="Idempotency-Key", max_length=255), AfterValidator(_not_blank)
    ]

    @router.post("/initiate", response_model=PaymentResponse, responses=MONEY_RESPONSES)
    async def initiate_payment(
        body: PaymentInitiateRequest,
        request: Request,
        db: Db,
        actor: CustomerActor,
        payments: Service,
        idempotency_key: IdempotencyHeader = None,
    ) -> Response:
        """C2B: the customer gets a PIN prompt; answers when they confirm (up to ~90 s)."""
        return _json(
            await payments.initiate_payment(
                request=body,
                db=db,
                actor=actor,
                idempotency_key=idempotency_key,
                client_ip=_client_ip(request, payments),
                owner=actor if _role(request) == CUSTOMER else None,
            )
        )

    @router.post("/payouts", response_model=PaymentResponse, responses=MONEY_RESPONSES)
    async def payout(
        body: PayoutRequest,
        request: Request,
        db: Db,
        actor: Actor,
        payments: Service,
        idempotency_key: IdempotencyHeader = None,
    ) -> Response:
        """B2C: pay a customer's wallet."""
        return _json(
            await payments.payout(
                body,
                db,
                actor,
                idempotency_key=idempotency_key,
                client_ip=_client_ip(request, payments),
            )
        )

    @router.post("/transfers", response_model=PaymentResponse, responses=MONEY_RESPONSES)
    async def transfer(
        body: TransferRequest,
        request: Request,
        db: Db,
        actor: Actor,
        payments: Service,
        idempotency_key: IdempotencyHeader = None,
    ) -> Response:
        """B2B: pay another business's shortcode."""
        return _json(
            await payments.transfer(
                body,
                db,
                actor,
                idempotency_key=idempotency_key,
                client_ip=_client_ip(request, payments),
            )
        )

    @router.post(
        "/{transaction_id}/reverse",
        response_model=PaymentResponse,
        responses=_responses(404, base=MONEY_RESPONSES),
    )
    async def reverse(
        transaction_id: str,
        request: Request,
        db: Db,
        actor: Actor,
        payments: Service,
        body: ReversalRequest | None = None,
        idempotency_key: IdempotencyHeader = None,
    ) -> Response:
        """Reverse a completed payment (all of it, or ``amount``). Returns the reversal."""
        return _json(
            await payments.reverse(
                transaction_id,
                body or ReversalRequest(),
                db,
                actor,
                idempotency_key=idempotency_key,
                client_ip=_client_ip(request, payments),
            )
        )

    @router.post(
        "/{transaction_id}/refresh",
        response_model=PaymentResponse,
        responses=_responses(404, 409, 413, 502, 504),
    )
    async def refresh(transaction_id: str, db: Db, actor: Actor, payments: Service) -> Response:
        """Ask M-Pesa for the status now and apply it."""
        return _json(await payments.refresh(transaction_id, db, actor=actor))

    @router.post(
        "/{transaction_id}/resolve",
        response_model=PaymentResponse,
        responses=_responses(400, 404, 409, 413),
    )
    async def resolve(
        transaction_id: str, body: ResolveRequest, db: Db, actor: Actor, payments: Service
    ) -> Response:
        """An operator's decision, audited: settle a payment M-Pesa's answers cannot settle,
        or record the M-Pesa transaction ID a completed payment lacks (so it can be reversed)."""
        return _json(
            await payments.resolve(
                transaction_id,
                db,
                reason=body.reason,
                status=body.status,
                provider_transaction_id=body.provider_transaction_id,
                actor=actor,
            )
        )

    @router.get(
        "/status/{transaction_id}", response_model=PaymentResponse, responses=_responses(404)
    )
    async def status(
        transaction_id: str, request: Request, db: Db, actor: AnyActor, payments: Service
    ) -> Response:
        """One payment. A customer sees only a payment they started (anyone else's is 404)."""
        owner = actor if _role(request) == CUSTOMER else None
        return _json(await payments.get(transaction_id, db, owner=owner))

    @router.get(
        "/",
        response_model=PaymentListResponse,
        responses=_responses(
            base={400: {"model": ErrorResponse, "description": "A cursor no page returned"}}
        ),
    )
    async def list_payments(
        db: Db,
        _: Actor,
        payments: Service,
        filters: Annotated[PaymentFilters, Query()],
        page: Annotated[int, Query(ge=1, le=100_000)] = 1,
        per_page: Annotated[int, Query(ge=1, le=100)] = 20,
        cursor: Annotated[
            str | None,
            Query(
                max_length=MAX_CURSOR_LENGTH,
                description="A previous page's ``next_cursor``: the page after it (keyset"
                " paging, as fast deep as near the top); ``page`` is then ignored.",
            ),
        ] = None,
    ) -> Response:
        """Payments, newest first. Deep pages and full walks: follow ``next_cursor``."""
        return _json(await payments.list(db, filters, page=page, per_page=per_page, cursor=cursor))

    @router.get(
        "/export.csv",
        response_class=StreamingResponse,
        responses=_responses(
            base={200: {"content": {"text/csv": {}}, "description": "One row per payment"}}
        ),
    )
    async def export_csv(
        db: Db,
        _: Actor,
        payments: Service,
        filters: Annotated[PaymentFilters, Query()],
    ) -> StreamingResponse:
        """The payments matching the list's filters as CSV (phone numbers masked), read in
        keyset batches."""
        return StreamingResponse(
            payments.export_csv(db, filters),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": 'attachment; filename="payments.csv"'},
        )

    @router.get("/summary", response_model=PaymentSummary, responses=_responses())
    async def summary(
        db: Db,
        _: Actor,
        payments: Service,
        from_date: ApiDate | None = None,
        to_date: ApiDate | None = None,
    ) -> Response:
        return _json(await payments.summary(db, from_date, to_date))

    @router.get(
        "/audit/{transaction_id}", response_model=AuditTrailResponse, responses=_responses(404)
    )
    async def audit(transaction_id: str, db: Db, _: Actor, payments: Service) -> Response:
        return _json(await payments.audit(transaction_id, db))

    @router.get(
        "/customer-name",
        response_model=CustomerNameResponse,
        responses=_responses(400, 402, 404, 502, 504),
    )
    async def customer_name(
        phone_number: Annotated[str, Query(max_length=30, pattern=MSISDN_PATTERN)],
        _: Actor,
        payments: Service,
    ) -> Response:
        """The wallet holder's masked name (confirm before a payout)."""
        return _json(await payments.query_customer_name(Msisdn(phone_number)))

    @router.get(
        "/health",
        response_model=HealthReport,
        # Public, except ``deep=true``.
        openapi_extra={"security": [{}, {"APIKeyHeader": []}]}
        if staff is require_api_key
        else None,
        responses={
            401: {"model": ErrorResponse, "description": "``deep=true`` without a valid key"},
            422: {"model": ErrorResponse, "description": "Invalid parameters"},
            503: {"model": HealthReport, "description": "Degraded"},
        },
    )
    async def health(
        db: Db,
        payments: Service,
        _: Annotated[
            str | None, Depends(_actor_dependency([(staff, STAFF)], only_with_flag="deep"))
        ],
        deep: bool = False,
    ) -> JSONResponse:
        """Database reachable, provider configuration valid; ``deep=true`` (staff only: it needs
        the key) also opens a TCP connection to each provider port (outbound firewalls are the
        usual production failure) and sends one status query to see that M-Pesa accepts the
        credentials and Origin."""
        return await health_report(db, payments, deep=deep)

    @router.post("/callback/c2b", response_model=ProviderAnswer, responses=CALLBACK_RESPONSES)
    async def callback_c2b(
        request: Request,
        db: Db,
        payments: Service,
        # No NUL in the schema: the API refuses one (the database could not store it).
        token: Annotated[str | None, Query(max_length=512, pattern=r"^[^\x00]*$")] = None,
    ) -> JSONResponse:
        """Result notifications: authenticated, stored (bounded) first, processed once."""
        status_code, answer = await NotificationProcessor(payments).receive_stream(
            db,
            headers=[(k.lower(), v) for k, v in request.headers.items()],
            peer_ip=request.client.host if request.client else None,
            query_token=token,
            body=request.stream(),
        )
        return JSONResponse(answer, status_code=status_code)

    setattr(callback_c2b, _OWN_BODY_MARK, True)

    @router.get("/events", response_model=EventListResponse, responses=_responses())
    async def list_events(
        db: Db,
        _: Actor,
        payments: Service,
        after: Annotated[str | None, Query(max_length=64, description="an event id")] = None,
        event_type: Annotated[EventType | None, Query(alias="type")] = None,
        transaction_id: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 50,
    ) -> Response:
        """Events oldest first, after the event ``after`` (a cursor: pass the last id seen)."""
        return _json(
            await payments.list_events(
                db,
                after=after,
                event_type=event_type.value if event_type else None,
                transaction_id=transaction_id,
                limit=limit,
            )
        )

    @router.get("/events/{event_id}", response_model=EventResponse, responses=_responses(404))
    async def get_event(event_id: str, db: Db, _: Actor, payments: Service) -> Response:
        """One event with its delivery state per consumer and every attempt."""
        return _json(await payments.get_event(event_id, db))

    @router.post(
        "/events/{event_id}/redeliver",
        response_model=EventResponse,
        responses=_responses(404, 413),
    )
    async def redeliver_event(event_id: str, db: Db, _: Actor, payments: Service) -> Response:
        """Deliver the event again to every configured endpoint (the hooks are not run again)."""
        return _json(await payments.redeliver_event(event_id, db))

    @router.get(
        "/metrics",
        response_class=Response,
        responses=_responses()
        | {
            200: {
                "description": "Prometheus text format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
        # Staff, like the API; or the PAYMENT_METRICS_TOKEN bearer token Prometheus sends.
        openapi_extra={"security": [{"APIKeyHeader": []}]} if staff is require_api_key else None,
    )
    async def metrics(request: Request, db: Db, payments: Service) -> Response:
        """Prometheus text format. Staff only, or ``Authorization: Bearer
        <PAYMENT_METRICS_TOKEN>`` when that is set."""
        await prometheus_metrics.check_access(request, staff, payments.settings)
        return Response(
            await prometheus_metrics.scrape(db, hooks=payments.runs_hooks),
            media_type=prometheus_metrics.CONTENT_TYPE,
        )

    if console:
        router.include_router(
            create_console_router(
                auth=staff, builtin_auth=require_api_key, get_session=get_session, service=service
            )
        )

    @router.get("/webhooks", responses=_responses())
    async def list_webhooks(
        db: Db,
        _: Actor,
        payments: Service,
        is_processed: bool | None = None,
        page: Annotated[int, Query(ge=1, le=100_000)] = 1,
        per_page: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> WebhookListResponse:
        return await NotificationProcessor(payments).listing(
            db, is_processed=is_processed, page=page, per_page=per_page
        )

    @router.post(
        "/webhooks/{webhook_id}/replay",
        response_model=ReplayResult,
        responses=_responses(404, 413),
    )
    async def replay_webhook(webhook_id: int, db: Db, _: Actor, payments: Service) -> ReplayResult:
        """Process a stored notification again (after fixing whatever made it fail)."""
        return await NotificationProcessor(payments).replay(db, webhook_id)

    return router


def dispatcher_lifespan(
    *, get_session: Callable[..., Any], service: Callable[..., Any]
) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """The router's lifespan: FastAPI merges it into the app's when the app includes the
    router, so the dispatcher starts and stops with the host's app."""

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        from .dispatcher import dispatch_forever

        overrides = getattr(app, "dependency_overrides", {})
        try:
            payments = overrides.get(service, service)()
            if inspect.isawaitable(payments):
                payments = await payments
            enabled = payments.settings.payment_dispatch_in_app
        except Exception as exc:  # misconfigured: requests say so; the app still starts
            payment_logger.error("Event dispatcher not started", error=str(exc))
            enabled = False
        if not enabled:
            yield
            return
        sessions = _session_source(overrides.get(get_session, get_session))
        stop = asyncio.Event()
        task = asyncio.create_task(dispatch_forever(payments, sessions, stop=stop))
        try:
            yield
        finally:
            stop.set()
            try:
                await asyncio.wait_for(task, timeout=15)
            except TimeoutError:
                payment_logger.warning("Event dispatcher stopped mid-delivery")

    return lifespan


def _session_source(get_session: Callable[..., Any]) -> Callable[[], Any]:
    """The sessions a dependency gives, as a context manager factory for the dispatcher: an
    async or sync generator without parameters; anything else gets the module's database."""
    from .database import get_database

    required = [
        p
        for p in inspect.signature(get_session).parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    if required:
        payment_logger.warning(
            "The session dependency takes parameters; the dispatcher uses PAYMENT_DATABASE_URL"
        )
        return get_database().session
    if inspect.isasyncgenfunction(get_session):
        return asynccontextmanager(get_session)
    if inspect.isgeneratorfunction(get_session):
        sync = contextmanager(get_session)

        @asynccontextmanager
        async def sessions() -> AsyncIterator[Any]:
            with sync() as session:
                yield session

        return sessions
    return get_database().session


def _responses(*codes: int, base: dict[int | str, Any] | None = None) -> dict[int | str, Any]:
    """The error answers an authenticated operation can give, besides its success."""
    described = {
        400: "Refused by M-Pesa as invalid",
        401: "Missing or wrong X-API-Key",
        402: "Refused by M-Pesa or the customer: no money moved",
        404: "Not found",
        409: "Conflict with the payment's state or an earlier request",
        413: "Body larger than PAYMENT_MAX_BODY_BYTES",
        422: "Invalid input",
        500: "The module is misconfigured (names the variable)",
        502: "M-Pesa answered something unexpected",
        503: "Database or M-Pesa unavailable; nothing was sent",
        504: "M-Pesa did not answer in time",
    }
    responses = dict(base or {})
    for code in (401, 422, 500, 503, *codes):
        responses[code] = {"model": ErrorResponse, "description": described[code]}
    return responses


MONEY_RESPONSES = _responses(
    400,
    402,
    409,
    413,
    502,
    504,
    base={
        202: {
            "model": PaymentResponse,
            "description": "Recorded, outcome not known yet (status unknown): never retry with"
            " a new key; reconciliation settles it",
        }
    },
)
CALLBACK_RESPONSES: dict[int | str, Any] = {
    code: {"model": ProviderAnswer, "description": description}
    for code, description in {
        400: "Not a JSON notification (stored)",
        401: "Not authenticated (stored, small)",
        413: "Body larger than PAYMENT_MAX_BODY_BYTES (stored truncated)",
        429: "Too many rejected notifications from this source (not stored)",
        500: "Stored, could not be applied yet: deliver again",
        503: "Could not be stored or processed now: deliver again",
    }.items()
} | {422: {"model": ErrorResponse, "description": "Invalid token parameter"}}


payment_router = create_payment_router()
