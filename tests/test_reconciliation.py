"""Reconciliation settles open outcomes from the provider's answers, never by guessing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from payments.config import load_settings
from payments.exceptions import PaymentOutcomeUnknownError
from payments.models import PaymentAuditLog, PaymentTransaction, utcnow
from payments.reconciliation import backoff, reconcile_once
from payments.schemas import PaymentFilters, PaymentInitiateRequest
from payments.service import PaymentService
from payments.simulator.app import MpesaSimulator, SimulatorConfig
from tests.support import DROPPED, OVERLOADED, simulated_client


@pytest.fixture
def simulator() -> MpesaSimulator:
    return MpesaSimulator(SimulatorConfig())


@pytest.fixture
async def service(simulator: MpesaSimulator) -> AsyncIterator[PaymentService]:
    settings = load_settings(mpesa_environment="simulator")
    client = simulated_client(simulator, settings)
    service = PaymentService(settings, client)
    yield service
    await service.aclose()


async def unknown_payments(
    service: PaymentService, sessions: async_sessionmaker[AsyncSession], phone: str, count: int
) -> list[str]:
    ids = []
    for _ in range(count):
        async with sessions() as db:
            with pytest.raises(PaymentOutcomeUnknownError) as info:
                await service.initiate_payment(
                    request=PaymentInitiateRequest(phone_number=phone, amount="10"), db=db
                )
        ids.append(info.value.payment.transaction_id)  # type: ignore[attr-defined]
    return ids


async def rows(sessions: async_sessionmaker[AsyncSession]) -> dict[str, PaymentTransaction]:
    async with sessions() as session:
        result = await session.scalars(select(PaymentTransaction))
        return {row.transaction_id: row for row in result}


async def test_settles_unknown_payments_from_the_provider(
    service: PaymentService, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    ids = await unknown_payments(service, session_factory, DROPPED, 3)
    report = await reconcile_once(service, session_factory, min_age=0)
    assert (report.examined, report.settled, report.unresolved) == (3, 3, 0)
    assert sorted(report.settled_ids) == sorted(ids)
    assert {row.status for row in (await rows(session_factory)).values()} == {"completed"}
    again = await reconcile_once(service, session_factory, min_age=0)
    assert again.examined == 0


async def test_min_age_leaves_young_payments_alone(
    service: PaymentService, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    await unknown_payments(service, session_factory, DROPPED, 1)
    report = await reconcile_once(service, session_factory, min_age=3600)
    assert report.examined == 0


async def test_no_evidence_never_fails_it_backs_off_then_flags_an_operator(
    service: PaymentService,
    session_factory: async_sessionmaker[AsyncSession],
    simulator: MpesaSimulator,
) -> None:
    (transaction_id,) = await unknown_payments(service, session_factory, OVERLOADED, 1)
    first = await reconcile_once(service, session_factory, min_age=0, attention_after=3600)
    assert (first.unresolved, first.flagged) == (1, 0)
    row = (await rows(session_factory))[transaction_id]
    assert row.status == "unknown"
    assert row.attention_required is False
    assert row.next_reconcile_at is not None
    # Not due again yet: the backoff keeps it out of the next pass.
    assert (await reconcile_once(service, session_factory, min_age=0)).examined == 0

    async with session_factory() as session:
        await session.execute(
            update(PaymentTransaction).values(next_reconcile_at=utcnow() - timedelta(seconds=1))
        )
        await session.commit()
    flagged = await reconcile_once(service, session_factory, min_age=0, attention_after=0)
    assert flagged.flagged == 1
    row = (await rows(session_factory))[transaction_id]
    assert (row.status, row.attention_required) == ("unknown", True)
    async with session_factory() as session:
        actions = (
            await session.scalars(
                select(PaymentAuditLog.action).where(PaymentAuditLog.payment_id == row.id)
            )
        ).all()
    assert actions.count("attention_required") == 1
    async with session_factory() as db:
        listed = await service.list(db, PaymentFilters(attention_required=True))
        summary = await service.summary(db)
    assert [item.transaction_id for item in listed.items] == [transaction_id]
    assert summary.attention_required == 1
    # Two passes, each asking by the ConversationID the INS-16 answer carried, then by the
    # third-party reference (issue 10.1: every key M-Pesa gave is tried).
    assert simulator.calls("query_status") == 4


async def test_abandoned_processing_payment_becomes_unknown_not_failed(
    service: PaymentService, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    (transaction_id,) = await unknown_payments(service, session_factory, OVERLOADED, 1)
    long_ago = utcnow() - timedelta(hours=1)
    async with session_factory() as session:  # as if the process died mid-call an hour ago
        await session.execute(
            update(PaymentTransaction).values(status="processing", created_at=long_ago)
        )
        await session.commit()
    report = await reconcile_once(service, session_factory, min_age=0)
    assert report.unresolved == 1
    assert (await rows(session_factory))[transaction_id].status == "unknown"


async def test_concurrent_reconcilers_never_work_on_the_same_payment(
    service: PaymentService,
    session_factory: async_sessionmaker[AsyncSession],
    simulator: MpesaSimulator,
    database_url: str,
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("several workers are supported on PostgreSQL; SQLite runs one")
    ids = await unknown_payments(service, session_factory, DROPPED, 12)
    reports = await asyncio.gather(
        *(reconcile_once(service, session_factory, min_age=0, batch_size=5) for _ in range(4))
    )
    examined = [transaction_id for report in reports for transaction_id in report.settled_ids]
    assert len(examined) == len(set(examined))  # nobody settled a payment twice
    assert simulator.calls("query_status") == sum(report.examined for report in reports)
    while any(row.status == "unknown" for row in (await rows(session_factory)).values()):
        await reconcile_once(service, session_factory, min_age=0)
    assert {row.status for row in (await rows(session_factory)).values()} == {"completed"}
    assert len(ids) == 12


def test_backoff_grows_and_is_capped() -> None:
    assert backoff(1) == timedelta(seconds=30)
    assert backoff(2) == timedelta(seconds=60)
    assert backoff(50) == timedelta(minutes=30)
