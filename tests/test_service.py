"""PaymentService against the simulator, on SQLite and PostgreSQL: the rows it writes, the
outcomes it applies, idempotency, hooks and the money-safety rules."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from payments.config import load_settings
from payments.exceptions import (
    IdempotencyConflictError,
    InsufficientFundsError,
    InvalidStateTransitionError,
    PaymentCancelledError,
    PaymentError,
    PaymentOutcomeUnknownError,
    PaymentStorageError,
    PaymentValidationError,
)
from payments.models import PaymentAuditLog, PaymentTransaction
from payments.repository import PaymentRecord
from payments.schemas import (
    PaymentFilters,
    PaymentInitiateRequest,
    PayoutRequest,
    ReversalRequest,
    TransferRequest,
)
from payments.simulator.app import MpesaSimulator, SimulatorConfig
from tests import support
from tests.support import (
    CANCELS,
    DROPPED,
    INSUFFICIENT,
    PIN_TIMEOUT,
    SLOW,
    SUCCESS,
    simulated_client,
)

HTML_502 = "258842000003"


class RecordingService(support.RecordingService):
    """Records every hook call, like a host's subclass would react to them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_hooks = False

    async def on_payment_completed(self, transaction: PaymentRecord) -> None:
        await super().on_payment_completed(transaction)
        if self.fail_hooks:
            raise RuntimeError("email server down")

    async def on_reversal_completed(self, reversal: PaymentRecord, original: PaymentRecord) -> None:
        self.events.append(("reversal_completed", reversal.transaction_id, original.status))


@pytest.fixture
def simulator() -> MpesaSimulator:
    return MpesaSimulator(SimulatorConfig(slow_response_seconds=5))


@pytest.fixture
async def service(simulator: MpesaSimulator) -> AsyncIterator[RecordingService]:
    settings = load_settings(mpesa_environment="simulator", payment_c2b_timeout=1)
    client = simulated_client(simulator, settings)
    service = RecordingService(settings, client)
    yield service
    await service.aclose()


def c2b(phone: str = SUCCESS, amount: str = "100", **extra: Any) -> PaymentInitiateRequest:
    return PaymentInitiateRequest(
        phone_number=phone, amount=amount, account_reference="ORDER-12345", **extra
    )


async def transaction_row(
    factory: async_sessionmaker[AsyncSession], transaction_id: str
) -> PaymentTransaction:
    async with factory() as session:
        return (
            await session.scalars(
                select(PaymentTransaction).where(
                    PaymentTransaction.transaction_id == transaction_id
                )
            )
        ).one()


async def audit_actions(
    factory: async_sessionmaker[AsyncSession], transaction_id: str
) -> list[str]:
    row = await transaction_row(factory, transaction_id)
    async with factory() as session:
        entries = await session.scalars(
            select(PaymentAuditLog)
            .where(PaymentAuditLog.payment_id == row.id)
            .order_by(PaymentAuditLog.id)
        )
        return [entry.action for entry in entries]


async def test_successful_c2b_writes_intent_exchange_and_outcome(
    service: RecordingService,
    session_factory: async_sessionmaker[AsyncSession],
    simulator: MpesaSimulator,
) -> None:
    async with session_factory() as db:
        response = await service.initiate_payment(
            request=c2b(description="Order", entity_type="order", entity_id="12345"),
            db=db,
            user_id="patient-123",
        )
    assert response.success is True
    assert response.status == "completed"
    assert response.transaction_id.startswith("TXN-")
    assert response.phone_number == "2588412*****"
    assert response.amount == Decimal("100.00")
    assert response.currency == "MZN"
    assert response.response_code == "INS-0"
    assert response.account_reference == "ORDER-12345"
    sent = simulator.find(response.third_party_reference)
    assert sent is not None and sent.transaction_id == response.provider_transaction_id
    assert sent.transaction_reference == "ORDER12345"

    row = await transaction_row(session_factory, response.transaction_id)
    assert row.status == "completed"
    assert row.phone_number == SUCCESS
    assert row.user_id == "patient-123"
    assert row.conversation_id == response.conversation_id
    assert row.completed_at is not None
    assert await audit_actions(session_factory, response.transaction_id) == [
        "initiated",
        "api_request",
        "api_response",
        "completed",
    ]
    async with session_factory() as session:
        api_response = (
            await session.scalars(
                select(PaymentAuditLog).where(
                    PaymentAuditLog.payment_id == row.id,
                    PaymentAuditLog.action == "api_response",
                )
            )
        ).one()
        api_request = (
            await session.scalars(
                select(PaymentAuditLog).where(
                    PaymentAuditLog.payment_id == row.id,
                    PaymentAuditLog.action == "api_request",
                )
            )
        ).one()
    assert api_response.http_status == 201
    assert api_response.response_time_ms is not None
    assert api_response.response_body["output_ResponseCode"] == "INS-0"
    assert api_request.request_body["fields"]["input_CustomerMSISDN"] == "2588412*****"
    assert service.events == [("completed", response.transaction_id, "completed")]


@pytest.mark.parametrize(
    ("phone", "error_type", "status", "code"),
    [
        (CANCELS, PaymentCancelledError, "cancelled", "INS-5"),
        (INSUFFICIENT, InsufficientFundsError, "failed", "INS-2006"),
        ("258841000006", PaymentCancelledError, "failed", "INS-6"),
    ],
)
async def test_provider_refusals_are_recorded_and_raised(
    service: RecordingService,
    session_factory: async_sessionmaker[AsyncSession],
    phone: str,
    error_type: type[PaymentError],
    status: str,
    code: str,
) -> None:
    async with session_factory() as db:
        with pytest.raises(error_type) as info:
            await service.initiate_payment(request=c2b(phone), db=db)
    payment = info.value.payment  # type: ignore[attr-defined]
    assert payment.status == status
    assert info.value.provider_code == code
    row = await transaction_row(session_factory, payment.transaction_id)
    assert (row.status, row.response_code) == (status, code)
    assert await audit_actions(session_factory, payment.transaction_id) == [
        "initiated",
        "api_request",
        "api_response",
        "failed",
    ]
    assert service.events == [("failed", payment.transaction_id, status)]


@pytest.mark.parametrize(
    ("phone", "settled"),
    [
        (SLOW, "completed"),
        (DROPPED, "completed"),
        (HTML_502, "completed"),
        (PIN_TIMEOUT, "expired"),
    ],
)
async def test_lost_answers_leave_the_payment_unknown_until_a_status_query(
    service: RecordingService,
    session_factory: async_sessionmaker[AsyncSession],
    phone: str,
    settled: str,
) -> None:
    async with session_factory() as db:
        with pytest.raises(PaymentOutcomeUnknownError) as info:
            await service.initiate_payment(request=c2b(phone), db=db)
    transaction_id = info.value.payment.transaction_id  # type: ignore[attr-defined]
    row = await transaction_row(session_factory, transaction_id)
    assert row.status == "unknown"
    async with session_factory() as db:
        refreshed = await service.refresh(transaction_id, db)
    assert refreshed.status == settled
    assert service.events == [
        ("unknown", transaction_id, "unknown"),
        ("completed" if settled == "completed" else "failed", transaction_id, settled),
    ]
    actions = await audit_actions(session_factory, transaction_id)
    assert actions[0] == "initiated"
    assert "status_changed" in actions and actions[-1] == "reconciled"


async def test_refresh_without_evidence_changes_nothing(
    service: RecordingService,
    session_factory: async_sessionmaker[AsyncSession],
    simulator: MpesaSimulator,
) -> None:
    async with session_factory() as db:
        with pytest.raises(PaymentOutcomeUnknownError) as info:
            await service.initiate_payment(request=c2b(SLOW), db=db)
    transaction_id = info.value.payment.transaction_id  # type: ignore[attr-defined]
    simulator.reset()  # the provider no longer knows it: the query answers N/A
    async with session_factory() as db:
        refreshed = await service.refresh(transaction_id, db)
    assert refreshed.status == "unknown"


async def test_same_key_same_request_returns_the_original_without_a_second_call(
    service: RecordingService,
    session_factory: async_sessionmaker[AsyncSession],
    simulator: MpesaSimulator,
) -> None:
    async with session_factory() as db:
        first = await service.initiate_payment(request=c2b(idempotency_key="order-1"), db=db)
        again = await service.initiate_payment(request=c2b(idempotency_key="order-1"), db=db)
        with pytest.raises(IdempotencyConflictError):
            await service.initiate_payment(
                request=c2b(amount="101", idempotency_key="order-1"), db=db
            )
        header_key = await service.initiate_payment(request=c2b(), db=db, idempotency_key="order-1")
    assert again.transaction_id == first.transaction_id == header_key.transaction_id
    assert again.status == "completed"
    assert first.third_party_reference == service.reference_for("c2b", "order-1")
    assert simulator.calls("c2b") == 1
    assert service.events == [("completed", first.transaction_id, "completed")]


async def test_replay_of_a_refused_payment_raises_the_same_error(
    service: RecordingService,
    session_factory: async_sessionmaker[AsyncSession],
    simulator: MpesaSimulator,
) -> None:
    async with session_factory() as db:
        with pytest.raises(InsufficientFundsError):
            await service.initiate_payment(request=c2b(INSUFFICIENT, idempotency_key="k"), db=db)
        with pytest.raises(InsufficientFundsError) as info:
            await service.initiate_payment(request=c2b(INSUFFICIENT, idempotency_key="k"), db=db)
    assert info.value.payment.status == "failed"  # type: ignore[attr-defined]
    assert simulator.calls("c2b") == 1


async def test_concurrent_duplicates_make_exactly_one_provider_call(
    service: RecordingService,
    session_factory: async_sessionmaker[AsyncSession],
    simulator: MpesaSimulator,
    database_url: str,
) -> None:
    simulator.config.pin_delay_seconds = 0.3
    tasks = 40 if database_url.startswith("postgresql") else 10

    async def pay() -> str:
        async with session_factory() as db:
            try:
                response = await service.initiate_payment(
                    request=c2b(idempotency_key="same-order"), db=db
                )
            except PaymentOutcomeUnknownError as still_in_flight:  # a duplicate of the first
                assert still_in_flight.payment.status == "processing"  # type: ignore[attr-defined]
                return still_in_flight.payment.transaction_id  # type: ignore[attr-defined]
            return response.transaction_id

    results = await asyncio.gather(*(pay() for _ in range(tasks)))
    assert len(set(results)) == 1
    reference = service.reference_for("c2b", "same-order")
    assert simulator.calls_for_reference(reference) == 1
    async with session_factory() as session:
        rows = (await session.scalars(select(PaymentTransaction))).all()
    assert len(rows) == 1


async def test_provider_duplicate_answer_is_checked_by_a_status_query_and_flagged(
    service: RecordingService,
    session_factory: async_sessionmaker[AsyncSession],
    simulator: MpesaSimulator,
) -> None:
    # The key's reference already reached M-Pesa (e.g. the database was restored from a backup).
    from payments.mpesa.values import Msisdn

    await service.client.c2b_payment(
        msisdn=Msisdn(SUCCESS),
        amount=Decimal("100"),
        transaction_reference="ORDER12345",
        third_party_reference=service.reference_for("c2b", "restored"),
    )
    async with session_factory() as db:
        with pytest.raises(PaymentOutcomeUnknownError) as info:
            await service.initiate_payment(request=c2b(idempotency_key="restored"), db=db)
    # M-Pesa has a completed transaction under this reference: maybe this payment, sent before a
    # restore, maybe another's. Never guessed: unknown, and flagged for an operator.
    payment = info.value.payment  # type: ignore[attr-defined]
    assert (payment.status, payment.attention_required) == ("unknown", True)
    assert "attention_required" in await audit_actions(session_factory, payment.transaction_id)
    assert simulator.calls("c2b") == 2
    assert simulator.calls("query_status") == 1
    assert len([t for t in simulator.transactions() if t.operation == "c2b"]) == 1


async def test_no_database_connection_is_held_while_waiting_for_the_pin(
    service: RecordingService,
    session_factory: async_sessionmaker[AsyncSession],
    simulator: MpesaSimulator,
    async_engine: AsyncEngine,
) -> None:
    simulator.config.pin_delay_seconds = 0.5

    async def pay() -> None:
        async with session_factory() as db:
            await service.initiate_payment(request=c2b(), db=db)

    tasks = [asyncio.create_task(pay()) for _ in range(5)]
    await asyncio.sleep(0.3)
    assert simulator.calls("c2b") == 5  # all five are waiting on the PIN
    assert async_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    await asyncio.gather(*tasks)


async def test_amount_limits_reject_before_anything_is_written(
    service: RecordingService,
    session_factory: async_sessionmaker[AsyncSession],
    simulator: MpesaSimulator,
) -> None:
    async with session_factory() as db:
        with pytest.raises(PaymentValidationError, match="at most 150000.00"):
            await service.initiate_payment(request=c2b(amount="150000.01"), db=db)
        with pytest.raises(PaymentValidationError, match="at least 1.00"):
            await service.initiate_payment(request=c2b(amount="0.50"), db=db)
    async with session_factory() as session:
        assert (await session.scalars(select(PaymentTransaction))).all() == []
    assert simulator.calls() == 0


async def test_unavailable_database_means_no_provider_call(
    service: RecordingService,
    simulator: MpesaSimulator,
    unreachable_sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with unreachable_sessions() as db:
        with pytest.raises(PaymentStorageError, match="nothing was sent"):
            await service.initiate_payment(request=c2b(), db=db)
    assert simulator.calls() == 0


async def test_a_failing_hook_never_loses_the_payment(
    service: RecordingService, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    service.fail_hooks = True
    async with session_factory() as db:
        response = await service.initiate_payment(request=c2b(), db=db)
    assert response.status == "completed"
    row = await transaction_row(session_factory, response.transaction_id)
    assert row.status == "completed"
    assert (await audit_actions(session_factory, response.transaction_id))[-1] == "hook_failed"


async def test_works_with_a_hosts_synchronous_session(
    service: RecordingService, database_url: str, async_engine: AsyncEngine
) -> None:
    sync_url = database_url.replace("postgresql://", "postgresql+psycopg://")
    engine = create_engine(sync_url)
    try:
        with Session(engine) as db:
            response = await service.initiate_payment(request=c2b(), db=db)
            with pytest.raises(PaymentCancelledError):
                await service.initiate_payment(request=c2b(CANCELS), db=db)
            listed = await service.list(db)
        assert response.status == "completed"
        assert listed.total == 2
        with Session(engine) as db:
            assert db.scalars(select(PaymentTransaction.status)).all().count("completed") == 1
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        engine.dispose()


async def test_payout_and_transfer(
    service: RecordingService,
    session_factory: async_sessionmaker[AsyncSession],
    simulator: MpesaSimulator,
) -> None:
    async with session_factory() as db:
        payout = await service.payout(
            PayoutRequest(phone_number="851234567", amount="250.50", account_reference="REF1"), db
        )
        transfer = await service.transfer(
            TransferRequest(receiver_party_code="979797", amount="1000"), db
        )
    assert (payout.operation, payout.status, payout.amount) == (
        "b2c",
        "completed",
        Decimal("250.50"),
    )
    assert (transfer.operation, transfer.status) == ("b2b", "completed")
    assert transfer.receiver_party_code == "979797"
    assert simulator.calls("b2c") == simulator.calls("b2b") == 1


async def test_partial_then_full_reversal(
    service: RecordingService,
    session_factory: async_sessionmaker[AsyncSession],
    simulator: MpesaSimulator,
) -> None:
    async with session_factory() as db:
        payment = await service.initiate_payment(request=c2b(amount="100"), db=db)
        partial = await service.reverse(payment.transaction_id, ReversalRequest(amount="30"), db)
        with pytest.raises(PaymentValidationError, match="at most 70.00"):
            await service.reverse(payment.transaction_id, ReversalRequest(amount="70.01"), db)
        rest = await service.reverse(payment.transaction_id, ReversalRequest(), db)
        original = await service.get(payment.transaction_id, db)
        with pytest.raises(InvalidStateTransitionError):
            await service.reverse(payment.transaction_id, ReversalRequest(), db)
    assert (partial.operation, partial.status, partial.amount) == ("reversal", "completed", 30)
    assert partial.original_transaction_id == payment.transaction_id
    assert rest.amount == Decimal("70.00")
    assert original.status == "reversed"
    assert original.reversed_amount == Decimal("100.00")
    assert simulator.calls("reversal") == 2
    assert [event[0] for event in service.events] == [
        "completed",
        "reversal_completed",
        "reversal_completed",
    ]
    assert service.events[1][2] == "partially_reversed"


async def test_list_summary_and_audit(
    service: RecordingService, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    async with session_factory() as db:
        done = await service.initiate_payment(
            request=c2b(entity_type="order", entity_id="1"), db=db
        )
        with pytest.raises(PaymentCancelledError):
            await service.initiate_payment(request=c2b(CANCELS, amount="50"), db=db)
        completed = await service.list(db, PaymentFilters(status="completed"))
        by_entity = await service.list(db, PaymentFilters(entity_type="order", entity_id="1"))
        by_phone = await service.list(db, PaymentFilters(phone_number="841000005"))
        page = await service.list(db, page=2, per_page=1)
        summary = await service.summary(db)
        trail = await service.audit(done.transaction_id, db)
    assert [item.transaction_id for item in completed.items] == [done.transaction_id]
    assert by_entity.total == 1 and by_phone.total == 1
    assert (page.total, page.pages, len(page.items)) == (2, 2, 1)
    assert summary.total_count == 2
    assert summary.by_status["completed"].amount == Decimal("100.00")
    assert summary.by_status["cancelled"].count == 1
    assert summary.by_operation["c2b"].count == 2
    assert summary.success_rate == 0.5
    assert [entry.action for entry in trail.entries] == [
        "initiated",
        "api_request",
        "api_response",
        "completed",
    ]
