"""Reads of the payment events' outbox for the events API and the operator console: events
with their deliveries and each delivery's attempts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import PaymentEvent, PaymentEventAttempt, PaymentEventDelivery, as_utc
from .schemas import (
    EventAttemptResponse,
    EventDeliveryResponse,
    EventListResponse,
    EventResponse,
)

_EVENTS = PaymentEvent.__table__
_DELIVERIES = PaymentEventDelivery.__table__
_ATTEMPTS = PaymentEventAttempt.__table__


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
