"""Persistence functions: the only place that builds queries. No business rules, no commits.

Functions take a synchronous ``Session``; ``database.run_db`` runs them for async callers.
They return ``PaymentRecord`` snapshots (plain values) so nothing lazy-loads after a commit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Select, and_, bindparam, func, insert, or_, select, true, update
from sqlalchemy.orm import Session, aliased
from sqlalchemy.orm.exc import StaleDataError

from .lifecycle import IN_FLIGHT, UNSETTLED
from .models import (
    AuditAction,
    PaymentAuditLog,
    PaymentTransaction,
    PaymentWebhookLog,
    as_utc,
    utcnow,
)
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
        query = query.where(table.attention_required.is_(filters.attention_required))
    if filters.from_date:
        query = query.where(table.created_at >= _day_start(filters.from_date))
    if filters.to_date:
        query = query.where(table.created_at < _day_start(filters.to_date) + timedelta(days=1))
    return query


def list_page(
    session: Session, filters: PaymentFilters, *, page: int, per_page: int
) -> tuple[list[PaymentRecord], int, int]:
    """One page, newest first: (records, total, pages)."""
    total = session.scalar(_filtered(select(func.count(PaymentTransaction.id)), filters)) or 0
    original = aliased(PaymentTransaction)
    rows = session.execute(
        _filtered(select(PaymentTransaction, original.transaction_id), filters)
        .outerjoin(original, PaymentTransaction.original_id == original.id)
        .order_by(PaymentTransaction.created_at.desc(), PaymentTransaction.id.desc())
        .offset((page - 1) * per_page)
        .limit(per_page)
    ).all()
    records = [PaymentRecord.of(row, original_id) for row, original_id in rows]
    return records, total, max(1, math.ceil(total / per_page))


def summary_rows(
    session: Session, filters: PaymentFilters
) -> list[tuple[str, str, int, Decimal, int, Decimal]]:
    """(status, operation, count, amount, attention count, reversed amount) per status and
    operation."""
    table = PaymentTransaction
    query = _filtered(
        select(
            table.status,
            table.operation,
            func.count(table.id),
            func.coalesce(func.sum(table.amount), 0),
            func.coalesce(func.sum(func.cast(table.attention_required, type_=table.id.type)), 0),
            func.coalesce(func.sum(table.reversed_amount), 0),
        ),
        filters,
    ).group_by(table.status, table.operation)
    return [
        (status, operation, int(count), Decimal(amount), int(attention), Decimal(reversed_amount))
        for status, operation, count, amount, attention, reversed_amount in session.execute(
            query
        ).all()
    ]


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


def claim_due_for_reconciliation(
    session: Session,
    *,
    now: datetime,
    created_before: datetime,
    lease_until: datetime,
    limit: int,
    open_calls_created_before: Mapping[str, datetime] | None = None,
) -> list[PaymentRecord]:
    """Lease up to ``limit`` unsettled payments that are due: ``next_reconcile_at`` moves to
    ``lease_until`` so other workers skip them while this one asks the provider, without holding
    a lock. ``SKIP LOCKED`` keeps concurrent claims on PostgreSQL from waiting on each other.

    Skipped: payments held for an operator (no answer of M-Pesa's can settle them), and
    ``pending``/``processing`` ones not created before ``open_calls_created_before[operation]``
    (their own call may still be answered)."""
    in_flight = PaymentTransaction.status.in_(sorted(IN_FLIGHT))
    call_over = (
        or_(
            *(
                and_(
                    PaymentTransaction.operation == operation,
                    PaymentTransaction.created_at <= cutoff,
                )
                for operation, cutoff in open_calls_created_before.items()
            )
        )
        if open_calls_created_before
        else true()
    )
    rows = session.scalars(
        select(PaymentTransaction)
        .where(
            PaymentTransaction.status.in_(sorted(UNSETTLED)),
            PaymentTransaction.operator_hold.is_(False),
            PaymentTransaction.created_at <= created_before,
            or_(~in_flight, call_over),
            or_(
                PaymentTransaction.next_reconcile_at.is_(None),
                PaymentTransaction.next_reconcile_at <= now,
            ),
        )
        .order_by(PaymentTransaction.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    for row in rows:
        row.next_reconcile_at = lease_until
        row.reconcile_attempts += 1
    session.flush()
    return [record_of(session, row) for row in rows]
