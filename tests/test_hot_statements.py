"""The money path's INSERTs and guarded UPDATE (``repository/statements.py``): on SQLite they run
on the driver and write exactly the rows SQLAlchemy writes; on a payment they are the only
statements that bypass SQLAlchemy, and SQLAlchemy still sees the rest."""

from __future__ import annotations

import base64
import gc
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, insert, select, update
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from payments import repository as repo
from payments.config import load_settings
from payments.database import ModuleDatabase, committing, create_sync_sqlite_engine, run_db
from payments.deliveries import delivery_row
from payments.events import EventSink, add_events
from payments.lifecycle import ConsumerKind, EventType
from payments.models import (
    AuditAction,
    Base,
    PaymentAuditLog,
    PaymentEvent,
    PaymentEventDelivery,
    PaymentTransaction,
)
from payments.repository import statements
from payments.repository.record import with_defaults
from payments.repository.statements import GuardedUpdate, RowInsert
from payments.schemas import PaymentInitiateRequest
from payments.service import PaymentService

MOMENT = datetime(2026, 12, 3, 14, 5, 6, 789012, tzinfo=UTC)


def _engine(path: Path) -> Engine:
    engine = create_sync_sqlite_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    return engine


def _rows(path: Path, table: str) -> list[tuple[Any, ...]]:
    """Every stored value with its SQLite storage class, as the file holds it."""
    with sqlite3.connect(path) as connection:
        names = [row[1] for row in connection.execute(f"PRAGMA table_info({table})")]
        columns = ", ".join(f"{name}, typeof({name})" for name in names)
        return connection.execute(f"SELECT {columns} FROM {table} ORDER BY 1").fetchall()


def _payment_values(transaction_id: str) -> dict[str, Any]:
    return with_defaults(
        {
            "transaction_id": transaction_id,
            "operation": "c2b",
            "status": "processing",
            "amount": Decimal("1234.50"),
            "phone_number": "258841234567",
            "third_party_reference": f"REF{transaction_id}",
            "transaction_reference": "ORDER-1",
            "metadata": {"order": 17, "note": "ção"},
            "request_fingerprint": "f" * 64,
            "created_at": MOMENT,
            "updated_at": MOMENT,
        }
    )


def _write_every_kind(session: Session, *, driver: bool) -> None:
    """One payment, its audit rows, an event with a delivery, and a guarded update: through the
    driver (``RowInsert``/``GuardedUpdate``) or through SQLAlchemy Core."""
    payments = PaymentTransaction.__table__
    if driver:
        pk = RowInsert(payments).one(session, _payment_values("TXN-1"))
    else:
        pk = session.execute(insert(payments), _payment_values("TXN-1")).inserted_primary_key[0]
    audits = [
        repo.audit_entry(pk, AuditAction.INITIATED, status_after="processing", actor="alice"),
        repo.audit_entry(
            pk, AuditAction.API_RESPONSE, response_body={"code": "INS-0"}, response_time_ms=12.6
        ),
    ]
    for entry in audits:
        entry["created_at"] = MOMENT
    event_row = {
        "id": "evt_1",
        "type": "payment.completed",
        "transaction_id": "TXN-1",
        "data": {"amount": "1234.50", "flags": [True, None]},
        "created_at": MOMENT,
    }
    delivery = delivery_row("evt_1", ConsumerKind.WEBHOOK, "https://shop.example/hooks", MOMENT)
    changes = {
        "status": "completed",
        "provider_transaction_id": "ABC123",
        "reversed_amount": Decimal("0.10"),
        "attention_required": True,
        "updated_at": MOMENT,
        "version": 2,
    }
    if driver:
        RowInsert(PaymentAuditLog.__table__).many(session, audits)
        RowInsert(PaymentEvent.__table__).many(session, [event_row])
        RowInsert(PaymentEventDelivery.__table__).many(session, [delivery])
        assert GuardedUpdate(payments).run(session, pk, 1, "processing", changes) == 1
        assert GuardedUpdate(payments).run(session, pk, 1, "processing", changes) == 0  # stale
    else:
        session.execute(insert(PaymentAuditLog.__table__), audits)
        session.execute(insert(PaymentEvent.__table__), [event_row])
        session.execute(insert(PaymentEventDelivery.__table__), [delivery])
        session.execute(update(payments).where(payments.c.id == pk), changes)
    session.commit()


def test_the_driver_writes_the_rows_sqlalchemy_writes(tmp_path: Path) -> None:
    written = {}
    for driver in (True, False):
        path = tmp_path / f"{'driver' if driver else 'core'}.db"
        engine = _engine(path)
        try:
            with sessionmaker(engine)() as session:
                _write_every_kind(session, driver=driver)
        finally:
            engine.dispose()
        written[driver] = {
            table: _rows(path, table)
            for table in (
                "payment_transactions",
                "payment_audit_logs",
                "payment_events",
                "payment_event_deliveries",
                "payment_daily_totals",
            )
        }
    assert written[True] == written[False]
    assert written[True]["payment_transactions"]  # something was compared
    assert written[True]["payment_daily_totals"]  # the triggers ran on the driver's rows too


def test_a_rollback_takes_the_drivers_rows_back(tmp_path: Path) -> None:
    """The driver's statements are in the session's transaction, not committed on their own."""
    engine = _engine(tmp_path / "p.db")
    try:
        with sessionmaker(engine)() as session:
            RowInsert(PaymentTransaction.__table__).one(session, _payment_values("TXN-9"))
            session.rollback()
            assert repo.get(session, "TXN-9") is None
    finally:
        engine.dispose()
    assert _rows(tmp_path / "p.db", "payment_transactions") == []


async def test_a_payment_sends_its_writes_to_the_driver(database_url: str) -> None:
    """A C2B payment's INSERTs and UPDATE reach the driver without SQLAlchemy's execution (which
    cost as much CPU as SQLite itself); the payment, its audit trail and its event are whole."""
    database = ModuleDatabase(database_url)
    await database.create_all(Base.metadata)
    through_sqlalchemy: list[str] = []
    engine = database.sync_engine or (database.async_engine and database.async_engine.sync_engine)
    assert engine is not None

    @event.listens_for(engine, "before_cursor_execute")
    def seen(*args: Any) -> None:
        through_sqlalchemy.append(args[2].split()[0].upper())

    service = PaymentService(load_settings(mpesa_environment="simulator"))
    try:
        async with database.session() as db:
            payment = await service.initiate_payment(
                request=PaymentInitiateRequest(phone_number="841234567", amount="10"), db=db
            )
            record = await run_db(db, lambda s: repo.get(s, payment.transaction_id))
            trail = await run_db(db, lambda s: repo.audit_trail(s, record.id) if record else [])
            events = await run_db(db, lambda s: s.scalars(select(PaymentEvent)).all())
    finally:
        await service.aclose()
        await database.dispose()
    assert payment.status == "completed"
    assert not {"INSERT", "UPDATE"} & set(through_sqlalchemy), through_sqlalchemy
    assert record is not None and record.status == "completed" and record.version == 2
    assert record.amount == Decimal("10.00") and record.provider_transaction_id
    assert [a.action for a in trail][:1] == ["initiated"] and len(trail) >= 3
    assert [e.type for e in events] == ["payment.completed"]
    assert events[0].data["transaction_id"] == payment.transaction_id


@pytest.mark.parametrize("driver", [True, False])
def test_events_written_either_way_read_back_alike(tmp_path: Path, driver: bool) -> None:
    engine = _engine(tmp_path / "p.db")
    try:
        with sessionmaker(engine)() as session:
            if driver:
                pk = RowInsert(PaymentTransaction.__table__).one(session, _payment_values("T-1"))
            else:
                pk = repo.insert_payment(session, _payment_values("T-1")).id
            record = repo.record_of(session, repo.get_by_id(session, pk))
            written = add_events(
                session,
                record,
                [EventType.PAYMENT_COMPLETED],
                EventSink(webhook_urls=("https://a.example/h",)),
            )
            session.commit()
            stored = session.get(PaymentEvent, written[0].id)
            assert stored is not None and stored.data["transaction_id"] == "T-1"
            assert stored.created_at is not None
    finally:
        engine.dispose()


def test_the_drivers_errors_are_raised_as_sqlalchemys(tmp_path: Path) -> None:
    """Callers catch SQLAlchemy's errors: a key used before must be its IntegrityError."""
    from sqlalchemy.exc import IntegrityError

    engine = _engine(tmp_path / "p.db")
    try:
        with sessionmaker(engine)() as session:
            insert_row = RowInsert(PaymentTransaction.__table__)
            insert_row.one(session, _payment_values("TXN-1"))
            with pytest.raises(IntegrityError, match="UNIQUE"):
                insert_row.one(session, _payment_values("TXN-1"))
    finally:
        engine.dispose()


async def test_a_payment_leaves_no_reference_cycle_through_its_session(database_url: str) -> None:
    """The connection kept for a transaction must not make the session a reference cycle: with
    1,000 payments in flight, such cycles (a session, its transaction, connection and event
    dispatchers: about 45 objects each) lived into the oldest generation and only full
    collections, which walk every object in flight, freed them."""
    database = ModuleDatabase(database_url)
    await database.create_all(Base.metadata)
    service = PaymentService(load_settings(mpesa_environment="simulator"))

    async def pay() -> None:
        async with database.session() as db:
            payment = await service.initiate_payment(
                request=PaymentInitiateRequest(phone_number="841234567", amount="10"), db=db
            )
        assert payment.status == "completed"

    try:
        await pay()  # compiled statements and pooled connections, made once
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds is kept in gc.garbage
        try:
            for _ in range(3):
                await pay()
            gc.collect()
            cycles = [o for o in gc.garbage if isinstance(o, Session | SessionTransaction)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    finally:
        await service.aclose()
        await database.dispose()
    assert cycles == []


async def test_a_replayed_key_gets_the_first_payment(database_url: str) -> None:
    """The intent's INSERT fails on the key's unique constraint, and that is how a replay is
    found (no lookup first): the driver's error must reach the service as SQLAlchemy's."""
    database = ModuleDatabase(database_url)
    await database.create_all(Base.metadata)
    service = PaymentService(load_settings(mpesa_environment="simulator"))
    body = {"phone_number": "841234567", "amount": "10", "idempotency_key": "order-7"}
    try:
        async with database.session() as db:
            first = await service.initiate_payment(request=PaymentInitiateRequest(**body), db=db)
        async with database.session() as db:
            again = await service.initiate_payment(request=PaymentInitiateRequest(**body), db=db)
            count = await run_db(db, lambda s: s.scalar(select(func.count(PaymentTransaction.id))))
    finally:
        await service.aclose()
        await database.dispose()
    assert again.transaction_id == first.transaction_id
    assert count == 1


async def test_either_way_the_database_holds_the_same_values(database_url: str) -> None:
    """On SQLite and on PostgreSQL: a payment inserted and updated through the driver reads back
    exactly like one written by SQLAlchemy Core (every column but its keys)."""
    database = ModuleDatabase(database_url)
    await database.create_all(Base.metadata)
    payments = PaymentTransaction.__table__
    changes = {"status": "completed", "provider_transaction_id": None, "updated_at": MOMENT}

    def write(session: Session) -> list[dict[str, Any]]:
        driver_pk = RowInsert(payments).one(session, _payment_values("TXN-D"))
        assert (
            GuardedUpdate(payments).run(
                session,
                driver_pk,
                1,
                "processing",
                changes | {"provider_transaction_id": "P-D", "version": 2},
            )
            == 1
        )
        core_pk = session.execute(insert(payments), _payment_values("TXN-C")).inserted_primary_key[
            0
        ]
        session.execute(
            update(payments).where(payments.c.id == core_pk),
            changes | {"provider_transaction_id": "P-C", "version": 2},
        )
        session.commit()
        rows = session.execute(select(payments).order_by(payments.c.id)).mappings().all()
        ignored = {"id", "transaction_id", "provider_transaction_id", "third_party_reference"}
        return [{k: v for k, v in row.items() if k not in ignored} for row in rows]

    try:
        async with database.session() as db:
            driver_row, core_row = await run_db(db, write)
    finally:
        await database.dispose()
    assert driver_row == core_row
    assert driver_row["metadata"] == {"order": 17, "note": "ção"}
    assert driver_row["amount"] == Decimal("1234.50") and driver_row["status"] == "completed"


def _record_statements(monkeypatch: pytest.MonkeyPatch, sent: list[str]) -> None:
    """Each statement ``repository/statements.py`` hands its driver, as its first word and the
    tables it inserts into ("INSERT payment_events", "WITH payment_events payment_…")."""
    real_cursor = statements._DriverCursor

    def shown(sql: str) -> str:
        return " ".join([sql.split()[0], *re.findall(r"INSERT INTO (\w+)", sql)])

    class Recorder:
        def __init__(self, cursor: Any) -> None:
            self.cursor = cursor

        def execute(self, sql: str, *args: Any) -> Any:
            sent.append(shown(sql))
            return self.cursor.execute(sql, *args)

        def executemany(self, sql: str, *args: Any) -> Any:
            sent.append(shown(sql))
            return self.cursor.executemany(sql, *args)

    @contextmanager
    def recording(*args: Any) -> Iterator[Any]:
        with real_cursor(*args) as cursor:
            yield Recorder(cursor)

    monkeypatch.setattr(statements, "_DriverCursor", recording)


async def test_several_rows_are_one_statement_and_read_back_as_sqlalchemy_writes_them(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outcome's audit rows (and an event's deliveries) reach the driver as one statement:
    on PostgreSQL each statement is a round trip. In order (their ids follow the rows), and
    with the values SQLAlchemy Core writes."""
    database = ModuleDatabase(database_url)
    await database.create_all(Base.metadata)
    audits = PaymentAuditLog.__table__
    sent: list[str] = []

    def write(session: Session) -> list[dict[str, Any]]:
        pk = RowInsert(PaymentTransaction.__table__).one(session, _payment_values("TXN-M"))
        rows = [
            repo.audit_entry(pk, action, actor="tester", response_body=body)
            | {"created_at": MOMENT}
            for action, body in (
                (AuditAction.API_REQUEST, {"url": "https://x", "ção": [1, None]}),
                (AuditAction.API_RESPONSE, None),
                (AuditAction.COMPLETED, {"amount": "1.50"}),
            )
        ]
        _record_statements(monkeypatch, sent)
        RowInsert(audits).many(session, rows)
        monkeypatch.undo()
        session.execute(insert(audits), [row | {"actor": "core"} for row in rows])
        session.commit()
        stored = session.execute(select(audits).order_by(audits.c.id)).mappings().all()
        return [{k: v for k, v in row.items() if k != "id"} for row in stored]

    try:
        async with database.session() as db:
            stored = await run_db(db, write)
    finally:
        await database.dispose()
    assert sent == ["INSERT payment_audit_logs"]
    by_driver, by_core = stored[:3], stored[3:]
    assert [row["action"] for row in by_driver] == ["api_request", "api_response", "completed"]
    assert by_driver == [row | {"actor": "tester"} for row in by_core]


async def test_an_event_and_its_deliveries_are_one_statement_on_postgresql(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deliveries reference their event (a foreign key): on PostgreSQL both go in one
    statement, the event's INSERT in a WITH; on SQLite (no round trips) one after the other."""
    database = ModuleDatabase(database_url)
    await database.create_all(Base.metadata)
    sent: list[str] = []
    sink = EventSink(webhook_urls=("https://a.example/h", "https://b.example/h"))

    def write(session: Session) -> tuple[str, list[tuple[str, str, str]]]:
        pk = RowInsert(PaymentTransaction.__table__).one(session, _payment_values("T-E"))
        record = repo.record_of(session, repo.get_by_id(session, pk))
        _record_statements(monkeypatch, sent)
        (written,) = add_events(session, record, [EventType.PAYMENT_COMPLETED], sink)
        monkeypatch.undo()
        session.commit()
        stored = session.get(PaymentEvent, written.id)
        assert stored is not None and stored.data["transaction_id"] == "T-E"
        deliveries = session.scalars(
            select(PaymentEventDelivery).order_by(PaymentEventDelivery.id)
        ).all()
        return written.id, [(d.event_id, d.kind, d.consumer) for d in deliveries]

    try:
        async with database.session() as db:
            event_id, deliveries = await run_db(db, write)
    finally:
        await database.dispose()
    assert deliveries == [
        (event_id, "hooks", "hooks"),
        (event_id, "webhook", "https://a.example/h"),
        (event_id, "webhook", "https://b.example/h"),
    ]
    if database_url.startswith("postgresql"):
        assert sent == ["WITH payment_events payment_event_deliveries"]
    else:
        assert sent == ["INSERT payment_events", "INSERT payment_event_deliveries"]


async def test_pending_orm_rows_go_in_before_the_drivers(database_url: str) -> None:
    """As ``Session.execute`` autoflushes: a delivery written on the driver may reference an
    event the session holds as a pending ORM object (the foreign key needs it there first)."""
    database = ModuleDatabase(database_url)
    await database.create_all(Base.metadata)
    delivery = delivery_row(
        "evt_pending", ConsumerKind.WEBHOOK, "https://shop.example/hooks", MOMENT
    )

    def write(session: Session) -> int:
        session.add(
            PaymentEvent(id="evt_pending", type="payment.completed", transaction_id="T-1", data={})
        )
        RowInsert(PaymentEventDelivery.__table__).many(session, [delivery])
        session.commit()
        return len(session.scalars(select(PaymentEventDelivery)).all())

    try:
        async with database.session() as db:
            assert await run_db(db, write) == 1
    finally:
        await database.dispose()


def test_a_value_left_to_sqlalchemy_is_written_by_core(tmp_path: Path) -> None:
    """An UPDATE without ``updated_at`` leaves it to the column's ``onupdate``: the driver's SQL
    would lack the value, so Core runs the statement and SQLAlchemy fills it in."""
    engine = _engine(tmp_path / "p.db")
    payments = PaymentTransaction.__table__
    try:
        with sessionmaker(engine)() as session:
            pk = RowInsert(payments).one(session, _payment_values("TXN-1"))
            changed = GuardedUpdate(payments).run(
                session, pk, 1, "processing", {"status": "completed", "version": 2}
            )
            session.commit()
            row = session.execute(select(payments).where(payments.c.id == pk)).mappings().one()
    finally:
        engine.dispose()
    assert changed == 1
    assert row["status"] == "completed" and row["version"] == 2
    assert row["updated_at"].replace(tzinfo=UTC) > MOMENT


def _log_queries(database: ModuleDatabase, sent: list[str]) -> None:
    """Every statement asyncpg sends on the database's connections, opened from now on."""
    assert database.async_engine is not None

    @event.listens_for(database.async_engine.sync_engine, "connect")
    def log_queries(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.driver_connection.add_query_logger(
            lambda logged: sent.append(logged.query)
        )


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_payment_on_postgresql_is_two_statements_that_commit_themselves(
    database_url: str,
) -> None:
    """Each statement is a round trip: the intent (the payment and its first audit row) is one
    statement, the outcome (the UPDATE, its audit rows, the event and its delivery) another, and
    neither needs BEGIN or COMMIT: a statement is atomic, and each is its unit's only write. The
    connections leave the pool without a ping."""
    database = ModuleDatabase(database_url)
    await database.create_all(Base.metadata)
    await database.dispose()
    database = ModuleDatabase(database_url)
    sent: list[str] = []
    _log_queries(database, sent)
    settings = load_settings(
        mpesa_environment="simulator",
        payment_webhook_urls="https://shop.example/hooks",
        payment_webhook_secret="whsec_" + base64.b64encode(b"k" * 32).decode(),
    )
    service = PaymentService(settings)
    try:
        async with database.session() as db:
            payment = await service.initiate_payment(
                request=PaymentInitiateRequest(phone_number="841234567", amount="10"), db=db
            )
        written = list(sent)  # nothing else: the checkout's check of a connection is no query
        async with database.session() as db:
            record = await run_db(db, lambda s: repo.get(s, payment.transaction_id))
            assert record is not None
            trail = await run_db(db, lambda s: repo.audit_trail(s, record.id))
            events = await run_db(db, lambda s: s.scalars(select(PaymentEvent)).all())
            deliveries = await run_db(
                db,
                lambda s: s.scalars(
                    select(PaymentEventDelivery).order_by(PaymentEventDelivery.id)
                ).all(),
            )
    finally:
        await service.aclose()
        await database.dispose()
    assert [query.split(" AS (")[0] for query in written] == ["WITH parent", "WITH guarded"]
    assert re.findall(r"INSERT INTO (\w+)", written[0]) == [
        "payment_transactions",
        "payment_audit_logs",
    ]
    assert re.findall(r"INSERT INTO (\w+)", written[1]) == [
        "payment_audit_logs",
        "payment_events",
        "payment_event_deliveries",
    ]
    assert payment.status == "completed"
    assert record.status == "completed" and record.version == 2 and record.provider_transaction_id
    assert [a.action for a in trail] == ["initiated", "api_request", "api_response", "completed"]
    assert trail[0].request_body == {"amount": "10.00", "phone_number": "2588412*****"}
    assert trail[0].status_after == "processing" and trail[0].actor is None
    assert [e.type for e in events] == ["payment.completed"]
    assert [(d.event_id, d.consumer) for d in deliveries] == [
        (events[0].id, "hooks"),
        (events[0].id, "https://shop.example/hooks"),
    ]


def _outcome_rows(pk: int, event_id: str) -> list[tuple[RowInsert, list[dict[str, Any]]]]:
    audits = [
        repo.audit_entry(pk, AuditAction.API_RESPONSE, response_body={"code": "INS-0"}),
        repo.audit_entry(pk, AuditAction.COMPLETED, status_before="processing"),
    ]
    event_row = {
        "id": event_id,
        "type": "payment.completed",
        "transaction_id": "TXN-F",
        "data": {"amount": "1234.50"},
        "created_at": MOMENT,
    }
    delivery = delivery_row(event_id, ConsumerKind.WEBHOOK, "https://shop.example/hooks", MOMENT)
    return [
        (RowInsert(PaymentAuditLog.__table__), audits),
        (RowInsert(PaymentEvent.__table__), [event_row]),
        (RowInsert(PaymentEventDelivery.__table__), [delivery]),
    ]


async def test_a_final_update_writes_its_rows_only_if_the_row_had_not_moved_on(
    database_url: str,
) -> None:
    """The guarded UPDATE and the rows that go with it (audit rows, an event, its delivery),
    as a unit's last write: a stale version changes nothing and writes none of them."""
    database = ModuleDatabase(database_url)
    await database.create_all(Base.metadata)
    payments = PaymentTransaction.__table__
    changes = {"status": "completed", "updated_at": MOMENT, "version": 2}

    def insert_payment(session: Session) -> int:
        pk = RowInsert(payments).one_with(
            session,
            _payment_values("TXN-F"),
            RowInsert(PaymentAuditLog.__table__),
            [repo.audit_entry(None, AuditAction.INITIATED, status_after="processing")],
            "transaction_id",
        )
        session.commit()
        return int(pk)

    def update(session: Session, version: int, event_id: str) -> int:
        changed = GuardedUpdate(payments).run(
            session,
            pk,
            version,
            "processing",
            changes,
            then=_outcome_rows(pk, event_id),
            final=True,
        )
        session.commit()
        return changed

    def stored(session: Session) -> tuple[Any, ...]:
        return (
            session.execute(select(payments.c.status, payments.c.version)).one(),
            session.scalars(select(PaymentAuditLog.action).order_by(PaymentAuditLog.id)).all(),
            session.scalars(select(PaymentEvent.id)).all(),
            session.scalars(select(PaymentEventDelivery.event_id)).all(),
        )

    try:
        async with database.session() as db:
            pk = await run_db(db, insert_payment, write=True)
            assert await run_db(db, lambda s: update(s, 7, "evt_stale"), write=True) == 0
            after_stale = await run_db(db, stored)
            assert await run_db(db, lambda s: update(s, 1, "evt_new"), write=True) == 1
            after_update = await run_db(db, stored)
    finally:
        await database.dispose()
    assert after_stale == (("processing", 1), ["initiated"], [], [])
    assert after_update == (
        ("completed", 2),
        ["initiated", "api_response", "completed"],
        ["evt_new"],
        ["evt_new"],
    )


async def test_a_final_write_inside_a_begun_transaction_is_undone_with_it(
    database_url: str,
) -> None:
    """When the unit has already sent a statement, the last write is one more statement of its
    transaction: a failure after it takes it back."""
    database = ModuleDatabase(database_url)
    await database.create_all(Base.metadata)
    payments = PaymentTransaction.__table__

    def begun_then_failed(session: Session) -> None:
        session.execute(select(func.count()).select_from(payments))  # begins the transaction
        RowInsert(payments).one_with(
            session,
            _payment_values("TXN-U"),
            RowInsert(PaymentAuditLog.__table__),
            [repo.audit_entry(None, AuditAction.INITIATED)],
            "transaction_id",
        )
        raise RuntimeError("after the last write")

    def counts(session: Session) -> tuple[int | None, int | None]:
        return (
            session.scalar(select(func.count()).select_from(payments)),
            session.scalar(select(func.count()).select_from(PaymentAuditLog)),
        )

    try:
        async with database.session() as db:
            with pytest.raises(RuntimeError):
                await run_db(db, committing(begun_then_failed), write=True)
            left = await run_db(db, counts)
    finally:
        await database.dispose()
    assert left == (0, 0)
