"""The reconciler's claim: leasing the unsettled payments that are due, over the partial index
``ix_payment_transactions_reconcile_due``, so concurrent workers never poll one twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, bindparam, false, literal_column, or_, select, true, update
from sqlalchemy.orm import Session

from ..lifecycle import IN_FLIGHT, UNSETTLED
from ..models import PaymentTransaction, as_utc
from .payments import transaction_id_of
from .record import PAYMENTS_TABLE, PaymentRecord

_PAYMENTS = PAYMENTS_TABLE
_LEASE = update(_PAYMENTS).where(_PAYMENTS.c.id == bindparam("b_pk"))
#: What the reconciler works on (the partial index ``ix_payment_transactions_reconcile_due``).
RECONCILABLE_STATUSES = tuple(sorted(UNSETTLED))


def claim_queries(
    *,
    now: datetime,
    created_before: datetime,
    limit: int,
    open_calls_created_before: Mapping[str, datetime] | None = None,
) -> tuple[Select[Any], Select[Any]]:
    """The claim's two statements: never-polled payments by id, then due ones by due time."""
    table = PaymentTransaction
    in_flight = table.status.in_(sorted(IN_FLIGHT))
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
