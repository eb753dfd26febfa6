"""Settle payments whose outcome is still open (``pending``, ``processing``, ``unknown``).

A pass leases due payments (``repository.claim_due_for_reconciliation``: ``FOR UPDATE SKIP
LOCKED`` plus a lease in ``next_reconcile_at``, so several workers on one PostgreSQL never work
on the same payment), asks M-Pesa for each one's status without holding a database connection,
and applies the answer through the state machine. It never fails a payment without provider
evidence: an answer-less payment is retried with exponential backoff and, past
``PAYMENT_RECONCILE_ATTENTION_AFTER`` seconds, flagged for an operator (``attention_required``).

Run it as ``python -m payments reconcile [--loop SECONDS]``, schedule ``reconcile_once`` yourself,
or start ``reconcile_forever`` as a background task with the app; the loop also applies the
retention settings hourly (``retention.prune``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from . import events, metrics
from . import repository as repo
from .config import PaymentSettings
from .database import DbSession, SessionSource, as_session_source, committing, run_db
from .logger import payment_logger
from .models import AuditAction, PaymentOperation, PaymentStatus, utcnow
from .outcomes import Outcome
from .reports import PassReport
from .repository import PaymentRecord
from .retention import PRUNE_EVERY, prune
from .service import PaymentService

#: Opens a session: an ``async_sessionmaker``, a synchronous ``sessionmaker``, or
#: ``get_database().session`` (see ``database.as_session_source``).
Sessions = Callable[[], Any]
__all__ = ["ReconcileReport", "SessionSource", "reconcile_forever", "reconcile_once"]

#: Time a payment's database work may take after its query (retries on conflicts included).
DATABASE_MARGIN = timedelta(seconds=30)
#: Backoff between attempts for one payment: 30 s, 1 min, 2 min, … capped at 30 min.
BACKOFF_BASE = timedelta(seconds=30)
BACKOFF_CAP = timedelta(minutes=30)
#: A flagged payment (an operator has been asked to look) is still asked about, in case M-Pesa
#: answers late, but on a bounded schedule: every half of its age, between 1 hour and 1 day
#: (about 8 polls on its first day, then one a day), each writing one UPDATE and, unless the
#: answer changes something, nothing else.
FLAGGED_POLL_MIN = timedelta(hours=1)
FLAGGED_POLL_MAX = timedelta(days=1)


@dataclass
class ReconcileReport(PassReport):
    examined: int = 0
    settled: int = 0
    unresolved: int = 0
    flagged: int = 0
    errors: int = 0
    settled_ids: list[str] = field(default_factory=list)


def query_budget(settings: PaymentSettings) -> timedelta:
    """The longest one status query may take (every attempt timing out, with its backoff); a
    pass cuts a query off there, so the lease below really covers it."""
    attempts = settings.payment_query_max_attempts
    per_attempt = settings.payment_request_timeout + settings.payment_connect_timeout
    return timedelta(
        seconds=attempts * per_attempt + (attempts - 1) * settings.payment_retry_backoff_max
    )


def lease_for(settings: PaymentSettings, batch_size: int, concurrency: int) -> timedelta:
    """How long claimed payments stay invisible to other workers: the whole pass, since the
    last of ``batch_size`` payments waits for ``concurrency`` slots before its query starts."""
    waves = math.ceil(batch_size / max(1, concurrency))
    return waves * (query_budget(settings) + DATABASE_MARGIN)


def backoff(attempts: int) -> timedelta:
    doublings = min(max(0, attempts - 1), 16)  # past the cap anyway; keeps timedelta in range
    return min(BACKOFF_CAP, BACKOFF_BASE * 2**doublings)


def flagged_poll_interval(age: timedelta) -> timedelta:
    """Time to a flagged payment's next poll, by its age: half of it, within 1 hour and 1 day."""
    return min(FLAGGED_POLL_MAX, max(FLAGGED_POLL_MIN, age / 2))


def _changes_nothing(record: PaymentRecord, outcome: Outcome) -> bool:
    """True when applying ``outcome`` would only repeat what the payment already says: no new
    status, no M-Pesa ID it lacks, nothing for an operator."""
    return (
        (outcome.status is None or outcome.status.value == record.status)
        and not outcome.attention
        and not outcome.hold
        and not (outcome.provider_transaction_id and not record.provider_transaction_id)
        and not (outcome.conversation_id and not record.conversation_id)
    )


async def reconcile_once(
    service: PaymentService,
    sessions: Sessions,
    *,
    min_age: float | None = None,
    attention_after: float | None = None,
    batch_size: int | None = None,
    concurrency: int = 10,
    now: Callable[[], datetime] = utcnow,
) -> ReconcileReport:
    """One pass over the due payments at least ``min_age`` seconds old. ``sessions`` opens a
    session: an ``async_sessionmaker``, a synchronous ``sessionmaker`` or
    ``get_database().session``."""
    sessions = as_session_source(sessions)
    settings = service.settings
    min_age = settings.payment_reconcile_min_age if min_age is None else min_age
    attention_after = (
        settings.payment_reconcile_attention_after if attention_after is None else attention_after
    )
    batch_size = batch_size or settings.payment_reconcile_batch_size
    # Whatever min_age says, a payment whose own call may still be answered is not asked about.
    started = now()
    calls_over = {
        operation.value: started - service.call_window(operation) for operation in PaymentOperation
    }
    report = ReconcileReport()

    async with sessions() as db:
        claimed = await run_db(
            db,
            committing(
                lambda s: repo.claim_due_for_reconciliation(
                    s,
                    now=started,
                    created_before=started - timedelta(seconds=min_age),
                    lease_until=started + lease_for(settings, batch_size, concurrency),
                    limit=batch_size,
                    open_calls_created_before=calls_over,
                    flagged_next_poll=lambda created: (
                        started + flagged_poll_interval(started - created)
                    ),
                )
            ),
            write=True,
        )
    report.examined = len(claimed)
    limit = asyncio.Semaphore(concurrency)

    async def settle(record: PaymentRecord) -> None:
        async with limit, sessions() as db:
            try:
                await _settle_one(service, db, record, report, now(), attention_after)
            except Exception as exc:  # one payment's trouble must not stop the others
                report.errors += 1
                payment_logger.error(
                    "Reconciliation failed for a payment",
                    transaction_id=record.transaction_id,
                    error=f"{type(exc).__name__}: {exc}",
                )

    await asyncio.gather(*(settle(record) for record in claimed))
    metrics.observe_reconcile_run("errors" if report.errors else "ok")
    if claimed:
        payment_logger.info("Reconciliation pass", report=str(report))
    return report


async def _settle_one(
    service: PaymentService,
    db: DbSession,
    record: PaymentRecord,
    report: ReconcileReport,
    now: datetime,
    attention_after: float,
) -> None:
    try:
        async with asyncio.timeout(query_budget(service.settings).total_seconds()):
            outcome = await service.query_outcome(record)
    except Exception as exc:  # a refused, hung or crashed query is no evidence, never a stall
        outcome = Outcome(None, f"status query could not be made ({type(exc).__name__}: {exc})")
    age = now - record.created_at
    # A "processing" payment older than this has lost the process that was waiting for it.
    abandoned_after = service.call_window(record.operation) + timedelta(seconds=60)
    if (
        outcome.status is None
        and record.status == PaymentStatus.PROCESSING
        and age > abandoned_after
    ):
        # Nobody is waiting for this answer any more; say so, without guessing the outcome.
        outcome = Outcome(
            PaymentStatus.UNKNOWN,
            "no answer was recorded for this payment; waiting for M-Pesa's status",
            exchanges=outcome.exchanges,
            action=AuditAction.RECONCILED,
        )
    if record.attention_required and _changes_nothing(record, outcome):
        # Flagged already, and M-Pesa says nothing new: the claim's UPDATE scheduled the next
        # poll; no audit rows repeating the same exchange, no more UPDATEs.
        report.unresolved += 1
        return
    try:
        updated, _ = await service.apply_outcome(db, record, outcome, actor="reconciler")
    except Exception as exc:  # still scheduled and, in time, flagged below
        report.errors += 1
        payment_logger.error(
            "Reconciliation could not apply an answer",
            transaction_id=record.transaction_id,
            error=f"{type(exc).__name__}: {exc}",
        )
        updated = record
        outcome = replace(
            outcome, status_description=f"the answer could not be recorded ({type(exc).__name__})"
        )
    if PaymentStatus(updated.status) not in (
        PaymentStatus.PENDING,
        PaymentStatus.PROCESSING,
        PaymentStatus.UNKNOWN,
    ):
        report.settled += 1
        metrics.observe_reconcile_settled(updated.status)
        report.settled_ids.append(updated.transaction_id)
        payment_logger.info(
            "Payment reconciled", transaction_id=updated.transaction_id, status=updated.status
        )
        return
    report.unresolved += 1
    flag = age.total_seconds() >= attention_after and not updated.attention_required
    if flag:
        report.flagged += 1
        payment_logger.warning(
            "Payment needs an operator: M-Pesa has not confirmed its outcome",
            transaction_id=updated.transaction_id,
            status=updated.status,
            age_seconds=round(age.total_seconds()),
        )

    def schedule(session: Session) -> bool:
        row = repo.get_by_id(session, updated.id, for_update=True)
        if flag or row.attention_required:
            row.next_reconcile_at = now + flagged_poll_interval(age)
        else:
            row.next_reconcile_at = now + backoff(row.reconcile_attempts)
        raised = flag and not row.attention_required
        if raised:
            row.attention_required = True
            repo.add_note(
                session,
                row,
                AuditAction.ATTENTION_REQUIRED,
                error_message=f"outcome still unknown after {round(age.total_seconds())} s;"
                f" last answer: {outcome.status_description}"[:2000],
                actor="reconciler",
            )
            session.flush()
            events.add_events(
                session,
                repo.record_of(session, row),
                [events.EventType.PAYMENT_ATTENTION_REQUIRED],
                service.event_sink(),
            )
        return raised

    if await run_db(db, committing(schedule), write=True):
        events.notify()


async def reconcile_forever(
    service: PaymentService,
    sessions: Sessions,
    *,
    interval: float | None = None,
    min_age: float | None = None,
    batch_size: int | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run passes every ``interval`` seconds until ``stop`` is set (or the task is cancelled)."""
    interval = interval or service.settings.payment_reconcile_interval
    stop = stop or asyncio.Event()
    last_prune: datetime | None = None
    while not stop.is_set():
        try:
            await reconcile_once(service, sessions, min_age=min_age, batch_size=batch_size)
        except Exception as exc:  # the database may be down for a while: keep trying
            metrics.observe_reconcile_run("failed")
            payment_logger.error("Reconciliation pass failed", error=type(exc).__name__)
        if last_prune is None or utcnow() - last_prune >= PRUNE_EVERY:
            last_prune = utcnow()
            try:
                await prune(service.settings, sessions)
            except Exception as exc:  # retried at the next hour
                payment_logger.error("Pruning failed", error=type(exc).__name__)
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            pass
