"""Retention: what the module deletes, and when. Nothing an audit needs goes by default.

- Rejected notices (failed authentication, unparsable): ``PAYMENT_REJECTED_NOTICE_RETENTION``
  seconds (default one day; the callback path prunes them too, as issue 11 bounded them).
- Processed notices: ``PAYMENT_PROCESSED_NOTICE_RETENTION_DAYS`` (default 90). Their content
  stays, sanitised, in the payment's audit trail (``callback_received``). Notices not processed
  yet are kept: an operator may replay them.
- Audit rows: ``PAYMENT_AUDIT_RETENTION_DAYS`` (default 0: as long as their payment, and payments
  are never deleted). When set, rows older than that of payments settled before that (not open,
  not flagged, not held for an operator) are deleted.

Applied by ``python -m payments prune`` and, at most once an hour, by the reconciler's loop,
which also fold the past days' shards of ``payment_daily_totals`` into one row per bucket.
Deletes run in batches, each its own short transaction, so a first prune of a large table does
not hold locks for long.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, exists, func, select
from sqlalchemy.orm import Session

from . import repository as repo
from .config import PaymentSettings
from .database import DbSession, committing, run_db
from .lifecycle import UNSETTLED
from .logger import payment_logger
from .models import PaymentAuditLog, PaymentNotification, PaymentTransaction, utcnow
from .reports import PassReport

SessionSource = Callable[[], AbstractAsyncContextManager[DbSession]]

#: Rows deleted per statement (and transaction).
BATCH_SIZE = 5000
#: The reconciler's loop prunes at most this often.
PRUNE_EVERY = timedelta(hours=1)
_OPEN = tuple(sorted(UNSETTLED))


@dataclass
class PruneReport(PassReport):
    rejected_notices: int = 0
    processed_notices: int = 0
    audit_rows: int = 0
    #: Rows of ``payment_daily_totals`` folded away (past days' shards into one; no data lost).
    daily_total_rows: int = 0


@dataclass(frozen=True)
class Cutoffs:
    """Rows received or created before these are due for deletion (``None``: kept)."""

    rejected_notices: datetime
    processed_notices: datetime | None
    audit_rows: datetime | None

    @classmethod
    def of(cls, settings: PaymentSettings, now: datetime) -> Cutoffs:
        processed = settings.payment_processed_notice_retention_days
        audit = settings.payment_audit_retention_days
        return cls(
            rejected_notices=now - timedelta(seconds=settings.payment_rejected_notice_retention),
            processed_notices=now - timedelta(days=processed) if processed else None,
            audit_rows=now - timedelta(days=audit) if audit else None,
        )


def _delete_batch(session: Session, table: type, where: tuple[object, ...]) -> int:
    ids = select(table.id).where(*where).limit(BATCH_SIZE).scalar_subquery()  # type: ignore[attr-defined]
    result = session.execute(delete(table).where(table.id.in_(ids)))  # type: ignore[attr-defined]
    return int(getattr(result, "rowcount", 0) or 0)


def _rejected(cutoff: datetime) -> tuple[object, ...]:
    notice = PaymentNotification
    return (notice.is_valid.is_(False), notice.received_at < cutoff)


def _processed(cutoff: datetime) -> tuple[object, ...]:
    notice = PaymentNotification
    return (
        notice.is_processed.is_(True),
        notice.is_valid.is_(True),
        notice.received_at < cutoff,
    )


def _audit(cutoff: datetime) -> tuple[object, ...]:
    payment = PaymentTransaction
    settled_before = exists().where(
        payment.id == PaymentAuditLog.payment_id,
        payment.status.not_in([status.value for status in _OPEN]),
        payment.attention_required.is_(False),
        payment.operator_hold.is_(False),
        payment.updated_at < cutoff,
    )
    return (PaymentAuditLog.created_at < cutoff, settled_before)


async def prune(
    settings: PaymentSettings,
    sessions: SessionSource,
    *,
    now: datetime | None = None,
    dry_run: bool = False,
) -> PruneReport:
    """Delete what the retention settings say is past keeping; with ``dry_run``, only count it."""
    cutoffs = Cutoffs.of(settings, now or utcnow())
    report = PruneReport()
    work: list[tuple[str, type, tuple[object, ...]]] = [
        ("rejected_notices", PaymentNotification, _rejected(cutoffs.rejected_notices))
    ]
    if cutoffs.processed_notices is not None:
        work.append(
            ("processed_notices", PaymentNotification, _processed(cutoffs.processed_notices))
        )
    if cutoffs.audit_rows is not None:
        work.append(("audit_rows", PaymentAuditLog, _audit(cutoffs.audit_rows)))
    async with sessions() as db:
        for name, table, where in work:
            if dry_run:
                count = await run_db(
                    db,
                    lambda s, t=table, w=where: int(
                        s.scalar(select(func.count()).select_from(t).where(*w)) or 0
                    ),
                )
                setattr(report, name, count)
                continue
            while True:
                removed = await run_db(
                    db,
                    committing(lambda s, t=table, w=where: _delete_batch(s, t, w)),
                    write=True,
                )
                setattr(report, name, getattr(report, name) + removed)
                if removed < BATCH_SIZE:
                    break
        if not dry_run:
            today = (now or utcnow()).date()
            report.daily_total_rows = await run_db(
                db,
                committing(lambda s: repo.compact_daily_totals(s, today)),
                write=True,
            )
    if not dry_run and (report.rejected_notices or report.processed_notices or report.audit_rows):
        payment_logger.info("Pruned by the retention settings", report=str(report))
    return report
