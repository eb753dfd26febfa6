"""The payments' own reads and writes: a payment by its keys, the money path's INSERT and
version-guarded UPDATE, and the audit trail. Plain statements, built once where they are hot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from ..lifecycle import UNSETTLED
from ..models import AuditAction, PaymentAuditLog, PaymentTransaction, utcnow
from .record import PAYMENTS_TABLE, PaymentRecord, with_defaults
from .statements import GuardedUpdate, RowInsert

_PAYMENTS = PAYMENTS_TABLE
_AUDIT_LOGS = PaymentAuditLog.__table__
# Built once: the hot path's statements (see statements.py).
_INSERT_PAYMENT = RowInsert(_PAYMENTS)
_INSERT_AUDIT = RowInsert(_AUDIT_LOGS)
_AUDIT_PAYMENT = "transaction_id"  # the audit table's column of PaymentAuditLog.payment_id
_GUARDED_UPDATE = GuardedUpdate(_PAYMENTS)
_LOCK_PAYMENT = select(_PAYMENTS).where(_PAYMENTS.c.id == bindparam("b_pk")).with_for_update()


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
    payment_id: int | None,
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
    """One audit row's values (every column, so a batch of them is one INSERT); ``payment_id``
    ``None`` for a payment's first row, written with the payment (``insert_payment``)."""
    return {
        _AUDIT_PAYMENT: payment_id,
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
    """Append audit rows (one INSERT: the trail is append-only, nothing to track)."""
    _INSERT_AUDIT.many(session, entries)


def add_audit(session: Session, payment_id: int, action: AuditAction, **fields: Any) -> None:
    add_audits(session, [audit_entry(payment_id, action, **fields)])


def add_note(session: Session, row: PaymentTransaction, action: AuditAction, **fields: Any) -> None:
    """An audit row that records something about the payment without changing its status."""
    add_audit(session, row.id, action, status_before=row.status, status_after=row.status, **fields)


def insert_payment(
    session: Session, values: Mapping[str, Any], first_audit: Mapping[str, Any] | None = None
) -> PaymentRecord:
    """Insert a payment from its column values (the model's defaults for those left out); the
    hot path, so a plain INSERT. ``first_audit`` (an ``audit_entry``, its payment id left to
    this insert) is written with it, as the unit's last write: on PostgreSQL one statement."""
    row = with_defaults(values)
    if first_audit is None:
        pk = _INSERT_PAYMENT.one(session, row)
    else:
        pk = _INSERT_PAYMENT.one_with(session, row, _INSERT_AUDIT, [first_audit], _AUDIT_PAYMENT)
    return PaymentRecord.from_columns(
        {**row, "id": pk}, transaction_id_of(session, row["original_id"])
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
    audits: Sequence[Mapping[str, Any]] = (),
    *,
    then: Sequence[tuple[RowInsert, Sequence[Mapping[str, Any]]]] = (),
    final: bool = False,
) -> None:
    """Write ``changes`` and ``audits`` (then ``then``'s rows: events, deliveries) if nobody
    changed the payment since it was read (at ``expected_version``, in ``expected_status``);
    else ``StaleDataError``, nothing written. ``final``: the unit's last write (on PostgreSQL
    all of it one statement)."""
    changed = _GUARDED_UPDATE.run(
        session,
        pk,
        expected_version,
        expected_status,
        {**changes, "version": expected_version + 1},
        then=[(_INSERT_AUDIT, audits), *then],
        final=final,
    )
    if changed != 1:
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


def audit_trail(session: Session, payment_id: int) -> list[PaymentAuditLog]:
    return list(
        session.scalars(
            select(PaymentAuditLog)
            .where(PaymentAuditLog.payment_id == payment_id)
            .order_by(PaymentAuditLog.id)
        )
    )
