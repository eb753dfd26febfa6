"""The delivery queue of the payment events' outbox (``payment_event_deliveries``): claiming due
deliveries under a lease, recording attempts, the retry schedule, redelivery and pruning.

A delivery is one event to one consumer (the host's hooks, or one webhook endpoint). The
dispatcher (``dispatcher.py``) drives the queue; ``events.py`` adds its rows with the event.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.orm import Session

from .models import (
    ConsumerKind,
    DeliveryStatus,
    PaymentEvent,
    PaymentEventAttempt,
    PaymentEventDelivery,
    as_utc,
    utcnow,
)

_EVENTS = PaymentEvent.__table__
_DELIVERIES = PaymentEventDelivery.__table__
_ATTEMPTS = PaymentEventAttempt.__table__
_INSERT_DELIVERY = insert(_DELIVERIES)
_INSERT_ATTEMPT = insert(_ATTEMPTS)

#: Characters of an endpoint's answer kept per attempt.
RESPONSE_BODY_LIMIT = 1000
#: Longest single wait between two attempts; the window (3 days by default) bounds the rest.
RETRY_DELAY_CAP = timedelta(hours=12)
#: Each delay is its nominal value times a factor drawn from this range (spreads retry storms).
JITTER = (0.8, 1.2)


def delivery_row(event_id: str, kind: ConsumerKind, consumer: str, due: datetime) -> dict[str, Any]:
    """A new pending delivery of ``event_id`` to ``consumer``, due at ``due``."""
    return {
        "event_id": event_id,
        "kind": kind.value,
        "consumer": consumer,
        "status": DeliveryStatus.PENDING.value,
        "attempts": 0,
        "next_attempt_at": due,
        "last_attempt_at": None,
        "delivered_at": None,
        "last_status_code": None,
        "last_error": None,
        "created_at": due if kind is ConsumerKind.WEBHOOK else utcnow(),
    }


# -- retries -------------------------------------------------------------------------------------


def nominal_delay(attempt: int, base: float) -> timedelta:
    """The wait after the ``attempt``-th failed attempt: base, 2×base, 4×base, … capped at
    ``RETRY_DELAY_CAP``."""
    doublings = min(max(0, attempt - 1), 30)
    return min(RETRY_DELAY_CAP, timedelta(seconds=base * 2**doublings))


def retry_delay(
    attempt: int, base: float, rand: Callable[[float, float], float] = random.uniform
) -> timedelta:
    return nominal_delay(attempt, base) * rand(*JITTER)


def schedule(base: float, window: float) -> list[timedelta]:
    """Nominal times of every attempt after the first, from the event's creation."""
    at, times, attempt = timedelta(0), [], 1
    while True:
        at += nominal_delay(attempt, base)
        if at.total_seconds() > window:
            return times
        times.append(at)
        attempt += 1


# -- the dispatcher's statements -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery a dispatcher holds under a lease, with its event."""

    delivery_id: int
    attempt: int  # this attempt's number (1 for the first)
    kind: str
    consumer: str
    event_id: str
    event_type: str
    transaction_id: str
    data: dict[str, Any]
    created_at: datetime


def claim_due(
    session: Session,
    *,
    kind: ConsumerKind,
    now: datetime,
    lease_until: datetime,
    limit: int,
) -> list[Claimed]:
    """Take up to ``limit`` due deliveries of ``kind``: rows other dispatchers hold are skipped
    (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), and the lease in ``next_attempt_at`` keeps them
    from everyone else until this one has recorded its attempt."""
    d = _DELIVERIES.c
    ids = (
        session.execute(
            select(d.id)
            .where(
                d.kind == kind.value,
                d.status == DeliveryStatus.PENDING.value,
                d.next_attempt_at <= now,
            )
            .order_by(d.next_attempt_at, d.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        .scalars()
        .all()
    )
    if not ids:
        return []
    # Guarded again: where row locks do not exist (SQLite), a dispatcher that read the same rows
    # first has moved them past ``now`` already, and the rows read back are this pass's only.
    session.execute(
        update(_DELIVERIES)
        .where(
            d.id.in_(ids),
            d.status == DeliveryStatus.PENDING.value,
            d.next_attempt_at <= now,
        )
        .values(next_attempt_at=lease_until, attempts=d.attempts + 1)
    )
    e = _EVENTS.c
    rows = session.execute(
        select(
            d.id,
            d.attempts,
            d.kind,
            d.consumer,
            e.id,
            e.type,
            e.transaction_id,
            e.data,
            e.created_at,
        )
        .join(_EVENTS, e.id == d.event_id)
        .where(d.id.in_(ids), d.next_attempt_at == lease_until)
        .order_by(e.id)
    ).all()
    return [
        Claimed(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], as_utc(row[8]))
        for row in rows
    ]


@dataclass(frozen=True, slots=True)
class AttemptResult:
    status_code: int | None
    duration_ms: int
    error: str | None = None
    response_body: str | None = None

    @property
    def delivered(self) -> bool:
        return self.error is None and (self.status_code is None or 200 <= self.status_code < 300)


#: The guard makes a stale attempt (its delivery redelivered, or taken by another dispatcher
#: after this one's lease ran out) change nothing; its attempt row is still kept.
_RECORD_STATE = (
    update(_DELIVERIES)
    .where(
        _DELIVERIES.c.id == bindparam("b_id"),
        _DELIVERIES.c.attempts == bindparam("b_attempt"),
        _DELIVERIES.c.status == DeliveryStatus.PENDING.value,
    )
    .values(
        status=bindparam("b_status"),
        next_attempt_at=bindparam("b_next"),
        last_attempt_at=bindparam("b_now"),
        delivered_at=bindparam("b_delivered"),
        last_status_code=bindparam("b_code"),
        last_error=bindparam("b_error"),
    )
)


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    delivery_id: int
    attempt: int
    result: AttemptResult
    status: DeliveryStatus
    next_attempt_at: datetime | None


def record_attempts(session: Session, records: Sequence[AttemptRecord], now: datetime) -> None:
    """Write attempts and their deliveries' new states: two batched statements for a pass."""
    if not records:
        return
    session.execute(
        _RECORD_STATE,
        [
            {
                "b_id": item.delivery_id,
                "b_attempt": item.attempt,
                "b_status": item.status.value,
                "b_next": item.next_attempt_at,
                "b_now": now,
                "b_delivered": now if item.status is DeliveryStatus.DELIVERED else None,
                "b_code": item.result.status_code,
                "b_error": item.result.error,
            }
            for item in records
        ],
    )
    session.execute(
        _INSERT_ATTEMPT,
        [
            {
                "delivery_id": item.delivery_id,
                "attempted_at": now,
                "status_code": item.result.status_code,
                "duration_ms": item.result.duration_ms,
                "error": item.result.error,
                "response_body": item.result.response_body,
            }
            for item in records
        ],
    )


def hook_delivery(session: Session, event_id: str) -> tuple[int, int] | None:
    """(delivery id, attempts) of an event's pending hook delivery, if it has one; taken as an
    attempt (its count goes up), for the process that runs the hook right after the commit."""
    d = _DELIVERIES.c
    row = session.execute(
        select(d.id, d.attempts).where(
            d.event_id == event_id,
            d.kind == ConsumerKind.HOOKS.value,
            d.status == DeliveryStatus.PENDING.value,
        )
    ).first()
    if row is None:
        return None
    session.execute(update(_DELIVERIES).where(d.id == row[0]).values(attempts=row[1] + 1))
    return row[0], row[1] + 1


def prune(session: Session, older_than: datetime, *, limit: int = 1000) -> int:
    """Delete up to ``limit`` events created before ``older_than``, with their deliveries and
    attempts (explicitly: a host's SQLite connection may not enforce ``ON DELETE CASCADE``)."""
    ids = session.scalars(
        select(_EVENTS.c.id).where(_EVENTS.c.created_at < older_than).limit(limit)
    ).all()
    if not ids:
        return 0
    deliveries = select(_DELIVERIES.c.id).where(_DELIVERIES.c.event_id.in_(ids))
    session.execute(delete(_ATTEMPTS).where(_ATTEMPTS.c.delivery_id.in_(deliveries)))
    session.execute(delete(_DELIVERIES).where(_DELIVERIES.c.event_id.in_(ids)))
    session.execute(delete(_EVENTS).where(_EVENTS.c.id.in_(ids)))
    return len(ids)


# -- redelivery and the backlog ------------------------------------------------------------------


def redeliver(session: Session, event_id: str, webhook_urls: Sequence[str]) -> bool:
    """Make the event due again at every endpoint configured now (new endpoints included),
    whatever its deliveries' states; the hooks are not run again. False: no such event."""
    exists = session.scalar(select(func.count()).where(_EVENTS.c.id == event_id))
    if not exists:
        return False
    now = utcnow()
    d = _DELIVERIES.c
    known = set(
        session.scalars(
            select(d.consumer).where(d.event_id == event_id, d.kind == ConsumerKind.WEBHOOK.value)
        ).all()
    )
    session.execute(
        update(_DELIVERIES)
        .where(d.event_id == event_id, d.kind == ConsumerKind.WEBHOOK.value)
        .values(status=DeliveryStatus.PENDING.value, next_attempt_at=now, delivered_at=None)
    )
    new = [
        delivery_row(event_id, ConsumerKind.WEBHOOK, url, now)
        for url in webhook_urls
        if url not in known
    ]
    if new:
        session.execute(_INSERT_DELIVERY, new)
    return True


def pending_events(session: Session, *, hooks: bool) -> int:
    """Events with at least one delivery still to make (the ``events_pending`` gauge): to a
    webhook endpoint, and to the hooks when the host's service has hooks (``hooks``; without,
    nothing ever consumes its hook deliveries). The pending rows lead the
    ``(kind, status, next_attempt_at)`` index, and stay few."""
    d = _DELIVERIES.c
    kinds = [ConsumerKind.WEBHOOK.value] + ([ConsumerKind.HOOKS.value] if hooks else [])
    return int(
        session.scalar(
            select(func.count(func.distinct(d.event_id))).where(
                d.kind.in_(kinds),
                d.status == DeliveryStatus.PENDING.value,
            )
        )
        or 0
    )
