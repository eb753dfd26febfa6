"""Payment events: one per transition, in the transition's own transaction; hooks and signed
webhooks as consumers, at least once, each carrying the event id; the events API.

Webhooks go to real HTTP receivers on loopback (aiohttp), verified with the ``standardwebhooks``
package, the reference implementation hosts use."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from payments import events
from payments.config import load_settings
from payments.dispatcher import dispatch_once
from payments.exceptions import (
    PaymentError,
    PaymentStorageError,
)
from payments.models import (
    EventType,
    PaymentEvent,
    PaymentEventAttempt,
    PaymentEventDelivery,
    PaymentTransaction,
    utcnow,
)
from payments.mpesa.client import ClientConfig, MpesaClient
from payments.reconciliation import reconcile_once
from payments.repository import PaymentRecord
from payments.schemas import PaymentInitiateRequest, ReversalRequest
from payments.service import PaymentService
from payments.simulator.app import MpesaSimulator, SimulatorConfig
from payments.simulator.transport import SimulatorTransport

SUCCESS = "258841234567"
CANCELS = "258841000005"
INSUFFICIENT = "258841002006"
DROPPED = "258842000001"  # the answer is lost: unknown; a status query later says completed
OVERLOADED = "258841000016"  # INS-16: unknown, and M-Pesa never finds it
SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


# --- a real receiver on loopback ----------------------------------------------------------------


@dataclass
class Receiver:
    """An HTTP endpoint that records every request and answers from a script (then 200)."""

    answers: list[int] = field(default_factory=list)
    delay: float = 0.0
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((dict(request.headers), body))
        if self.delay:
            await asyncio.sleep(self.delay)
        status = self.answers.pop(0) if self.answers else 200
        return web.Response(status=status, text=f"answer {status}")

    def event_ids(self) -> list[str]:
        return [headers["webhook-id"] for headers, _ in self.requests]

    def verified(self, secret: str = SECRET) -> list[dict[str, Any]]:
        """Every request, verified by the reference implementation (raises if one fails)."""
        return [Webhook(secret).verify(body, headers) for headers, body in self.requests]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with serving(Receiver()) as started:
        yield started


class serving:
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.receiver.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.receiver.url = f"http://127.0.0.1:{port}/hook"
        return self.receiver

    async def __aexit__(self, *_: object) -> None:
        await self.runner.cleanup()


# --- services -----------------------------------------------------------------------------------


class HookService(PaymentService):
    """A host's subclass with the old hook signatures: it reads the event id from the context."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, str, str | None]] = []
        self.failures_left = 0

    async def on_payment_completed(self, transaction: PaymentRecord) -> None:
        if self.failures_left:
            self.failures_left -= 1
            raise RuntimeError("order service down")
        self.calls.append(("completed", transaction.transaction_id, self.current_event_id))

    async def on_payment_failed(
        self, transaction: PaymentRecord, error: PaymentError | None
    ) -> None:
        self.calls.append(("failed", transaction.transaction_id, self.current_event_id))

    async def on_payment_unknown(self, transaction: PaymentRecord) -> None:
        self.calls.append(("unknown", transaction.transaction_id, self.current_event_id))

    async def on_reversal_completed(self, reversal: PaymentRecord, original: PaymentRecord) -> None:
        self.calls.append(("reversal_completed", reversal.transaction_id, self.current_event_id))


class KeywordHookService(PaymentService):
    """A newer host's subclass: its hook declares ``event_id``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, str]] = []

    async def on_payment_completed(self, transaction: PaymentRecord, *, event_id: str) -> None:
        self.calls.append((transaction.transaction_id, event_id))


async def _no_sleep(_: float) -> None:
    return None


def make_service(
    cls: type[PaymentService] = PaymentService,
    simulator: MpesaSimulator | None = None,
    **overrides: Any,
) -> Any:
    settings = load_settings(
        **({"mpesa_environment": "simulator", "payment_c2b_timeout": 2} | overrides)
    )
    client = MpesaClient(
        ClientConfig.from_settings(settings),
        transport=SimulatorTransport(simulator or MpesaSimulator(SimulatorConfig())),
        sleep=_no_sleep,
    )
    return cls(settings, client, db_retry_delays=(0.01,))


def webhook_settings(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "payment_webhook_urls": url,
        "payment_webhook_secret": SECRET,
        "payment_webhook_retry_base_seconds": 0.05,
    } | extra


async def pay(
    service: PaymentService, sessions: async_sessionmaker[AsyncSession], phone: str = SUCCESS
) -> str:
    async with sessions() as db:
        try:
            response = await service.initiate_payment(
                PaymentInitiateRequest(phone_number=phone, amount="100.00"),
                db,
                idempotency_key=os.urandom(8).hex(),
            )
            return response.transaction_id
        except PaymentError as error:
            return error.payment.transaction_id  # type: ignore[attr-defined]


async def event_rows(
    sessions: async_sessionmaker[AsyncSession], transaction_id: str | None = None
) -> list[PaymentEvent]:
    async with sessions() as session:
        query = select(PaymentEvent).order_by(PaymentEvent.id)
        if transaction_id:
            query = query.where(PaymentEvent.transaction_id == transaction_id)
        return list((await session.scalars(query)).all())


async def deliveries(
    sessions: async_sessionmaker[AsyncSession], kind: str = "webhook"
) -> list[PaymentEventDelivery]:
    """Deliveries of one kind (a plain service leaves hook deliveries to the host's service)."""
    async with sessions() as session:
        query = select(PaymentEventDelivery).order_by(PaymentEventDelivery.id)
        query = query.where(PaymentEventDelivery.kind == kind)
        return list((await session.scalars(query)).all())


async def attempts(sessions: async_sessionmaker[AsyncSession]) -> list[PaymentEventAttempt]:
    async with sessions() as session:
        query = select(PaymentEventAttempt).order_by(PaymentEventAttempt.id)
        return list((await session.scalars(query)).all())


async def dispatch_until_settled(
    service: PaymentService, sessions: async_sessionmaker[AsyncSession], passes: int = 200
) -> None:
    """Passes until no delivery is pending (retries are due after tens of milliseconds)."""
    kind = "hooks" if service.runs_hooks else "webhook"
    for _ in range(passes):
        await dispatch_once(service, sessions)
        if all(row.status != "pending" for row in await deliveries(sessions, kind)):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("deliveries still pending")


# --- one event per transition, in its transaction -----------------------------------------------


async def test_every_kind_of_transition_writes_its_event(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    service = make_service()
    paid = await pay(service, session_factory)
    refused = await pay(service, session_factory, INSUFFICIENT)
    cancelled = await pay(service, session_factory, CANCELS)
    lost = await pay(service, session_factory, DROPPED)
    async with session_factory() as db:
        reversal = await service.reverse(
            paid, ReversalRequest(reason="customer returned it", amount="40.00"), db
        )
    stuck = await pay(service, session_factory, OVERLOADED)
    async with session_factory() as db:
        await service.resolve(stuck, db, status="failed", reason="portal shows nothing")
    flagged = await pay(service, session_factory, OVERLOADED)
    await reconcile_once(service, session_factory, min_age=0, attention_after=0)

    def types(transaction_id: str, rows: list[PaymentEvent]) -> list[str]:
        return [row.type for row in rows if row.transaction_id == transaction_id]

    rows = await event_rows(session_factory)
    assert types(paid, rows) == ["payment.completed"]
    assert types(refused, rows) == ["payment.failed"]
    assert types(cancelled, rows) == ["payment.cancelled"]
    # Lost, then settled by the reconciler's status query.
    assert types(lost, rows) == ["payment.unknown", "payment.completed"]
    assert types(reversal.transaction_id, rows) == ["reversal.completed"]
    assert types(stuck, rows) == ["payment.unknown", "payment.resolved"]
    assert types(flagged, rows) == ["payment.unknown", "payment.attention_required"]
    ids = [row.id for row in rows]
    assert len(set(ids)) == len(ids) and all(i.startswith("evt_") for i in ids)

    (completed,) = [row for row in rows if row.transaction_id == paid]
    assert completed.data["transaction_id"] == paid
    assert completed.data["status"] == "completed"
    assert completed.data["phone_number"] == "2588412*****"  # masked
    assert SUCCESS not in json.dumps(completed.data)
    (resolved,) = [row for row in rows if row.type == "payment.resolved"]
    assert resolved.data["status"] == "failed"
    assert resolved.data["status_before"] == "unknown"
    assert resolved.data["resolution"]["reason"] == "portal shows nothing"
    await service.aclose()


async def test_ids_are_sortable_by_creation() -> None:
    ids = [events.new_event_id() for _ in range(2000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 for i in ids)


async def test_no_transition_commits_without_its_event(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    """The event is written in the transition's transaction: when it cannot be written, the
    transition does not commit either (the payment stays as it was, for reconciliation)."""
    service = make_service()
    async with session_factory() as session:
        await session.execute(text("DROP TABLE payment_event_attempts"))
        await session.execute(text("DROP TABLE payment_event_deliveries"))
        await session.execute(text("DROP TABLE payment_events"))
        await session.commit()
    async with session_factory() as db:
        with pytest.raises(PaymentStorageError) as info:
            await service.initiate_payment(
                PaymentInitiateRequest(phone_number=SUCCESS, amount="100.00"), db
            )
    transaction_id = info.value.details["transaction_id"]
    async with session_factory() as session:
        row = (
            await session.scalars(
                select(PaymentTransaction).where(
                    PaymentTransaction.transaction_id == transaction_id
                )
            )
        ).one()
    assert row.status == "processing"  # not completed without its event
    await service.aclose()


# --- hooks as consumers -------------------------------------------------------------------------


async def test_hooks_run_after_the_commit_once_with_the_event_id(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    service = make_service(HookService, payment_hook_lease_seconds=0.01)
    transaction_id = await pay(service, session_factory)
    (event,) = await event_rows(session_factory, transaction_id)
    assert service.calls == [("completed", transaction_id, event.id)]
    (hooks,) = await deliveries(session_factory, "hooks")
    assert (hooks.status, hooks.attempts) == ("delivered", 1)
    await asyncio.sleep(0.05)  # past the lease: a dispatcher must still not run it again
    report = await dispatch_once(service, session_factory)
    assert report.hooks == 0
    assert service.calls == [("completed", transaction_id, event.id)]
    assert service.current_event_id is None  # only set while a hook runs
    await service.aclose()


async def test_a_hook_that_declares_event_id_gets_it_as_a_keyword(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    service = make_service(KeywordHookService)
    transaction_id = await pay(service, session_factory)
    (event,) = await event_rows(session_factory, transaction_id)
    assert service.calls == [(transaction_id, event.id)]
    await service.aclose()


async def test_a_transition_made_without_hooks_reaches_the_hosts_hooks(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    """The reconcile CLI's plain service settles a payment; the host's service, in whichever
    process runs it, gets the hook call (today's bug: the order stayed unpaid)."""
    simulator = MpesaSimulator(SimulatorConfig())
    cli = make_service(simulator=simulator)  # the plain service: no hooks of its own
    assert not cli.runs_hooks
    transaction_id = await pay(cli, session_factory, DROPPED)
    await reconcile_once(cli, session_factory, min_age=0)
    host = make_service(HookService, simulator=simulator)
    assert host.runs_hooks
    report = await dispatch_once(host, session_factory)
    assert report.hooks == 2  # payment.unknown, then payment.completed
    rows = await event_rows(session_factory, transaction_id)
    assert [row.type for row in rows] == ["payment.unknown", "payment.completed"]
    assert sorted(host.calls) == sorted(
        [("unknown", transaction_id, rows[0].id), ("completed", transaction_id, rows[1].id)]
    )
    assert (await dispatch_once(host, session_factory)).hooks == 0  # once each
    assert len(host.calls) == 2
    # The plain service's dispatcher never consumes the host's hook events.
    await pay(cli, session_factory)
    assert (await dispatch_once(cli, session_factory)).hooks == 0
    await cli.aclose()
    await host.aclose()


async def test_a_failing_hook_is_audited_and_retried_until_it_succeeds(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    service = make_service(
        HookService, payment_hook_lease_seconds=0.01, payment_webhook_retry_base_seconds=0.02
    )
    service.failures_left = 2
    transaction_id = await pay(service, session_factory)
    async with session_factory() as session:
        status = await session.scalar(
            select(PaymentTransaction.status).where(
                PaymentTransaction.transaction_id == transaction_id
            )
        )
    assert status == "completed"  # a hook never undoes the payment
    assert service.calls == []
    await dispatch_until_settled(service, session_factory)
    (event,) = await event_rows(session_factory, transaction_id)
    assert service.calls == [("completed", transaction_id, event.id)]
    (hooks,) = await deliveries(session_factory, "hooks")
    assert (hooks.status, hooks.attempts) == ("delivered", 3)
    errors = [row.error for row in await attempts(session_factory)]
    assert errors == ["RuntimeError: order service down"] * 2 + [None]
    await service.aclose()


# --- webhooks -----------------------------------------------------------------------------------


async def test_500_three_times_then_200_is_four_deliveries_ending_delivered(
    session_factory: async_sessionmaker[AsyncSession], receiver: Receiver
) -> None:
    receiver.answers = [500, 500, 500, 200]
    service = make_service(**webhook_settings(receiver.url))
    transaction_id = await pay(service, session_factory)
    await dispatch_until_settled(service, session_factory)

    (event,) = await event_rows(session_factory, transaction_id)
    assert receiver.event_ids() == [event.id] * 4
    bodies = receiver.verified()
    assert bodies[0] == {
        "id": event.id,
        "type": "payment.completed",
        "created_at": events.iso(event.created_at),
        "data": event.data,
    }
    assert all(body == bodies[0] for body in bodies)
    (delivery,) = await deliveries(session_factory)
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("delivered", 4, 200)
    assert delivery.delivered_at is not None
    logged = await attempts(session_factory)
    assert [row.status_code for row in logged] == [500, 500, 500, 200]
    assert [row.response_body for row in logged] == ["answer 500"] * 3 + ["answer 200"]
    assert all(row.duration_ms is not None for row in logged)
    assert logged[0].error == "HTTP 500"
    await service.aclose()


async def test_standard_webhooks_verifies_every_delivery_and_rejects_a_tampered_one(
    session_factory: async_sessionmaker[AsyncSession], receiver: Receiver
) -> None:
    service = make_service(**webhook_settings(receiver.url))
    for phone in (SUCCESS, INSUFFICIENT, CANCELS):
        await pay(service, session_factory, phone)
    await dispatch_until_settled(service, session_factory)
    assert len(receiver.requests) == 3
    verified = receiver.verified()
    assert sorted(body["type"] for body in verified) == [
        "payment.cancelled",
        "payment.completed",
        "payment.failed",
    ]
    headers, body = receiver.requests[0]
    assert headers["Content-Type"] == "application/json"
    changed = json.loads(body)
    changed["data"]["amount"] = "999.00"
    tampered = json.dumps(changed, separators=(",", ":")).encode()
    assert tampered != body
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(tampered, headers)
    forged = dict(headers, **{"webhook-id": "evt_forged"})
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body, forged)
    other_secret = "whsec_" + base64.b64encode(b"another key, 32 bytes long!!!!!").decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other_secret).verify(body, headers)
    await service.aclose()


def test_our_signature_is_the_reference_implementations() -> None:
    from datetime import UTC, datetime

    body = b'{"id":"evt_1","type":"payment.completed","data":{"amount":"100.00"}}'
    stamp = 1_767_225_600
    ours = events.sign(events.signing_key(SECRET), "evt_1", stamp, body)
    reference = Webhook(SECRET).sign("evt_1", datetime.fromtimestamp(stamp, UTC), body.decode())
    assert ours == reference


async def test_410_gone_stops_retries_for_that_endpoint_and_event(
    session_factory: async_sessionmaker[AsyncSession], receiver: Receiver
) -> None:
    async with serving(Receiver(answers=[500, 500])) as other:
        receiver.answers = [410]
        urls = f"{receiver.url},{other.url}"
        service = make_service(**webhook_settings(urls))
        await pay(service, session_factory)
        await dispatch_until_settled(service, session_factory)
        for _ in range(3):
            await dispatch_once(service, session_factory)
    assert len(receiver.requests) == 1  # 410: never again
    assert len(other.requests) == 3  # the other endpoint is retried as usual
    by_url = {row.consumer: row for row in await deliveries(session_factory)}
    assert (by_url[receiver.url].status, by_url[receiver.url].attempts) == ("gone", 1)
    assert by_url[other.url].status == "delivered"
    await service.aclose()


async def test_refused_connections_and_timeouts_are_retried_then_failed_and_logged(
    session_factory: async_sessionmaker[AsyncSession],
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving(Receiver(delay=5.0)) as slow:
        closed = "http://127.0.0.1:9/hook"  # discard port: nothing listens
        service = make_service(
            **webhook_settings(
                f"{closed},{slow.url}",
                payment_webhook_timeout=1.0,  # a refusal is answered well within it
                payment_webhook_retry_window_seconds=3.0,
            )
        )
        await pay(service, session_factory)
        with caplog.at_level("ERROR", logger="payments"):
            await dispatch_until_settled(service, session_factory)
    rows = {row.consumer: row for row in await deliveries(session_factory)}
    assert rows[closed].status == rows[slow.url].status == "failed"
    assert rows[closed].attempts >= 2 and rows[slow.url].attempts >= 2
    assert rows[slow.url].last_error == "timed out after 1 s"
    assert "Connect" in (rows[closed].last_error or "")  # refused
    assert "Event delivery failed for good" in caplog.text
    await service.aclose()


def test_the_retry_schedule_doubles_from_the_base_for_about_three_days() -> None:
    times = events.schedule(5, 3 * 86400)
    assert times[:3] == [timedelta(seconds=5), timedelta(seconds=15), timedelta(seconds=35)]
    assert timedelta(days=2.5) < times[-1] <= timedelta(days=3)
    assert len(times) == 18
    delays = [events.retry_delay(1, 5) for _ in range(200)]
    assert min(delays) >= timedelta(seconds=4) and max(delays) <= timedelta(seconds=6)
    assert len(set(delays)) > 100  # jittered


async def test_deliveries_never_block_the_payment_request(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    async with serving(Receiver(delay=5.0)) as slow:
        service = make_service(**webhook_settings(slow.url))
        started = asyncio.get_running_loop().time()
        await pay(service, session_factory)
        assert asyncio.get_running_loop().time() - started < 2
        assert slow.requests == []  # only a dispatcher delivers
    await service.aclose()


async def test_old_events_are_pruned_with_their_deliveries(
    session_factory: async_sessionmaker[AsyncSession], receiver: Receiver
) -> None:
    service = make_service(**webhook_settings(receiver.url))
    old = await pay(service, session_factory)
    await dispatch_until_settled(service, session_factory)
    async with session_factory() as session:
        await session.execute(
            update(PaymentEvent)
            .where(PaymentEvent.transaction_id == old)
            .values(created_at=utcnow() - timedelta(days=31))
        )
        await session.commit()
    recent = await pay(service, session_factory)
    report = await dispatch_once(service, session_factory)
    assert report.pruned == 1
    assert [row.transaction_id for row in await event_rows(session_factory)] == [recent]
    assert len(await deliveries(session_factory)) == 1
    assert len(await attempts(session_factory)) == 1
    await service.aclose()


# --- the events API and the app's own dispatcher ------------------------------------------------


async def test_the_events_api_lists_shows_and_redelivers(
    payment_api_factory: Any, receiver: Receiver
) -> None:
    api = await payment_api_factory(settings_overrides=webhook_settings(receiver.url))
    first = await api.http.post(
        "/api/payments/initiate", json={"phone_number": SUCCESS, "amount": "100.00"}
    )
    second = await api.http.post(
        "/api/payments/initiate", json={"phone_number": INSUFFICIENT, "amount": "10.00"}
    )
    paid, refused = first.json()["transaction_id"], second.json()["details"]["transaction_id"]

    listed = (await api.http.get("/api/payments/events")).json()
    assert [item["transaction_id"] for item in listed["items"]] == [paid, refused]
    assert [item["type"] for item in listed["items"]] == ["payment.completed", "payment.failed"]
    assert listed["has_more"] is False
    first_id, second_id = (item["id"] for item in listed["items"])
    after = (await api.http.get("/api/payments/events", params={"after": first_id})).json()
    assert [item["id"] for item in after["items"]] == [second_id]
    page = (await api.http.get("/api/payments/events", params={"limit": 1})).json()
    assert ([item["id"] for item in page["items"]], page["has_more"]) == ([first_id], True)
    typed = await api.http.get("/api/payments/events", params={"type": "payment.failed"})
    assert [item["id"] for item in typed.json()["items"]] == [second_id]
    by_payment = await api.http.get("/api/payments/events", params={"transaction_id": paid})
    assert [item["id"] for item in by_payment.json()["items"]] == [first_id]
    assert listed["items"][0]["data"]["phone_number"] == "2588412*****"

    await dispatch_until_settled(api.service, api.session_factory)
    shown = (await api.http.get(f"/api/payments/events/{first_id}")).json()
    (webhook,) = [d for d in shown["deliveries"] if d["kind"] == "webhook"]
    assert (webhook["consumer"], webhook["status"], webhook["attempts"]) == (
        receiver.url,
        "delivered",
        1,
    )
    (attempt,) = webhook["attempt_log"]
    assert attempt["status_code"] == 200 and attempt["response_body"] == "answer 200"

    again = await api.http.post(f"/api/payments/events/{first_id}/redeliver")
    assert again.status_code == 200
    assert [d["status"] for d in again.json()["deliveries"] if d["kind"] == "webhook"] == [
        "pending"
    ]
    await dispatch_until_settled(api.service, api.session_factory)
    assert receiver.event_ids().count(first_id) == 2
    assert all(body["id"] in (first_id, second_id) for body in receiver.verified())

    assert (await api.http.get("/api/payments/events/evt_nope")).status_code == 404
    assert (await api.http.post("/api/payments/events/evt_nope/redeliver")).status_code == 404
    bad = await api.http.get("/api/payments/events", params={"type": "payment.paid"})
    assert bad.status_code == 422
    assert (await api.http.get("/api/payments/events", params={"limit": 0})).status_code == 422
    for method, path in (
        ("GET", "/api/payments/events"),
        ("GET", f"/api/payments/events/{first_id}"),
        ("POST", f"/api/payments/events/{first_id}/redeliver"),
    ):
        answer = await api.http.request(method, path, headers={"X-API-Key": "wrong"})
        assert answer.status_code == 401, path


async def test_the_router_runs_the_dispatcher_with_the_app(
    payment_api_factory: Any, receiver: Receiver
) -> None:
    api = await payment_api_factory(
        service_class=HookService, settings_overrides=webhook_settings(receiver.url)
    )
    async with api.app.router.lifespan_context(api.app):
        answer = await api.http.post(
            "/api/payments/initiate", json={"phone_number": SUCCESS, "amount": "100.00"}
        )
        transaction_id = answer.json()["transaction_id"]
        for _ in range(100):  # promptly: the commit wakes the app's dispatcher
            if receiver.requests:
                break
            await asyncio.sleep(0.02)
    (body,) = receiver.verified()
    assert body["data"]["transaction_id"] == transaction_id
    assert api.service.calls == [("completed", transaction_id, body["id"])]


@pytest.mark.parametrize("service_class", [PaymentService, HookService])
async def test_a_payment_with_nothing_due_does_not_wake_the_dispatcher(
    payment_api_factory: Any, monkeypatch: pytest.MonkeyPatch, service_class: type
) -> None:
    """No webhook endpoint, and hooks (if any) run by the request itself: a pass would find
    nothing, and cost a write unit per payment."""
    passes: list[int] = []
    real_pass = dispatch_once

    async def counted_pass(*args: Any, **kwargs: Any) -> Any:
        passes.append(1)
        return await real_pass(*args, **kwargs)

    monkeypatch.setattr("payments.dispatcher.dispatch_once", counted_pass)
    # a poll far beyond the test: only a wakeup could start a second pass (with the default
    # 1 s poll, a slow machine reached the next poll before the assertion)
    api = await payment_api_factory(
        service_class=service_class, settings_overrides={"payment_dispatch_interval": 60.0}
    )
    async with api.app.router.lifespan_context(api.app):
        for _ in range(100):
            if passes:
                break
            await asyncio.sleep(0.01)
        assert passes == [1]  # the first pass, at startup
        for _ in range(3):
            answer = await api.http.post(
                "/api/payments/initiate", json={"phone_number": SUCCESS, "amount": "100.00"}
            )
            assert answer.json()["status"] == "completed"
        await asyncio.sleep(0.3)  # a wakeup would have started a pass by now
        assert passes == [1]
    if service_class is HookService:
        assert [call[0] for call in api.service.calls] == ["completed"] * 3


async def test_payment_dispatch_in_app_false_leaves_delivery_to_the_cli(
    payment_api_factory: Any, receiver: Receiver
) -> None:
    api = await payment_api_factory(
        settings_overrides=webhook_settings(receiver.url, payment_dispatch_in_app=False)
    )
    async with api.app.router.lifespan_context(api.app):
        await api.http.post(
            "/api/payments/initiate", json={"phone_number": SUCCESS, "amount": "100.00"}
        )
        await asyncio.sleep(1.5)  # longer than the dispatcher's poll interval
    assert receiver.requests == []
    await dispatch_once(api.service, api.session_factory)
    assert len(receiver.requests) == 1


def test_webhook_settings_are_checked() -> None:
    from payments.exceptions import PaymentConfigurationError

    for bad in (
        {"payment_webhook_urls": "http://127.0.0.1:1/x"},  # no secret
        {"payment_webhook_urls": "ftp://host/x", "payment_webhook_secret": SECRET},
        {"payment_webhook_urls": "http://h/x", "payment_webhook_secret": "not-whsec"},
        {"payment_webhook_urls": "http://h/x", "payment_webhook_secret": "whsec_???"},
        {"payment_event_retention_days": 7},
    ):
        with pytest.raises((PaymentConfigurationError, ValueError)):
            load_settings(mpesa_environment="simulator", **bad)
    settings = load_settings(
        mpesa_environment="simulator",
        payment_webhook_urls=" http://127.0.0.1:1/a , http://127.0.0.1:1/b ",
        payment_webhook_secret=SECRET,
    )
    assert settings.webhook_urls() == ["http://127.0.0.1:1/a", "http://127.0.0.1:1/b"]
    assert SECRET in settings.secret_values()


# --- the README's Events section ----------------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(marker: str, language: str) -> str:
    text = README.read_text()
    start = text.index(f"<!-- readme-test: {marker} -->\n```{language}\n")
    start = text.index("\n", text.index("```", start)) + 1
    return text[start : text.index("```", start)]


async def test_the_readme_verification_snippet_accepts_deliveries_and_rejects_tampering(
    session_factory: async_sessionmaker[AsyncSession], receiver: Receiver
) -> None:
    namespace: dict[str, Any] = {}
    exec(readme_block("group=verify-webhook", "python"), namespace)
    verified_event = namespace["verified_event"]
    service = make_service(**webhook_settings(receiver.url))
    transaction_id = await pay(service, session_factory)
    await dispatch_until_settled(service, session_factory)
    ((headers, body),) = receiver.requests
    event = verified_event(body, headers, SECRET)
    assert (event["type"], event["data"]["transaction_id"]) == ("payment.completed", transaction_id)
    assert verified_event(body + b" ", headers, SECRET) is None
    assert verified_event(body, {**headers, "webhook-timestamp": "1000"}, SECRET) is None
    await service.aclose()


def test_the_readme_payload_example_is_an_event_with_a_payment() -> None:
    from payments.schemas import EventPayload, PaymentResponse

    example = json.loads(readme_block("model=EventPayload", "json"))
    assert set(example) == {"id", "type", "created_at", "data"}
    EventPayload.model_validate(example)
    PaymentResponse.model_validate(example["data"])
    assert example["type"] in {member.value for member in EventType}
