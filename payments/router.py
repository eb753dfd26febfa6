"""HTTP in and out: parse, authorize, call one service method, map errors to HTTP in one place.

Mount it with ``app.include_router(payment_router, prefix="/api")``. Every endpoint except
``/payments/health`` and ``/payments/callback/c2b`` requires ``require_api_key`` (``X-API-Key``
against ``PAYMENT_ADMIN_API_KEY``); hosts swap it, the session and the service through
``create_payment_router(...)`` or ``app.dependency_overrides``.
"""

import asyncio
import hmac
import inspect
from collections.abc import Awaitable, Callable
from datetime import date
from functools import lru_cache
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sqlalchemy import text
from starlette.exceptions import HTTPException

from . import repository as repo
from .callbacks import CallbackProcessor, InboundNotification
from .client import OPERATIONS
from .config import PROVIDER_HOSTS, get_settings
from .database import DATABASE_ERRORS, DbSession, get_db, run_db
from .exceptions import (
    DuplicateTransactionError,
    IdempotencyConflictError,
    InsufficientFundsError,
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
from .logger import payment_logger, sanitize_text
from .schemas import (
    AuditTrailResponse,
    CustomerNameResponse,
    PaymentFilters,
    PaymentInitiateRequest,
    PaymentListResponse,
    PaymentResponse,
    PaymentSummary,
    PayoutRequest,
    ResolveRequest,
    ReversalRequest,
    TransferRequest,
)
from .service import PaymentService
from .values import Msisdn

#: Exception type → HTTP status; the most specific class listed first wins.
ERROR_STATUS: tuple[tuple[type[PaymentError], int], ...] = (
    (UnauthorizedError, 401),
    (PaymentValidationError, 422),
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
    message = "; ".join(f"{e['field'] or 'body'}: {e['reason']}" for e in errors) or "invalid"
    return JSONResponse(
        {"error_code": "validation_error", "message": message, "details": {"errors": errors}},
        status_code=422,
    )


class PaymentRoute(APIRoute):
    """Maps errors inside the router itself, so hosts need no exception handlers of their own."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as error:
                return validation_response(error)
            except PaymentError as error:
                return error_response(error)
            except HTTPException as error:  # e.g. a body FastAPI could not decode
                return JSONResponse(
                    {"error_code": "bad_request", "message": str(error.detail), "details": {}},
                    status_code=error.status_code,
                )
            except DATABASE_ERRORS as error:
                payment_logger.error(
                    "Database unavailable", path=request.url.path, error=type(error).__name__
                )
                return error_response(PaymentStorageError("the payment database is unavailable"))

        return route


# -- dependencies (each replaceable with app.dependency_overrides) ------------------------------


async def require_api_key(x_api_key: Annotated[str | None, Header()] = None) -> str:
    """Default authorization: ``X-API-Key`` must equal ``PAYMENT_ADMIN_API_KEY``.

    A coroutine only so that FastAPI calls it on the event loop, not through its thread pool.

    Without a configured key everything is denied, except in the simulator environment.
    Returns the actor name recorded in the audit trail."""
    settings = get_settings()
    expected = settings.admin_api_key
    if expected is None:
        if settings.mpesa_environment == "simulator":
            return "simulator-admin"
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


def _client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


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
    auth: Callable[..., Any] = require_api_key,
    service: Callable[[], PaymentService] = get_payment_service,
) -> APIRouter:
    """Build the router. ``get_session`` yields a ``Session`` or an ``AsyncSession``; ``auth``
    returns the caller's name (or raises); ``service`` returns the ``PaymentService`` to use."""
    router = APIRouter(prefix="/payments", tags=["payments"], route_class=PaymentRoute)
    Db = Annotated[DbSession, Depends(get_session)]
    Actor = Annotated[str, Depends(auth)]
    Service = Annotated[PaymentService, Depends(_awaitable(service))]
    IdempotencyHeader = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]

    @router.post("/initiate", response_model=PaymentResponse)
    async def initiate_payment(
        body: PaymentInitiateRequest,
        request: Request,
        db: Db,
        actor: Actor,
        payments: Service,
        idempotency_key: IdempotencyHeader = None,
    ) -> Response:
        """C2B: the customer gets a PIN prompt; answers when they confirm (up to ~90 s)."""
        return _json(
            await payments.initiate_payment(
                request=body,
                db=db,
                user_id=actor,
                idempotency_key=idempotency_key,
                client_ip=_client_ip(request),
            )
        )

    @router.post("/payouts", response_model=PaymentResponse)
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
                body, db, actor, idempotency_key=idempotency_key, client_ip=_client_ip(request)
            )
        )

    @router.post("/transfers", response_model=PaymentResponse)
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
                body, db, actor, idempotency_key=idempotency_key, client_ip=_client_ip(request)
            )
        )

    @router.post("/{transaction_id}/reverse", response_model=PaymentResponse)
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
                client_ip=_client_ip(request),
            )
        )

    @router.post("/{transaction_id}/refresh", response_model=PaymentResponse)
    async def refresh(transaction_id: str, db: Db, actor: Actor, payments: Service) -> Response:
        """Ask M-Pesa for the status now and apply it."""
        return _json(await payments.refresh(transaction_id, db, actor=actor))

    @router.post("/{transaction_id}/resolve", response_model=PaymentResponse)
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

    @router.get("/status/{transaction_id}", response_model=PaymentResponse)
    async def status(transaction_id: str, db: Db, _: Actor, payments: Service) -> Response:
        return _json(await payments.get(transaction_id, db))

    @router.get("/", response_model=PaymentListResponse)
    async def list_payments(
        db: Db,
        _: Actor,
        payments: Service,
        filters: Annotated[PaymentFilters, Query()],
        page: Annotated[int, Query(ge=1, le=100_000)] = 1,
        per_page: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> Response:
        return _json(await payments.list(db, filters, page=page, per_page=per_page))

    @router.get("/summary", response_model=PaymentSummary)
    async def summary(
        db: Db,
        _: Actor,
        payments: Service,
        from_date: date | None = None,
        to_date: date | None = None,
    ) -> Response:
        return _json(await payments.summary(db, from_date, to_date))

    @router.get("/audit/{transaction_id}", response_model=AuditTrailResponse)
    async def audit(transaction_id: str, db: Db, _: Actor, payments: Service) -> Response:
        return _json(await payments.audit(transaction_id, db))

    @router.get("/customer-name", response_model=CustomerNameResponse)
    async def customer_name(
        phone_number: Annotated[str, Query(max_length=30)], _: Actor, payments: Service
    ) -> Response:
        """The wallet holder's masked name (confirm before a payout)."""
        return _json(await payments.query_customer_name(Msisdn(phone_number)))

    @router.get("/health")
    async def health(db: Db, payments: Service, deep: bool = False) -> JSONResponse:
        """Database reachable, provider configuration valid; ``deep=true`` also opens a TCP
        connection to each provider port (outbound firewalls are the usual production failure)
        and sends one status query to see that M-Pesa accepts the credentials and Origin."""
        return await _health(db, payments, deep)

    @router.post("/callback/c2b")
    async def callback_c2b(
        request: Request,
        db: Db,
        payments: Service,
        token: Annotated[str | None, Query(max_length=512)] = None,
    ) -> JSONResponse:
        """Result notifications: stored raw first, authenticated, processed once."""
        status_code, answer = await CallbackProcessor(payments).receive(
            db,
            InboundNotification(
                body=await request.body(),
                headers={k.lower(): v for k, v in request.headers.items()},
                peer_ip=_client_ip(request),
                query_token=token,
            ),
        )
        return JSONResponse(answer, status_code=status_code)

    @router.get("/webhooks")
    async def list_webhooks(
        db: Db,
        _: Actor,
        is_processed: bool | None = None,
        page: Annotated[int, Query(ge=1, le=100_000)] = 1,
        per_page: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> WebhookListResponse:
        rows, total = await run_db(
            db,
            lambda s: repo.list_webhooks(
                s, is_processed=is_processed, page=page, per_page=per_page
            ),
        )
        return WebhookListResponse(
            items=[
                # Forwarders may put phone numbers in the body: masked like every other answer.
                WebhookEntry.model_validate(row).model_copy(
                    update={"raw_body": sanitize_text(row.raw_body)}
                )
                for row in rows
            ],
            total=total,
            page=page,
            per_page=per_page,
        )

    @router.post("/webhooks/{webhook_id}/replay")
    async def replay_webhook(
        webhook_id: int, db: Db, _: Actor, payments: Service
    ) -> dict[str, Any]:
        """Process a stored notification again (after fixing whatever made it fail)."""
        result = await CallbackProcessor(payments).process(db, webhook_id, replay=True)
        return {
            "webhook_id": result.webhook_id,
            "processed": result.processed,
            "transaction_id": result.transaction_id,
            "status": result.status,
            "error": result.error,
        }

    return router


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
    transaction_id: int | None


class WebhookListResponse(BaseModel):
    items: list[WebhookEntry]
    total: int
    page: int
    per_page: int


async def _health(db: DbSession, payments: PaymentService, deep: bool) -> JSONResponse:
    report: dict[str, Any] = {}
    healthy = True
    try:
        await run_db(db, lambda s: s.execute(text("SELECT 1")))
        report["database"] = "ok"
    except Exception as exc:  # any driver error means "unreachable" here
        report["database"] = f"unreachable ({type(exc).__name__})"
        healthy = False
    try:
        settings = payments.settings
        report["provider_configuration"] = "ok"
        report["environment"] = settings.mpesa_environment
    except PaymentConfigurationError as exc:
        report["provider_configuration"] = exc.message
        healthy = False
    if deep and report.get("provider_configuration") == "ok":
        report["provider_ports"] = ports = await _probe_ports(payments)
        healthy = healthy and all(result == "ok" for result in ports.values())
        # One status query for a made-up reference: does M-Pesa accept the key and Origin?
        refused = await payments.client.check_access()
        report["provider_access"] = refused or "ok"
        healthy = healthy and refused is None
    report["status"] = "ok" if healthy else "degraded"
    return JSONResponse(report, status_code=200 if healthy else 503)


async def _probe_ports(payments: PaymentService) -> dict[str, str]:
    config = payments.client.config
    if config.environment == "simulator" and not config.base_url:
        return {"simulator": "ok"}  # in-process: nothing to connect to
    targets: dict[str, tuple[str, int]] = {}
    for operation in OPERATIONS:
        url = urlsplit(config.url_for(operation))
        host = url.hostname or PROVIDER_HOSTS.get(config.environment, "")
        port = url.port or (443 if url.scheme == "https" else 80)
        targets[f"{operation.value}:{port}"] = (host, port)

    async def probe(host: str, port: int) -> str:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=3)
        except (OSError, TimeoutError) as exc:
            return f"unreachable ({type(exc).__name__})"
        writer.close()
        return "ok"

    results = await asyncio.gather(*(probe(*target) for target in targets.values()))
    for name, result in zip(targets, results, strict=True):
        if result != "ok":
            payment_logger.warning("Provider port unreachable", target=name, result=result)
    return dict(zip(targets, results, strict=True))


payment_router = create_payment_router()
