"""The dispatcher: delivers payment events to their consumers, at least once.

A pass claims due deliveries (``deliveries.claim_due``: ``FOR UPDATE SKIP LOCKED`` plus a lease
in ``next_attempt_at``, so several dispatchers on one PostgreSQL never deliver one event to one
endpoint at once; on SQLite run one), delivers each without holding a database connection, and
records the attempt: a webhook is POSTed, signed as Standard Webhooks defines; a hook event runs
the service's hook. 2xx (or a hook that returns) is delivered; ``410 Gone`` stops retries to that
endpoint for that event; anything else, a timeout or a refused connection is retried after
``deliveries.retry_delay`` until ``PAYMENT_WEBHOOK_RETRY_WINDOW_SECONDS`` have passed since the
event, then marked failed and logged at ERROR (flagged). Events older than
``PAYMENT_EVENT_RETENTION_DAYS`` are pruned as part of the work.

It runs as a background task of an app that mounts the router (see ``router.py``; switched off by
``PAYMENT_DISPATCH_IN_APP=false``), as ``python -m payments dispatch [--loop SECONDS] [--service
module:attribute]``, or through ``dispatch_once`` / ``dispatch_forever`` in a host's own worker.
Hook events are consumed only by a service that has hooks (``PaymentService.runs_hooks``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import aiohttp
from sqlalchemy.orm import Session

from . import deliveries, events, metrics, webhooks
from . import repository as repo
from .database import DATABASE_ERRORS, DbSession, committing, run_db
from .deliveries import AttemptResult, Claimed
from .logger import payment_logger
from .models import HOOKS_CONSUMER, ConsumerKind, DeliveryStatus, PaymentOperation, utcnow
from .outcomes import error_for_record
from .reconciliation import SessionSource
from .redaction import sanitize_text
from .reports import PassReport
from .repository import PaymentRecord
from .service import PaymentService

#: How long a claimed webhook delivery stays invisible to other dispatchers beyond its timeout.
LEASE_MARGIN = timedelta(seconds=30)
#: Deliveries in flight at once per dispatcher.
CONCURRENCY = 20
#: Claims in one pass at most (``dispatch_once`` keeps claiming while deliveries are due).
MAX_BATCHES_PER_PASS = 50
#: How often a long-running dispatcher prunes old events.
PRUNE_EVERY = timedelta(hours=1)


@dataclass
class DispatchReport(PassReport):
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    gone: int = 0
    hooks: int = 0
    pruned: int = 0


def next_state(
    result: AttemptResult,
    attempt: int,
    created_at: datetime,
    now: datetime,
    service: PaymentService,
) -> tuple[DeliveryStatus, datetime | None]:
    """After an attempt: delivered, gone (410), failed (the window is over) or due again."""
    if result.delivered:
        return DeliveryStatus.DELIVERED, None
    if result.status_code == 410:
        return DeliveryStatus.GONE, None
    settings = service.settings
    due = now + deliveries.retry_delay(attempt, settings.payment_webhook_retry_base_seconds)
    if (due - created_at).total_seconds() > settings.payment_webhook_retry_window_seconds:
        return DeliveryStatus.FAILED, None
    return DeliveryStatus.PENDING, due


def _outcome_of(
    service: PaymentService, item: _Done, now: datetime
) -> tuple[DeliveryStatus, datetime | None]:
    status, due = next_state(item.result, item.attempt, item.created_at, now, service)
    if status is DeliveryStatus.FAILED:
        payment_logger.error(
            "Event delivery failed for good: retried for the whole window",
            event_id=item.event_id,
            consumer=item.consumer,
            attempts=item.attempt,
            error=item.result.error or f"HTTP {item.result.status_code}",
        )
    elif status is DeliveryStatus.GONE:
        payment_logger.warning(
            "Endpoint answered 410 Gone", event_id=item.event_id, consumer=item.consumer
        )
    return status, due


#: ``event_deliveries_total{result}``: a pending delivery after an attempt is a retry.
_RESULT_LABEL = {
    DeliveryStatus.DELIVERED: "delivered",
    DeliveryStatus.PENDING: "retry",
    DeliveryStatus.FAILED: "failed",
    DeliveryStatus.GONE: "gone",
}


@dataclass(frozen=True, slots=True)
class _Done:
    """One attempt made, to be recorded."""

    delivery_id: int
    attempt: int
    created_at: datetime
    event_id: str
    consumer: str
    result: AttemptResult


async def _record(
    service: PaymentService,
    db: DbSession,
    done: list[_Done],
    report: DispatchReport | None = None,
) -> None:
    """Record attempts and the deliveries' new states, all in one transaction."""
    if not done:
        return
    now = utcnow()
    decided = [(item, *_outcome_of(service, item, now)) for item in done]

    def write(session: Session) -> None:
        deliveries.record_attempts(
            session,
            [
                deliveries.AttemptRecord(item.delivery_id, item.attempt, item.result, status, due)
                for item, status, due in decided
            ],
            now,
        )

    await run_db(db, committing(write), write=True)
    for _, status, _ in decided:  # counted once committed: what the attempt decided
        metrics.observe_event_delivery(_RESULT_LABEL[status])
    if report is not None:
        for _, status, _ in decided:
            if status is DeliveryStatus.DELIVERED:
                report.delivered += 1
            elif status is DeliveryStatus.GONE:
                report.gone += 1
            elif status is DeliveryStatus.FAILED:
                report.failed += 1
            else:
                report.retried += 1


# -- hooks ---------------------------------------------------------------------------------------


async def run_hook(
    service: PaymentService,
    db: DbSession,
    event_id: str,
    record: PaymentRecord,
    name: str,
    args: tuple[Any, ...],
) -> AttemptResult:
    """Run one hook call for an event: a hook that raises is audited (as ``hook_failed``) and
    retried later, and never undoes the payment."""
    started = time.perf_counter()
    error: str | None = None
    try:
        await events.call_hook(service, name, args, event_id)
    except Exception as exc:  # a host's hook must never undo or lose the payment
        error = sanitize_text(f"{type(exc).__name__}: {exc}")[:2000]
        await service.audit_hook_failure(db, record, exc)
    return AttemptResult(None, round((time.perf_counter() - started) * 1000), error)


async def finish_hook(
    service: PaymentService,
    db: DbSession,
    taken: tuple[int, int],
    event_id: str,
    record: PaymentRecord,
    name: str,
    args: tuple[Any, ...],
) -> None:
    """The hook of an event its own process runs right after the commit, and its record."""
    result = await run_hook(service, db, event_id, record, name, args)
    done = _Done(taken[0], taken[1], utcnow(), event_id, HOOKS_CONSUMER, result)
    try:
        await _record(service, db, [done])
    except DATABASE_ERRORS:  # the hook ran; at worst it runs once more after the lease
        payment_logger.error("Could not record a hook call", event_id=event_id)


def _hook_records(
    session: Session, transaction_id: str
) -> tuple[PaymentRecord, PaymentRecord | None]:
    row = repo.get(session, transaction_id)
    if row is None:
        raise LookupError(f"payment {transaction_id} not found")
    record = repo.record_of(session, row)
    original = None
    if record.operation == PaymentOperation.REVERSAL and record.original_id is not None:
        original = repo.record_of(session, repo.get_by_id(session, record.original_id))
    return record, original


async def _run_claimed_hook(
    service: PaymentService, db: DbSession, claimed: Claimed, report: DispatchReport
) -> AttemptResult:
    """A hook event whose process did not run it (it died, or had no hooks): run it with the
    payment as it is now."""
    record, original = await run_db(db, lambda s: _hook_records(s, claimed.transaction_id))
    name = events.hook_of(claimed.event_type, claimed.data)
    report.hooks += 1
    if name is None:  # nothing to run (no row written here is without a hook): delivered
        return AttemptResult(None, 0)
    args: tuple[Any, ...]
    if name in ("on_payment_failed", "on_reversal_failed"):
        args = (record, error_for_record(record))
    elif name == "on_reversal_completed":
        args = (record, original)
    else:
        args = (record,)
    return await run_hook(service, db, claimed.event_id, record, name, args)


# -- webhooks ------------------------------------------------------------------------------------


async def post_event(
    http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], timeout: float
) -> AttemptResult:
    """One POST; the answer's body is read up to ``deliveries.RESPONSE_BODY_LIMIT`` bytes."""
    started = time.perf_counter()

    def elapsed() -> int:
        return round((time.perf_counter() - started) * 1000)

    try:
        async with asyncio.timeout(timeout):
            async with http.post(url, data=body, headers=headers, allow_redirects=False) as answer:
                kept = await answer.content.read(deliveries.RESPONSE_BODY_LIMIT)
                code = answer.status
        text = kept.decode("utf-8", "replace")
        error = None if 200 <= code < 300 else f"HTTP {code}"
        return AttemptResult(code, elapsed(), error, sanitize_text(text) or None)
    except TimeoutError:
        return AttemptResult(None, elapsed(), f"timed out after {timeout:g} s")
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return AttemptResult(None, elapsed(), f"{type(exc).__name__}: {exc}"[:2000])


async def _deliver_webhook(
    service: PaymentService, claimed: Claimed, http: aiohttp.ClientSession
) -> AttemptResult:
    settings = service.settings
    secret = settings.webhook_secret
    if secret is None:
        return AttemptResult(None, 0, "PAYMENT_WEBHOOK_SECRET is not configured")
    body = webhooks.payload(claimed.event_id, claimed.event_type, claimed.created_at, claimed.data)
    headers = webhooks.webhook_headers(
        webhooks.signing_key(secret), claimed.event_id, body, int(time.time())
    )
    return await post_event(http, claimed.consumer, body, headers, settings.payment_webhook_timeout)


# -- passes --------------------------------------------------------------------------------------


def new_http_client() -> aiohttp.ClientSession:
    """aiohttp, not httpx's default pool: one POST through httpx cost ~40 ms of CPU here (its
    pool and async-library detection per request), aiohttp well under 1 ms."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=CONCURRENCY, keepalive_timeout=4.0),
        trust_env=False,
        skip_auto_headers=("Content-Type",),
    )


def delivered_kinds(service: PaymentService) -> list[ConsumerKind]:
    """What a dispatcher of ``service`` delivers: webhooks, and hook events if it has hooks."""
    return [ConsumerKind.WEBHOOK] + ([ConsumerKind.HOOKS] if service.runs_hooks else [])


async def dispatch_once(
    service: PaymentService,
    sessions: SessionSource,
    *,
    http: aiohttp.ClientSession | None = None,
    batch_size: int | None = None,
    prune: bool = True,
    now: Callable[[], datetime] = utcnow,
) -> DispatchReport:
    """Deliver everything due now (hook events too, if ``service`` has hooks), then prune."""
    settings = service.settings
    batch_size = batch_size or settings.payment_dispatch_batch_size
    report = DispatchReport()
    own_http = http is None
    client = http or new_http_client()
    kinds = delivered_kinds(service)
    leases = {
        ConsumerKind.WEBHOOK: timedelta(seconds=settings.payment_webhook_timeout) + LEASE_MARGIN,
        ConsumerKind.HOOKS: timedelta(seconds=settings.payment_hook_lease_seconds),
    }
    limit = asyncio.Semaphore(CONCURRENCY)

    async def deliver(claimed: Claimed) -> _Done | None:
        async with limit:
            try:
                if claimed.kind == ConsumerKind.HOOKS:
                    async with sessions() as db:
                        result = await _run_claimed_hook(service, db, claimed, report)
                else:  # no database work while the endpoint answers
                    result = await _deliver_webhook(service, claimed, client)
            except Exception as exc:  # one delivery's trouble must not stop the others
                payment_logger.error(
                    "Event delivery failed before it was made; retried after its lease",
                    event_id=claimed.event_id,
                    consumer=claimed.consumer,
                    error=f"{type(exc).__name__}: {exc}",
                )
                return None
        return _Done(
            claimed.delivery_id,
            claimed.attempt,
            claimed.created_at,
            claimed.event_id,
            claimed.consumer,
            result,
        )

    try:
        for _ in range(MAX_BATCHES_PER_PASS):
            started = now()
            claimed: list[Claimed] = []
            async with sessions() as db:
                for kind in kinds:

                    def claim(
                        session: Session, kind: ConsumerKind = kind, started: datetime = started
                    ) -> list[Claimed]:
                        return deliveries.claim_due(
                            session,
                            kind=kind,
                            now=started,
                            lease_until=started + leases[kind],
                            limit=batch_size,
                        )

                    claimed += await run_db(db, committing(claim), write=True)
            if not claimed:
                break
            done = [item for item in await asyncio.gather(*map(deliver, claimed)) if item]
            async with sessions() as db:
                await _record(service, db, done, report)
            if len(claimed) < batch_size:
                break
        if prune:
            cutoff = now() - timedelta(days=settings.payment_event_retention_days)
            async with sessions() as db:
                while pruned := await run_db(
                    db, committing(lambda s: deliveries.prune(s, cutoff)), write=True
                ):
                    report.pruned += pruned
    finally:
        if own_http:
            await client.close()
    if report.delivered or report.retried or report.failed or report.gone or report.pruned:
        payment_logger.info("Dispatch pass", report=str(report))
    return report


async def dispatch_forever(
    service: PaymentService,
    sessions: SessionSource,
    *,
    interval: float | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Passes every ``interval`` seconds, and at once whenever this process commits events,
    until ``stop`` is set (or the task is cancelled)."""
    interval = interval or service.settings.payment_dispatch_interval
    stop = stop or asyncio.Event()
    wakeup = events.wakeup_event(delivered_kinds(service))
    last_prune: float | None = None
    async with new_http_client() as http:
        while not stop.is_set():
            wakeup.clear()
            prune = last_prune is None or time.monotonic() - last_prune >= PRUNE_EVERY.seconds
            try:
                await dispatch_once(service, sessions, http=http, prune=prune)
                if prune:
                    last_prune = time.monotonic()
            except Exception as exc:  # the database may be down for a while: keep trying
                payment_logger.error("Dispatch pass failed", error=f"{type(exc).__name__}: {exc}")
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wakeup.wait())]
            try:
                await asyncio.wait(waiters, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
