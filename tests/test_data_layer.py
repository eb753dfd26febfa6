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
from alembic import command
from sqlalchemy import event, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from payments import repository as repo
from payments.config import load_settings
from payments.exceptions import InvalidCursorError, PaymentOutcomeUnknownError
from payments.models import (
    PaymentAuditLog,
    PaymentDailyTotal,
    PaymentTransaction,
    PaymentWebhookLog,
    utcnow,
)
from payments.mpesa.client import ClientConfig, MpesaClient
from payments.paging import PageCursor
from payments.reconciliation import flagged_poll_interval, reconcile_once
from payments.schemas import PaymentFilters, PaymentInitiateRequest
from payments.service import PaymentService
from payments.simulator.app import MpesaSimulator, SimulatorConfig
from payments.simulator.transport import SimulatorTransport
from tests.support import PaymentApi
from tests.test_migrations import repo_alembic_config, sync_engine

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
    audit_rows = select(func.count()).where(PaymentAuditLog.payment_id == pk)
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


# --- 8. retention ---------------------------------------------------------------------------------

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


async def seed_for_retention(sessions: async_sessionmaker[AsyncSession]) -> dict[str, int]:
    """Notices and audit rows of several ages and kinds; returns their ids by name."""

    def ago(days: float) -> datetime:
        return NOW - timedelta(days=days)

    ids: dict[str, int] = {}
    async with sessions() as session:
        notices = {
            "rejected_old": PaymentWebhookLog(raw_body="x", is_valid=False, received_at=ago(2)),
            "rejected_new": PaymentWebhookLog(raw_body="x", is_valid=False, received_at=ago(0.5)),
            "processed_old": PaymentWebhookLog(
                raw_body="{}", is_valid=True, is_processed=True, received_at=ago(91)
            ),
            "processed_new": PaymentWebhookLog(
                raw_body="{}", is_valid=True, is_processed=True, received_at=ago(89)
            ),
            "unprocessed_old": PaymentWebhookLog(
                raw_body="{}", is_valid=True, is_processed=False, received_at=ago(400)
            ),
        }
        payments = {
            "settled_old": PaymentTransaction(status="completed", updated_at=ago(60)),
            "settled_new": PaymentTransaction(status="completed", updated_at=ago(10)),
            "open_old": PaymentTransaction(status="unknown", updated_at=ago(60)),
            "flagged_old": PaymentTransaction(
                status="failed", attention_required=True, updated_at=ago(60)
            ),
        }
        for index, payment in enumerate(payments.values()):
            payment.transaction_id = f"P{index}"
            payment.third_party_reference = f"R{index}"
            payment.operation = "c2b"
            payment.amount = Decimal("5")
            payment.created_at = ago(61)
        session.add_all([*notices.values(), *payments.values()])
        await session.flush()
        for name, payment in payments.items():  # noqa: B007 (named by the dict)
            audit = PaymentAuditLog(payment_id=payment.id, action="initiated", created_at=ago(61))
            session.add(audit)
            await session.flush()
            ids[f"audit_{name}"] = audit.id
        ids |= {name: notice.id for name, notice in notices.items()}
        await session.commit()
    return ids


async def remaining(sessions: async_sessionmaker[AsyncSession]) -> tuple[set[int], set[int]]:
    async with sessions() as session:
        notices = set((await session.scalars(select(PaymentWebhookLog.id))).all())
        audits = set((await session.scalars(select(PaymentAuditLog.id))).all())
    return notices, audits


async def test_prune_deletes_only_what_the_retention_settings_say(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    from payments.retention import prune

    ids = await seed_for_retention(session_factory)
    defaults = load_settings()
    assert defaults.payment_audit_retention_days == 0  # audit rows: as long as their payment

    dry = await prune(defaults, session_factory, now=NOW, dry_run=True)
    assert (dry.rejected_notices, dry.processed_notices, dry.audit_rows) == (1, 1, 0)
    assert len((await remaining(session_factory))[0]) == 5

    report = await prune(defaults, session_factory, now=NOW)
    assert (report.rejected_notices, report.processed_notices, report.audit_rows) == (1, 1, 0)
    notices, audits = await remaining(session_factory)
    assert notices == {ids["rejected_new"], ids["processed_new"], ids["unprocessed_old"]}
    assert len(audits) == 4  # every audit row kept by default

    strict = load_settings(payment_audit_retention_days=30)
    report = await prune(strict, session_factory, now=NOW)
    assert report.audit_rows == 1
    _, audits = await remaining(session_factory)
    # Open, flagged and recently settled payments keep their trail.
    assert audits == {ids["audit_settled_new"], ids["audit_open_old"], ids["audit_flagged_old"]}


async def test_prune_works_in_batches(
    session_factory: async_sessionmaker[AsyncSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    from payments import retention

    monkeypatch.setattr(retention, "BATCH_SIZE", 2)
    async with session_factory() as session:
        session.add_all(
            PaymentWebhookLog(raw_body="x", is_valid=False, received_at=NOW - timedelta(days=3))
            for _ in range(7)
        )
        await session.commit()
    report = await retention.prune(load_settings(), session_factory, now=NOW)
    assert report.rejected_notices == 7
    assert (await remaining(session_factory))[0] == set()


def test_the_prune_command_applies_the_settings(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from payments.__main__ import main
    from payments.config import get_settings
    from payments.database import get_database

    url = f"sqlite:///{tmp_path}/cli.db"
    command.upgrade(repo_alembic_config(url), "head")
    with sync_engine(url) as engine, engine.begin() as connection:
        old = utcnow() - timedelta(days=2)
        connection.execute(
            PaymentWebhookLog.__table__.insert(),
            [{"raw_body": "x", "is_valid": False, "received_at": old}],
        )
        # A raw insert with only the columns that have no default (server defaults do the rest).
        connection.execute(text("INSERT INTO payment_webhook_logs (raw_body) VALUES ('y')"))
    monkeypatch.setenv("PAYMENT_DATABASE_URL", url)
    get_settings.cache_clear()
    get_database.cache_clear()
    try:
        main(["prune", "--dry-run"])
        assert "rejected_notices=1" in capsys.readouterr().out
        main(["prune"])
        assert "rejected_notices=1" in capsys.readouterr().out
    finally:  # the next test gets a database of its own
        get_database.cache_clear()
        get_settings.cache_clear()
    with sync_engine(url) as engine, engine.connect() as connection:
        assert connection.execute(text("SELECT raw_body FROM payment_webhook_logs")).all() == [
            ("y",)
        ]


async def test_the_reconciler_loop_prunes(
    service: PaymentService, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    import asyncio

    from payments.reconciliation import reconcile_forever

    async with session_factory() as session:
        session.add(
            PaymentWebhookLog(
                raw_body="x", is_valid=False, received_at=utcnow() - timedelta(days=2)
            )
        )
        await session.commit()
    stop = asyncio.Event()
    task = asyncio.create_task(
        reconcile_forever(service, session_factory, interval=0.05, stop=stop)
    )
    for _ in range(100):
        await asyncio.sleep(0.05)
        if not (await remaining(session_factory))[0]:
            break
    stop.set()
    await task
    assert (await remaining(session_factory))[0] == set()


# --- 5. the daily totals behind the summary -------------------------------------------------------


CANCELLED = "258841000005"  # INS-5: recorded Cancelled


async def direct_summary(sessions: async_sessionmaker[AsyncSession]) -> set[tuple[Any, ...]]:
    """(status, operation, count, amount) straight from the payments."""
    table = PaymentTransaction
    async with sessions() as session:
        rows = await session.execute(
            select(table.status, table.operation, func.count(), func.sum(table.amount)).group_by(
                table.status, table.operation
            )
        )
        return {(s, o, n, Decimal(str(a)).quantize(Decimal("0.01"))) for s, o, n, a in rows}


async def test_the_summary_reads_totals_kept_in_step_with_every_transition(
    service: PaymentService, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    """Payments completed, cancelled, lost then reconciled, reversed in part: the totals the
    triggers keep match a count of the payments themselves, bucket by bucket."""
    from payments.schemas import ReversalRequest

    first = await paid(service, session_factory, amount="100.10")
    await paid(service, session_factory, amount="7.25")
    async with session_factory() as db:
        try:
            await service.initiate_payment(
                request=PaymentInitiateRequest(phone_number=CANCELLED, amount="3"), db=db
            )
        except Exception:
            pass
    await unknown_payment(service, session_factory, DROPPED)
    await unknown_payment(service, session_factory, OVERLOADED)
    await reconcile_once(service, session_factory, min_age=0)
    async with session_factory() as db:
        await service.reverse(first, ReversalRequest(amount="40"), db, "operator")

    expected = await direct_summary(session_factory)
    async with session_factory() as session:
        got = await session.run_sync(lambda s: repo.summary_rows(s, PaymentFilters()))
        today = utcnow().date()
        dated = await session.run_sync(
            lambda s: repo.summary_rows(s, PaymentFilters(from_date=today, to_date=today))
        )
        before = await session.run_sync(
            lambda s: repo.summary_rows(s, PaymentFilters(to_date=today - timedelta(days=1)))
        )
        buckets = await session.scalar(select(func.count()).select_from(PaymentDailyTotal))
    assert {row[:4] for row in got} == expected
    assert {row[:4] for row in dated} == expected
    assert before == []
    assert {row[0] for row in got} >= {"completed", "partially_reversed", "cancelled", "unknown"}
    assert buckets is not None and buckets > 0
    async with session_factory() as db:
        summary = await service.summary(db)
    assert summary.total_count == sum(row[2] for row in expected)


async def test_raw_sql_changes_keep_the_totals_too(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    """The totals are the database's own (triggers), so an operator's SQL keeps them true."""
    await seed(session_factory, 20)
    async with session_factory() as session:
        await session.execute(
            update(PaymentTransaction)
            .where(PaymentTransaction.status == "failed")
            .values(status="cancelled", amount=PaymentTransaction.amount + 1)
        )
        await session.execute(
            PaymentTransaction.__table__.delete().where(
                PaymentTransaction.transaction_id == "T00001"
            )
        )
        await session.commit()
    async with session_factory() as session:
        got = await session.run_sync(lambda s: repo.summary_rows(s, PaymentFilters()))
    assert {row[:4] for row in got} == await direct_summary(session_factory)

    # Flagging and unflagging moves the bucket's flagged count (the summary's attention figure).
    async with session_factory() as session:
        await session.execute(
            update(PaymentTransaction)
            .where(PaymentTransaction.phone_number == "258840000001")
            .values(attention_required=True)
        )
        await session.execute(
            update(PaymentTransaction)
            .where(PaymentTransaction.transaction_id == "T00005")
            .values(attention_required=False)
        )
        await session.commit()
        got = await session.run_sync(lambda s: repo.summary_rows(s, PaymentFilters()))
        table = PaymentTransaction
        flagged = {
            (status, operation): n
            for status, operation, n in (
                await session.execute(
                    select(table.status, table.operation, func.count())
                    .where(table.attention_required.is_(True))
                    .group_by(table.status, table.operation)
                )
            ).all()
        }
    assert {(row[0], row[1]): row[4] for row in got if row[4]} == flagged
    assert sum(flagged.values()) == 3  # T00009, T00013, T00017 (T00001 deleted above)


# --- 6 and 7. server defaults; SQL NULL for an absent JSON value ----------------------------------


async def test_absent_json_values_are_sql_null(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    async with session_factory() as session:
        payment = PaymentTransaction(
            transaction_id="J1",
            operation="c2b",
            amount=Decimal("1"),
            third_party_reference="J1",
            metadata_=None,
        )
        session.add(payment)
        await session.flush()
        session.add(PaymentAuditLog(payment_id=payment.id, action="initiated"))
        session.add(PaymentWebhookLog(raw_body="{}", headers=None))
        await session.commit()
        for column in (
            PaymentTransaction.metadata_,
            PaymentAuditLog.request_body,
            PaymentAuditLog.response_body,
            PaymentWebhookLog.headers,
        ):
            assert await session.scalar(select(func.count()).where(column.is_(None))) == 1


RAW_PAYMENT = (
    "INSERT INTO payment_transactions (transaction_id, operation, amount, third_party_reference)"
    " VALUES ('RAW1', 'c2b', 12.34, 'RAW1')"
)


def test_the_revision_upgrades_existing_data_and_downgrades(database_url: str) -> None:
    """From ``payment_001`` with rows in it: JSON ``null`` becomes SQL NULL, the daily totals are
    filled from the payments, raw inserts get server defaults and move the totals; then down to
    ``payment_001`` (the old indexes back) and up again."""
    config = repo_alembic_config(database_url)
    command.upgrade(config, "payment_001")
    with sync_engine(database_url) as engine:
        with engine.begin() as connection:
            with pytest.raises(IntegrityError):  # no server defaults before
                with connection.begin_nested():
                    connection.execute(text(RAW_PAYMENT))
            connection.execute(
                text(
                    "INSERT INTO payment_transactions (transaction_id, operation, status, amount,"
                    " currency, reversed_amount, third_party_reference, metadata,"
                    " attention_required, operator_hold, reconcile_attempts, version, created_at,"
                    " updated_at) VALUES ('OLD1', 'b2c', 'completed', 20.05, 'MZN', 0, 'OLD1',"
                    " 'null', false, false, 0, 1, :at, :at)"
                ),
                {"at": datetime(2026, 3, 1, 10, tzinfo=UTC)},
            )
            connection.execute(
                text(
                    "INSERT INTO payment_audit_logs (transaction_id, action, request_body,"
                    " response_body, created_at) SELECT id, 'initiated', 'null', '{\"a\": 1}',"
                    " :at FROM payment_transactions"
                ),
                {"at": datetime(2026, 3, 1, 10, tzinfo=UTC)},
            )
        command.upgrade(config, "head")
        with engine.begin() as connection:
            assert (
                connection.execute(
                    text("SELECT count(*) FROM payment_transactions WHERE metadata IS NULL")
                ).scalar_one()
                == 1
            )
            assert (
                connection.execute(
                    text(
                        "SELECT count(*) FROM payment_audit_logs"
                        " WHERE request_body IS NULL AND response_body IS NOT NULL"
                    )
                ).scalar_one()
                == 1
            )
            totals = connection.execute(
                text(
                    "SELECT day, operation, status, sum(count), sum(amount_cents)"
                    " FROM payment_daily_totals GROUP BY day, operation, status"
                )
            ).all()
            assert [(str(d), o, s, int(n), int(c)) for d, o, s, n, c in totals] == [
                ("2026-03-01", "b2c", "completed", 1, 2005)
            ]
            connection.execute(text(RAW_PAYMENT))  # server defaults fill the rest
            row = connection.execute(
                text(
                    "SELECT status, currency, version, attention_required, created_at"
                    " FROM payment_transactions WHERE transaction_id = 'RAW1'"
                )
            ).one()
            assert (row[0], row[1], row[2], bool(row[3])) == ("pending", "MZN", 1, False)
            assert row[4] is not None
            connection.execute(
                text(
                    "UPDATE payment_transactions SET status = 'failed'"
                    " WHERE transaction_id = 'RAW1'"
                )
            )
            moved = connection.execute(
                text(
                    "SELECT status, sum(count) FROM payment_daily_totals"
                    " WHERE operation = 'c2b' GROUP BY status ORDER BY status"
                )
            ).all()
            assert [(s, int(n)) for s, n in moved] == [("failed", 1), ("pending", 0)]

        command.downgrade(config, "payment_001")
        with engine.connect() as connection:
            from sqlalchemy import inspect

            inspector = inspect(connection)
            assert "payment_daily_totals" not in inspector.get_table_names()
            names = {index["name"] for index in inspector.get_indexes("payment_transactions")}
            assert "ix_payment_transactions_operation" in names
            assert "ix_payment_transactions_attention" not in names
        command.upgrade(config, "head")
        with engine.connect() as connection:
            assert (
                connection.execute(text("SELECT sum(count) FROM payment_daily_totals")).scalar_one()
                == 2
            )


def test_the_models_and_the_revision_define_the_same_triggers() -> None:
    import importlib.util

    from payments import models
    from tests.test_migrations import REPO_ROOT

    path = REPO_ROOT / "payments" / "migrations" / "payment_003_data_layer.py"
    spec = importlib.util.spec_from_file_location("payment_003", path)
    assert spec is not None and spec.loader is not None
    revision = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(revision)
    assert revision.PG_TOTALS_DDL == models.PG_TOTALS_DDL
    assert revision.PG_TOTALS_DROP == models.PG_TOTALS_DROP
    assert revision.SQLITE_TOTALS_DDL == models.SQLITE_TOTALS_DDL
    assert revision.SQLITE_TOTALS_DROP == models.SQLITE_TOTALS_DROP


async def test_compacting_the_daily_totals_keeps_every_sum(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    """Past days' shards fold into one row per bucket (a year stays a few thousand rows for the
    summary and the count); today's stay spread for concurrent writers."""
    await seed(session_factory, 40)  # 2026-01-01, 40 payments over 16 shards
    async with session_factory() as session:
        session.add(
            PaymentTransaction(
                transaction_id="TODAY",
                operation="c2b",
                amount=Decimal("1"),
                third_party_reference="TODAY",
            )
        )
        await session.commit()
        before = await session.run_sync(lambda s: repo.summary_rows(s, PaymentFilters()))
        rows_before = await session.scalar(select(func.count()).select_from(PaymentDailyTotal))
        removed = await session.run_sync(lambda s: repo.compact_daily_totals(s, utcnow().date()))
        await session.commit()
        after = await session.run_sync(lambda s: repo.summary_rows(s, PaymentFilters()))
        rows_after = await session.scalar(select(func.count()).select_from(PaymentDailyTotal))
        shards = set(
            (
                await session.scalars(
                    select(PaymentDailyTotal.shard).where(PaymentDailyTotal.day < utcnow().date())
                )
            ).all()
        )
    assert sorted(after) == sorted(before)
    assert shards == {0}
    assert rows_before is not None and rows_after is not None
    assert removed == rows_before - rows_after > 0
    assert rows_after == 4 + 1  # (c2b, b2c) x (completed, failed) on 2026-01-01, and today's
    assert await direct_summary(session_factory) == {row[:4] for row in after}


def test_the_prune_command_names_a_missing_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from payments.__main__ import main
    from payments.config import get_settings

    monkeypatch.setenv("MPESA_ENVIRONMENT", "sandbox")
    get_settings.cache_clear()
    with pytest.raises(SystemExit) as exited:
        main(["prune"])
    assert exited.value.code == 2
    assert "MPESA_API_KEY" in capsys.readouterr().err
