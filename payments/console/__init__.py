"""The operator console: server-rendered pages over the payment service, mounted by
``create_payment_router(console=True)`` at ``/payments/console/`` under the host's prefix.

Pages: overview (totals, chart, work queue), payments (filters, pages, CSV), a payment's detail
(fields, audit timeline, reversals, notifications, events) with its actions, stored
notifications, and outgoing events (deliveries per consumer, attempts; redeliver).
Every action is a POST behind a confirmation page, carries a CSRF token and is audited with the
operator's name. Templates live in ``templates/`` beside this file, so they travel with the copied
folder. No page needs JavaScript; the chart is inline SVG.
"""

import csv
import io
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from .. import events
from .. import repository as repo
from ..database import DATABASE_ERRORS, DbSession, run_db
from ..exceptions import (
    InvalidCursorError,
    InvalidStateTransitionError,
    PaymentError,
    PaymentNotFoundError,
    PaymentValidationError,
    UnauthorizedError,
)
from ..logger import payment_logger
from ..models import AuditAction, EventType, PaymentOperation, PaymentStatus, utcnow
from ..mpesa.values import Msisdn, mask_msisdn, money_text
from ..notifications import NotificationProcessor
from ..paging import PageCursor
from ..redaction import sanitize, sanitize_text
from ..schemas import EventResponse, PaymentFilters, ReversalRequest
from ..service import PaymentService
from . import charts, security

TEMPLATES = Path(__file__).parent / "templates"
PER_PAGE = 50
#: Pages reached by number (an OFFSET of at most this many pages); deeper ones by a cursor.
OFFSET_PAGES = 100
#: Page-number links shown under the list.
PAGE_LINKS = 5
WORK_QUEUE_LIMIT = 50
CSV_BATCH = 1000
CSV_MAX_ROWS = 100_000
FORM_MAX_BYTES = 16 * 1024
ACTIONS = ("refresh", "reverse", "resolve")
EVENTS_PER_PAGE = 50
EVENT_TYPES = tuple(kind.value for kind in EventType)

_environment = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _money(value: Decimal | int | float | None) -> str:
    if value is None:
        return ""
    return f"{Decimal(value).quantize(Decimal('0.01')):,.2f}"


def _when(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _age(value: datetime | None, now: datetime | None = None) -> str:
    if value is None:
        return ""
    seconds = int(((now or utcnow()) - value).total_seconds())
    if seconds < 90:
        return f"{max(seconds, 0)} s"
    minutes = seconds // 60
    if minutes < 90:
        return f"{minutes} min"
    hours = minutes // 60
    if hours < 48:
        return f"{hours} h {minutes % 60} min"
    return f"{hours // 24} d {hours % 24} h"


_environment.filters.update(money=_money, when=_when, age=_age, safe_text=sanitize_text)


class ConsoleRedirect(Exception):
    def __init__(self, url: str) -> None:
        self.url = url


@dataclass
class Operator:
    actor: str
    csrf: str
    signed_in: bool  # by the built-in key's session (so sign-out applies)


def _console_path(request: Request) -> str:
    """The console's root path as this request reached it (whatever the host's prefix)."""
    path = request.url.path
    index = path.find("/console/")
    return path[: index + len("/console/")] if index >= 0 else path.rstrip("/") + "/"


def _render(
    request: Request,
    template: str,
    status_code: int = 200,
    operator: Operator | None = None,
    **context: Any,
) -> HTMLResponse:
    base = _console_path(request)
    html = _environment.get_template(template).render(
        base=base,
        operator=operator,
        csrf_field=security.CSRF_FIELD,
        csrf=operator.csrf if operator else context.pop("csrf", ""),
        statuses=[status.value for status in PaymentStatus],
        operations=[operation.value for operation in PaymentOperation],
        **context,
    )
    return HTMLResponse(html, status_code=status_code, headers=_SECURITY_HEADERS)


_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _error_status(error: PaymentError) -> int:
    for kind, status in (
        (UnauthorizedError, 401),
        (PaymentNotFoundError, 404),
        (PaymentValidationError, 422),
        (InvalidStateTransitionError, 409),
    ):
        if isinstance(error, kind):
            return status
    return 502


async def _form(request: Request) -> dict[str, str]:
    """The urlencoded body of a console form, capped (no multipart parser needed)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise HTTPException(415, "console forms are application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_MAX_BYTES:
            raise HTTPException(413, "form too large")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(400, "malformed form") from None
    if any("\x00" in key or "\x00" in value for key, value in pairs):
        raise HTTPException(400, "form fields must not contain NUL characters")
    return dict(pairs)


def _same_origin(request: Request) -> bool:
    """A browser's Origin (sent on every cross-site POST) must be this host."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":  # privacy settings send "null": the token decides
        return True
    host = request.headers.get("host", "")
    return urlsplit(origin).netloc == host


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

    async def provide_service() -> PaymentService:
        value = service()
        if isinstance(value, Awaitable):
            value = await value
        return value  # type: ignore[no-any-return]

    Db = Annotated[DbSession, Depends(get_session)]
    Service = Annotated[PaymentService, Depends(provide_service)]

    def uses_key(request: Request) -> bool:
        return auth is builtin_auth and not security.overridden(request, builtin_auth)

    async def operator_of(request: Request, payments: PaymentService) -> Operator:
        """The signed-in operator, or a redirect to the sign-in form / an error page."""
        settings = payments.settings
        if uses_key(request):
            session = security.read_session(settings, request.cookies.get(security.SESSION_COOKIE))
            if session is None:
                raise ConsoleRedirect(_console_path(request) + "login")
            return Operator(actor=session[0], csrf=session[1], signed_in=True)
        actor = await security.run_auth(request, auth)
        csrf = request.cookies.get(security.CSRF_COOKIE) or ""
        return Operator(actor=actor, csrf=csrf, signed_in=False)

    async def checked_post(request: Request, payments: PaymentService) -> tuple[Operator, dict]:
        if not _same_origin(request):
            raise HTTPException(403, "cross-site form posts are refused")
        operator = await operator_of(request, payments)
        form = await _form(request)
        if not security.tokens_match(form.get(security.CSRF_FIELD), operator.csrf):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
        return operator, form

    def with_csrf_cookie(request: Request, response: Response, operator: Operator) -> Response:
        """Host-auth mode: a double-submit CSRF cookie, set once per browser."""
        if not operator.signed_in and not request.cookies.get(security.CSRF_COOKIE):
            security.set_cookie(
                response, request, security.CSRF_COOKIE, operator.csrf, _console_path(request)
            )
        return response

    async def page(
        request: Request, payments: PaymentService, build: Callable[[Operator], Awaitable[Any]]
    ) -> Response:
        """Run one page: the operator first, errors as pages."""
        try:
            operator = await operator_of(request, payments)
            if not operator.signed_in and not operator.csrf:
                operator.csrf = security.secrets.token_urlsafe(24)
            response = await build(operator)
            return with_csrf_cookie(request, response, operator)
        except ConsoleRedirect as redirect:
            return RedirectResponse(redirect.url, status_code=303)
        except PaymentError as error:
            return _render(
                request, "error.html", _error_status(error), message=sanitize_text(error.message)
            )
        except HTTPException as error:
            return _render(request, "error.html", error.status_code, message=str(error.detail))
        except DATABASE_ERRORS as error:
            payment_logger.error(
                "Console: database unavailable", path=request.url.path, error=type(error).__name__
            )
            return _render(
                request, "error.html", 503, message="The payments database is unavailable."
            )
        except Exception:
            payment_logger.exception("Console page failed", path=request.url.path)
            return _render(
                request, "error.html", 500, message="Something went wrong; it is logged."
            )

    # -- sign-in ---------------------------------------------------------------------------------

    @router.get("/login", name="payments_console_login")
    async def login_form(request: Request, payments: Service) -> Response:
        if not uses_key(request):
            return RedirectResponse(_console_path(request), status_code=303)
        csrf = request.cookies.get(security.CSRF_COOKIE) or security.secrets.token_urlsafe(24)
        response = _render(request, "login.html", csrf=csrf)
        security.set_cookie(response, request, security.CSRF_COOKIE, csrf, _console_path(request))
        return response

    @router.post("/login")
    async def login(request: Request, payments: Service) -> Response:
        if not uses_key(request):
            return RedirectResponse(_console_path(request), status_code=303)
        try:
            if not _same_origin(request):
                raise HTTPException(403, "cross-site form posts are refused")
            form = await _form(request)
        except HTTPException as error:
            return _render(request, "error.html", error.status_code, message=str(error.detail))
        csrf = request.cookies.get(security.CSRF_COOKIE)
        if not security.tokens_match(form.get(security.CSRF_FIELD), csrf):
            return _render(
                request, "login.html", 403, csrf=csrf or "", error="Reload the page and sign in."
            )
        expected = payments.settings.admin_api_key
        if expected is None or not security.tokens_match(form.get("api_key"), expected):
            return _render(
                request, "login.html", 401, csrf=csrf or "", error="Wrong key: not signed in."
            )
        name = security.operator_name(form.get("operator"))
        actor = f"{name} (admin key)" if name else "admin-api-key"
        cookie, _ = security.issue_session(payments.settings, actor)
        response = RedirectResponse(_console_path(request), status_code=303)
        security.set_cookie(
            response, request, security.SESSION_COOKIE, cookie, _console_path(request)
        )
        return response

    @router.post("/logout")
    async def logout(request: Request, payments: Service) -> Response:
        async def build(operator: Operator) -> Response:
            response = RedirectResponse(_console_path(request) + "login", status_code=303)
            response.delete_cookie(
                security.SESSION_COOKIE,
                path=_console_path(request),
                httponly=True,
                samesite="strict",
            )
            return response

        try:
            await checked_post(request, payments)
        except ConsoleRedirect as redirect:
            return RedirectResponse(redirect.url, status_code=303)
        except HTTPException as error:
            return _render(request, "error.html", error.status_code, message=str(error.detail))
        return await build(Operator("", "", True))

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
            hours = charts.fill(_series(hourly), hour, timedelta(hours=1), 24)
            days = charts.fill(_series(daily), week, timedelta(days=1), 7)
            return _render(
                request,
                "overview.html",
                operator=operator,
                periods=[("Today", _totals(today_rows)), ("Last 7 days", _totals(week_rows))],
                hourly_chart=charts.svg(hours, label_format="%H:00", title="Last 24 hours"),
                daily_chart=charts.svg(days, label_format="%d %b", title="Last 7 days"),
                queue=[_row(record, now) for record in queue],
                queue_total=queue_total,
                now=now,
            )

        return await page(request, payments, build)

    # -- payments --------------------------------------------------------------------------------

    def list_query(request: Request, payments: PaymentService) -> ListQuery:
        return ListQuery.parse(request, payments)

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
            return _render(
                request,
                "payments.html",
                operator=operator,
                query=query,
                rows=[_row(record, now) for record in records],
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

            async def lines() -> AsyncIterator[str]:
                buffer = io.StringIO()
                writer = csv.writer(buffer)
                writer.writerow(CSV_COLUMNS)
                after: tuple[datetime, int] | None = None
                sent = 0
                while sent < CSV_MAX_ROWS:
                    batch = await run_db(db, partial(_csv_batch, query, after))
                    for record in batch:
                        writer.writerow(_csv_row(record))
                    sent += len(batch)
                    yield buffer.getvalue()
                    buffer.seek(0)
                    buffer.truncate()
                    if len(batch) < CSV_BATCH:
                        break
                    after = (batch[-1].created_at, batch[-1].id)

            stamp = utcnow().strftime("%Y%m%d-%H%M%S")
            return StreamingResponse(
                lines(),
                media_type="text/csv; charset=utf-8",
                headers={
                    "Content-Disposition": f'attachment; filename="payments-{stamp}.csv"',
                    "Cache-Control": "no-store",
                },
            )

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
                - sum((r.amount for r in reversals if r.status in _OPEN), Decimal("0"))
            )
            return _render(
                request,
                "detail.html",
                operator=operator,
                p=_row(record, now),
                fields=_fields(record),
                trail=[_audit(entry) for entry in trail],
                reversals=[_row(r, now) for r in reversals],
                webhooks=[_webhook(w, record.transaction_id) for w in webhooks],
                events=[_event_view(event) for event in payment_events],
                more_events=more_events,
                runs_hooks=payments.runs_hooks,
                reversible=reversible,
                can_reverse=record.status in ("completed", "partially_reversed")
                and record.operation != "reversal"
                and reversible > 0,
                can_resolve=record.operation != "reversal"
                and (
                    record.status in _OPEN
                    or record.attention_required
                    or (
                        record.status in ("completed", "partially_reversed", "reversed")
                        and not record.provider_transaction_id
                    )
                ),
                notice=request.query_params.get("done"),
                failure=request.query_params.get("failed"),
            )

        return await page(request, payments, build)

    @router.post("/payments/{transaction_id}/{action}")
    async def payment_action(
        request: Request, transaction_id: str, action: str, db: Db, payments: Service
    ) -> Response:
        detail = _console_path(request) + "payments/" + transaction_id[:64]
        try:
            operator, form = await checked_post(request, payments)
            if action not in ACTIONS:
                raise HTTPException(404, "no such action")
            if form.get("confirmed") != "yes":
                if action == "reverse" and not form.get("idempotency_key"):
                    # One key per confirmation: a form sent twice reverses once.
                    form["idempotency_key"] = "console-" + security.secrets.token_urlsafe(18)
                return _render(
                    request,
                    "confirm.html",
                    operator=operator,
                    action=action,
                    transaction_id=transaction_id[:64],
                    form={k: v for k, v in form.items() if k != security.CSRF_FIELD},
                    target=detail + "/" + action,
                    back=detail,
                )
            message = await _run_action(db, payments, operator, transaction_id, action, form)
            return RedirectResponse(detail + "?" + urlencode({"done": message}), status_code=303)
        except ConsoleRedirect as redirect:
            return RedirectResponse(redirect.url, status_code=303)
        except HTTPException as error:
            return _render(request, "error.html", error.status_code, message=str(error.detail))
        except PaymentError as error:
            text = sanitize_text(error.message)[:300]
            return RedirectResponse(detail + "?" + urlencode({"failed": text}), status_code=303)

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
            return _render(
                request,
                "events.html",
                operator=operator,
                events=[_event_view(event) for event in found],
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

    @router.post("/events/{event_id}/redeliver")
    async def redeliver(request: Request, event_id: str, db: Db, payments: Service) -> Response:
        back = _console_path(request) + "events"
        event_id = event_id[:64]
        try:
            operator, form = await checked_post(request, payments)
            event = await payments.get_event(event_id, db)
            after = form.get("back") if form.get("back") in ("detail", "events") else "events"
            if after == "detail":
                back = _console_path(request) + "payments/" + event.transaction_id
            if form.get("confirmed") != "yes":
                return _render(
                    request,
                    "confirm.html",
                    operator=operator,
                    action="redeliver",
                    transaction_id=event.transaction_id,
                    event=_event_view(event),
                    endpoints=payments.settings.webhook_urls(),
                    form={"back": after},
                    target=f"{_console_path(request)}events/{event_id}/redeliver",
                    back=back,
                )
            await _audit_action(
                db,
                event.transaction_id,
                operator,
                {"action": "redeliver_event", "event_id": event_id, "type": event.type},
            )
            again = await payments.redeliver_event(event_id, db)
            due = [d for d in again.deliveries or [] if d.kind == "webhook"]
            message = (
                f"event {event_id} is due again at {len(due)} endpoint(s)"
                if due
                else f"event {event_id}: no webhook endpoint is configured (PAYMENT_WEBHOOK_URLS)"
            )
            return RedirectResponse(back + "?" + urlencode({"done": message}), status_code=303)
        except ConsoleRedirect as redirect:
            return RedirectResponse(redirect.url, status_code=303)
        except HTTPException as error:
            return _render(request, "error.html", error.status_code, message=str(error.detail))
        except PaymentError as error:
            text = sanitize_text(error.message)[:300]
            return RedirectResponse(back + "?" + urlencode({"failed": text}), status_code=303)

    # -- notifications ---------------------------------------------------------------------------

    @router.get("/notifications", name="payments_console_notifications")
    async def notifications(request: Request, db: Db, payments: Service) -> Response:
        async def build(operator: Operator) -> Response:
            params = request.query_params
            valid = _flag(params.get("valid"))
            processed = _flag(params.get("processed"))
            page_no = _page(params.get("page"))
            rows, total = await run_db(
                db,
                lambda s: repo.console_webhooks(
                    s, is_valid=valid, is_processed=processed, page=page_no, per_page=PER_PAGE
                ),
            )
            base_query = {
                k: v
                for k, v in (("valid", params.get("valid")), ("processed", params.get("processed")))
                if v
            }
            return _render(
                request,
                "notifications.html",
                operator=operator,
                rows=[_webhook(w, tid) for w, tid in rows],
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

    @router.post("/notifications/{webhook_id}/replay")
    async def replay(request: Request, webhook_id: int, db: Db, payments: Service) -> Response:
        back = _console_path(request) + "notifications"
        try:
            operator, form = await checked_post(request, payments)
            if form.get("confirmed") != "yes":
                return _render(
                    request,
                    "confirm.html",
                    operator=operator,
                    action="replay",
                    transaction_id=None,
                    webhook_id=webhook_id,
                    form={},
                    target=f"{back}/{webhook_id}/replay",
                    back=back,
                )
            if not 1 <= webhook_id <= 2**31 - 1:
                raise PaymentNotFoundError(f"notification {webhook_id} not found")
            result = await NotificationProcessor(payments).process(db, webhook_id, replay=True)
            if result.transaction_id is not None:
                await _audit_action(
                    db,
                    result.transaction_id,
                    operator,
                    {"action": "replay_notification", "webhook_id": webhook_id},
                )
            message = f"notification {webhook_id} replayed: " + (
                "processed" if result.processed else f"not processed ({result.error})"
            )
            return RedirectResponse(back + "?" + urlencode({"done": message}), status_code=303)
        except ConsoleRedirect as redirect:
            return RedirectResponse(redirect.url, status_code=303)
        except HTTPException as error:
            return _render(request, "error.html", error.status_code, message=str(error.detail))
        except PaymentError as error:
            text = sanitize_text(error.message)[:300]
            return RedirectResponse(back + "?" + urlencode({"failed": text}), status_code=303)

    return router


_OPEN = ("pending", "processing", "unknown")
CSV_COLUMNS = (
    "transaction_id",
    "created_at",
    "operation",
    "status",
    "amount",
    "reversed_amount",
    "currency",
    "phone_number",
    "provider_transaction_id",
    "third_party_reference",
    "account_reference",
    "entity_type",
    "entity_id",
    "response_code",
    "attention_required",
    "original_transaction_id",
    "completed_at",
)


def _csv_batch(
    query: "ListQuery", after: tuple[datetime, int] | None, session: Any
) -> list[repo.PaymentRecord]:
    return repo.console_batch(
        session,
        query.filters,
        reference=query.reference,
        search=query.search,
        after=after,
        size=CSV_BATCH,
    )


def _cell(value: Any) -> str:
    """Text a spreadsheet will not run as a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _csv_row(record: repo.PaymentRecord) -> list[str]:
    return [
        _cell(value)
        for value in (
            record.transaction_id,
            record.created_at.astimezone(UTC).isoformat(),
            record.operation,
            record.status,
            money_text(record.amount),
            money_text(record.reversed_amount),
            record.currency,
            mask_msisdn(record.phone_number) if record.phone_number else "",
            record.provider_transaction_id,
            record.third_party_reference,
            sanitize_text(record.account_reference) if record.account_reference else "",
            record.entity_type,
            record.entity_id,
            record.response_code,
            "true" if record.attention_required else "false",
            record.original_transaction_id,
            record.completed_at.astimezone(UTC).isoformat() if record.completed_at else "",
        )
    ]


def _flag(value: str | None) -> bool | None:
    return {"true": True, "false": False}.get((value or "").lower())


def _page(value: str | None) -> int:
    try:
        return min(max(int(value or "1"), 1), 100_000)
    except ValueError:
        return 1


_SUCCEEDED = ("completed", "partially_reversed", "reversed")


def _series(
    rows: list[tuple[datetime, str, str, int, Decimal]],
) -> list[tuple[datetime, int, int, int]]:
    """Per bucket: (start, payments, succeeded, settled), reversals left out."""
    buckets: dict[datetime, list[int]] = {}
    for start, status, operation, count, _ in rows:
        if operation == "reversal":
            continue
        bucket = buckets.setdefault(start, [0, 0, 0])
        bucket[0] += count
        bucket[1] += count if status in _SUCCEEDED else 0
        bucket[2] += count if status not in _OPEN else 0
    return [(start, *values) for start, values in sorted(buckets.items())]  # type: ignore[misc]


def _totals(rows: list[tuple[str, str, int, Decimal]]) -> dict[str, Any]:
    """One period's table: per status and operation, with totals and the success rate."""
    cells: dict[Any, tuple[int, Decimal]] = {}
    statuses: dict[Any, tuple[int, Decimal]] = {}
    operations: dict[Any, tuple[int, Decimal]] = {}
    for status, operation, count, amount in rows:
        for bucket, key in (
            (cells, (status, operation)),
            (statuses, status),
            (operations, operation),
        ):
            c, a = bucket.get(key, (0, Decimal("0")))
            bucket[key] = (c + count, a + amount)
    payments = [row for row in rows if row[1] != "reversal"]
    succeeded = sum(
        r[2] for r in payments if r[0] in ("completed", "partially_reversed", "reversed")
    )
    settled = sum(r[2] for r in payments if r[0] not in _OPEN)
    return {
        "cells": cells,
        "statuses": statuses,
        "operations": operations,
        # Payments (C2B, B2C, B2B); reversals are shown apart, as money going back.
        "count": sum(r[2] for r in payments),
        "amount": sum((r[3] for r in payments), Decimal("0")),
        "completed_amount": sum(
            (r[3] for r in payments if r[0] in ("completed", "partially_reversed", "reversed")),
            Decimal("0"),
        ),
        "reversals": sum(r[2] for r in rows if r[1] == "reversal"),
        "reversed_amount": sum(
            (r[3] for r in rows if r[1] == "reversal" and r[0] == "completed"), Decimal("0")
        ),
        "success_rate": (succeeded / settled) if settled else None,
        "settled": settled,
    }


def _row(record: repo.PaymentRecord, now: datetime) -> dict[str, Any]:
    return {
        "transaction_id": record.transaction_id,
        "operation": record.operation,
        "status": record.status,
        "amount": record.amount,
        "reversed_amount": record.reversed_amount,
        "currency": record.currency,
        "phone": mask_msisdn(record.phone_number) if record.phone_number else "",
        "receiver": record.receiver_party_code or "",
        "reference": sanitize_text(record.account_reference) if record.account_reference else "",
        "provider_transaction_id": record.provider_transaction_id or "",
        "attention_required": record.attention_required,
        "operator_hold": record.operator_hold,
        "created_at": record.created_at,
        "age": _age(record.created_at, now),
        "reason": _queue_reason(record),
    }


def _queue_reason(record: repo.PaymentRecord) -> str:
    if record.operator_hold:
        return "held for an operator"
    if record.attention_required:
        return "attention required"
    if record.status == "unknown":
        return "outcome unknown"
    if record.status in ("pending", "processing"):
        return "stuck in " + record.status
    return ""


#: What the detail page lists, in order. The phone number is shown masked; keys never.
_DETAIL_FIELDS = (
    "transaction_id",
    "operation",
    "status",
    "amount",
    "reversed_amount",
    "currency",
    "phone_number",
    "receiver_party_code",
    "provider_transaction_id",
    "conversation_id",
    "third_party_reference",
    "transaction_reference",
    "account_reference",
    "description",
    "entity_type",
    "entity_id",
    "customer_name",
    "customer_email",
    "user_id",
    "response_code",
    "response_description",
    "status_description",
    "error_code",
    "original_transaction_id",
    "metadata",
    "attention_required",
    "operator_hold",
    "reconcile_attempts",
    "version",
    "created_at",
    "updated_at",
    "completed_at",
)


def _fields(record: repo.PaymentRecord) -> list[tuple[str, str]]:
    shown = []
    for name in _DETAIL_FIELDS:
        value = getattr(record, name)
        if name == "phone_number":
            text = mask_msisdn(value) if value else ""
        elif isinstance(value, datetime):
            text = _when(value)
        elif isinstance(value, Decimal):
            text = f"{value:.2f}"
        elif isinstance(value, dict):
            text = str(sanitize(value))
        elif value is None:
            text = ""
        else:
            text = sanitize_text(str(value))
        shown.append((name, text))
    return shown


def _audit(entry: Any) -> dict[str, Any]:
    return {
        "id": entry.id,
        "action": entry.action,
        "status_before": entry.status_before,
        "status_after": entry.status_after,
        "request_body": _pretty(entry.request_body),
        "response_body": _pretty(entry.response_body),
        "http_status": entry.http_status,
        "error_message": sanitize_text(entry.error_message) if entry.error_message else None,
        "response_time_ms": entry.response_time_ms,
        "actor": sanitize_text(entry.actor) if entry.actor else None,
        "created_at": entry.created_at,
    }


def _pretty(body: Any) -> str | None:
    if body is None:
        return None
    import json

    return json.dumps(sanitize(body), indent=1, ensure_ascii=False, default=str)[:4000]


def _webhook(webhook: Any, transaction_id: str | None) -> dict[str, Any]:
    return {
        "id": webhook.id,
        "source": webhook.source,
        "received_at": webhook.received_at,
        "remote_ip": webhook.remote_ip,
        "is_valid": webhook.is_valid,
        "validation_error": webhook.validation_error,
        "is_processed": webhook.is_processed,
        "processed_at": webhook.processed_at,
        "processing_error": sanitize_text(webhook.processing_error)
        if webhook.processing_error
        else None,
        "attempts": webhook.attempts,
        "transaction_id": transaction_id,
        "body": sanitize_text(webhook.raw_body)[:2000],
    }


def _event_view(event: EventResponse) -> dict[str, Any]:
    """An event for a page: its deliveries per consumer, each with its attempts (newest last)."""
    return {
        "id": event.id,
        "type": event.type,
        "transaction_id": event.transaction_id,
        "created_at": event.created_at,
        "data": _pretty(event.data),
        "deliveries": [
            {
                "kind": d.kind,
                "consumer": "host's hooks" if d.kind == "hooks" else sanitize_text(d.consumer),
                "status": d.status,
                "attempts": d.attempts,
                "next_attempt_at": d.next_attempt_at if d.status == "pending" else None,
                "delivered_at": d.delivered_at,
                "attempt_log": [
                    {
                        "attempted_at": a.attempted_at,
                        "status_code": a.status_code,
                        "duration_ms": a.duration_ms,
                        "error": sanitize_text(a.error) if a.error else None,
                        "response_body": sanitize_text(a.response_body)[:500]
                        if a.response_body
                        else None,
                    }
                    for a in d.attempt_log
                ],
            }
            for d in event.deliveries or []
        ],
        "has_webhooks": any(d.kind == "webhook" for d in event.deliveries or []),
    }


async def _audit_action(
    db: DbSession, transaction_id: str, operator: Operator, body: dict[str, Any]
) -> None:
    def write(session: Any) -> None:
        row = repo.get(session, transaction_id)
        if row is not None:
            repo.add_audit(
                session,
                row.id,
                AuditAction.OPERATOR_ACTION,
                status_before=row.status,
                status_after=row.status,
                request_body=body | {"via": "console"},
                actor=operator.actor,
            )
        session.commit()

    await run_db(db, write, write=True)


async def _run_action(
    db: DbSession,
    payments: PaymentService,
    operator: Operator,
    transaction_id: str,
    action: str,
    form: dict[str, str],
) -> str:
    """Do one confirmed action; returns what to tell the operator."""
    if action == "refresh":
        await _audit_action(db, transaction_id, operator, {"action": "refresh"})
        result = await payments.refresh(transaction_id, db, actor=operator.actor)
        return f"Refreshed from M-Pesa: {result.status}"
    if action == "resolve":
        result = await payments.resolve(
            transaction_id,
            db,
            reason=form.get("reason", ""),
            status=form.get("status") or None,
            provider_transaction_id=(form.get("provider_transaction_id") or "").strip() or None,
            actor=operator.actor,
        )
        return f"Resolved: {result.status}"
    # reverse
    reason = (form.get("reason") or "").strip()
    if not reason:
        raise PaymentValidationError("a reversal needs a reason", field="reason")
    amount_text = (form.get("amount") or "").strip()
    try:
        request = ReversalRequest(amount=amount_text or None, reason=reason)
    except ValidationError as error:
        problems = "; ".join(str(e.get("msg", "")) for e in error.errors())
        raise PaymentValidationError(f"invalid reversal: {problems}", field="amount") from None
    await _audit_action(
        db,
        transaction_id,
        operator,
        {"action": "reverse", "amount": amount_text or "all", "reason": reason},
    )
    result = await payments.reverse(
        transaction_id, request, db, operator.actor, idempotency_key=form.get("idempotency_key")
    )
    return f"Reversal {result.transaction_id}: {result.status} ({result.amount:.2f} MZN)"


@dataclass
class ListQuery:
    filters: PaymentFilters
    reference: str | None
    search: str | None
    page: int
    values: dict[str, str]  # what the form shows again (never a phone number)
    phone_masked: str | None
    params: dict[str, str]  # what links carry (the phone as a token)
    error: str | None = None
    redirect: str | None = None
    after: tuple[datetime, int] | None = None

    def link(self, **changes: Any) -> str:
        merged = {k: v for k, v in (self.params | changes).items() if v not in (None, "")}
        return "?" + urlencode(merged)

    @classmethod
    def parse(cls, request: Request, payments: PaymentService) -> "ListQuery":
        params = request.query_params
        names = ("status", "operation", "entity_type", "entity_id", "from_date", "to_date")
        raw = {name: (params.get(name) or "").strip()[:100] for name in names}
        reference = (params.get("reference") or "").strip()[:100] or None
        search = (params.get("q") or "").strip()[:100] or None
        carried = {k: v for k, v in raw.items() if v}
        if reference:
            carried["reference"] = reference
        if search:
            carried["q"] = search
        phone_digits: str | None = None
        error: str | None = None
        typed_phone = (params.get("phone") or "").strip()
        if typed_phone:
            # A typed number never stays in a URL or on the page: it becomes a token.
            try:
                digits = Msisdn(typed_phone[:30]).digits
            except (ValueError, PaymentValidationError):
                error = "phone number: not a Mozambican M-Pesa number (84/85 …)"
            else:
                token = security.phone_token(payments.settings, digits)
                query = urlencode(carried | {"phone_token": token})
                return cls(PaymentFilters(), None, None, 1, {}, None, {}, redirect="?" + query)
        token = params.get("phone_token")
        if token:
            phone_digits = security.phone_from_token(payments.settings, token[:500])
            if phone_digits is None:
                error = "the phone filter has expired: type the number again"
            else:
                carried["phone_token"] = token
        try:
            filters = PaymentFilters(
                status=raw["status"] or None,
                operation=raw["operation"] or None,
                entity_type=raw["entity_type"] or None,
                entity_id=raw["entity_id"] or None,
                from_date=raw["from_date"] or None,
                to_date=raw["to_date"] or None,
                phone_number=phone_digits,
            )
        except ValidationError as exc:
            error = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}".removeprefix(": ")
                for e in exc.errors()
            )
            filters = PaymentFilters()
        page_no, after = _page(params.get("page")), None
        if page_no > OFFSET_PAGES:
            page_no = OFFSET_PAGES
            error = error or (
                f"pages beyond {OFFSET_PAGES} are reached with Older →, or narrow the filter"
            )
        if params.get("cursor"):
            try:
                cursor = PageCursor.decode((params.get("cursor") or "")[:300])
            except InvalidCursorError:
                error = error or "that page link is not valid any more: start from the first page"
            else:
                page_no, after = cursor.page, (cursor.created_at, cursor.id)
        return cls(
            filters,
            reference,
            search,
            page_no,
            {k: sanitize_text(v) for k, v in carried.items() if k != "phone_token"},
            mask_msisdn(phone_digits) if phone_digits else None,
            carried,
            error=error,
            after=after,
        )
