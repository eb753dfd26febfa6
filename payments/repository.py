"""Persistence functions: the only place that builds queries. No business rules, no commits.

Functions take a synchronous ``Session``; ``database.run_db`` runs them for async callers.
They return ``PaymentRecord`` snapshots (plain values) so nothing lazy-loads after a commit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Select,
    and_,
    bindparam,
    delete,
    false,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
    true,
    tuple_,
    update,
)
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from .lifecycle import IN_FLIGHT, UNSETTLED
from .models import (
    AuditAction,
    PaymentAuditLog,
    PaymentDailyTotal,
    PaymentStatus,
    PaymentTransaction,
    PaymentWebhookLog,
    as_utc,
    utcnow,
)
from .paging import PageCursor
from .schemas import PaymentFilters


@dataclass(frozen=True, slots=True)
class PaymentRecord:
    """A payment's values at one moment. What hooks receive and responses are built from."""

    id: int
    transaction_id: str
    operation: str
    status: str
    amount: Decimal
    reversed_amount: Decimal
    currency: str
    phone_number: str | None
    receiver_party_code: str | None
    conversation_id: str | None
    provider_transaction_id: str | None
    third_party_reference: str
    transaction_reference: str | None
    account_reference: str | None
    description: str | None
    entity_type: str | None
    entity_id: str | None
    customer_name: str | None
    customer_email: str | None
    user_id: str | None
    idempotency_key: str | None
    request_fingerprint: str | None
    response_code: str | None
    response_description: str | None
    status_description: str | None
    error_code: str | None
    original_id: int | None
    metadata: dict[str, Any] | None
    attention_required: bool
    operator_hold: bool
    reconcile_attempts: int
    version: int
    created_at: datetime
    updated_at: datetime | None
    completed_at: datetime | None
    original_transaction_id: str | None = None

    @classmethod
    def of(
        cls, row: PaymentTransaction, original_transaction_id: str | None = None
    ) -> PaymentRecord:
        """From an ORM row."""
        return cls.from_columns(
            {name: getattr(row, _ATTRIBUTE.get(name, name)) for name in _RECORD_COLUMNS},
            original_transaction_id,
        )

    def columns(self) -> dict[str, Any]:
        """This record as column values (what ``from_columns`` takes)."""
        return {name: getattr(self, name) for name in _RECORD_COLUMNS}

    @classmethod
    def from_columns(
        cls, columns: Mapping[str, Any], original_transaction_id: str | None = None
    ) -> PaymentRecord:
        """From column values (a Core row's mapping, or the values just written)."""
        values = {name: columns[name] for name in _RECORD_COLUMNS}
        for key in ("created_at", "updated_at", "completed_at"):
            values[key] = as_utc(values[key])
        return cls(**values, original_transaction_id=original_transaction_id)


_PAYMENTS = PaymentTransaction.__table__
_AUDIT_LOGS = PaymentAuditLog.__table__
#: Record fields that are columns (all but ``original_transaction_id``), by column name.
_RECORD_COLUMNS = tuple(f.name for f in fields(PaymentRecord) if f.name in _PAYMENTS.columns)
# Built once: the hot path's statements, with every value passed as a parameter, so SQLAlchemy
# compiles each of them once instead of per payment.
_INSERT_PAYMENT = insert(_PAYMENTS)
_INSERT_AUDIT = insert(_AUDIT_LOGS)
_LOCK_PAYMENT = select(_PAYMENTS).where(_PAYMENTS.c.id == bindparam("b_pk")).with_for_update()
#: Parameters name the columns to set.
_GUARDED_UPDATE = update(_PAYMENTS).where(
    _PAYMENTS.c.id == bindparam("b_pk"),
    _PAYMENTS.c.version == bindparam("b_version"),
    # The status too: a hand-made UPDATE (an operator's SQL) may not bump the version.
    _PAYMENTS.c.status == bindparam("b_status"),
)
_LEASE = update(_PAYMENTS).where(_PAYMENTS.c.id == bindparam("b_pk"))
#: What the reconciler works on (the partial index ``ix_payment_transactions_reconcile_due``).
RECONCILABLE_STATUSES = (PaymentStatus.PENDING, PaymentStatus.PROCESSING, PaymentStatus.UNKNOWN)
#: Column names whose ORM attribute is named differently.
_ATTRIBUTE = {"metadata": "metadata_"}


def get(
    session: Session, transaction_id: str, *, for_update: bool = False
) -> PaymentTransaction | None:
    query = select(PaymentTransaction).where(PaymentTransaction.transaction_id == transaction_id)
    if for_update:
        query = query.with_for_update()
    return session.scalars(query).one_or_none()


def get_by_id(session: Session, id_: int, *, for_update: bool = False) -> PaymentTransaction:
    query = select(PaymentTransaction).where(PaymentTransaction.id == id_)
    if for_update:
        query = query.with_for_update()
    # populate_existing: a row read earlier in this session must not hide a concurrent change.
    return session.scalars(query.execution_options(populate_existing=True)).one()


def get_by_idempotency_key(session: Session, key: str) -> PaymentTransaction | None:
    return session.scalars(
        select(PaymentTransaction).where(PaymentTransaction.idempotency_key == key)
    ).one_or_none()


def get_by_provider_transaction_id(
    session: Session, provider_transaction_id: str
) -> PaymentTransaction | None:
    return session.scalars(
        select(PaymentTransaction).where(
            PaymentTransaction.provider_transaction_id == provider_transaction_id
        )
    ).one_or_none()


def transaction_id_of(session: Session, id_: int | None) -> str | None:
    if id_ is None:
        return None
    return session.scalar(
        select(PaymentTransaction.transaction_id).where(PaymentTransaction.id == id_)
    )


def record_of(session: Session, row: PaymentTransaction) -> PaymentRecord:
    return PaymentRecord.of(row, transaction_id_of(session, row.original_id))


def audit_entry(
    payment_id: int,
    action: AuditAction,
    *,
    status_before: str | None = None,
    status_after: str | None = None,
    request_body: Any = None,
    response_body: Any = None,
    http_status: int | None = None,
    error_message: str | None = None,
    response_time_ms: float | None = None,
    actor: str | None = None,
    client_ip: str | None = None,
) -> dict[str, Any]:
    """One audit row's values (every column, so a batch of them is one INSERT)."""
    return {
        "transaction_id": payment_id,  # the column of PaymentAuditLog.payment_id
        "action": action.value,
        "status_before": status_before,
        "status_after": status_after,
        "request_body": request_body,
        "response_body": response_body,
        "http_status": http_status,
        "error_message": error_message,
        "response_time_ms": round(response_time_ms) if response_time_ms is not None else None,
        "actor": actor[:100] if actor else actor,  # a host's actor name may be long
        "client_ip": client_ip,
        "created_at": utcnow(),
    }


def add_audits(session: Session, entries: Sequence[dict[str, Any]]) -> None:
    """Append audit rows (plain INSERTs: the trail is append-only, nothing to track)."""
    if entries:
        session.execute(_INSERT_AUDIT, list(entries))


def add_audit(session: Session, payment_id: int, action: AuditAction, **fields: Any) -> None:
    add_audits(session, [audit_entry(payment_id, action, **fields)])


def insert_payment(session: Session, values: Mapping[str, Any]) -> PaymentRecord:
    """Insert a payment from its column values; the hot path, so a plain INSERT."""
    result = session.execute(_INSERT_PAYMENT, dict(values))
    pk = result.inserted_primary_key[0] if result.inserted_primary_key else None
    return PaymentRecord.from_columns(
        {**values, "id": pk}, transaction_id_of(session, values.get("original_id"))
    )


def lock_payment(session: Session, pk: int) -> Mapping[str, Any]:
    """The payment's current column values, locked for update (a no-op on SQLite)."""
    return session.execute(_LOCK_PAYMENT, {"b_pk": pk}).mappings().one()


def update_payment(
    session: Session,
    pk: int,
    expected_version: int,
    expected_status: str,
    changes: Mapping[str, Any],
) -> None:
    """Write ``changes`` if nobody changed the payment since it was read (at
    ``expected_version``, in ``expected_status``); else ``StaleDataError``."""
    result = session.execute(
        _GUARDED_UPDATE,
        {
            **changes,
            "version": expected_version + 1,
            "b_pk": pk,
            "b_version": expected_version,
            "b_status": expected_status,
        },
    )
    if result.rowcount != 1:
        raise StaleDataError(f"payment {pk} changed concurrently")


def reversals_in_flight_amount(session: Session, original_pk: int) -> Decimal:
    """Amount of reversals of this payment that were sent but are not settled yet."""
    total = session.scalar(
        select(func.coalesce(func.sum(PaymentTransaction.amount), 0)).where(
            PaymentTransaction.original_id == original_pk,
            PaymentTransaction.status.in_(sorted(UNSETTLED)),
        )
    )
    return Decimal(total or 0)


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def _filtered(query: Select[Any], filters: PaymentFilters) -> Select[Any]:
    table = PaymentTransaction
    if filters.status:
        query = query.where(table.status == filters.status)
    if filters.operation:
        query = query.where(table.operation == filters.operation)
    if filters.phone_number is not None:
        query = query.where(table.phone_number == filters.phone_number.digits)
    if filters.entity_type:
        query = query.where(table.entity_type == filters.entity_type)
    if filters.entity_id:
        query = query.where(table.entity_id == filters.entity_id)
    if filters.user_id:
        query = query.where(table.user_id == filters.user_id)
    if filters.attention_required is not None:
        # ``= true`` as a literal: PostgreSQL matches it to the partial index (``IS true`` or a
        # bound parameter would not).
        query = query.where(
            table.attention_required == (true() if filters.attention_required else false())
        )
    if filters.from_date:
        query = query.where(table.created_at >= _day_start(filters.from_date))
    if filters.to_date:
        query = query.where(table.created_at < _day_start(filters.to_date) + timedelta(days=1))
    return query


def _totals_can_count(filters: PaymentFilters) -> bool:
    """The daily totals answer a count filtered by status, operation and dates only."""
    return not (
        filters.phone_number is not None
        or filters.entity_type
        or filters.entity_id
        or filters.user_id
        or filters.attention_required is not None
    )


def _totals_filtered(query: Select[Any], filters: PaymentFilters) -> Select[Any]:
    totals = PaymentDailyTotal
    if filters.status:
        query = query.where(totals.status == filters.status)
    if filters.operation:
        query = query.where(totals.operation == filters.operation)
    if filters.from_date:
        query = query.where(totals.day >= filters.from_date)
    if filters.to_date:
        query = query.where(totals.day <= filters.to_date)
    return query


def count_payments(session: Session, filters: PaymentFilters) -> int:
    """How many payments match: from the daily totals when they can tell (a few hundred rows
    whatever the history), else ``count(*)`` over the index that serves the filter."""
    if _totals_can_count(filters):
        query = _totals_filtered(
            select(func.coalesce(func.sum(PaymentDailyTotal.count), 0)), filters
        )
    else:
        query = _filtered(select(func.count()).select_from(PaymentTransaction), filters)
    return int(session.scalar(query) or 0)


def list_page(
    session: Session,
    filters: PaymentFilters,
    *,
    page: int,
    per_page: int,
    cursor: PageCursor | None = None,
) -> tuple[list[PaymentRecord], int, int, PageCursor | None]:
    """One page, newest first: (records, total, pages, cursor of the next page or ``None``).

    With a ``cursor`` the page starts after the row it names (keyset: an index range scan,
    however deep); without one, at ``page`` (OFFSET: fine for the first pages)."""
    total = count_payments(session, filters)
    table = PaymentTransaction
    query = (
        _filtered(select(table), filters)
        .order_by(table.created_at.desc(), table.id.desc())
        .limit(per_page + 1)  # one more tells whether there is a next page
    )
    if cursor is not None:
        page = cursor.page
        query = query.where(tuple_(table.created_at, table.id) < (cursor.created_at, cursor.id))
    else:
        query = query.offset((page - 1) * per_page)
    fetched = session.scalars(query).all()
    rows = fetched[:per_page]
    # Reversals name their original: one lookup for the page (a self-join costs every page a
    # plan twice as large, for the few rows that are reversals).
    original_ids = {row.original_id for row in rows if row.original_id is not None}
    originals = (
        dict(
            session.execute(
                select(table.id, table.transaction_id).where(table.id.in_(original_ids))
            ).all()
        )
        if original_ids
        else {}
    )
    records = [PaymentRecord.of(row, originals.get(row.original_id)) for row in rows]
    next_cursor = (
        PageCursor(records[-1].created_at, records[-1].id, page + 1)
        if len(fetched) > per_page
        else None
    )
    return records, total, max(1, math.ceil(total / per_page)), next_cursor


def summary_rows(
    session: Session, filters: PaymentFilters
) -> list[tuple[str, str, int, Decimal, int, Decimal]]:
    """(status, operation, count, amount, flagged count, reversed amount) per status and
    operation, from the daily totals (only ``from_date``/``to_date`` of the filters apply): a
    few rows per day, whatever the number of payments."""
    totals = PaymentDailyTotal
    buckets = session.execute(
        _totals_filtered(
            select(
                totals.status,
                totals.operation,
                func.sum(totals.count),
                func.sum(totals.amount_cents),
                func.sum(totals.flagged),
                func.sum(totals.reversed_cents),
            ),
            PaymentFilters(from_date=filters.from_date, to_date=filters.to_date),
        ).group_by(totals.status, totals.operation)
    ).all()
    return [
        (
            status,
            operation,
            int(count),
            Decimal(int(cents or 0)) / 100,
            int(flagged or 0),
            Decimal(int(reversed_cents or 0)) / 100,
        )
        for status, operation, count, cents, flagged, reversed_cents in buckets
        if count  # every payment of the bucket moved on to another status
    ]


_PG_COMPACT = """
WITH moved AS (
    DELETE FROM payment_daily_totals WHERE day < :before AND shard <> 0
    RETURNING day, operation, status, count, amount_cents, flagged, reversed_cents
)
INSERT INTO payment_daily_totals AS t
    (day, operation, status, shard, count, amount_cents, flagged, reversed_cents)
SELECT day, operation, status, 0, sum(count), sum(amount_cents), sum(flagged),
       sum(reversed_cents)
FROM moved
GROUP BY day, operation, status
ON CONFLICT (day, operation, status, shard) DO UPDATE
SET count = t.count + EXCLUDED.count, amount_cents = t.amount_cents + EXCLUDED.amount_cents,
    flagged = t.flagged + EXCLUDED.flagged,
    reversed_cents = t.reversed_cents + EXCLUDED.reversed_cents
"""
_SQLITE_COMPACT = (
    """
INSERT INTO payment_daily_totals
    (day, operation, status, shard, count, amount_cents, flagged, reversed_cents)
SELECT day, operation, status, 0, sum(count), sum(amount_cents), sum(flagged),
       sum(reversed_cents)
FROM payment_daily_totals
WHERE day < :before AND shard <> 0 GROUP BY day, operation, status
ON CONFLICT (day, operation, status, shard) DO UPDATE
SET count = count + excluded.count, amount_cents = amount_cents + excluded.amount_cents,
    flagged = flagged + excluded.flagged, reversed_cents = reversed_cents + excluded.reversed_cents
""",
    "DELETE FROM payment_daily_totals WHERE day < :before AND shard <> 0",
)


def compact_daily_totals(session: Session, before: date) -> int:
    """Fold the shards of the days before ``before`` into shard 0 and drop empty buckets (the
    payments of a day moved on); the number of rows removed. Sums are unchanged."""
    rows_before = session.scalar(select(func.count()).select_from(PaymentDailyTotal)) or 0
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(_PG_COMPACT), {"before": before})
    else:  # one writer at a time on SQLite: two statements are as good as one
        for statement in _SQLITE_COMPACT:
            session.execute(text(statement), {"before": before})
    session.execute(
        delete(PaymentDailyTotal).where(
            PaymentDailyTotal.day < before,
            PaymentDailyTotal.count == 0,
            PaymentDailyTotal.amount_cents == 0,
            PaymentDailyTotal.flagged == 0,
            PaymentDailyTotal.reversed_cents == 0,
        )
    )
    rows_after = session.scalar(select(func.count()).select_from(PaymentDailyTotal)) or 0
    return int(rows_before) - int(rows_after)


def audit_trail(session: Session, payment_id: int) -> list[PaymentAuditLog]:
    return list(
        session.scalars(
            select(PaymentAuditLog)
            .where(PaymentAuditLog.payment_id == payment_id)
            .order_by(PaymentAuditLog.id)
        )
    )


# -- inbound notifications ----------------------------------------------------------------------


def add_notification(session: Session, row: PaymentWebhookLog) -> int:
    session.add(row)
    session.flush()
    return row.id


def get_notification(
    session: Session, notification_id: int, *, for_update: bool = False
) -> PaymentWebhookLog | None:
    query = select(PaymentWebhookLog).where(PaymentWebhookLog.id == notification_id)
    if for_update:
        query = query.with_for_update()
    return session.scalars(query.execution_options(populate_existing=True)).one_or_none()


def find_by_provider_reference(
    session: Session, *, third_party_reference: str | None, conversation_id: str | None
) -> PaymentTransaction | None:
    """The payment a notification is about: by our third-party reference, else conversation ID."""
    if third_party_reference:
        row = session.scalars(
            select(PaymentTransaction).where(
                PaymentTransaction.third_party_reference == third_party_reference
            )
        ).one_or_none()
        if row is not None:
            return row
    if conversation_id:
        return session.scalars(
            select(PaymentTransaction)
            .where(PaymentTransaction.conversation_id == conversation_id)
            .limit(1)
        ).one_or_none()
    return None


def list_notifications(
    session: Session, *, is_processed: bool | None, page: int, per_page: int
) -> tuple[list[PaymentWebhookLog], int]:
    query = select(PaymentWebhookLog)
    count = select(func.count(PaymentWebhookLog.id))
    if is_processed is not None:
        query = query.where(PaymentWebhookLog.is_processed.is_(is_processed))
        count = count.where(PaymentWebhookLog.is_processed.is_(is_processed))
    total = session.scalar(count) or 0
    rows = session.scalars(
        query.order_by(PaymentWebhookLog.id.desc()).offset((page - 1) * per_page).limit(per_page)
    )
    return list(rows), total


# -- reconciliation -----------------------------------------------------------------------------


def claim_queries(
    *,
    now: datetime,
    created_before: datetime,
    limit: int,
    open_calls_created_before: Mapping[str, datetime] | None = None,
) -> tuple[Select[Any], Select[Any]]:
    """The claim's two statements: never-polled payments by id, then due ones by due time."""
    table = PaymentTransaction
    in_flight = table.status.in_([PaymentStatus.PENDING, PaymentStatus.PROCESSING])
    call_over = (
        or_(
            *(
                and_(table.operation == operation, table.created_at <= cutoff)
                for operation, cutoff in open_calls_created_before.items()
            )
        )
        if open_calls_created_before
        else true()
    )
    claimable = (
        # The partial index's own predicate, with literals, so PostgreSQL proves it applies.
        table.status.in_([literal_column(f"'{s.value}'") for s in RECONCILABLE_STATUSES]),
        table.operator_hold == false(),
        table.created_at <= created_before,
        or_(~in_flight, call_over),
    )
    never_polled = (
        select(_PAYMENTS)
        .where(*claimable, table.next_reconcile_at.is_(None))
        # The same as ``ORDER BY id`` here (all NULL), but only the partial index has this
        # order: by id, PostgreSQL would walk the primary key through the whole history.
        .order_by(table.next_reconcile_at, table.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    due = (
        select(_PAYMENTS)
        .where(*claimable, table.next_reconcile_at <= now)
        .order_by(table.next_reconcile_at, table.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return never_polled, due


def claim_due_for_reconciliation(
    session: Session,
    *,
    now: datetime,
    created_before: datetime,
    lease_until: datetime,
    limit: int,
    open_calls_created_before: Mapping[str, datetime] | None = None,
    flagged_next_poll: Callable[[datetime], datetime] | None = None,
) -> list[PaymentRecord]:
    """Lease up to ``limit`` unsettled payments that are due: ``next_reconcile_at`` moves to
    ``lease_until`` so other workers skip them while this one asks the provider, without holding
    a lock. ``SKIP LOCKED`` keeps concurrent claims on PostgreSQL from waiting on each other.

    Never-polled payments first (``next_reconcile_at`` NULL, oldest first), then the due ones in
    the order they fell due: two range scans of the partial index
    ``ix_payment_transactions_reconcile_due``, so neither a long history nor many old unknowns
    slow the claim or keep a new unknown waiting.

    A flagged payment (``attention_required``) is leased until ``flagged_next_poll(created_at)``
    (its next poll, when later than the lease): an unchanged answer then writes nothing more, so
    one poll of it is this one UPDATE.

    Skipped: payments held for an operator (no answer of M-Pesa's can settle them), and
    ``pending``/``processing`` ones not created before ``open_calls_created_before[operation]``
    (their own call may still be answered)."""
    never_polled, due = claim_queries(
        now=now,
        created_before=created_before,
        limit=limit,
        open_calls_created_before=open_calls_created_before,
    )
    rows = list(session.execute(never_polled).mappings().all())
    if len(rows) < limit:
        rows += session.execute(due.limit(limit - len(rows))).mappings().all()
    if not rows:
        return []
    leased = []
    for row in rows:
        lease = lease_until
        if row["attention_required"] and flagged_next_poll is not None:
            lease = max(lease, flagged_next_poll(as_utc(row["created_at"]) or now))
        leased.append(
            {
                **row,
                "next_reconcile_at": lease,
                "reconcile_attempts": row["reconcile_attempts"] + 1,
                "version": row["version"] + 1,
            }
        )
    # One UPDATE for the payments leased until ``lease_until`` (all but the flagged ones), an
    # executemany for the flagged few; the rows are locked, so the lock is the version guard.
    plain = [values["id"] for values in leased if values["next_reconcile_at"] == lease_until]
    if plain:
        session.execute(
            update(_PAYMENTS)
            .where(_PAYMENTS.c.id.in_(plain))
            .values(
                next_reconcile_at=lease_until,
                reconcile_attempts=_PAYMENTS.c.reconcile_attempts + 1,
                version=_PAYMENTS.c.version + 1,
            )
        )
    flagged = [values for values in leased if values["next_reconcile_at"] != lease_until]
    if flagged:
        session.execute(
            _LEASE,
            [
                {
                    "b_pk": values["id"],
                    "next_reconcile_at": values["next_reconcile_at"],
                    "reconcile_attempts": values["reconcile_attempts"],
                    "version": values["version"],
                }
                for values in flagged
            ],
        )
    return [
        PaymentRecord.from_columns(values, transaction_id_of(session, values["original_id"]))
        for values in leased
    ]


# -- the operator console and the metrics' gauges (read-only) ----------------------------------

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
        "events_pending": _events_pending(session, hooks),
    }


def _events_pending(session: Session, hooks: bool) -> int:
    from .events import pending_events  # events imports this module

    return pending_events(session, hooks=hooks)


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


def _searched(query: Select[Any], *, reference: str | None, search: str | None) -> Select[Any]:
    table = PaymentTransaction
    if reference:
        query = query.where(
            or_(table.account_reference == reference, table.transaction_reference == reference)
        )
    if search:
        # Each is a unique, indexed column: three index look-ups, no scan.
        query = query.where(
            or_(
                table.transaction_id == search,
                table.third_party_reference == search,
                table.provider_transaction_id == search,
            )
        )
    return query


def console_page(
    session: Session,
    filters: PaymentFilters,
    *,
    reference: str | None,
    search: str | None,
    page: int,
    per_page: int,
    after: tuple[datetime, int] | None = None,
) -> tuple[list[PaymentRecord], int]:
    """One page of the console's list, newest first: (records, total matching). ``after`` (the
    keyset (created_at, id) of the previous page's last row) reads the page as an index range
    from there, whatever its depth; without it the page is an OFFSET (the first pages only).
    The count is ``count(*)``: no column to read for NULLs, so an index-only count."""
    table = PaymentTransaction
    total = session.scalar(
        _searched(
            _filtered(select(func.count()).select_from(table), filters),
            reference=reference,
            search=search,
        )
    )
    query = _searched(_filtered(select(table), filters), reference=reference, search=search)
    if after is not None:
        created, pk = after
        query = query.where(
            or_(table.created_at < created, and_(table.created_at == created, table.id < pk))
        )
    else:
        query = query.offset((page - 1) * per_page)
    rows = session.scalars(
        query.order_by(table.created_at.desc(), table.id.desc()).limit(per_page)
    )
    return [PaymentRecord.of(row) for row in rows], int(total or 0)


def console_batch(
    session: Session,
    filters: PaymentFilters,
    *,
    reference: str | None,
    search: str | None,
    after: tuple[datetime, int] | None,
    size: int,
) -> list[PaymentRecord]:
    """The next ``size`` payments of the filter, newest first, after the keyset ``after``
    (created_at, id) of the previous batch: the CSV export, which never offsets."""
    table = PaymentTransaction
    query = _searched(_filtered(select(table), filters), reference=reference, search=search)
    if after is not None:
        created, pk = after
        query = query.where(
            or_(table.created_at < created, and_(table.created_at == created, table.id < pk))
        )
    rows = session.scalars(query.order_by(table.created_at.desc(), table.id.desc()).limit(size))
    return [PaymentRecord.of(row) for row in rows]


def payment_detail(
    session: Session, transaction_id: str
) -> (
    tuple[PaymentRecord, list[PaymentAuditLog], list[PaymentRecord], list[PaymentWebhookLog]] | None
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
        select(PaymentWebhookLog)
        .where(PaymentWebhookLog.payment_id == row.id)
        .order_by(PaymentWebhookLog.id)
        .limit(200)
    )
    return (
        record_of(session, row),
        audit_trail(session, row.id),
        [PaymentRecord.of(r, row.transaction_id) for r in reversals],
        list(webhooks),
    )


def console_webhooks(
    session: Session,
    *,
    is_valid: bool | None,
    is_processed: bool | None,
    page: int,
    per_page: int,
) -> tuple[list[tuple[PaymentWebhookLog, str | None]], int]:
    """Stored notifications, newest first, with the payment each was matched to."""
    table = PaymentWebhookLog
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
