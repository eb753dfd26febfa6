"""The module's own SQLite sessions: the write units of one batch share one transaction
(``payments/group_commit.py``), each in a savepoint, with one COMMIT before any caller hears of
its unit. A unit's failure undoes only its own work; a failed COMMIT, or a transaction SQLite ended
by itself, fails every unit that ran in it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from payments import repository as repo
from payments.database import ModuleDatabase, committing, run_db
from payments.models import AuditAction, Base, PaymentAuditLog, PaymentTransaction
from payments.repository.record import with_defaults


def _payment(transaction_id: str, key: str | None = None) -> dict[str, Any]:
    return with_defaults(
        {
            "transaction_id": transaction_id,
            "operation": "c2b",
            "status": "processing",
            "amount": "10.00",
            "third_party_reference": transaction_id[-20:],
            "idempotency_key": key,
        }
    )


def _insert(transaction_id: str, key: str | None = None) -> Callable[[Session], Any]:
    return committing(lambda s: repo.insert_payment(s, _payment(transaction_id, key)).id)


async def _database(path: Path) -> tuple[ModuleDatabase, list[str]]:
    """A module database whose connections report every COMMIT they run."""
    database = ModuleDatabase(f"sqlite:///{path}")
    assert database.sync_engine is not None
    commits: list[str] = []

    @event.listens_for(database.sync_engine, "connect")
    def trace(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.set_trace_callback(
            lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None
        )

    await database.create_all(Base.metadata)
    return database, commits


async def _batch(database: ModuleDatabase, *works: Callable[[Session], Any]) -> list[Any]:
    """The units at once, each on a session of its own (as requests are): they queue up
    together and run as one batch."""

    async def one(work: Callable[[Session], Any]) -> Any:
        async with database.session() as db:
            return await run_db(db, work, write=True)

    return await asyncio.gather(*(one(work) for work in works), return_exceptions=True)


async def _stored(database: ModuleDatabase) -> list[str]:
    async with database.session() as db:
        return await run_db(
            db,
            lambda s: list(
                s.scalars(
                    select(PaymentTransaction.transaction_id).order_by(
                        PaymentTransaction.transaction_id
                    )
                )
            ),
        )


async def test_a_batch_of_units_commits_once(tmp_path: Path) -> None:
    database, commits = await _database(tmp_path / "p.db")
    try:
        commits.clear()
        results = await _batch(database, *(_insert(f"TXN-{n:02}") for n in range(10)))
        assert all(isinstance(result, int) for result in results), results
        assert commits == ["COMMIT"]  # one per unit before: ten
        assert await _stored(database) == [f"TXN-{n:02}" for n in range(10)]
    finally:
        await database.dispose()


async def test_a_failing_unit_undoes_only_its_own_work(tmp_path: Path) -> None:
    database, _ = await _database(tmp_path / "p.db")
    try:
        first, replayed, third = await _batch(
            database,
            _insert("TXN-A", key="order-1"),
            _insert("TXN-B", key="order-1"),  # the key's unique constraint refuses it
            _insert("TXN-C"),
        )
        assert isinstance(first, int) and isinstance(third, int)
        assert isinstance(replayed, IntegrityError)
        assert await _stored(database) == ["TXN-A", "TXN-C"]
    finally:
        await database.dispose()


async def test_the_savepoints_of_a_batch_go_straight_to_the_driver(tmp_path: Path) -> None:
    """Each unit's SAVEPOINT and RELEASE (and a failed unit's ROLLBACK TO) reach SQLite without
    SQLAlchemy's statement execution, which cost 13 times as much CPU as the statements."""
    database, _ = await _database(tmp_path / "p.db")
    assert database.sync_engine is not None
    seen_by_sqlite: list[str] = []
    seen_by_sqlalchemy: list[str] = []

    @event.listens_for(database.sync_engine, "connect")
    def trace(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.set_trace_callback(seen_by_sqlite.append)

    @event.listens_for(database.sync_engine, "before_cursor_execute")
    def executed(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen_by_sqlalchemy.append(statement)

    try:
        database.sync_engine.dispose()  # new connections, traced from their start
        results = await _batch(
            database,
            _insert("TXN-A", key="order-1"),
            _insert("TXN-B", key="order-1"),  # refused: rolled back to its savepoint
            _insert("TXN-C"),
        )
        assert [type(result) for result in results] == [int, IntegrityError, int], results
        assert await _stored(database) == ["TXN-A", "TXN-C"]
        savepoints = [
            sql for sql in seen_by_sqlite if sql.startswith(("SAVEPOINT", "RELEASE", "ROLLBACK TO"))
        ]
        # One savepoint per unit, the batch's own: the money path's statements begin no
        # transaction (nor savepoint) of the session's. The refused unit is rolled back to it.
        assert savepoints == [
            *["SAVEPOINT payments_unit", "RELEASE SAVEPOINT payments_unit"],
            *["SAVEPOINT payments_unit", "ROLLBACK TO SAVEPOINT payments_unit"],
            "RELEASE SAVEPOINT payments_unit",
            *["SAVEPOINT payments_unit", "RELEASE SAVEPOINT payments_unit"],
        ], seen_by_sqlite
        assert not [
            sql
            for sql in seen_by_sqlalchemy
            if sql.split()[0].upper() in {"SAVEPOINT", "RELEASE", "ROLLBACK"}
        ]
    finally:
        await database.dispose()


def _orm_and_statements(transaction_id: str, fails: bool) -> Callable[[Session], Any]:
    """A unit that mixes the module's statements (on the batch's connection) with ORM work (in
    a savepoint the session begins inside the unit's), then fails if ``fails``."""

    def work(session: Session) -> int:
        pk = repo.insert_payment(session, _payment(transaction_id)).id
        session.add(PaymentAuditLog(payment_id=pk, action=AuditAction.INITIATED.value))
        repo.add_audit(session, pk, AuditAction.API_REQUEST)  # flushes the ORM row first
        if fails:
            raise RuntimeError("the unit gives up after its writes")
        return pk

    return committing(work)


async def test_a_units_orm_work_and_statements_are_kept_or_undone_together(tmp_path: Path) -> None:
    """The session's savepoint for its ORM work nests inside the unit's, and goes straight to
    the driver too."""
    database, _ = await _database(tmp_path / "p.db")
    assert database.sync_engine is not None
    seen_by_sqlite: list[str] = []  # this trace replaces _database's COMMIT trace
    seen_by_sqlalchemy: list[str] = []

    @event.listens_for(database.sync_engine, "connect")
    def trace(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.set_trace_callback(seen_by_sqlite.append)

    @event.listens_for(database.sync_engine, "before_cursor_execute")
    def executed(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen_by_sqlalchemy.append(statement)

    try:
        database.sync_engine.dispose()  # new connections, traced from their start
        kept, undone, also_kept = await _batch(
            database,
            _orm_and_statements("TXN-A", fails=False),
            _orm_and_statements("TXN-B", fails=True),
            _orm_and_statements("TXN-C", fails=False),
        )
        assert isinstance(kept, int) and isinstance(also_kept, int), (kept, also_kept)
        assert isinstance(undone, RuntimeError), undone
        assert [sql for sql in seen_by_sqlite if sql.strip().upper() == "COMMIT"] == ["COMMIT"]
        savepoints = [
            sql.replace("sa_savepoint_", "sa_").split()[-1]
            for sql in seen_by_sqlite
            if sql.startswith(("SAVEPOINT", "RELEASE", "ROLLBACK TO"))
        ]
        # Per unit: the unit's savepoint, the session's inside it (begun by the ORM row's
        # flush), released (or rolled back, for the unit that failed) innermost first.
        assert [name.startswith("sa_") for name in savepoints] == [
            *[False, True, True, False],
            *[False, True, True, False, False],
            *[False, True, True, False],
        ], seen_by_sqlite
        assert not [
            sql
            for sql in seen_by_sqlalchemy
            if sql.split()[0].upper() in {"SAVEPOINT", "RELEASE", "ROLLBACK"}
        ]
        assert await _stored(database) == ["TXN-A", "TXN-C"]
        async with database.session() as db:
            audits = await run_db(
                db,
                lambda s: sorted(
                    (pk, action)
                    for pk, action in s.execute(
                        select(PaymentAuditLog.payment_id, PaymentAuditLog.action)
                    )
                ),
            )
        assert audits == sorted(
            (pk, action.value)
            for pk in (kept, also_kept)
            for action in (AuditAction.INITIATED, AuditAction.API_REQUEST)
        )
    finally:
        await database.dispose()


async def test_a_failed_commit_fails_every_unit_of_the_batch(tmp_path: Path) -> None:
    """A foreign key checked at COMMIT (``defer_foreign_keys``) makes the COMMIT itself fail:
    no unit of the batch may be told it is stored."""

    def orphan_audit(session: Session) -> None:
        session.execute(text("PRAGMA defer_foreign_keys = ON"))
        repo.add_audit(session, 999_999, AuditAction.INITIATED)

    database, _ = await _database(tmp_path / "p.db")
    try:
        results = await _batch(database, _insert("TXN-A"), committing(orphan_audit))
        assert all(isinstance(result, IntegrityError) for result in results), results
        assert await _stored(database) == []
        async with database.session() as db:
            audits = await run_db(db, lambda s: s.scalar(select(func.count(PaymentAuditLog.id))))
        assert audits == 0
    finally:
        await database.dispose()


async def test_a_transaction_sqlite_ended_fails_what_ran_in_it(tmp_path: Path) -> None:
    """SQLite rolls the whole transaction back by itself on some errors (a full disk, an I/O
    error). The units that ran in it are told they failed; the units after it run alone."""

    def ended_by_sqlite(session: Session) -> None:
        # What SQLite does on such an error: the transaction is gone, savepoints and all.
        session.connection().connection.dbapi_connection.execute("ROLLBACK")  # type: ignore[union-attr]

    database, _ = await _database(tmp_path / "p.db")
    try:
        first, ended, after = await _batch(
            database, _insert("TXN-A"), committing(ended_by_sqlite), _insert("TXN-C")
        )
        assert isinstance(first, OperationalError), first
        assert isinstance(ended, Exception), ended
        assert isinstance(after, int), after
        assert await _stored(database) == ["TXN-C"]
    finally:
        await database.dispose()


@pytest.mark.parametrize("units", [1, 2])
async def test_units_of_a_hosts_sessions_commit_each_on_their_own(
    tmp_path: Path, units: int
) -> None:
    """A host's synchronous sessions (not the module's) keep one transaction per unit."""
    from sqlalchemy.orm import sessionmaker

    database, commits = await _database(tmp_path / "p.db")
    host_sessions = sessionmaker(database.sync_engine)

    async def one(transaction_id: str) -> Any:
        with host_sessions() as session:
            return await run_db(session, _insert(transaction_id), write=True)

    try:
        commits.clear()
        await asyncio.gather(*(one(f"TXN-{n}") for n in range(units)))
        assert len(commits) == units
    finally:
        await database.dispose()
