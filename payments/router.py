"""The endpoints: parse, authorize, call one service method (``routing.PaymentRoute`` maps errors).

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

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from . import metrics as prometheus_metrics
from .auth import (
    CUSTOMER,
    IDENTITY_MAX_LENGTH,
    STAFF,
    actor_dependency,
    api_key_scheme,
    identity_of,
    require_api_key,
    role_of,
)
from .console import create_console_router
from .database import DbSession, get_db
from .dependencies import (
    RequestOrigin,
    as_async_dependency,
    default_payment_service,
    get_payment_service,
    request_origin_dependency,
)
from .health import health_report
from .http_errors import ERROR_STATUS, error_response, validation_response
from .lifespan import dispatcher_lifespan
from .models import EventType
from .mpesa.values import MSISDN_PATTERN, Msisdn
from .notifications import NotificationProcessor, ProviderAnswer
from .openapi import CALLBACK_RESPONSES, MONEY_RESPONSES, error_responses
from .paging import MAX_CURSOR_LENGTH
from .routing import PaymentRoute, reads_own_body
from .schemas import (
    NO_NUL_PATTERN,
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

# What hosts import from here; the names defined elsewhere moved out of this module.
__all__ = [
    "CALLBACK_RESPONSES",
    "CUSTOMER",
    "ERROR_STATUS",
    "IDENTITY_MAX_LENGTH",
    "MONEY_RESPONSES",
    "STAFF",
    "PaymentRoute",
    "api_key_scheme",
    "create_payment_router",
    "default_payment_service",
    "dispatcher_lifespan",
    "error_response",
    "get_payment_service",
    "identity_of",
    "payment_router",
    "require_api_key",
    "validation_response",
]


#: An id in the path (``TXN-…``, ``evt_…``); looked up as given, so any text without NUL.
PathText = Annotated[str, Path(pattern=NO_NUL_PATTERN)]


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
    Actor = Annotated[str, Depends(actor_dependency([(staff, STAFF)]))]
    # A staff member's credentials are tried first, so staff read any payment's status with
    # their own; the same dependency for both roles means one call, as staff.
    either: list[tuple[Callable[..., Any], str]] = (
        [(staff, STAFF)] if customer is staff else [(staff, STAFF), (customer, CUSTOMER)]
    )
    # One dependency for both roles (the admin key, or ``auth=``): its callers are staff, as
    # before the roles were split (replays and status reads are not limited to their own).
    customer_role = STAFF if customer is staff else CUSTOMER
    CustomerActor = Annotated[str, Depends(actor_dependency([(customer, customer_role)]))]
    AnyActor = Annotated[str, Depends(actor_dependency(either))]
    service_dependency = as_async_dependency(service)
    Service = Annotated[PaymentService, Depends(service_dependency)]

    # Declared after Db, Actor and Service in each endpoint: FastAPI solves those first, in order.
    Origin = Annotated[RequestOrigin, Depends(request_origin_dependency(service_dependency))]

    @router.post("/initiate", response_model=PaymentResponse, responses=MONEY_RESPONSES)
    async def initiate_payment(
        body: PaymentInitiateRequest,
        request: Request,
        db: Db,
        actor: CustomerActor,
        payments: Service,
        origin: Origin,
    ) -> Response:
        """C2B: the customer gets a PIN prompt; answers when they confirm (up to ~90 s)."""
        return _json(
            await payments.initiate_payment(
                request=body,
                db=db,
                actor=actor,
                idempotency_key=origin.idempotency_key,
                client_ip=origin.client_ip,
                owner=actor if role_of(request) == CUSTOMER else None,
            )
        )

    @router.post("/payouts", response_model=PaymentResponse, responses=MONEY_RESPONSES)
    async def payout(
        body: PayoutRequest, db: Db, actor: Actor, payments: Service, origin: Origin
    ) -> Response:
        """B2C: pay a customer's wallet."""
        return _json(
            await payments.payout(
                body, db, actor, idempotency_key=origin.idempotency_key, client_ip=origin.client_ip
            )
        )

    @router.post("/transfers", response_model=PaymentResponse, responses=MONEY_RESPONSES)
    async def transfer(
        body: TransferRequest, db: Db, actor: Actor, payments: Service, origin: Origin
    ) -> Response:
        """B2B: pay another business's shortcode."""
        return _json(
            await payments.transfer(
                body, db, actor, idempotency_key=origin.idempotency_key, client_ip=origin.client_ip
            )
        )

    @router.post(
        "/{transaction_id}/reverse",
        response_model=PaymentResponse,
        responses=error_responses(404, base=MONEY_RESPONSES),
    )
    async def reverse(
        transaction_id: PathText,
        db: Db,
        actor: Actor,
        payments: Service,
        origin: Origin,
        body: ReversalRequest | None = None,
    ) -> Response:
        """Reverse a completed payment (all of it, or ``amount``). Returns the reversal."""
        return _json(
            await payments.reverse(
                transaction_id,
                body or ReversalRequest(),
                db,
                actor,
                idempotency_key=origin.idempotency_key,
                client_ip=origin.client_ip,
            )
        )

    @router.post(
        "/{transaction_id}/refresh",
        response_model=PaymentResponse,
        responses=error_responses(404, 409, 413, 502, 504),
    )
    async def refresh(
        transaction_id: PathText, db: Db, actor: Actor, payments: Service
    ) -> Response:
        """Ask M-Pesa for the status now and apply it."""
        return _json(await payments.refresh(transaction_id, db, actor=actor))

    @router.post(
        "/{transaction_id}/resolve",
        response_model=PaymentResponse,
        responses=error_responses(400, 404, 409, 413),
    )
    async def resolve(
        transaction_id: PathText, body: ResolveRequest, db: Db, actor: Actor, payments: Service
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
        "/status/{transaction_id}", response_model=PaymentResponse, responses=error_responses(404)
    )
    async def status(
        transaction_id: PathText, request: Request, db: Db, actor: AnyActor, payments: Service
    ) -> Response:
        """One payment. A customer sees only a payment they started (anyone else's is 404)."""
        owner = actor if role_of(request) == CUSTOMER else None
        return _json(await payments.get(transaction_id, db, owner=owner))

    @router.get(
        "/",
        response_model=PaymentListResponse,
        responses=error_responses(
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
                pattern=NO_NUL_PATTERN,
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
        responses=error_responses(
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

    @router.get("/summary", response_model=PaymentSummary, responses=error_responses())
    async def summary(
        db: Db,
        _: Actor,
        payments: Service,
        from_date: ApiDate | None = None,
        to_date: ApiDate | None = None,
    ) -> Response:
        return _json(await payments.summary(db, from_date, to_date))

    @router.get(
        "/audit/{transaction_id}", response_model=AuditTrailResponse, responses=error_responses(404)
    )
    async def audit(transaction_id: PathText, db: Db, _: Actor, payments: Service) -> Response:
        return _json(await payments.audit(transaction_id, db))

    @router.get(
        "/customer-name",
        response_model=CustomerNameResponse,
        responses=error_responses(400, 402, 404, 502, 504),
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
            str | None, Depends(actor_dependency([(staff, STAFF)], only_with_flag="deep"))
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
        token: Annotated[str | None, Query(max_length=512, pattern=NO_NUL_PATTERN)] = None,
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

    reads_own_body(callback_c2b)

    @router.get("/events", response_model=EventListResponse, responses=error_responses())
    async def list_events(
        db: Db,
        _: Actor,
        payments: Service,
        after: Annotated[
            str | None, Query(max_length=64, pattern=NO_NUL_PATTERN, description="an event id")
        ] = None,
        event_type: Annotated[EventType | None, Query(alias="type")] = None,
        transaction_id: Annotated[str | None, Query(max_length=64, pattern=NO_NUL_PATTERN)] = None,
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

    @router.get("/events/{event_id}", response_model=EventResponse, responses=error_responses(404))
    async def get_event(event_id: PathText, db: Db, _: Actor, payments: Service) -> Response:
        """One event with its delivery state per consumer and every attempt."""
        return _json(await payments.get_event(event_id, db))

    @router.post(
        "/events/{event_id}/redeliver",
        response_model=EventResponse,
        responses=error_responses(404, 413),
    )
    async def redeliver_event(event_id: PathText, db: Db, _: Actor, payments: Service) -> Response:
        """Deliver the event again to every configured endpoint (the hooks are not run again)."""
        return _json(await payments.redeliver_event(event_id, db))

    @router.get(
        "/metrics",
        response_class=Response,
        responses=error_responses()
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

    @router.get("/webhooks", responses=error_responses())
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
        responses=error_responses(404, 413),
    )
    async def replay_webhook(webhook_id: int, db: Db, _: Actor, payments: Service) -> ReplayResult:
        """Process a stored notification again (after fixing whatever made it fail)."""
        return await NotificationProcessor(payments).replay(db, webhook_id)

    return router


payment_router = create_payment_router()
