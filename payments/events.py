"""Payment events: a transactional outbox, and what its consumers need to read it.

Every transition of a payment writes one event (``payment_events``) **in the transition's own
database transaction**, with one delivery row per consumer (``payment_event_deliveries``): the
host's in-process hooks, and each ``PAYMENT_WEBHOOK_URLS`` endpoint. No transition commits
without its event, and no event without its transition. Consumers are then served at least once:

- The process that made the transition runs its hooks right after the commit (when its service
  has any: see ``runs_hooks``), under a lease of ``PAYMENT_HOOK_LEASE_SECONDS``; if it dies first,
  a dispatcher (``dispatcher.py``) of whichever process runs the host's service runs them once
  that lease is over. A transition made by a service without hooks (the plain ``reconcile`` CLI)
  leaves its hook deliveries due at once, for the host's dispatcher.
- Dispatchers POST each event to each endpoint, signed as Standard Webhooks defines, and retry
  with exponential backoff and jitter (``retry_delay``) for
  ``PAYMENT_WEBHOOK_RETRY_WINDOW_SECONDS``.

Every hook call and delivery carries the event id (``webhook-id``; ``current_event_id`` or an
``event_id`` keyword in a hook), so a host can dedupe.

The statements on the outbox tables live here rather than in ``repository.py``: they are the
outbox's own, and nothing else reads these tables.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import inspect
import json
import os
import random
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.orm import Session

from .models import (
    HOOKS_CONSUMER,
    ConsumerKind,
    DeliveryStatus,
    EventType,
    PaymentEvent,
    PaymentEventAttempt,
    PaymentEventDelivery,
    PaymentOperation,
    PaymentStatus,
    as_utc,
    utcnow,
)
from .repository import PaymentRecord
from .schemas import (
    EventAttemptResponse,
    EventDeliveryResponse,
    EventListResponse,
    EventResponse,
)

_EVENTS = PaymentEvent.__table__
_DELIVERIES = PaymentEventDelivery.__table__
_ATTEMPTS = PaymentEventAttempt.__table__
_INSERT_EVENT = insert(_EVENTS)
_INSERT_DELIVERY = insert(_DELIVERIES)
_INSERT_ATTEMPT = insert(_ATTEMPTS)

#: Characters of an endpoint's answer kept per attempt.
RESPONSE_BODY_LIMIT = 1000
#: Longest single wait between two attempts; the window (3 days by default) bounds the rest.
RETRY_DELAY_CAP = timedelta(hours=12)
#: Each delay is its nominal value times a factor drawn from this range (spreads retry storms).
JITTER = (0.8, 1.2)

#: The event id of the hook call in progress (``None`` outside one). Hooks that keep the old
#: signature read it; hooks that declare an ``event_id`` parameter get it as a keyword.
current_event_id: ContextVar[str | None] = ContextVar("payments_current_event_id", default=None)

_S = PaymentStatus
_STATUS_EVENT = {
    _S.COMPLETED: EventType.PAYMENT_COMPLETED,
    _S.FAILED: EventType.PAYMENT_FAILED,
    _S.CANCELLED: EventType.PAYMENT_CANCELLED,
    _S.EXPIRED: EventType.PAYMENT_EXPIRED,
    _S.UNKNOWN: EventType.PAYMENT_UNKNOWN,
}


# -- ids -----------------------------------------------------------------------------------------

_id_lock = threading.Lock()
_last_id: tuple[int, int] = (0, 0)


def new_event_id() -> str:
    """``evt_`` + 12 hex digits of milliseconds + 16 hex digits: sortable by creation time, and
    strictly increasing within a process (a second id in the same millisecond counts up)."""
    global _last_id
    with _id_lock:
        millis = time.time_ns() // 1_000_000
        last_millis, last_tail = _last_id
        if millis > last_millis:
            tail = int.from_bytes(os.urandom(8)) >> 1  # room to count up
        else:
            millis, tail = last_millis, last_tail + 1
        _last_id = (millis, tail)
    return f"evt_{millis:012x}{tail:016x}"


# -- writing (inside the transition's transaction) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class EventSink:
    """What a transition needs to write its events: the endpoints configured now, and whether
    this process runs the hooks itself right after the commit (then it holds them under a
    lease) or leaves them due at once for the host's dispatcher."""

    webhook_urls: tuple[str, ...] = ()
    hook_lease: timedelta | None = None


@dataclass(frozen=True, slots=True)
class WrittenEvent:
    id: str
    type: str
    has_hook: bool


def transition_types(
    record: PaymentRecord, *, status_before: str, attention_before: bool
) -> list[EventType]:
    """The events of one applied outcome: its status change, and a newly raised flag."""
    types: list[EventType] = []
    status = PaymentStatus(record.status)
    if record.status != status_before and status in _STATUS_EVENT:
        if record.operation == PaymentOperation.REVERSAL and status is not _S.UNKNOWN:
            types.append(
                EventType.REVERSAL_COMPLETED
                if status is _S.COMPLETED
                else EventType.REVERSAL_FAILED
            )
        else:
            types.append(_STATUS_EVENT[status])
    if record.attention_required and not attention_before:
        types.append(EventType.PAYMENT_ATTENTION_REQUIRED)
    return types


def snapshot(record: PaymentRecord) -> dict[str, Any]:
    """The payment as the API shows it (phone number masked), as JSON values."""
    from .outcomes import to_response  # outcomes imports this module

    return to_response(record).model_dump(mode="json")


def hook_of(event_type: str, data: Mapping[str, Any]) -> str | None:
    """The ``PaymentService`` hook an event calls, if any."""
    if event_type == EventType.PAYMENT_RESOLVED:
        if data.get("status") == data.get("status_before"):
            return None  # only M-Pesa's ID was recorded: nothing for a hook
        return hook_of(_STATUS_EVENT.get(PaymentStatus(data["status"]), ""), data)
    return {
        EventType.PAYMENT_COMPLETED: "on_payment_completed",
        EventType.PAYMENT_FAILED: "on_payment_failed",
        EventType.PAYMENT_CANCELLED: "on_payment_failed",
        EventType.PAYMENT_EXPIRED: "on_payment_failed",
        EventType.PAYMENT_UNKNOWN: "on_payment_unknown",
        EventType.REVERSAL_COMPLETED: "on_reversal_completed",
        EventType.REVERSAL_FAILED: "on_reversal_failed",
    }.get(EventType(event_type) if event_type else None)  # type: ignore[call-overload]


def add_events(
    session: Session,
    record: PaymentRecord,
    types: Sequence[EventType],
    sink: EventSink,
    *,
    extra: Mapping[str, Any] | None = None,
) -> list[WrittenEvent]:
    """Insert the events of ``record``'s transition and their deliveries (no commit: the
    caller's transaction commits them with the transition, or rolls them back with it)."""
    if not types:
        return []
    now = utcnow()
    data = snapshot(record) | dict(extra or {})
    events: list[dict[str, Any]] = []
    deliveries: list[dict[str, Any]] = []
    written: list[WrittenEvent] = []
    for event_type in types:
        event_id = new_event_id()
        events.append(
            {
                "id": event_id,
                "type": event_type.value,
                "transaction_id": record.transaction_id,
                "data": data,
                "created_at": now,
            }
        )
        has_hook = hook_of(event_type, data) is not None
        if has_hook:
            hold = sink.hook_lease or timedelta(0)
            deliveries.append(_delivery(event_id, ConsumerKind.HOOKS, HOOKS_CONSUMER, now + hold))
        deliveries += [
            _delivery(event_id, ConsumerKind.WEBHOOK, url, now) for url in sink.webhook_urls
        ]
        written.append(WrittenEvent(event_id, event_type.value, has_hook))
    session.execute(_INSERT_EVENT, events)
    if deliveries:
        session.execute(_INSERT_DELIVERY, deliveries)
    return written


def _delivery(event_id: str, kind: ConsumerKind, consumer: str, due: datetime) -> dict[str, Any]:
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


# -- hooks ---------------------------------------------------------------------------------------

_accepts_event_id: weakref.WeakKeyDictionary[type, dict[str, bool]] = weakref.WeakKeyDictionary()


def _takes_event_id(service: Any, name: str) -> bool:
    known = _accepts_event_id.setdefault(type(service), {})
    if name not in known:
        parameters = inspect.signature(getattr(service, name)).parameters.values()
        known[name] = any(
            p.name == "event_id" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
        )
    return known[name]


async def call_hook(service: Any, name: str, args: Sequence[Any], event_id: str) -> None:
    """Call ``service.<name>(*args)`` with the event id in ``current_event_id`` (and as the
    ``event_id`` keyword when the hook declares one: older hooks keep working unchanged)."""
    hook: Callable[..., Awaitable[None]] = getattr(service, name)
    token = current_event_id.set(event_id)
    try:
        if _takes_event_id(service, name):
            await hook(*args, event_id=event_id)
        else:
            await hook(*args)
    finally:
        current_event_id.reset(token)


# -- wire format ---------------------------------------------------------------------------------


def iso(value: datetime) -> str:
    stamp = as_utc(value)
    assert stamp is not None
    return stamp.isoformat().replace("+00:00", "Z")


def payload(event_id: str, event_type: str, created_at: datetime, data: Any) -> bytes:
    """The body POSTed to each endpoint: ``{"id", "type", "created_at", "data": {payment}}``."""
    body = {"id": event_id, "type": event_type, "created_at": iso(created_at), "data": data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def signing_key(secret: str) -> bytes:
    """The key of a ``whsec_``-prefixed, base64-encoded secret."""
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` + base64(HMAC-SHA256(key, id.timestamp.body))."""
    signed = b"%s.%d.%s" % (message_id.encode(), timestamp, body)
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def webhook_headers(key: bytes, message_id: str, body: bytes, timestamp: int) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "user-agent": "payments-webhooks/1",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(key, message_id, timestamp, body),
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


# -- the API's reads and redelivery --------------------------------------------------------------


def _event(row: Any) -> EventResponse:
    return EventResponse(
        id=row.id,
        type=row.type,
        transaction_id=row.transaction_id,
        created_at=as_utc(row.created_at),
        data=row.data,
    )


def list_events(
    session: Session,
    *,
    after: str | None,
    event_type: str | None,
    transaction_id: str | None,
    limit: int,
) -> EventListResponse:
    e = _EVENTS.c
    query = select(_EVENTS).order_by(e.id).limit(limit + 1)
    if after:
        query = query.where(e.id > after)
    if event_type:
        query = query.where(e.type == event_type)
    if transaction_id:
        query = query.where(e.transaction_id == transaction_id)
    rows = session.execute(query).all()
    return EventListResponse(
        items=[_event(row) for row in rows[:limit]], has_more=len(rows) > limit
    )


def get_event(session: Session, event_id: str) -> EventResponse | None:
    row = session.execute(select(_EVENTS).where(_EVENTS.c.id == event_id)).first()
    if row is None:
        return None
    event = _event(row)
    event.deliveries = _deliveries_of(session, [event_id]).get(event_id, [])
    return event


def recent_events(
    session: Session,
    *,
    before: str | None,
    event_type: str | None,
    transaction_id: str | None,
    limit: int,
) -> tuple[list[EventResponse], bool]:
    """The operator console's view: events newest first (before the event ``before``), each
    with its deliveries and their attempts; and whether older ones follow. Three indexed
    queries whatever ``limit`` is (events by primary key, deliveries and attempts by event)."""
    e = _EVENTS.c
    query = select(_EVENTS).order_by(e.id.desc()).limit(limit + 1)
    if before:
        query = query.where(e.id < before)
    if event_type:
        query = query.where(e.type == event_type)
    if transaction_id:
        query = query.where(e.transaction_id == transaction_id)
    rows = session.execute(query).all()
    found = [_event(row) for row in rows[:limit]]
    deliveries = _deliveries_of(session, [event.id for event in found])
    for event in found:
        event.deliveries = deliveries.get(event.id, [])
    return found, len(rows) > limit


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


def _deliveries_of(
    session: Session, event_ids: Sequence[str]
) -> dict[str, list[EventDeliveryResponse]]:
    if not event_ids:
        return {}
    d, a = _DELIVERIES.c, _ATTEMPTS.c
    deliveries = session.execute(
        select(_DELIVERIES).where(d.event_id.in_(event_ids)).order_by(d.id)
    ).all()
    attempts: dict[int, list[EventAttemptResponse]] = {}
    if deliveries:
        for attempt in session.execute(
            select(_ATTEMPTS)
            .where(a.delivery_id.in_([row.id for row in deliveries]))
            .order_by(a.id)
        ).all():
            attempts.setdefault(attempt.delivery_id, []).append(
                EventAttemptResponse(
                    attempted_at=as_utc(attempt.attempted_at),
                    status_code=attempt.status_code,
                    duration_ms=attempt.duration_ms,
                    error=attempt.error,
                    response_body=attempt.response_body,
                )
            )
    found: dict[str, list[EventDeliveryResponse]] = {}
    for row in deliveries:
        found.setdefault(row.event_id, []).append(
            EventDeliveryResponse(
                kind=row.kind,
                consumer=row.consumer,
                status=row.status,
                attempts=row.attempts,
                next_attempt_at=as_utc(row.next_attempt_at),
                last_attempt_at=as_utc(row.last_attempt_at),
                delivered_at=as_utc(row.delivered_at),
                last_status_code=row.last_status_code,
                last_error=row.last_error,
                attempt_log=attempts.get(row.id, []),
            )
        )
    return found


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
        _delivery(event_id, ConsumerKind.WEBHOOK, url, now)
        for url in webhook_urls
        if url not in known
    ]
    if new:
        session.execute(_INSERT_DELIVERY, new)
    return True


# -- waking the dispatchers of this process ------------------------------------------------------

_wakeups: weakref.WeakSet[asyncio.Event] = weakref.WeakSet()


def wakeup_event() -> asyncio.Event:
    """An event set whenever this process commits events (a dispatcher waits on it)."""
    event = asyncio.Event()
    _wakeups.add(event)
    return event


def notify() -> None:
    """New events were committed: wake this process's dispatchers now, not at their next poll."""
    for event in list(_wakeups):
        try:
            event.set()
        except RuntimeError:  # an event of another (closed) loop
            _wakeups.discard(event)
