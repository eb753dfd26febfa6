"""Issue 16: the data layer at a year of payments.

The reconciler's claim by its index, bounded polling of flagged payments, keyset pages and the
CSV export, the daily totals behind the summary and the list's count, server defaults, SQL NULL
for absent JSON, and the revision that brings them (upgrade from ``payment_001`` with data,
downgrade, upgrade)."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import event, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from payments import repository as repo
from payments.config import load_settings
from payments.exceptions import InvalidCursorError, PaymentOutcomeUnknownError
from payments.models import (
    PaymentAuditLog,
    PaymentTransaction,
    utcnow,
)
from payments.mpesa.client import ClientConfig, MpesaClient
from payments.paging import PageCursor
from payments.reconciliation import flagged_poll_interval, reconcile_once
from payments.schemas import PaymentFilters, PaymentInitiateRequest
from payments.service import PaymentService
from payments.simulator.app import MpesaSimulator, SimulatorConfig
from payments.simulator.transport import SimulatorTransport
from tests.conftest import PaymentApi

DROPPED = "258842000001"  # recorded Completed, the answer lost: the status query settles it
OVERLOADED = "258841000016"  # INS-16, not recorded: every status query says "not found"
PAID = "258841234567"


async def _no_sleep(_: float) -> None:
    return None


@pytest.fixture
def simulator() -> MpesaSimulator:
    return MpesaSimulator(SimulatorConfig())


@pytest.fixture
async def service(simulator: MpesaSimulator) -> AsyncIterator[PaymentService]:
    settings = load_settings(mpesa_environment="simulator")
    client = MpesaClient(
        ClientConfig.from_settings(settings),
        transport=SimulatorTransport(simulator),
        sleep=_no_sleep,
    )
    service = PaymentService(settings, client)
    yield service
    await service.aclose()


async def unknown_payment(
    service: PaymentService, sessions: async_sessionmaker[AsyncSession], phone: str
) -> str:
    async with sessions() as db:
        with pytest.raises(PaymentOutcomeUnknownError) as info:
            await service.initiate_payment(
                request=PaymentInitiateRequest(phone_number=phone, amount="10"), db=db
            )
    return info.value.payment.transaction_id  # type: ignore[attr-defined]


async def paid(
    service: PaymentService, sessions: async_sessionmaker[AsyncSession], **fields: Any
) -> str:
    async with sessions() as db:
        response = await service.initiate_payment(
            request=PaymentInitiateRequest(**({"phone_number": PAID, "amount": "10"} | fields)),
            db=db,
        )
    return response.transaction_id


async def scalar(sessions: async_sessionmaker[AsyncSession], query: Any) -> Any:
    async with sessions() as session:
        return await session.scalar(query)


# --- 1. the claim ---------------------------------------------------------------------------------


async def test_a_new_unknown_does_not_wait_behind_old_ones(
    service: PaymentService, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    """Ordered by id, the claim took the three old, due payments first and the new one waited
    for a later pass; in due order (never polled first) the new one goes first."""
    old = [await unknown_payment(service, session_factory, OVERLOADED) for _ in range(3)]
    async with session_factory() as session:
        await session.execute(
            update(PaymentTransaction)
            .where(PaymentTransaction.transaction_id.in_(old))
            .values(next_reconcile_at=utcnow() - timedelta(minutes=5), reconcile_attempts=3)
        )
        await session.commit()
    new = await unknown_payment(service, session_factory, DROPPED)

    report = await reconcile_once(service, session_factory, min_age=0, batch_size=1)
    assert report.settled_ids == [new]

    # Then the old ones, in the order they fell due.
    async with session_factory() as session:
        await session.execute(
            update(PaymentTransaction)
            .where(PaymentTransaction.transaction_id == old[2])
            .values(next_reconcile_at=utcnow() - timedelta(hours=1))
        )
        await session.commit()
        claimed = await session.run_sync(
            lambda s: repo.claim_due_for_reconciliation(
                s,
                now=utcnow(),
                created_before=utcnow(),
                lease_until=utcnow() + timedelta(minutes=5),
                limit=3,
            )
        )
        await session.rollback()
    assert [record.transaction_id for record in claimed] == [old[2], old[0], old[1]]


# --- 2. flagged payments: a bounded schedule, audit rows only for news, one UPDATE per poll -------


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


async def test_a_stuck_flagged_payment_costs_a_bounded_number_of_polls_and_audit_rows_a_day(
    service: PaymentService,
    session_factory: async_sessionmaker[AsyncSession],
    simulator: MpesaSimulator,
) -> None:
    """Driven by the reconciler's clock, a pass every 30 minutes for five days: before, every
    poll of a stuck payment wrote two audit rows (about 96 a day, forever); now, once flagged,
    it is asked on a schedule that backs off to once a day, and an unchanged answer writes no
    audit row at all."""
    transaction_id = await unknown_payment(service, session_factory, OVERLOADED)
    pk = await scalar(
        session_factory,
        select(PaymentTransaction.id).where(PaymentTransaction.transaction_id == transaction_id),
    )
    audit_rows = select(func.count()).where(PaymentAuditLog.transaction_id == pk)
    clock = Clock(utcnow() + timedelta(minutes=2))
    per_day: list[tuple[int, int]] = []  # (polls, audit rows) per simulated day
    for _day in range(5):
        polls = 0
        audits_before = await scalar(session_factory, audit_rows)
        for _ in range(48):
            report = await reconcile_once(service, session_factory, min_age=0, now=clock)
            polls += report.examined
            clock.now += timedelta(minutes=30)
        per_day.append((polls, await scalar(session_factory, audit_rows) - audits_before))

    status = await scalar(
        session_factory,
        select(PaymentTransaction.status).where(PaymentTransaction.id == pk),
    )
    assert status == "unknown"  # never failed without evidence
    first_polls, first_audits = per_day[0]
    # Day 1: the backoff up to 30 min for the first hour, then flagged (one attention row).
    assert first_polls <= 20
    assert first_audits <= 2 * 8 + 1
    for polls, audits in per_day[2:]:
        assert polls <= 1  # once a day
        assert audits == 0  # M-Pesa keeps saying the same: nothing new to record
    assert sum(polls for polls, _ in per_day) <= 25
    assert simulator.calls("query_status") <= 2 * 25


async def test_a_quiet_poll_of_a_flagged_payment_is_one_update_and_no_audit_row(
    service: PaymentService,
    session_factory: async_sessionmaker[AsyncSession],
    async_engine: AsyncEngine,
) -> None:
    transaction_id = await unknown_payment(service, session_factory, OVERLOADED)
    await reconcile_once(service, session_factory, min_age=0, attention_after=0)  # flags it
    async with session_factory() as session:
        row = await session.scalar(
            select(PaymentTransaction).where(PaymentTransaction.transaction_id == transaction_id)
        )
        assert row is not None and row.attention_required
        next_poll = row.next_reconcile_at
    assert next_poll is not None
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(" ".join(statement.split()).upper())

    clock = Clock(utcnow() + timedelta(hours=2))
    event.listen(async_engine.sync_engine, "before_cursor_execute", record)
    try:
        report = await reconcile_once(service, session_factory, min_age=0, now=clock)
    finally:
        event.remove(async_engine.sync_engine, "before_cursor_execute", record)
    assert report.examined == 1
    updates = [s for s in statements if s.startswith("UPDATE PAYMENT_TRANSACTIONS")]
    assert len(updates) == 1, statements
    assert not [s for s in statements if s.startswith("INSERT INTO PAYMENT_AUDIT_LOGS")]
    async with session_factory() as session:
        row = await session.scalar(
            select(PaymentTransaction).where(PaymentTransaction.transaction_id == transaction_id)
        )
        assert row is not None and row.next_reconcile_at is not None
        age = clock.now - row.created_at.replace(tzinfo=UTC)
        assert abs(
            row.next_reconcile_at.replace(tzinfo=UTC) - (clock.now + flagged_poll_interval(age))
        ) < timedelta(seconds=1)


async def test_a_flagged_payment_whose_answer_changes_is_settled_and_audited(
    service: PaymentService,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    transaction_id = await unknown_payment(service, session_factory, DROPPED)
    async with session_factory() as session:
        await session.execute(
            update(PaymentTransaction)
            .where(PaymentTransaction.transaction_id == transaction_id)
            .values(attention_required=True)
        )
        await session.commit()
    report = await reconcile_once(service, session_factory, min_age=0)
    assert report.settled_ids == [transaction_id]


def test_the_flagged_schedule_is_bounded() -> None:
    assert flagged_poll_interval(timedelta(minutes=10)) == timedelta(hours=1)
    assert flagged_poll_interval(timedelta(hours=6)) == timedelta(hours=3)
    assert flagged_poll_interval(timedelta(days=30)) == timedelta(days=1)


# --- 3. keyset pages, the cheap count, the CSV export ---------------------------------------------


async def seed(sessions: async_sessionmaker[AsyncSession], count: int, **values: Any) -> None:
    """Payments one second apart (some sharing a created_at, to test the id tie-break)."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    async with sessions() as session:
        session.add_all(
            PaymentTransaction(
                transaction_id=f"T{index:05d}",
                operation="c2b" if index % 3 else "b2c",
                status="completed" if index % 2 else "failed",
                amount=Decimal("10.50") + index,
                phone_number=f"2588400000{index % 4:02d}",
                third_party_reference=f"R{index:05d}",
                user_id=f"user-{index % 2}",
                created_at=start + timedelta(seconds=index // 2),
                **values,
            )
            for index in range(count)
        )
        await session.commit()


async def test_cursor_pages_walk_every_row_once_in_list_order(
    payment_api: PaymentApi,
) -> None:
    await seed(payment_api.session_factory, 53)
    by_offset = []
    for page in range(1, 7):
        body = (
            await payment_api.http.get("/api/payments/", params={"per_page": 10, "page": page})
        ).json()
        by_offset += [item["transaction_id"] for item in body["items"]]

    by_cursor: list[str] = []
    pages = []
    params: dict[str, Any] = {"per_page": 10}
    while True:
        response = await payment_api.http.get("/api/payments/", params=params)
        assert response.status_code == 200
        body = response.json()
        assert set(body) == {"items", "total", "page", "per_page", "pages", "next_cursor"}
        assert (body["total"], body["pages"], body["per_page"]) == (53, 6, 10)
        pages.append(body["page"])
        by_cursor += [item["transaction_id"] for item in body["items"]]
        if body["next_cursor"] is None:
            break
        params = {"per_page": 10, "cursor": body["next_cursor"]}
    assert pages == [1, 2, 3, 4, 5, 6]
    assert by_cursor == by_offset
    assert len(set(by_cursor)) == 53


async def test_cursor_pages_keep_the_filters(payment_api: PaymentApi) -> None:
    await seed(payment_api.session_factory, 40)
    params: dict[str, Any] = {"per_page": 3, "phone_number": "258840000001", "status": "completed"}
    seen: list[str] = []
    while True:
        body = (await payment_api.http.get("/api/payments/", params=params)).json()
        assert body["total"] == 10
        seen += [item["transaction_id"] for item in body["items"]]
        if not body["next_cursor"]:
            break
        params["cursor"] = body["next_cursor"]
    assert len(seen) == len(set(seen)) == 10


@pytest.mark.parametrize(
    "cursor",
    [
        "x",
        "not base64 !!",
        PageCursor(datetime(2026, 1, 1, tzinfo=UTC), 5, 2).encode()[:-3],
        "WzEsMiwzXQ",  # [1,2,3]
        PageCursor(datetime(2026, 1, 1, tzinfo=UTC), 5, 2).encode().replace("I", "J"),
        "A" * 201,
    ],
)
async def test_a_bad_cursor_is_a_clear_400(payment_api: PaymentApi, cursor: str) -> None:
    response = await payment_api.http.get("/api/payments/", params={"cursor": cursor})
    assert response.status_code in (400, 422), response.text
    body = response.json()
    if response.status_code == 400:
        assert body["error_code"] == "invalid_cursor"
        assert body["details"]["field"] == "cursor"
    else:  # longer than any cursor: refused by the schema
        assert len(cursor) > 200


def test_a_cursor_round_trips_and_refuses_tampering() -> None:
    cursor = PageCursor(datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC), 42, 7)
    assert PageCursor.decode(cursor.encode()) == cursor
    for bad in ("", "@@@", "bnVsbA", "WyIyMDI2LTAxLTAxIiwgMSwgMl0"):  # null; naive time
        with pytest.raises(InvalidCursorError):
            PageCursor.decode(bad)


async def test_the_total_comes_from_the_daily_totals_or_an_indexed_count(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    await seed(session_factory, 30)
    cases = [
        PaymentFilters(),
        PaymentFilters(status="completed"),
        PaymentFilters(operation="b2c", status="failed"),
        PaymentFilters(from_date=date(2026, 1, 1), to_date=date(2026, 1, 1)),
        PaymentFilters(from_date=date(2026, 1, 2)),
        PaymentFilters(user_id="user-1"),
        PaymentFilters(phone_number="258840000002", status="failed"),
        PaymentFilters(attention_required=False),
    ]
    async with session_factory() as session:
        for filters in cases:
            expected = await session.scalar(
                repo._filtered(select(func.count(PaymentTransaction.id)), filters)
            )
            assert await session.run_sync(lambda s, f=filters: repo.count_payments(s, f)) == (
                expected
            ), filters


async def test_the_csv_export_walks_the_filter_in_keyset_batches(
    payment_api: PaymentApi,
) -> None:
    await seed(payment_api.session_factory, 25, account_reference="=HYPERLINK(1)")
    response = await payment_api.http.get(
        "/api/payments/export.csv", params={"status": "completed"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == 12
    assert rows[0]["transaction_id"] == "T00023"  # newest first
    assert rows[0]["amount"] == "33.50"
    assert rows[0]["account_reference"] == "'=HYPERLINK(1)"  # not a formula in a spreadsheet
    assert rows[0]["phone_number"].endswith("*****")
    async with payment_api.session_factory() as db:
        chunks = [chunk async for chunk in payment_api.service.export_csv(db, batch_size=4)]
    assert len(chunks) == 7  # 25 rows in batches of 4 (the last one empty-ended)
    assert sum(chunk.count("\n") for chunk in chunks) == 26
    unauthenticated = await payment_api.http.get(
        "/api/payments/export.csv", headers={"X-API-Key": "wrong"}
    )
    assert unauthenticated.status_code == 401


# --- 4. the flagged filter and the indexes --------------------------------------------------------


async def test_attention_filter_and_claim_use_their_partial_indexes_on_postgresql(
    session_factory: async_sessionmaker[AsyncSession], database_url: str
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's planner")
    await seed(session_factory, 40)
    async with session_factory() as session:
        await session.execute(text("SET enable_seqscan = off"))
        await session.execute(text("ANALYZE payment_transactions"))
        listed = repo._filtered(
            select(PaymentTransaction.id), PaymentFilters(attention_required=True)
        ).order_by(PaymentTransaction.created_at.desc(), PaymentTransaction.id.desc())
        plan = await explain(session, listed)
        assert "ix_payment_transactions_attention" in plan, plan

        for query in repo.claim_queries(
            now=utcnow(),
            created_before=utcnow(),
            limit=5,
            open_calls_created_before={"c2b": utcnow()},
        ):
            plan = await explain(session, query)
            assert "ix_payment_transactions_reconcile_due" in plan, plan
        await session.rollback()


async def explain(session: AsyncSession, query: Any) -> str:
    compiled = query.compile(
        dialect=session.bind.dialect,  # type: ignore[union-attr]
        compile_kwargs={"literal_binds": True},
    )
    return await explain_text(session, str(compiled))


async def explain_text(session: AsyncSession, statement: str) -> str:
    result = await session.connection()
    rows = (await result.exec_driver_sql("EXPLAIN " + statement)).all()
    return "\n".join(row[0] for row in rows)
