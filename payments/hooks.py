"""The hooks a host overrides, and running them: right after the service's own commits
(``runs_hooks``) or, for one another process committed, in the dispatcher."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from . import events
from . import repository as repo
from .database import DATABASE_ERRORS, DbSession, committing, run_db
from .exceptions import PaymentError
from .lifecycle import UNSUCCESSFUL
from .logger import payment_logger
from .models import AuditAction, ConsumerKind, PaymentOperation, PaymentStatus
from .outcomes import Outcome, error_for_record
from .redaction import sanitize_text
from .repository import PaymentRecord
from .service_base import ServiceBase

S = PaymentStatus


class PaymentHooks(ServiceBase):
    """The hooks (no-ops here: a subclass overrides them) and the events that run them."""

    @property
    def runs_hooks(self) -> bool:
        """Whether this service has hooks of its own (a subclass overrides one): only then does
        it run hook events, right after its own commits and in its dispatcher. A plain
        ``PaymentService`` (the ``reconcile`` CLI without ``--service``) leaves them to the
        host's service, in whichever process runs it."""
        own = getattr(self, "__dict__", {})  # a hook set on the instance counts too
        return any(
            name in own or getattr(type(self), name) is not getattr(PaymentHooks, name)
            for name in _HOOKS
        )

    @property
    def current_event_id(self) -> str | None:
        """The id of the event whose hook is running (``None`` outside a hook): a hook that
        keeps the old signature reads it to dedupe; one may declare ``event_id`` instead."""
        return events.current_event_id.get()

    def event_sink(self) -> events.EventSink:
        settings = self.settings
        lease = timedelta(seconds=settings.payment_hook_lease_seconds)
        return events.EventSink(
            webhook_urls=tuple(settings.webhook_urls()),
            hook_lease=lease if self.runs_hooks else None,
        )

    async def on_payment_completed(self, transaction: PaymentRecord) -> None:
        """A payment (C2B, B2C or B2B) completed: money moved."""

    async def on_payment_failed(
        self, transaction: PaymentRecord, error: PaymentError | None
    ) -> None:
        """A payment ended failed, cancelled or expired: no money moved."""

    async def on_payment_unknown(self, transaction: PaymentRecord) -> None:
        """The outcome is unknown for now; reconciliation will settle it."""

    async def on_reversal_completed(self, reversal: PaymentRecord, original: PaymentRecord) -> None:
        """A reversal went through; ``original`` shows the new reversed amount."""

    async def on_reversal_failed(self, reversal: PaymentRecord, error: PaymentError | None) -> None:
        """A reversal was refused; the original payment is unchanged."""

    async def _after_commit(
        self,
        db: DbSession,
        written: list[events.WrittenEvent],
        record: PaymentRecord,
        outcome: Outcome,
        original: PaymentRecord | None,
    ) -> None:
        """The transition's events are committed: wake this process's dispatchers for what is
        due now, and run the hooks now, if this service has any (otherwise the host's dispatcher
        will)."""
        if not written:
            return
        due = frozenset[ConsumerKind]().union(*(event.due_now for event in written))
        if due:
            events.notify(due)
        if not self.runs_hooks:
            return
        for event in written:
            if event.has_hook:
                await self._run_hook_now(db, event.id, record, outcome, original)

    def hook_call(
        self,
        record: PaymentRecord,
        original: PaymentRecord | None,
        error: PaymentError | None = None,
    ) -> tuple[str, tuple[Any, ...]] | None:
        """Which hook a payment in ``record``'s state calls, and with what."""
        status = PaymentStatus(record.status)
        is_reversal = record.operation == PaymentOperation.REVERSAL
        if status is S.COMPLETED:
            if is_reversal:
                return ("on_reversal_completed", (record, original)) if original else None
            return "on_payment_completed", (record,)
        if status in UNSUCCESSFUL:
            error = error or error_for_record(record)
            name = "on_reversal_failed" if is_reversal else "on_payment_failed"
            return name, (record, error)
        if status is S.UNKNOWN:
            return "on_payment_unknown", (record,)
        return None

    async def _run_hook_now(
        self,
        db: DbSession,
        event_id: str,
        record: PaymentRecord,
        outcome: Outcome,
        original: PaymentRecord | None,
    ) -> None:
        call = self.hook_call(record, original, outcome.error)
        if call is None:
            return
        try:
            taken = await run_db(
                db, committing(lambda s: events.hook_delivery(s, event_id)), write=True
            )
        except DATABASE_ERRORS:  # the dispatcher runs it once the lease is over
            payment_logger.error("Could not take a hook delivery", event_id=event_id)
            return
        if taken is None:
            return  # a dispatcher ran it already
        from .dispatcher import finish_hook  # the dispatcher imports the service

        await finish_hook(self, db, taken, event_id, record, *call)

    async def audit_hook_failure(
        self, db: DbSession, record: PaymentRecord, exc: BaseException
    ) -> None:
        payment_logger.exception(
            "Payment hook failed", transaction_id=record.transaction_id, status=record.status
        )
        message = sanitize_text(f"{type(exc).__name__} in hook for status {record.status}: {exc}")
        try:
            await run_db(
                db,
                committing(
                    lambda s: repo.add_audit(
                        s, record.id, AuditAction.HOOK_FAILED, error_message=message[:2000]
                    )
                ),
                write=True,
            )
        except DATABASE_ERRORS:
            payment_logger.error(
                "Could not audit the failed hook", transaction_id=record.transaction_id
            )


#: The hooks a host may override (``runs_hooks``).
_HOOKS = (
    "on_payment_completed",
    "on_payment_failed",
    "on_payment_unknown",
    "on_reversal_completed",
    "on_reversal_failed",
)
