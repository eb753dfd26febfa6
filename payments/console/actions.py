"""The console's actions, each a POST behind a confirmation page and audited with the operator's
name: on a payment refresh, reverse and resolve; redeliver an outgoing event; replay a stored
notification. The outcome goes back to the page the action came from, as ``?done=``/``?failed=``."""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from .. import repository as repo
from ..database import DbSession, run_db
from ..exceptions import PaymentError, PaymentNotFoundError, PaymentValidationError
from ..models import AuditAction
from ..notifications import NotificationProcessor
from ..redaction import sanitize_text
from ..schemas import ReversalRequest
from ..service import PaymentService
from . import security
from .access import ConsoleAccess, ConsoleRedirect, Operator, console_path
from .rendering import http_error_page, render, see_other
from .views import event_view

ACTIONS = ("refresh", "reverse", "resolve")


def _confirmation(
    request: Request, operator: Operator, action: str, target: str, back: str, **page: Any
) -> Response:
    """The page that asks the operator to confirm ``action``: it posts again to ``target`` with
    ``confirmed=yes``; ``back`` cancels."""
    return render(
        request, "confirm.html", operator=operator, action=action, target=target, back=back, **page
    )


async def _audit_action(
    db: DbSession, transaction_id: str, operator: Operator, body: dict[str, Any]
) -> None:
    """Record on the payment who asked for what, before it is done."""

    def write(session: Any) -> None:
        row = repo.get(session, transaction_id)
        if row is not None:
            repo.add_note(
                session,
                row,
                AuditAction.OPERATOR_ACTION,
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
class ReturnPage:
    """The page an action reports to; an action may point it elsewhere once it knows more."""

    url: str


async def _answer_action(
    request: Request, back: ReturnPage, act: Callable[[], Awaitable[Response | str]]
) -> Response:
    """Run one action post. ``act`` returns a page (the confirmation) or what it did; what it did
    and an action's failure go back to ``back``, a refused post is an error page."""
    try:
        outcome = await act()
    except ConsoleRedirect as redirect:
        return see_other(redirect.url)
    except HTTPException as error:
        return http_error_page(request, error)
    except PaymentError as error:
        text = sanitize_text(error.message)[:300]
        return see_other(back.url + "?" + urlencode({"failed": text}))
    if isinstance(outcome, Response):
        return outcome
    return see_other(back.url + "?" + urlencode({"done": outcome}))


def add_action_routes(
    router: APIRouter,
    access: ConsoleAccess,
    get_session: Callable[..., Any],
    provide_service: Callable[..., Any],
) -> None:
    Db = Annotated[DbSession, Depends(get_session)]
    Service = Annotated[PaymentService, Depends(provide_service)]

    @router.post("/payments/{transaction_id}/{action}")
    async def payment_action(
        request: Request, transaction_id: str, action: str, db: Db, payments: Service
    ) -> Response:
        detail = console_path(request) + "payments/" + transaction_id[:64]

        async def act() -> Response | str:
            operator, form = await access.checked_post(request, payments)
            if action not in ACTIONS:
                raise HTTPException(404, "no such action")
            if form.get("confirmed") != "yes":
                if action == "reverse" and not form.get("idempotency_key"):
                    # One key per confirmation: a form sent twice reverses once.
                    form["idempotency_key"] = "console-" + security.secrets.token_urlsafe(18)
                return _confirmation(
                    request,
                    operator,
                    action,
                    detail + "/" + action,
                    detail,
                    transaction_id=transaction_id[:64],
                    form={k: v for k, v in form.items() if k != security.CSRF_FIELD},
                )
            return await _run_action(db, payments, operator, transaction_id, action, form)

        return await _answer_action(request, ReturnPage(detail), act)

    @router.post("/events/{event_id}/redeliver")
    async def redeliver(request: Request, event_id: str, db: Db, payments: Service) -> Response:
        back = ReturnPage(console_path(request) + "events")
        event_id = event_id[:64]

        async def act() -> Response | str:
            operator, form = await access.checked_post(request, payments)
            event = await payments.get_event(event_id, db)
            after = form.get("back") if form.get("back") in ("detail", "events") else "events"
            if after == "detail":
                back.url = console_path(request) + "payments/" + event.transaction_id
            if form.get("confirmed") != "yes":
                target = f"{console_path(request)}events/{event_id}/redeliver"
                return _confirmation(
                    request,
                    operator,
                    "redeliver",
                    target,
                    back.url,
                    transaction_id=event.transaction_id,
                    event=event_view(event),
                    endpoints=payments.settings.webhook_urls(),
                    form={"back": after},
                )
            await _audit_action(
                db,
                event.transaction_id,
                operator,
                {"action": "redeliver_event", "event_id": event_id, "type": event.type},
            )
            again = await payments.redeliver_event(event_id, db)
            due = [d for d in again.deliveries or [] if d.kind == "webhook"]
            return (
                f"event {event_id} is due again at {len(due)} endpoint(s)"
                if due
                else f"event {event_id}: no webhook endpoint is configured (PAYMENT_WEBHOOK_URLS)"
            )

        return await _answer_action(request, back, act)

    @router.post("/notifications/{webhook_id}/replay")
    async def replay(request: Request, webhook_id: int, db: Db, payments: Service) -> Response:
        back = console_path(request) + "notifications"

        async def act() -> Response | str:
            operator, form = await access.checked_post(request, payments)
            if form.get("confirmed") != "yes":
                target = f"{back}/{webhook_id}/replay"
                return _confirmation(
                    request,
                    operator,
                    "replay",
                    target,
                    back,
                    transaction_id=None,
                    webhook_id=webhook_id,
                    form={},
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
            return f"notification {webhook_id} replayed: " + (
                "processed" if result.processed else f"not processed ({result.error})"
            )

        return await _answer_action(request, ReturnPage(back), act)
