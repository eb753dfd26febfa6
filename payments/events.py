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

The statements on the outbox tables live with the outbox rather than in ``repository/``: they
are its own, and nothing else reads these tables. This module writes events and runs hooks; the
delivery queue is ``deliveries.py``, the Standard Webhooks wire format ``webhooks.py``, and the
events API's reads ``event_reads.py`` (their names stay importable from here).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from .deliveries import (
    JITTER,
    RESPONSE_BODY_LIMIT,
    RETRY_DELAY_CAP,
    AttemptRecord,
    AttemptResult,
    Claimed,
    claim_due,
    delivery_row,
    hook_delivery,
    nominal_delay,
    pending_events,
    prune,
    record_attempts,
    redeliver,
    retry_delay,
    schedule,
)
from .event_reads import get_event, list_events, recent_events
from .models import (
    HOOKS_CONSUMER,
    ConsumerKind,
    EventType,
    PaymentEvent,
    PaymentEventDelivery,
    PaymentOperation,
    PaymentStatus,
    utcnow,
)
from .repository import PaymentRecord
from .repository.statements import RowInsert, insert_together
from .webhooks import iso, payload, sign, signing_key, webhook_headers

__all__ = [
    "JITTER",
    "RESPONSE_BODY_LIMIT",
    "RETRY_DELAY_CAP",
    "AttemptRecord",
    "AttemptResult",
    "Claimed",
    "EventSink",
    "EventType",
    "WrittenEvent",
    "add_events",
    "event_rows",
    "call_hook",
    "claim_due",
    "current_event_id",
    "get_event",
    "hook_delivery",
    "hook_of",
    "iso",
    "list_events",
    "new_event_id",
    "nominal_delay",
    "notify",
    "payload",
    "pending_events",
    "prune",
    "recent_events",
    "record_attempts",
    "redeliver",
    "retry_delay",
    "schedule",
    "sign",
    "signing_key",
    "snapshot",
    "transition_types",
    "wakeup_event",
    "webhook_headers",
]

_INSERT_EVENT = RowInsert(PaymentEvent.__table__)
_INSERT_DELIVERY = RowInsert(PaymentEventDelivery.__table__)

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
    #: The consumer kinds with a delivery of it due at once (a dispatcher may take it now).
    due_now: frozenset[ConsumerKind] = frozenset()


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


@dataclass(frozen=True, slots=True)
class EventRows:
    """The rows of a transition's events and their deliveries, not yet written."""

    events: list[dict[str, Any]]
    deliveries: list[dict[str, Any]]
    written: list[WrittenEvent]

    def inserts(self) -> list[tuple[RowInsert, list[dict[str, Any]]]]:
        """What writes them, in order (a delivery refers to its event)."""
        return [(_INSERT_EVENT, self.events), (_INSERT_DELIVERY, self.deliveries)]


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
    rows = event_rows(record, types, sink, extra=extra)
    if rows.events:
        insert_together(session, *rows.inserts())
    return rows.written


def event_rows(
    record: PaymentRecord,
    types: Sequence[EventType],
    sink: EventSink,
    *,
    extra: Mapping[str, Any] | None = None,
) -> EventRows:
    """The events of ``record``'s transition and their deliveries, for the caller to write."""
    if not types:
        return EventRows([], [], [])
    now = utcnow()
    data = snapshot(record) | dict(extra or {})
    events: list[dict[str, Any]] = []
    deliveries: list[dict[str, Any]] = []
    written: list[WrittenEvent] = []
    webhooks_due = frozenset({ConsumerKind.WEBHOOK} if sink.webhook_urls else ())
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
        due_now = webhooks_due
        if has_hook:
            hold = sink.hook_lease or timedelta(0)
            deliveries.append(
                delivery_row(event_id, ConsumerKind.HOOKS, HOOKS_CONSUMER, now + hold)
            )
            if not hold:
                due_now |= {ConsumerKind.HOOKS}
        deliveries += [
            delivery_row(event_id, ConsumerKind.WEBHOOK, url, now) for url in sink.webhook_urls
        ]
        written.append(WrittenEvent(event_id, event_type.value, has_hook, due_now))
    return EventRows(events, deliveries, written)


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


# -- waking the dispatchers of this process ------------------------------------------------------

#: Each waiting dispatcher's event, and the consumer kinds it delivers.
_wakeups: weakref.WeakKeyDictionary[asyncio.Event, frozenset[ConsumerKind]] = (
    weakref.WeakKeyDictionary()
)
_EVERY_KIND = frozenset(ConsumerKind)


def wakeup_event(kinds: Iterable[ConsumerKind] = _EVERY_KIND) -> asyncio.Event:
    """An event set whenever this process commits deliveries of one of ``kinds`` (a dispatcher
    waits on it for the kinds it delivers)."""
    event = asyncio.Event()
    _wakeups[event] = frozenset(kinds)
    return event


def notify(kinds: Iterable[ConsumerKind] = _EVERY_KIND) -> None:
    """Deliveries of ``kinds`` were committed, due now: wake this process's dispatchers that
    deliver them now, not at their next poll. A payment with nothing due (no webhook endpoint,
    its hooks run by this process) wakes none: a pass that finds nothing costs a write unit."""
    due = frozenset(kinds)
    for event, delivered in list(_wakeups.items()):
        if not due & delivered:
            continue
        try:
            event.set()
        except RuntimeError:  # an event of another (closed) loop
            _wakeups.pop(event, None)
