"""Read-only views for operators: the console's overview (activity, work queue), a payment's
detail, the stored notifications, and the gauges of ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, false, func, or_, select, true
from sqlalchemy.orm import Session

from ..deliveries import pending_events
from ..lifecycle import IN_FLIGHT, UNSETTLED
from ..models import PaymentAuditLog, PaymentNotification, PaymentStatus, PaymentTransaction, as_utc
from .payments import audit_trail, get, record_of
from .record import PaymentRecord

#: Statuses whose outcome is still open, in a stable order (the gauges list each).
OPEN_STATUSES = tuple(sorted(UNSETTLED))


def metrics_state(session: Session, *, now: datetime, hooks: bool = False) -> dict[str, Any]:
    """The gauges of ``/metrics``: three indexed aggregates (``status`` leads an index)."""
    table = PaymentTransaction
    open_rows = session.execute(
        select(table.status, table.operation, func.count(table.id), func.min(table.created_at))
        .where(table.status.in_(OPEN_STATUSES))
        .group_by(table.status, table.operation)
    ).all()
    open_counts = {status.value: 0 for status in OPEN_STATUSES}
    in_flight: dict[str, int] = {}
    oldest: datetime | None = None
    for status, operation, count, first in open_rows:
        open_counts[status] += int(count)
        if status in IN_FLIGHT:
            in_flight[operation] = in_flight.get(operation, 0) + int(count)
        first = as_utc(first)
        if first is not None and (oldest is None or first < oldest):
            oldest = first
    attention = session.scalar(
        select(func.count(table.id)).where(table.attention_required == true())
    )
    return {
        "open": open_counts,
        "in_flight": in_flight,
        "oldest_open_age_seconds": max(0.0, (now - oldest).total_seconds()) if oldest else 0.0,
        "attention_required": int(attention or 0),
        "events_pending": pending_events(session, hooks=hooks),
    }


def activity(
    session: Session, since: datetime, *, hourly: bool
) -> list[tuple[datetime, str, str, int, Decimal]]:
    """(hour or day, status, operation, count, amount) of the payments created since ``since``:
    one aggregate over a range of ``ix_payment_transactions_created_at``, bucketed in the
    database. The overview derives its totals, success rates and chart from it."""
    table = PaymentTransaction
    if session.get_bind().dialect.name == "postgresql":
        # In UTC whatever the server's TimeZone: the buckets are UTC hours and days.
        bucket = func.date_trunc(
            "hour" if hourly else "day", func.timezone("UTC", table.created_at)
        )
    else:  # SQLite stores ISO text, in UTC
        bucket = func.strftime(
            "%Y-%m-%d %H:00:00" if hourly else "%Y-%m-%d 00:00:00", table.created_at
        )
    rows = session.execute(
        select(
            bucket.label("bucket"),
            table.status,
            table.operation,
            func.count(table.id),
            func.coalesce(func.sum(table.amount), 0),
        )
        .where(table.created_at >= since)
        .group_by("bucket", table.status, table.operation)
    ).all()
    found = []
    for start, status, operation, count, amount in rows:
        if isinstance(start, str):
            start = datetime.fromisoformat(start)
        found.append((as_utc(start), status, operation, int(count), Decimal(amount)))
    return found  # type: ignore[return-value]


def work_queue(
    session: Session,
    *,
    stuck_created_before: Mapping[str, datetime],
    limit: int,
) -> tuple[list[PaymentRecord], int]:
    """Payments an operator should look at, oldest first: ``unknown``, flagged
    ``attention_required``, or ``pending``/``processing`` past their call's window. Three
    queries each bounded by ``limit`` (the first two on the status index), merged here, so the
    page never sorts the whole table. Returns (oldest ``limit``, how many in all)."""
    table = PaymentTransaction
    stuck = or_(
        *(
            and_(table.operation == operation, table.created_at <= cutoff)
            for operation, cutoff in stuck_created_before.items()
        )
    )
    conditions = [
        table.status == PaymentStatus.UNKNOWN,
        and_(table.status.in_(sorted(IN_FLIGHT)), stuck),
        and_(table.attention_required == true(), table.status != PaymentStatus.UNKNOWN),
    ]
    found: dict[int, PaymentTransaction] = {}
    total = 0
    for condition in conditions:
        if condition is conditions[1]:
            # Stuck and flagged at once: counted (and listed) once, with the flagged ones.
            condition = and_(condition, table.attention_required == false())
        # The count rides along (a window over the same scan): one pass per condition.
        rows = session.execute(
            select(table, func.count().over())
            .where(condition)
            .order_by(table.created_at, table.id)
            .limit(limit)
        ).all()
        total += int(rows[0][1]) if rows else 0
        for row, _ in rows:
            found[row.id] = row
    rows = sorted(found.values(), key=lambda row: (as_utc(row.created_at), row.id))[:limit]
    return [PaymentRecord.of(row) for row in rows], total


#: A payment, its audit trail, its reversals and the notifications matched to it.
PaymentDetail = tuple[
    PaymentRecord, list[PaymentAuditLog], list[PaymentRecord], list[PaymentNotification]
]


def payment_detail(
    session: Session, transaction_id: str
) -> (
    tuple[PaymentRecord, list[PaymentAuditLog], list[PaymentRecord], list[PaymentNotification]]
    | None
):
    """A payment, its audit trail, its reversals and the notifications matched to it."""
    row = get(session, transaction_id)
    if row is None:
        return None
    reversals = session.scalars(
        select(PaymentTransaction)
        .where(PaymentTransaction.original_id == row.id)
        .order_by(PaymentTransaction.id)
        .limit(200)
    )
    webhooks = session.scalars(
        select(PaymentNotification)
        .where(PaymentNotification.payment_id == row.id)
        .order_by(PaymentNotification.id)
        .limit(200)
    )
    return (
        record_of(session, row),
        audit_trail(session, row.id),
        [PaymentRecord.of(r, row.transaction_id) for r in reversals],
        list(webhooks),
    )


def console_notifications(
    session: Session,
    *,
    is_valid: bool | None,
    is_processed: bool | None,
    page: int,
    per_page: int,
) -> tuple[list[tuple[PaymentNotification, str | None]], int]:
    """Stored notifications, newest first, with the payment each was matched to."""
    table = PaymentNotification
    conditions = []
    if is_valid is not None:
        conditions.append(table.is_valid.is_(is_valid))
    if is_processed is not None:
        conditions.append(table.is_processed.is_(is_processed))
    total = session.scalar(select(func.count(table.id)).where(*conditions)) or 0
    rows = session.execute(
        select(table, PaymentTransaction.transaction_id)
        .outerjoin(PaymentTransaction, table.payment_id == PaymentTransaction.id)
        .where(*conditions)
        .order_by(table.id.desc())
        .offset((page - 1) * per_page)
        .limit(per_page)
    ).all()
    return [(webhook, tid) for webhook, tid in rows], int(total)
