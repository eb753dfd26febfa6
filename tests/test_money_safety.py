"""Money safety on every path (issue 9): the operator gate, proven transaction IDs, calls still in
flight, notices that contradict the record, bounded reconciliation, truthful errors, outcomes
that are always recorded, and operator resolution. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from payments.config import load_settings
from payments.exceptions import (
    InvalidStateTransitionError,
    PaymentError,
    PaymentOutcomeUnknownError,
    PaymentValidationError,
)
from payments.models import PaymentAuditLog, PaymentStatus, PaymentTransaction, utcnow
from payments.mpesa.values import Msisdn
from payments.notifications import InboundNotification, NotificationProcessor
from payments.outcomes import Outcome
from payments.reconciliation import lease_for, query_budget, reconcile_once
from payments.repository import PaymentRecord
from payments.schemas import PaymentInitiateRequest, ReversalRequest
from payments.service import PaymentService
from payments.simulator.app import MpesaSimulator, SimulatorConfig
from payments.simulator.transport import SimulatorTransport
from tests import support
from tests.support import CANCELS, DROPPED, OTHER, SUCCESS, TEST_CALLBACK_TOKEN, simulated_client
from tests.support import payment_row as row_of


class RecordingService(support.RecordingService):
    on_payment_unknown = PaymentService.on_payment_unknown  # unknown outcomes are not recorded here

    async def on_reversal_failed(self, reversal: PaymentRecord, error: PaymentError | None) -> None:
        self.events.append(("reversal_failed", reversal.transaction_id, reversal.status))


def make_service(
    simulator: MpesaSimulator, transport: httpx.AsyncBaseTransport | None = None, **settings: Any
) -> RecordingService:
    config = load_settings(**({"mpesa_environment": "simulator"} | settings))
    client = simulated_client(simulator, config, transport)
    return RecordingService(config, client, db_retry_delays=(0.01,))


@pytest.fixture
def simulator() -> MpesaSimulator:
    return MpesaSimulator(SimulatorConfig())


@pytest.fixture
async def service(simulator: MpesaSimulator) -> AsyncIterator[RecordingService]:
    service = make_service(simulator, payment_c2b_timeout=2)
    yield service
    await service.aclose()


Sessions = async_sessionmaker[AsyncSession]


def c2b(phone: str = SUCCESS, **extra: Any) -> PaymentInitiateRequest:
    return PaymentInitiateRequest(phone_number=phone, amount="100", **extra)


async def unknown_payment(service: PaymentService, sessions: Sessions, **extra: Any) -> str:
    """A C2B whose answer was lost; M-Pesa recorded it Completed."""
    async with sessions() as db:
        with pytest.raises(PaymentOutcomeUnknownError) as info:
            await service.initiate_payment(request=c2b(DROPPED, **extra), db=db)
    return str(info.value.payment.transaction_id)  # type: ignore[attr-defined]


async def audit_of(sessions: Sessions, transaction_id: str) -> list[PaymentAuditLog]:
    row = await row_of(sessions, transaction_id)
    async with sessions() as session:
        return list(
            await session.scalars(
                select(PaymentAuditLog)
                .where(PaymentAuditLog.payment_id == row.id)
                .order_by(PaymentAuditLog.id)
            )
        )


async def notify(service: PaymentService, sessions: Sessions, body: dict[str, Any]) -> int:
    async with sessions() as db:
        status, _ = await NotificationProcessor(service).receive(
            db,
            InboundNotification(
                body=json.dumps(body).encode(),
                headers={"x-callback-token": TEST_CALLBACK_TOKEN},
                peer_ip="127.0.0.1",
            ),
        )
    return status


def notice(row: PaymentTransaction, code: str, transaction_id: str = "") -> dict[str, str]:
    return {
        "input_OriginalConversationID": row.conversation_id or "",
        "input_ThirdPartyReference": row.third_party_reference,
        "input_TransactionID": transaction_id,
        "input_ResultCode": code,
        "input_ResultDesc": f"result {code}",
    }


async def make_old(sessions: Sessions, transaction_id: str, seconds: float = 3600) -> None:
    """Move a payment's creation back in time (its own call is long over)."""
    async with sessions() as session:
        row = await session.scalars(
            select(PaymentTransaction).where(PaymentTransaction.transaction_id == transaction_id)
        )
        found = row.one()
        found.created_at = utcnow() - timedelta(seconds=seconds)
        await session.commit()


# --- 1. the INS-10 operator gate ----------------------------------------------------------------


async def ins10_held_payment(service: RecordingService, sessions: Sessions) -> str:
    """A retry meets INS-10 and M-Pesa reports an earlier, completed transaction."""
    await service.client.c2b_payment(
        msisdn=Msisdn(SUCCESS),
        amount=Decimal("100"),
        transaction_reference="ORDER1",
        third_party_reference=service.reference_for("c2b", "restored"),
    )
    async with sessions() as db:
        with pytest.raises(PaymentOutcomeUnknownError) as info:
            await service.initiate_payment(request=c2b(idempotency_key="restored"), db=db)
    payment = info.value.payment  # type: ignore[attr-defined]
    assert (payment.status, payment.attention_required) == ("unknown", True)
    return str(payment.transaction_id)


async def test_ins10_completed_earlier_is_never_settled_by_m_pesas_answers(
    service: RecordingService, session_factory: Sessions, simulator: MpesaSimulator
) -> None:
    transaction_id = await ins10_held_payment(service, session_factory)
    await make_old(session_factory, transaction_id)
    async with session_factory() as db:
        refreshed = await service.refresh(transaction_id, db)
    assert (refreshed.status, refreshed.attention_required) == ("unknown", True)
    report = await reconcile_once(service, session_factory, min_age=0, attention_after=0)
    assert report.examined == 0  # held: the reconciler does not ask (or spin) again
    row = await row_of(session_factory, transaction_id)
    assert await notify(service, session_factory, notice(row, "INS-0")) == 200
    row = await row_of(session_factory, transaction_id)
    assert (row.status, row.attention_required, row.operator_hold) == ("unknown", True, True)
    assert service.events == []  # no hook: nothing was delivered

    async with session_factory() as db:
        resolved = await service.resolve(
            transaction_id,
            db,
            status="completed",
            provider_transaction_id="CONFIRMED1",
            reason="portal shows it is this order",
            actor="ops@example.com",
        )
    assert (resolved.status, resolved.attention_required, resolved.operator_hold) == (
        "completed",
        False,
        False,
    )
    assert resolved.provider_transaction_id == "CONFIRMED1"
    assert service.events == [("completed", transaction_id, "completed")]
    trail = await audit_of(session_factory, transaction_id)
    (entry,) = [e for e in trail if e.action == "operator_resolved"]
    assert (entry.actor, entry.status_before, entry.status_after) == (
        "ops@example.com",
        "unknown",
        "completed",
    )
    assert entry.request_body["reason"] == "portal shows it is this order"
    assert entry.request_body["provider_transaction_id"] == "CONFIRMED1"


# --- 2. a notice's transaction ID needs M-Pesa's proof ---------------------------------------


async def test_a_notice_naming_another_payments_transaction_never_supplies_its_id(
    service: RecordingService, session_factory: Sessions, simulator: MpesaSimulator
) -> None:
    async with session_factory() as db:
        victim = await service.initiate_payment(request=c2b(OTHER), db=db)
    assert victim.provider_transaction_id
    transaction_id = await unknown_payment(service, session_factory)
    await make_old(session_factory, transaction_id)
    row = await row_of(session_factory, transaction_id)
    forged = notice(row, "INS-0", transaction_id=victim.provider_transaction_id)
    assert await notify(service, session_factory, forged) == 200

    row = await row_of(session_factory, transaction_id)
    assert row.status == "completed"  # M-Pesa confirms it by its own reference
    assert row.provider_transaction_id is None  # but not the other payment's ID
    assert row.attention_required is True
    reversals = simulator.calls("reversal")
    async with session_factory() as db:
        with pytest.raises(InvalidStateTransitionError) as info:
            await service.reverse(transaction_id, ReversalRequest(), db)
    assert info.value.error_code == "provider_transaction_id_missing"
    assert "resolve" in info.value.message
    assert simulator.calls("reversal") == reversals  # nobody was refunded


async def test_a_notice_with_the_payments_own_transaction_id_records_it(
    service: RecordingService, session_factory: Sessions, simulator: MpesaSimulator
) -> None:
    transaction_id = await unknown_payment(service, session_factory)
    await make_old(session_factory, transaction_id)
    row = await row_of(session_factory, transaction_id)
    recorded = simulator.find(row.third_party_reference)
    assert recorded is not None
    genuine = notice(row, "INS-0", transaction_id=recorded.transaction_id)
    assert await notify(service, session_factory, genuine) == 200
    row = await row_of(session_factory, transaction_id)
    assert (row.status, row.provider_transaction_id) == ("completed", recorded.transaction_id)
    assert row.attention_required is False
    async with session_factory() as db:
        reversal = await service.reverse(transaction_id, ReversalRequest(), db)
    assert reversal.status == "completed"


async def test_one_m_pesa_transaction_id_belongs_to_one_payment(
    service: RecordingService, session_factory: Sessions
) -> None:
    async with session_factory() as db:
        first = await service.initiate_payment(request=c2b(), db=db)
    transaction_id = await unknown_payment(service, session_factory)
    await make_old(session_factory, transaction_id)
    async with session_factory() as db:
        record = await service._get_record(db, transaction_id)
        claimed = Outcome(
            PaymentStatus.COMPLETED,
            "M-Pesa answered",
            provider_transaction_id=first.provider_transaction_id,
        )
        updated, _ = await service.apply_outcome(db, record, claimed, actor="test")
    assert updated.status == "completed"  # the outcome is recorded ...
    assert updated.provider_transaction_id is None  # ... without the other payment's ID
    assert updated.attention_required is True
    trail = await audit_of(session_factory, transaction_id)
    assert any(
        e.action == "attention_required" and first.transaction_id in (e.error_message or "")
        for e in trail
    )


# --- 4. no query settles a call still in flight -----------------------------------------------


async def test_no_query_settles_a_c2b_still_waiting_for_the_pin(
    service: RecordingService,
    session_factory: Sessions,
    simulator: MpesaSimulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    simulator.config.pin_delay_seconds = 0.6

    async def expired(record: PaymentRecord, **_: Any) -> Outcome:
        # What M-Pesa's status answer may say while the customer is still typing the PIN.
        return Outcome(PaymentStatus.EXPIRED, "M-Pesa reports the transaction expired")

    async def pay() -> Any:
        async with session_factory() as db:
            return await service.initiate_payment(request=c2b(), db=db)

    paying = asyncio.create_task(pay())
    await asyncio.sleep(0.3)
    (row,) = await all_rows(session_factory)
    monkeypatch.setattr(service, "query_outcome", expired)
    report = await reconcile_once(service, session_factory, min_age=0)
    assert report.examined == 0  # whatever min_age says
    async with session_factory() as db:
        refreshed = await service.refresh(row.transaction_id, db)
    assert refreshed.status == "processing"
    assert await notify(service, session_factory, notice(row, "INS-9")) == 500
    paid = await paying
    assert paid.status == "completed"  # the customer paid: never answered as a failure
    assert service.events == [("completed", row.transaction_id, "completed")]


async def test_a_crash_during_the_call_ends_unknown_not_stuck_processing(
    service: RecordingService, session_factory: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def crash(**_: Any) -> Any:
        raise RuntimeError("bug in the middle of the call")

    monkeypatch.setattr(service.client, "c2b_payment", crash)
    async with session_factory() as db:
        with pytest.raises(RuntimeError):
            await service.initiate_payment(request=c2b(), db=db)
    (row,) = await all_rows(session_factory)
    assert row.status == "unknown"  # the call's own end: the in-flight gate does not apply


async def all_rows(sessions: Sessions) -> list[PaymentTransaction]:
    async with sessions() as session:
        return list(await session.scalars(select(PaymentTransaction)))


async def test_a_live_success_after_a_settled_failure_is_held_not_answered_as_a_failure(
    simulator: MpesaSimulator, session_factory: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reconciler configured with a shorter C2B timeout than the gateway (a real mistake):
    # its query settles the payment "expired" while the gateway still waits for the PIN.
    gateway = make_service(simulator, payment_c2b_timeout=5)
    reconciler = make_service(
        simulator,
        payment_c2b_timeout=0.01,
        payment_connect_timeout=0.01,
        payment_retry_backoff_max=0,
        payment_query_max_attempts=1,
    )
    simulator.config.pin_delay_seconds = 0.5

    async def expired(record: PaymentRecord, **_: Any) -> Outcome:
        return Outcome(PaymentStatus.EXPIRED, "M-Pesa reports the transaction expired")

    monkeypatch.setattr(reconciler, "query_outcome", expired)
    try:

        async def pay() -> Any:
            async with session_factory() as db:
                return await gateway.initiate_payment(request=c2b(), db=db)

        paying = asyncio.create_task(pay())
        await asyncio.sleep(0.2)
        report = await reconcile_once(reconciler, session_factory, min_age=0)
        assert report.settled == 1
        with pytest.raises(PaymentOutcomeUnknownError) as info:  # HTTP 202, not 402
            await paying
    finally:
        await gateway.aclose()
        await reconciler.aclose()
    payment = info.value.payment  # type: ignore[attr-defined]
    assert "completed" in info.value.message
    row = await row_of(session_factory, payment.transaction_id)
    assert (row.status, row.attention_required, row.operator_hold) == ("expired", True, True)
    assert row.provider_transaction_id  # the live answer's ID is kept for the operator
    assert [event[0] for event in gateway.events] == []  # no failure hook from the live call


# --- 5. operator resolution, and what reverse says is missing --------------------------------


async def test_a_payment_settled_by_a_query_gets_its_id_from_an_operator_then_reverses(
    service: RecordingService, session_factory: Sessions, simulator: MpesaSimulator
) -> None:
    transaction_id = await unknown_payment(service, session_factory)
    await make_old(session_factory, transaction_id)
    report = await reconcile_once(service, session_factory, min_age=0)
    assert report.settled_ids == [transaction_id]
    async with session_factory() as db:
        with pytest.raises(InvalidStateTransitionError) as missing:
            await service.reverse(transaction_id, ReversalRequest(), db)
        assert missing.value.error_code == "provider_transaction_id_missing"
        row = await row_of(session_factory, transaction_id)
        recorded = simulator.find(row.third_party_reference)
        assert recorded is not None
        resolved = await service.resolve(
            transaction_id,
            db,
            provider_transaction_id=recorded.transaction_id,
            reason="receipt from the portal",
            actor="ops",
        )
        assert (resolved.status, resolved.provider_transaction_id) == (
            "completed",
            recorded.transaction_id,
        )
        reversal = await service.reverse(transaction_id, ReversalRequest(), db)
        assert reversal.status == "completed"
        with pytest.raises(InvalidStateTransitionError):  # settled, with an ID: nothing to do
            await service.resolve(
                transaction_id, db, provider_transaction_id="OTHER1", reason="again"
            )
    assert [e[0] for e in service.events] == ["completed"]  # recording an ID fires no hook


async def test_resolve_refuses_what_is_not_an_operators_to_decide(
    service: RecordingService, session_factory: Sessions
) -> None:
    async with session_factory() as db:
        paid = await service.initiate_payment(request=c2b(), db=db)
        with pytest.raises(PaymentError):
            await service.initiate_payment(request=c2b(CANCELS), db=db)
        reversal = await service.reverse(paid.transaction_id, ReversalRequest(amount="10"), db)
    (cancelled,) = [r for r in await all_rows(session_factory) if r.status == "cancelled"]
    unknown = await unknown_payment(service, session_factory)
    async with session_factory() as db:
        for transaction_id, kwargs in (
            (paid.transaction_id, {"status": "failed"}),
            (paid.transaction_id, {"provider_transaction_id": "X1"}),
            (reversal.transaction_id, {"status": "failed"}),
            (cancelled.transaction_id, {"status": "completed", "provider_transaction_id": "X2"}),
        ):
            with pytest.raises(InvalidStateTransitionError):
                await service.resolve(transaction_id, db, reason="try", **kwargs)
        with pytest.raises(PaymentValidationError, match="provider_transaction_id"):
            await service.resolve(unknown, db, status="completed", reason="no ID")
        with pytest.raises(PaymentValidationError, match="reason"):
            await service.resolve(unknown, db, status="failed", reason=" ")
        with pytest.raises(InvalidStateTransitionError, match="already recorded"):
            await service.resolve(
                unknown,
                db,
                status="completed",
                provider_transaction_id=paid.provider_transaction_id,
                reason="wrong receipt",
            )
        failed = await service.resolve(unknown, db, status="failed", reason="not on the portal")
    assert failed.status == "failed"
    assert ("failed", unknown, "failed") in service.events
    for row in await all_rows(session_factory):
        trail = await audit_of(session_factory, row.transaction_id)
        resolutions = [e for e in trail if e.action == "operator_resolved"]
        assert len(resolutions) == (1 if row.transaction_id == unknown else 0)


async def test_resolve_over_http(
    payment_api_factory: Any, session_factory: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAYMENT_ADMIN_API_KEY", "admin-key-1")
    api = await payment_api_factory()
    headers = {"X-API-Key": "admin-key-1"}
    answer = await api.http.post(
        "/api/payments/initiate",
        json={"phone_number": DROPPED, "amount": 100},
        headers=headers | {"Idempotency-Key": "http-resolve"},
    )
    assert answer.status_code == 202
    transaction_id = answer.json()["transaction_id"]
    path = f"/api/payments/{transaction_id}/resolve"
    assert (await api.http.post(path, json={"status": "completed"})).status_code == 401
    for bad in (
        {"status": "completed", "provider_transaction_id": "ABC1"},  # no reason
        {"status": "completed", "provider_transaction_id": "ABC1", "reason": ""},
        {"status": "completed", "provider_transaction_id": "ABC1", "reason": "x" * 501},
        {"status": "reversed", "reason": "x"},
        {"status": "completed", "provider_transaction_id": "bad id!", "reason": "x"},
    ):
        refused = await api.http.post(path, json=bad, headers=headers)
        assert refused.status_code == 422, (bad, refused.text)
        assert refused.json()["error_code"] == "validation_error"
    done = await api.http.post(
        path,
        json={"status": "completed", "provider_transaction_id": "ABC1", "reason": "portal"},
        headers=headers,
    )
    assert done.status_code == 200, done.text
    assert (done.json()["status"], done.json()["provider_transaction_id"]) == ("completed", "ABC1")
    again = await api.http.post(
        path, json={"status": "failed", "reason": "changed my mind"}, headers=headers
    )
    assert again.status_code == 409
    assert set(again.json()) == {"error_code", "message", "details"}
    trail = (await api.http.get(f"/api/payments/audit/{transaction_id}", headers=headers)).json()
    (entry,) = [e for e in trail["entries"] if e["action"] == "operator_resolved"]
    assert entry["actor"] == "admin-api-key"


# --- 6. concurrent reversals with one key -------------------------------------------------------


async def test_concurrent_reversals_with_one_key_all_get_the_original_result(
    service: RecordingService, session_factory: Sessions, simulator: MpesaSimulator
) -> None:
    async with session_factory() as db:
        paid = await service.initiate_payment(request=c2b(), db=db)

    async def reverse() -> str:
        async with session_factory() as db:
            try:
                reversal = await service.reverse(
                    paid.transaction_id, ReversalRequest(idempotency_key="refund-1"), db
                )
            except PaymentOutcomeUnknownError as in_flight:  # the first is still being sent
                return str(in_flight.payment.transaction_id)  # type: ignore[attr-defined]
            return reversal.transaction_id

    results = await asyncio.gather(*(reverse() for _ in range(8)))
    assert len(set(results)) == 1
    assert simulator.calls("reversal") == 1


# --- 7. a success notice for a payment recorded as not paid -----------------------------------


async def test_success_notice_for_a_cancelled_payment_that_m_pesa_reports_completed_is_held(
    service: RecordingService, session_factory: Sessions, simulator: MpesaSimulator
) -> None:
    async with session_factory() as db:
        with pytest.raises(PaymentError) as info:
            await service.initiate_payment(request=c2b(CANCELS), db=db)
    transaction_id = info.value.payment.transaction_id  # type: ignore[attr-defined]
    row = await row_of(session_factory, transaction_id)
    recorded = simulator.find(row.third_party_reference)
    assert recorded is not None
    recorded.status = "Completed"  # type: ignore[assignment]
    queries = simulator.calls("query_status")
    assert await notify(service, session_factory, notice(row, "INS-0")) == 200
    assert simulator.calls("query_status") == queries + 1  # confirmed with M-Pesa
    row = await row_of(session_factory, transaction_id)
    assert (row.status, row.attention_required, row.operator_hold) == ("cancelled", True, True)
    assert [e[0] for e in service.events] == ["failed"]  # never flipped silently
    # The operator decides: M-Pesa has the money, so it is this payment after all.
    async with session_factory() as db:
        resolved = await service.resolve(
            transaction_id,
            db,
            status="completed",
            provider_transaction_id=recorded.transaction_id,
            reason="M-Pesa statement shows the payment",
        )
    assert resolved.status == "completed"
    assert [e[0] for e in service.events] == ["failed", "completed"]


# --- 8. ambiguous notices are not acknowledged until M-Pesa confirms --------------------------


@pytest.mark.parametrize("code", ["INS-1", "INS-9", "INS-XYZ", ""])
async def test_ambiguous_notice_is_not_acknowledged_until_m_pesa_confirms(
    service: RecordingService, session_factory: Sessions, simulator: MpesaSimulator, code: str
) -> None:
    transaction_id = await unknown_payment(service, session_factory)
    await make_old(session_factory, transaction_id)
    row = await row_of(session_factory, transaction_id)
    recorded = simulator.find(row.third_party_reference)
    assert recorded is not None
    recorded.status = "N/A"  # type: ignore[assignment]  # M-Pesa has no outcome yet
    assert await notify(service, session_factory, notice(row, code)) == 500
    assert (await row_of(session_factory, transaction_id)).status == "unknown"
    recorded.status = "Completed"  # type: ignore[assignment]
    assert await notify(service, session_factory, notice(row, code)) == 200
    row = await row_of(session_factory, transaction_id)
    assert (row.status, row.response_code) == ("completed", None)  # not the notice's code


# --- 10. a reconciler's lease outlives its work --------------------------------------------------


class HangingTransport(httpx.AsyncBaseTransport):
    """M-Pesa accepts the connection and never answers (ignoring every timeout)."""

    def __init__(self, simulator: MpesaSimulator) -> None:
        self._simulator = SimulatorTransport(simulator)
        self.hang = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.hang:
            await asyncio.Event().wait()
        return await self._simulator.handle_async_request(request)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_pass_over_a_hanging_m_pesa_ends_before_its_lease(
    simulator: MpesaSimulator, session_factory: Sessions
) -> None:
    transport = HangingTransport(simulator)
    service = make_service(
        simulator,
        transport,
        payment_c2b_timeout=2,
        payment_request_timeout=0.2,
        payment_connect_timeout=0.1,
        payment_query_max_attempts=1,
        payment_retry_backoff_max=0,
    )
    try:
        ids = [await unknown_payment(service, session_factory) for _ in range(3)]
        for transaction_id in ids:
            await make_old(session_factory, transaction_id)
        transport.hang = True
        started = utcnow()
        pass_ = asyncio.create_task(
            reconcile_once(service, session_factory, min_age=0, batch_size=3, concurrency=1)
        )
        await asyncio.sleep(0.1)
        rival = await reconcile_once(service, session_factory, min_age=0)
        assert rival.examined == 0  # leased to the first pass
        report = await asyncio.wait_for(pass_, timeout=10)
        ended = utcnow()
    finally:
        await service.aclose()
    assert (report.examined, report.unresolved) == (3, 3)
    lease = lease_for(service.settings, 3, 1)
    assert started + lease > ended  # the lease covered the whole pass
    assert lease >= 3 * query_budget(service.settings)
    # With the defaults, 50 payments 10 at a time, each query timing out on every attempt.
    defaults = load_settings(mpesa_environment="simulator")
    assert lease_for(defaults, 50, 10) >= 5 * query_budget(defaults) > timedelta(minutes=10)


# --- 11. a query that cannot be made still reaches an operator ---------------------------------


async def test_a_payment_whose_query_is_refused_locally_is_flagged_not_retried_forever(
    service: RecordingService, session_factory: Sessions
) -> None:
    transaction_id = await unknown_payment(service, session_factory)
    await make_old(session_factory, transaction_id)
    async with session_factory() as session:
        # A reference the client refuses to send (a character no M-Pesa ID has).
        await session.execute(
            update(PaymentTransaction)
            .where(PaymentTransaction.transaction_id == transaction_id)
            .values(conversation_id="C" * 40 + "!")
        )
        await session.commit()
    report = await reconcile_once(service, session_factory, min_age=0, attention_after=0)
    assert (report.unresolved, report.flagged) == (1, 1), str(report)
    row = await row_of(session_factory, transaction_id)
    assert row.attention_required is True
    assert row.next_reconcile_at is not None
    assert row.next_reconcile_at.replace(tzinfo=None) < (utcnow() + timedelta(hours=1)).replace(
        tzinfo=None
    )  # backed off, not left to a lease
    trail = await audit_of(session_factory, transaction_id)
    assert any("could not be made" in (e.error_message or "") for e in trail)


# --- 12. errors tell what was written and what was sent ----------------------------------------


async def test_a_refusal_before_sending_says_the_payment_was_recorded_failed(
    payment_api_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = await payment_api_factory()

    async def refuse(**_: Any) -> Any:
        raise PaymentValidationError("input_TransactionReference is not allowed", field="x")

    monkeypatch.setattr(api.service.client, "c2b_payment", refuse)
    body = {"phone_number": SUCCESS, "amount": 100}
    headers = {"Idempotency-Key": "refused-1"}
    answer = await api.http.post("/api/payments/initiate", json=body, headers=headers)
    assert answer.status_code == 422, answer.text
    error = answer.json()
    assert "recorded as failed" in error["message"] and "nothing was sent" in error["message"]
    assert "nothing was written" not in error["message"]
    assert error["details"]["payment"]["status"] == "failed"
    assert error["details"]["sent"] is False
    assert api.simulator.calls("c2b") == 0
    replay = await api.http.post("/api/payments/initiate", json=body, headers=headers)
    assert replay.status_code == 422, replay.text
    assert replay.json()["error_code"] == "validation_error"
    assert (
        replay.json()["details"]["payment"]["transaction_id"]
        == (error["details"]["payment"]["transaction_id"])
    )


class LoseReversalAnswers(httpx.AsyncBaseTransport):
    """The reversal reaches M-Pesa; its answer is lost on the way back."""

    def __init__(self, simulator: MpesaSimulator) -> None:
        self._simulator = SimulatorTransport(simulator)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._simulator.handle_async_request(request)
        if request.method == "PUT":
            await response.aread()
            raise httpx.RemoteProtocolError("Server disconnected (injected)", request=request)
        return response


async def test_a_reversal_settled_failed_by_a_query_does_not_replay_as_never_sent(
    simulator: MpesaSimulator, session_factory: Sessions
) -> None:
    service = make_service(simulator, LoseReversalAnswers(simulator), payment_c2b_timeout=2)
    request = ReversalRequest(idempotency_key="refund-lost")
    try:
        async with session_factory() as db:
            paid = await service.initiate_payment(request=c2b(), db=db)
            with pytest.raises(PaymentOutcomeUnknownError) as info:
                await service.reverse(paid.transaction_id, request, db)
        reversal_id = info.value.payment.transaction_id  # type: ignore[attr-defined]
        await make_old(session_factory, reversal_id)
        row = await row_of(session_factory, reversal_id)
        recorded = simulator.find(row.third_party_reference)
        assert recorded is not None
        recorded.status = "Cancelled"  # type: ignore[assignment]  # M-Pesa did not reverse it
        async with session_factory() as db:
            refreshed = await service.refresh(reversal_id, db)
            assert refreshed.status == "failed"
            with pytest.raises(PaymentError) as replayed:
                await service.reverse(paid.transaction_id, request, db)
    finally:
        await service.aclose()
    assert replayed.value.error_code != "provider_unavailable"
    assert "not sent" not in replayed.value.message
    assert replayed.value.payment.transaction_id == reversal_id  # type: ignore[attr-defined]


# --- 13. whatever M-Pesa sends, the outcome is recorded ----------------------------------------


class OverlongCode(httpx.AsyncBaseTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            500,
            json={
                "output_ResponseCode": "INS-" + "7" * 80,
                "output_ResponseDesc": "Something new",
                "output_ConversationID": "X" * 150,
                "output_TransactionID": "",
                "output_ThirdPartyReference": "",
            },
        )


async def test_an_overlong_response_code_is_recorded_not_refused(
    simulator: MpesaSimulator, session_factory: Sessions
) -> None:
    service = make_service(simulator, OverlongCode(), payment_query_max_attempts=1)
    try:
        async with session_factory() as db:
            with pytest.raises(PaymentOutcomeUnknownError) as info:
                await service.initiate_payment(request=c2b(), db=db)
    finally:
        await service.aclose()
    transaction_id = info.value.payment.transaction_id  # type: ignore[attr-defined]
    row = await row_of(session_factory, transaction_id)
    assert row.status == "unknown"
    assert row.response_code is not None and row.response_code.startswith("INS-777")
    actions = [e.action for e in await audit_of(session_factory, transaction_id)]
    assert actions[:3] == ["initiated", "api_request", "api_response"]
    assert "status_changed" in actions


# --- 14. money-moving requests without an idempotency key are logged ---------------------------


async def test_a_money_moving_request_without_a_key_logs_a_warning(
    service: RecordingService, session_factory: Sessions, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        async with session_factory() as db:
            await service.initiate_payment(request=c2b(idempotency_key="with-key"), db=db)
            assert not [r for r in caplog.records if "idempotency key" in r.getMessage()]
            paid = await service.initiate_payment(request=c2b(), db=db)
            await service.reverse(paid.transaction_id, ReversalRequest(amount="1"), db)
    warnings = [r for r in caplog.records if "without an idempotency key" in r.getMessage()]
    assert len(warnings) == 2
    assert all(r.levelno == logging.WARNING for r in warnings)
