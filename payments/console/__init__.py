"""The operator console: server-rendered pages over the payment service, mounted by
``create_payment_router(console=True)`` at ``/payments/console/`` under the host's prefix.

Pages: overview (totals, chart, work queue), payments (filters, pages, CSV), a payment's detail
(fields, audit timeline, reversals, notifications, events) with its actions, stored
notifications, and outgoing events (deliveries per consumer, attempts; redeliver).
Every action is a POST behind a confirmation page, carries a CSRF token and is audited with the
operator's name. Templates live in ``templates/`` beside this file, so they travel with the copied
folder. No page needs JavaScript; the chart is inline SVG.

This module holds the router and its read-only pages; beside it: ``access`` (operator, CSRF,
forms), ``rendering`` (templates, headers, error pages), ``signin``, ``actions`` (the POSTs),
``listing`` (the list's query), ``export`` (CSV), ``views`` and ``totals`` (what pages show).
"""

import math
from collections.abc import Awaitable, Callable
from datetime import timedelta
from decimal import Decimal
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from .. import events
from .. import repository as repo
from ..database import DbSession, run_db
from ..exceptions import PaymentNotFoundError
from ..lifecycle import REVERSIBLE, SUCCEEDED, UNSETTLED
from ..models import EventType, PaymentOperation, utcnow
from ..paging import PageCursor
from ..redaction import sanitize_text
from ..service import PaymentService
from . import charts
from .access import FORM_MAX_BYTES, ConsoleAccess, ConsoleRedirect, Operator
from .actions import ACTIONS, add_action_routes
from .export import CSV_BATCH, CSV_COLUMNS, CSV_MAX_ROWS, csv_response
from .listing import ListQuery, parse_flag, parse_page
from .rendering import TEMPLATES, render, run_page
from .signin import add_sign_in_routes
from .totals import chart_series, period_totals
from .views import (
    audit_view,
    detail_fields,
    event_view,
    notification_view,
    payment_row,
)

__all__ = [
    "ACTIONS",
    "CSV_BATCH",
    "CSV_COLUMNS",
    "CSV_MAX_ROWS",
    "EVENTS_PER_PAGE",
    "EVENT_TYPES",
    "FORM_MAX_BYTES",
    "OFFSET_PAGES",
    "PAGE_LINKS",
    "PER_PAGE",
    "TEMPLATES",
    "WORK_QUEUE_LIMIT",
    "ConsoleRedirect",
    "ListQuery",
    "Operator",
    "create_console_router",
]

# Read when a page is built (not bound at import), so a test may set them on this module.
PER_PAGE = 50
#: Pages reached by number (an OFFSET of at most this many pages); deeper ones by a cursor.
OFFSET_PAGES = 100
#: Page-number links shown under the list.
PAGE_LINKS = 5
WORK_QUEUE_LIMIT = 50
EVENTS_PER_PAGE = 50
EVENT_TYPES = tuple(kind.value for kind in EventType)


def create_console_router(
    *,
    auth: Callable[..., Any],
    builtin_auth: Callable[..., Any],
    get_session: Callable[..., Any],
    service: Callable[[], Any],
) -> APIRouter:
    """The console's routes (prefix ``/console``). ``auth`` is the router's staff dependency;
    when it is ``builtin_auth`` (the admin key) and not overridden in the app, the console signs
    operators in with the key and keeps a signed session cookie instead."""
    router = APIRouter(prefix="/console", include_in_schema=False)
    access = ConsoleAccess(auth=auth, builtin_auth=builtin_auth)

    async def provide_service() -> PaymentService:
        value = service()
        if isinstance(value, Awaitable):
            value = await value
        return value  # type: ignore[no-any-return]

    Db = Annotated[DbSession, Depends(get_session)]
    Service = Annotated[PaymentService, Depends(provide_service)]

    async def page(
        request: Request, payments: PaymentService, build: Callable[[Operator], Awaitable[Any]]
    ) -> Response:
        return await run_page(access, request, payments, build)

    def list_query(request: Request, payments: PaymentService) -> ListQuery:
        return ListQuery.parse(request, payments, offset_pages=OFFSET_PAGES)

    add_sign_in_routes(router, access, provide_service)

    # -- overview --------------------------------------------------------------------------------

    @router.get("/", name="payments_console_overview")
    async def overview(request: Request, db: Db, payments: Service) -> Response:
        async def build(operator: Operator) -> Response:
            now = utcnow()
            today = now.replace(hour=0, minute=0, second=0, microsecond=0)
            week = today - timedelta(days=6)
            hour = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=23)
            stuck = {op.value: now - payments.call_window(op.value) for op in PaymentOperation}

            def load(session: Any) -> Any:
                return (
                    repo.activity(session, week, hourly=False),
                    repo.activity(session, hour, hourly=True),
                    repo.work_queue(session, stuck_created_before=stuck, limit=WORK_QUEUE_LIMIT),
                )

            daily, hourly, (queue, queue_total) = await run_db(db, load)
            today_rows = [row[1:] for row in daily if row[0] >= today]
            week_rows = [row[1:] for row in daily]
            hours = charts.fill(chart_series(hourly), hour, timedelta(hours=1), 24)
            days = charts.fill(chart_series(daily), week, timedelta(days=1), 7)
            return render(
                request,
                "overview.html",
                operator=operator,
                periods=[
                    ("Today", period_totals(today_rows)),
                    ("Last 7 days", period_totals(week_rows)),
                ],
                hourly_chart=charts.svg(hours, label_format="%H:00", title="Last 24 hours"),
                daily_chart=charts.svg(days, label_format="%d %b", title="Last 7 days"),
                queue=[payment_row(record, now) for record in queue],
                queue_total=queue_total,
                now=now,
            )

        return await page(request, payments, build)

    # -- payments --------------------------------------------------------------------------------

    @router.get("/payments", name="payments_console_list")
    async def payments_list(request: Request, db: Db, payments: Service) -> Response:
        async def build(operator: Operator) -> Response:
            query = list_query(request, payments)
            if query.redirect:
                raise ConsoleRedirect(query.redirect)
            records, total = await run_db(
                db,
                lambda s: repo.console_page(
                    s,
                    query.filters,
                    reference=query.reference,
                    search=query.search,
                    page=query.page,
                    per_page=PER_PAGE,
                    after=query.after,
                ),
            )
            pages = max(1, math.ceil(total / PER_PAGE))
            older = (
                query.link(
                    page=None,
                    cursor=PageCursor(
                        records[-1].created_at, records[-1].id, query.page + 1
                    ).encode(),
                )
                if records and query.page < pages
                else None
            )
            newer = (
                query.link(page=query.page - 1 if query.page > 2 else None)
                if 1 < query.page <= OFFSET_PAGES + 1
                else None
            )
            now = utcnow()
            return render(
                request,
                "payments.html",
                operator=operator,
                query=query,
                rows=[payment_row(record, now) for record in records],
                total=total,
                page=query.page,
                pages=pages,
                link=query.link,
                older=older,
                newer=newer,
                first=query.link(page=None) if query.page > 1 else None,
                page_links=[
                    (n, query.link(page=n if n > 1 else None))
                    for n in range(1, min(pages, PAGE_LINKS) + 1)
                ],
                error=query.error,
            )

        return await page(request, payments, build)

    @router.get("/payments.csv", name="payments_console_csv")
    async def payments_csv(request: Request, db: Db, payments: Service) -> Response:
        async def build(operator: Operator) -> Response:
            query = list_query(request, payments)
            if query.error or query.redirect:
                raise HTTPException(422, query.error or "invalid filter")
            return csv_response(db, query)

        return await page(request, payments, build)

    @router.get("/payments/{transaction_id}", name="payments_console_detail")
    async def payment_detail(
        request: Request, transaction_id: str, db: Db, payments: Service
    ) -> Response:
        async def build(operator: Operator) -> Response:
            found = await run_db(db, lambda s: repo.payment_detail(s, transaction_id[:64]))
            if found is None:
                raise PaymentNotFoundError(f"payment {transaction_id[:64]} not found")
            record, trail, reversals, webhooks = found
            payment_events, more_events = await run_db(
                db,
                lambda s: events.recent_events(
                    s,
                    before=None,
                    event_type=None,
                    transaction_id=record.transaction_id,
                    limit=EVENTS_PER_PAGE,
                ),
            )
            now = utcnow()
            reversible = (
                record.amount
                - record.reversed_amount
                - sum((r.amount for r in reversals if r.status in UNSETTLED), Decimal("0"))
            )
            return render(
                request,
                "detail.html",
                operator=operator,
                p=payment_row(record, now),
                fields=detail_fields(record),
                trail=[audit_view(entry) for entry in trail],
                reversals=[payment_row(r, now) for r in reversals],
                webhooks=[notification_view(w, record.transaction_id) for w in webhooks],
                events=[event_view(event) for event in payment_events],
                more_events=more_events,
                runs_hooks=payments.runs_hooks,
                reversible=reversible,
                can_reverse=record.status in REVERSIBLE
                and record.operation != "reversal"
                and reversible > 0,
                can_resolve=record.operation != "reversal"
                and (
                    record.status in UNSETTLED
                    or record.attention_required
                    or (record.status in SUCCEEDED and not record.provider_transaction_id)
                ),
                notice=request.query_params.get("done"),
                failure=request.query_params.get("failed"),
            )

        return await page(request, payments, build)

    # -- events ----------------------------------------------------------------------------------

    @router.get("/events", name="payments_console_events")
    async def events_page(request: Request, db: Db, payments: Service) -> Response:
        async def build(operator: Operator) -> Response:
            params = request.query_params
            event_type = (params.get("type") or "").strip()[:40]
            transaction_id = (params.get("transaction_id") or "").strip()[:64]
            before = (params.get("before") or "").strip()[:64]
            error = None
            if event_type and event_type not in EVENT_TYPES:
                error = f"type: not an event type ({sanitize_text(event_type)})"
                event_type = ""
            found, more = await run_db(
                db,
                lambda s: events.recent_events(
                    s,
                    before=before or None,
                    event_type=event_type or None,
                    transaction_id=transaction_id or None,
                    limit=EVENTS_PER_PAGE,
                ),
            )
            carried = {
                k: v for k, v in (("type", event_type), ("transaction_id", transaction_id)) if v
            }
            return render(
                request,
                "events.html",
                operator=operator,
                events=[event_view(event) for event in found],
                event_types=EVENT_TYPES,
                event_type=event_type,
                transaction_id=sanitize_text(transaction_id),
                newest_link="?" + urlencode(carried) if before else None,
                older_link="?" + urlencode(carried | {"before": found[-1].id})
                if more and found
                else None,
                endpoints=len(payments.settings.webhook_urls()),
                runs_hooks=payments.runs_hooks,
                error=error,
                notice=params.get("done"),
                failure=params.get("failed"),
            )

        return await page(request, payments, build)

    # -- notifications ---------------------------------------------------------------------------

    @router.get("/notifications", name="payments_console_notifications")
    async def notifications(request: Request, db: Db, payments: Service) -> Response:
        async def build(operator: Operator) -> Response:
            params = request.query_params
            valid = parse_flag(params.get("valid"))
            processed = parse_flag(params.get("processed"))
            page_no = parse_page(params.get("page"))
            rows, total = await run_db(
                db,
                lambda s: repo.console_notifications(
                    s, is_valid=valid, is_processed=processed, page=page_no, per_page=PER_PAGE
                ),
            )
            base_query = {
                k: v
                for k, v in (("valid", params.get("valid")), ("processed", params.get("processed")))
                if v
            }
            return render(
                request,
                "notifications.html",
                operator=operator,
                rows=[notification_view(w, tid) for w, tid in rows],
                total=total,
                page=page_no,
                pages=max(1, math.ceil(total / PER_PAGE)),
                valid=params.get("valid", ""),
                processed=params.get("processed", ""),
                link=lambda **changes: "?" + urlencode(base_query | changes),
                notice=params.get("done"),
                failure=params.get("failed"),
            )

        return await page(request, payments, build)

    add_action_routes(router, access, get_session, provide_service)
    return router
