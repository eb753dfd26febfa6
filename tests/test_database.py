"""The module's own database: URLs people paste, and sessions that never hold the loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from payments.config import load_settings
from payments.database import (
    ModuleDatabase,
    create_engine_for,
    discard_closed_on_checkout,
    normalize_database_url,
    run_db,
)
from payments.exceptions import PaymentConfigurationError
from payments.models import Base, PaymentTransaction
from payments.schemas import PaymentInitiateRequest
from payments.service import PaymentService


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///./payments.db", "sqlite+aiosqlite:///./payments.db"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("postgresql://u:p@db/pay", "postgresql+asyncpg://u:p@db/pay"),
        ("postgres://u:p@db/pay", "postgresql+asyncpg://u:p@db/pay"),
        ("postgresql+psycopg://u:p@db/pay", "postgresql+psycopg://u:p@db/pay"),
        ("postgresql+asyncpg://u:p@db:5433/pay", "postgresql+asyncpg://u:p@db:5433/pay"),
    ],
)
def test_pasted_urls_become_async_ones(url: str, expected: str) -> None:
    assert normalize_database_url(url) == expected


@pytest.mark.parametrize("url", ["mysql://u@h/db", "not a url at all", "oracle://x"])
def test_unsupported_urls_name_the_variable(url: str) -> None:
    with pytest.raises(PaymentConfigurationError, match="PAYMENT_DATABASE_URL"):
        normalize_database_url(url)


async def test_module_database_runs_a_payment_and_gives_every_connection_back(
    database_url: str,
) -> None:
    database = ModuleDatabase(database_url, pool_size=3)
    await database.create_all(Base.metadata)
    service = PaymentService(load_settings(mpesa_environment="simulator"))
    try:
        async with database.session() as db:
            # SQLite: a plain Session worked in threads; PostgreSQL: an AsyncSession.
            expected = Session if database_url.startswith("sqlite") else AsyncSession
            assert isinstance(db, expected)
            payment = await service.initiate_payment(
                request=PaymentInitiateRequest(phone_number="841234567", amount="10"), db=db
            )
            assert database.connections_in_use() == 0  # committed: nothing held
            status = await run_db(
                db,
                lambda s: s.scalar(
                    select(PaymentTransaction.status).where(
                        PaymentTransaction.transaction_id == payment.transaction_id
                    )
                ),
            )
        assert status == "completed"
        assert database.connections_in_use() == 0
    finally:
        await service.aclose()
        await database.dispose()


def test_explicit_aiosqlite_keeps_aiosqlite(tmp_path: object) -> None:
    database = ModuleDatabase(f"sqlite+aiosqlite:///{tmp_path}/x.db")
    assert database.async_engine is not None and database.sync_engine is None


async def test_sqlite_write_units_that_queue_up_share_a_thread_hop_each_on_its_own(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of writes on the module's SQLite sessions: units that queued up while one ran go
    to the worker thread together (one hop and one wait for the GIL per batch, not per unit),
    in order, each with its own result, its own exception and its own commit; a unit whose
    caller gave up while it waited never runs."""
    import asyncio

    from sqlalchemy import text

    import payments.database as database_module
    from payments.database import committing

    database = ModuleDatabase(f"sqlite:///{tmp_path}/burst.db", pool_size=3)
    await database.create_all(Base.metadata)
    hops: list[int] = []
    real_to_thread = asyncio.to_thread

    async def counting_to_thread(function: Any, /, *args: Any, **kwargs: Any) -> Any:
        hops.append(1)
        return await real_to_thread(function, *args, **kwargs)

    monkeypatch.setattr(database_module.asyncio, "to_thread", counting_to_thread)
    ran: list[int] = []

    def insert(index: int) -> Any:
        def work(session: Session) -> int:
            ran.append(index)
            if index == 7:
                raise ValueError("unit 7 fails alone")
            session.execute(text("CREATE TABLE IF NOT EXISTS burst (n INTEGER)"))
            session.execute(text("INSERT INTO burst VALUES (:n)"), {"n": index})
            return index * 10

        return committing(work)

    async def unit(index: int) -> int:
        async with database.session() as db:
            return await run_db(db, insert(index), write=True)

    try:
        tasks = [asyncio.create_task(unit(index)) for index in range(40)]
        await asyncio.sleep(0)  # every unit is queued
        tasks[30].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[7], ValueError)
        assert isinstance(results[30], asyncio.CancelledError)
        assert [r for i, r in enumerate(results) if i not in (7, 30)] == [
            i * 10 for i in range(40) if i not in (7, 30)
        ]
        assert ran == [i for i in range(40) if i != 30]  # in order; the cancelled one never ran
        assert len(hops) < 10  # 39 units
        async with database.session() as db:
            rows = await run_db(db, lambda s: s.execute(text("SELECT n FROM burst")).all())
        assert sorted(n for (n,) in rows) == [i for i in range(40) if i not in (7, 30)]
        assert database.connections_in_use() == 0
    finally:
        await database.dispose()


def test_the_postgresql_pre_ping_is_a_setting_on_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each pooled PostgreSQL connection is checked before use unless the host turns it off
    (``PAYMENT_DATABASE_PRE_PING=false``, see README Performance)."""
    from payments.config import get_settings
    from payments.database import get_database

    url = "postgresql+asyncpg://u:p@127.0.0.1:1/never-connected"
    monkeypatch.setenv("PAYMENT_DATABASE_URL", url)
    for value, expected in ((None, True), ("false", False), ("true", True)):
        if value is None:
            monkeypatch.delenv("PAYMENT_DATABASE_PRE_PING", raising=False)
        else:
            monkeypatch.setenv("PAYMENT_DATABASE_PRE_PING", value)
        get_settings.cache_clear()
        get_database.cache_clear()
        try:
            engine = get_database().async_engine
            assert engine is not None
            found = event.contains(engine.sync_engine, "checkout", discard_closed_on_checkout)
            assert found is expected
        finally:
            get_database.cache_clear()
            get_settings.cache_clear()


async def test_a_dead_postgresql_connection_is_replaced_before_use(database_url: str) -> None:
    """A pooled connection the server closed while it sat in the pool (a restart, here
    ``pg_terminate_backend``) is found closed when it leaves the pool, without a round trip,
    and the pool hands out a fresh one; without the check, the request fails."""
    if not database_url.startswith("postgresql"):
        pytest.skip("the check is PostgreSQL's")
    sent: list[str] = []

    def log_queries(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.driver_connection.add_query_logger(lambda q: sent.append(q.query))

    for pre_ping in (True, False):
        engine = create_engine_for(database_url, pool_size=1, pre_ping=pre_ping)
        event.listen(engine.sync_engine, "connect", log_queries)
        try:
            async with engine.connect() as connection:
                backend = await connection.scalar(text("SELECT pg_backend_pid()"))
            killer_engine = create_engine_for(database_url, pool_size=1, pre_ping=False)
            try:
                async with killer_engine.connect() as killer:
                    await killer.execute(text(f"SELECT pg_terminate_backend({backend})"))
            finally:
                await killer_engine.dispose()
            await asyncio.sleep(0.2)  # the connection sits in the pool; the server has closed it
            sent.clear()
            if pre_ping:
                async with engine.connect() as connection:
                    fresh = await connection.scalar(text("SELECT pg_backend_pid()"))
                assert fresh != backend
                # the check itself sent nothing: only the fresh connection's own transaction
                own = ("BEGIN;", "SELECT pg_backend_pid()", "ROLLBACK;")
                assert [q for q in sent if q not in own] == []
            else:
                with pytest.raises(Exception):  # noqa: B017 - the driver's "connection closed"
                    async with engine.connect() as connection:
                        await connection.scalar(text("SELECT 1"))
        finally:
            await engine.dispose()


@pytest.mark.parametrize("url", ["sqlite:///{}", "sqlite+aiosqlite:///{}"])
async def test_sqlite_connections_get_the_modules_pragmas(tmp_path: Any, url: str) -> None:
    """WAL, synchronous=NORMAL and foreign keys on every connection; and the journals of
    statements and savepoints in memory (temp_store=2): a temporary file's writes were half the
    system CPU of a burst, for journals only a rollback in this process reads."""
    database = ModuleDatabase(url.format(tmp_path / "p.db"))
    pragmas = ("journal_mode", "synchronous", "foreign_keys", "temp_store")
    try:
        async with database.session() as db:
            found = await run_db(
                db, lambda s: [s.execute(text(f"PRAGMA {name}")).scalar() for name in pragmas]
            )
    finally:
        await database.dispose()
    assert found == ["wal", 1, 1, 2]
