"""Database plumbing: URL normalisation, the module's own engine, and running ORM work from async
code on either a host's synchronous ``Session`` or an ``AsyncSession``.

Persistence functions (``repository/``) are written once against the synchronous ``Session``
API. ``run_db`` runs them on an ``AsyncSession`` through ``run_sync`` (no thread), or on a
synchronous ``Session`` in a worker thread, so blocking database work never blocks the event loop.

SQLite takes one writer at a time, and a writer that finds the file locked sleeps in SQLite's busy
handler (1, 2, 5, 10 ms and longer) while holding its pool connection. ``run_db(..., write=True)``
therefore queues the write units of one process per engine, in memory and in order, so a burst of
payments neither polls the lock nor exhausts the pool. Units of synchronous ``Session``s that
queued up while one ran go to the worker thread together and run there one after another: one
thread hop (and one wait for the GIL) per batch instead of per unit, which is what bounded a
burst of payments. The module's own sessions' units of a batch share one transaction, each in a
savepoint, with one COMMIT before any caller hears of its unit (``group_commit.py``); a host's
sessions commit each unit on its own. The queue only orders work; SQLite's own locking (and the
busy timeout, across processes) still guarantees it.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib.util
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, MetaData, QueuePool, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError, SQLAlchemyError, UnboundExecutionError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

from .exceptions import PaymentConfigurationError
from .group_commit import outcome_of, run_in_one_transaction, savepoints_on_the_driver

T = TypeVar("T")

#: What "the database failed" looks like: SQLAlchemy's errors, and the OS errors some drivers
#: (asyncpg refusing a connection, for one) raise without wrapping.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (SQLAlchemyError, OSError)
DbSession = Session | AsyncSession

_ASYNC_DRIVERS = {"aiosqlite", "asyncpg", "psycopg", "psycopg_async"}


def normalize_database_url(url: str) -> str:
    """Turn the URLs people paste into async ones: ``sqlite:///x.db`` → ``sqlite+aiosqlite``,
    ``postgres://`` / ``postgresql://`` → ``postgresql+asyncpg`` (refused, naming the
    ``[postgres]`` extra, when asyncpg is not installed). Explicit async drivers are kept."""
    raw = url.strip()
    if raw.startswith("postgres://"):
        raw = "postgresql://" + raw.removeprefix("postgres://")
    try:
        parsed = make_url(raw)
    except Exception as exc:  # sqlalchemy raises ArgumentError with the URL inside
        raise PaymentConfigurationError(
            "PAYMENT_DATABASE_URL is not a valid database URL",
            details={"variable": "PAYMENT_DATABASE_URL"},
        ) from exc
    backend, _, driver = parsed.drivername.partition("+")
    if driver in _ASYNC_DRIVERS:
        return parsed.render_as_string(hide_password=False)
    if backend == "sqlite":
        drivername = "sqlite+aiosqlite"
    elif backend == "postgresql":
        # No silent fallback to another driver: postgresql:// means asyncpg, the driver the
        # module is measured and tested with; psycopg only when the URL says +psycopg.
        if importlib.util.find_spec("asyncpg") is None:
            raise PaymentConfigurationError(
                "PAYMENT_DATABASE_URL points at PostgreSQL (postgresql://), which needs asyncpg:"
                " install the [postgres] extra (pip install 'payments[postgres]', or pip install"
                " asyncpg), or name another async driver explicitly (postgresql+psycopg://)",
                details={"variable": "PAYMENT_DATABASE_URL"},
            )
        drivername = "postgresql+asyncpg"
    else:
        raise PaymentConfigurationError(
            f"PAYMENT_DATABASE_URL: unsupported database {backend!r} (use sqlite or postgresql)",
            details={"variable": "PAYMENT_DATABASE_URL"},
        )
    return parsed.set(drivername=drivername).render_as_string(hide_password=False)


def create_engine_for(
    url: str, *, pool_size: int = 10, echo: bool = False, pre_ping: bool = True
) -> AsyncEngine:
    """An async engine for ``url`` with at most ``pool_size`` connections; SQLite gets WAL and a
    busy timeout so writers wait. ``pre_ping`` (PostgreSQL): a pooled connection the server
    closed (a restart) is replaced before use instead of failing (``discard_closed_on_checkout``;
    on another async driver SQLAlchemy's ``pool_pre_ping``, a round trip)."""
    async_url = normalize_database_url(url)
    if async_url.startswith("sqlite"):
        engine = create_async_engine(
            async_url,
            echo=echo,
            connect_args={"timeout": 30},
            pool_size=pool_size,
            max_overflow=0,
        )

        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    if make_url(async_url).drivername != "postgresql+asyncpg":
        return create_async_engine(
            async_url, echo=echo, pool_size=pool_size, max_overflow=0, pool_pre_ping=pre_ping
        )
    engine = create_async_engine(async_url, echo=echo, pool_size=pool_size, max_overflow=0)
    if pre_ping:
        event.listen(engine.sync_engine, "checkout", discard_closed_on_checkout)
    return engine


def discard_closed_on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """``pool_pre_ping`` without a round trip (asyncpg). A server that closes a connection (a
    restart, ``pg_terminate_backend``, a proxy closing idle connections) closes its socket, and
    asyncpg marks the connection closed as soon as the event loop reads that, which it does
    while the connection sits in the pool (within milliseconds). Such a connection raises
    ``DisconnectionError``: the pool discards it and checks out another, as with
    ``pool_pre_ping``. A query (SQLAlchemy's ping makes three round trips: BEGIN, the query,
    ROLLBACK) would also catch one closed in the instant before its use, at a round trip per
    unit of work (two per payment); that one fails its request instead (README Performance)."""
    if dbapi_connection.driver_connection.is_closed():
        raise DisconnectionError("the server closed the pooled connection")


def create_sync_sqlite_engine(url: str, *, pool_size: int = 10) -> Engine:
    """A synchronous SQLite engine (stdlib ``sqlite3``) with the same pragmas, for sessions that
    run in worker threads."""
    sync_url = make_url(url).set(drivername="sqlite")
    engine = create_engine(
        sync_url,
        connect_args={"timeout": 30, "check_same_thread": False},
        poolclass=QueuePool,
        pool_size=pool_size,
        max_overflow=0,
    )
    event.listen(engine, "connect", _sqlite_pragmas)
    savepoints_on_the_driver(engine)  # a savepoint per unit of a write batch (group_commit)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # The journals of statements and savepoints (one savepoint per unit of a write batch) in
    # memory rather than in a temporary file: they only serve a rollback in this process (the
    # WAL is what survives a crash), and their file writes were half the system CPU of a burst.
    cursor.execute("PRAGMA temp_store=MEMORY")
    cursor.close()


class ModuleDatabase:
    """The module's own database, from ``PAYMENT_DATABASE_URL``.

    PostgreSQL gets ``AsyncSession``s on asyncpg. SQLite gets synchronous ``Session``s whose
    work ``run_db`` runs in a worker thread: one thread hop per unit of work, where aiosqlite
    makes a dozen (measured: about 4 ms of CPU per payment against 7). An explicit
    ``sqlite+aiosqlite://`` URL keeps aiosqlite.
    """

    def __init__(self, url: str, *, pool_size: int = 10, pre_ping: bool = True) -> None:
        async_url = normalize_database_url(url)
        self.threaded = async_url.startswith("sqlite") and "+aiosqlite" not in url
        self.sync_engine: Engine | None = None
        self.async_engine: AsyncEngine | None = None
        if self.threaded:
            self.sync_engine = create_sync_sqlite_engine(url, pool_size=pool_size)
            self._sync_sessions = sessionmaker(self.sync_engine, expire_on_commit=False)
        else:
            self.async_engine = create_engine_for(url, pool_size=pool_size, pre_ping=pre_ping)
            self._async_sessions = async_sessionmaker(self.async_engine, expire_on_commit=False)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[DbSession]:
        if self.async_engine is not None:
            async with self._async_sessions() as async_session:
                yield async_session
            return
        session = self._sync_sessions(info={_RELEASE_AFTER_UNIT: True})
        try:
            yield session
        finally:
            if session.in_transaction():  # only then is there a connection to give back
                await asyncio.to_thread(session.close)
            else:
                session.close()

    async def create_all(self, metadata: MetaData) -> None:
        if self.async_engine is not None:
            async with self.async_engine.begin() as connection:
                await connection.run_sync(metadata.create_all)
        else:
            await asyncio.to_thread(metadata.create_all, self.sync_engine)

    def connections_in_use(self) -> int:
        engine = self.sync_engine or (self.async_engine.sync_engine if self.async_engine else None)
        pool = engine.pool if engine is not None else None
        return pool.checkedout() if isinstance(pool, QueuePool) else 0

    async def dispose(self) -> None:
        if self.async_engine is not None:
            await self.async_engine.dispose()
        if self.sync_engine is not None:
            self.sync_engine.dispose()


def _configured() -> tuple[str, dict[str, Any]]:
    """``PAYMENT_DATABASE_URL`` and its engine options, as the settings give them."""
    from .config import get_settings

    settings = get_settings()
    options = {
        "pool_size": settings.payment_database_pool_size,
        "pre_ping": settings.payment_database_pre_ping,
    }
    return settings.payment_database_url, options


@lru_cache(maxsize=1)
def get_database() -> ModuleDatabase:
    """The module's own database (hosts may bring their own sessions instead)."""
    url, options = _configured()
    return ModuleDatabase(url, **options)


@lru_cache(maxsize=1)
def get_engine() -> AsyncEngine:
    """An async engine on ``PAYMENT_DATABASE_URL``, for hosts and scripts that want one."""
    url, options = _configured()
    return create_engine_for(url, **options)


async def get_db() -> AsyncIterator[DbSession]:
    """FastAPI dependency: one session per request from the module's own database.

    Hosts replace it with ``app.dependency_overrides[get_db] = host_get_db`` (sync or async)."""
    async with get_database().session() as session:
        yield session


#: Opens a session for one unit of the module's own background work (a reconciliation pass):
#: ``async with sessions() as db``.
SessionSource = Callable[[], AbstractAsyncContextManager[DbSession]]


def as_session_source(factory: Callable[[], Any]) -> SessionSource:
    """Whatever a host opens sessions with, as a ``SessionSource``: an ``async_sessionmaker``,
    a synchronous ``sessionmaker`` (its sessions work in worker threads, as on the router), a
    callable returning an ``async with`` context (``ModuleDatabase.session``), or one returning a
    ``Session``/``AsyncSession``. Sessions it opened are closed after use."""

    @asynccontextmanager
    async def open_session() -> AsyncIterator[DbSession]:
        opened = await asyncio.to_thread(factory) if _blocking(factory) else factory()
        if isinstance(opened, AsyncSession):
            async with opened:
                yield opened
            return
        if isinstance(opened, Session):
            try:
                yield opened
            finally:
                await asyncio.to_thread(opened.close)
            return
        if hasattr(opened, "__aenter__"):
            async with opened as session:
                yield session
            return
        raise TypeError(
            "a session factory must return a Session, an AsyncSession or an async context"
            f" manager of one, not {type(opened).__name__}"
        )

    return open_session


def _blocking(factory: Callable[[], Any]) -> bool:
    """A synchronous ``sessionmaker`` may connect (or run hooks) when called: off the loop."""
    return isinstance(factory, sessionmaker)


async def run_db(db: DbSession, work: Callable[[Session], T], *, write: bool = False) -> T:
    """Run synchronous ORM ``work`` on either kind of session without blocking the loop.

    ``write=True`` marks a unit that writes and ends its transaction (``committing(...)``): on
    SQLite it waits for the engine's write turn first (see the module docstring)."""
    if not isinstance(db, AsyncSession | Session):
        raise TypeError(f"db must be a SQLAlchemy Session or AsyncSession, not {type(db).__name__}")
    engine = _sqlite_engine_for_write(db) if write else None
    if engine is None:
        return await _run(db, work)
    if isinstance(db, Session):
        return await _write_queue(engine).run(db, work)
    async with _write_lock(engine):  # aiosqlite: its own thread, one unit at a time
        return await _run(db, work)


async def _run(db: DbSession, work: Callable[[Session], T]) -> T:
    if isinstance(db, AsyncSession):
        return await db.run_sync(work)
    return await asyncio.to_thread(_threaded_unit, db, work)


#: ``Session.info`` flag of the module's own threaded sessions (see ``_threaded_unit``).
_RELEASE_AFTER_UNIT = "payments_release_after_unit"


def _threaded_unit(session: Session, work: Callable[[Session], T]) -> T:
    """Run one unit in a worker thread. The module's own sessions then end their transaction,
    so no connection is held between units: a session waiting for a thread to give its
    connection back, while every thread waits for a connection, would deadlock."""
    release = session.info.get(_RELEASE_AFTER_UNIT, False)
    try:
        result = work(session)
    except BaseException:
        if release and session.in_transaction():
            session.rollback()
        raise
    if release and session.in_transaction():
        session.commit()  # after a read, this only gives the connection back
    return result


class _WriteQueue:
    """The write units of one SQLite engine's synchronous sessions, in order: whatever queued up
    while a batch ran goes to the worker thread as the next batch (see the module docstring)."""

    #: Units per thread hop: bounds how long one hop keeps the others waiting.
    BATCH = 64

    def __init__(self) -> None:
        self._waiting: deque[tuple[contextvars.Context, Session, Callable[[Session], Any], Any]]
        self._waiting = deque()
        self._drainer: asyncio.Task[None] | None = None

    async def run(self, session: Session, work: Callable[[Session], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        # Each unit runs in its caller's context, as asyncio.to_thread would run it.
        self._waiting.append((contextvars.copy_context(), session, work, future))
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        return await future  # cancelled while waiting: the unit is skipped, never run

    async def _drain(self) -> None:
        batch: list[tuple[contextvars.Context, Session, Callable[[Session], Any], Any]] = []
        try:
            while self._waiting:
                batch = []
                while self._waiting and len(batch) < self.BATCH:
                    item = self._waiting.popleft()
                    if not item[3].cancelled():
                        batch.append(item)
                if not batch:
                    continue
                units = [(context, session, work) for context, session, work, _ in batch]
                outcomes = await asyncio.to_thread(_run_units, units)
                for (*_, future), (ok, value) in zip(batch, outcomes, strict=True):
                    if future.cancelled():
                        continue  # its caller is gone; the unit ran (as after a to_thread)
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
                batch = []
        finally:
            self._drainer = None
            # Only when this task itself is cancelled (the loop is closing): nobody waits forever.
            for *_, future in [*batch, *self._waiting]:
                if not future.done():
                    future.cancel()
            self._waiting.clear()


def _run_units(
    units: list[tuple[contextvars.Context, Session, Callable[[Session], Any]]],
) -> list[tuple[bool, Any]]:
    """In the worker thread: each unit on its own, its result or its exception kept for it.
    Several units of the module's own SQLite sessions share one transaction (``group_commit``)."""
    engine = _one_module_engine(units)
    if engine is not None:
        return run_in_one_transaction(engine, units, _threaded_unit)
    return [outcome_of(unit, _threaded_unit) for unit in units]


def _one_module_engine(
    units: list[tuple[contextvars.Context, Session, Callable[[Session], Any]]],
) -> Engine | None:
    """The engine of a batch that can share one transaction: two or more units, all of the
    module's own sessions (which hold no connection between units) on one SQLite engine."""
    if len(units) < 2 or not all(s.info.get(_RELEASE_AFTER_UNIT) for _, s, _ in units):
        return None
    engines = {_sqlite_engine_for_write(session) for _, session, _ in units}
    engine = engines.pop() if len(engines) == 1 else None
    return engine if engine is not None and engine.dialect.driver == "pysqlite" else None


#: Per event loop, per SQLite engine: what orders write units (see the module docstring).
_write_queues: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, weakref.WeakKeyDictionary[Engine, _WriteQueue]
] = weakref.WeakKeyDictionary()
_write_locks: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, weakref.WeakKeyDictionary[Engine, asyncio.Lock]
] = weakref.WeakKeyDictionary()


def _sqlite_engine_for_write(db: DbSession) -> Engine | None:
    """The SQLite engine whose write turn this unit waits for, or ``None``."""
    if db.in_transaction():
        # The session already holds a connection: queueing it behind other writers could leave
        # the writer in front without a connection. SQLite's busy timeout orders this one.
        return None
    try:
        bind = db.get_bind()
    except UnboundExecutionError:
        return None
    engine = bind.engine if isinstance(bind, Connection) else bind
    return engine if engine.dialect.name == "sqlite" else None


def _write_queue(engine: Engine) -> _WriteQueue:
    queues = _write_queues.setdefault(asyncio.get_running_loop(), weakref.WeakKeyDictionary())
    found = queues.get(engine)
    if found is None:
        found = queues[engine] = _WriteQueue()
    return found


def _write_lock(engine: Engine) -> asyncio.Lock:
    locks = _write_locks.setdefault(asyncio.get_running_loop(), weakref.WeakKeyDictionary())
    lock = locks.get(engine)
    if lock is None:
        lock = locks[engine] = asyncio.Lock()
    return lock


def committing(work: Callable[[Session], Any]) -> Callable[[Session], Any]:
    """``work``, then the session's commit. A session that began no transaction (in a write
    batch, the money path's statements run in the unit's savepoint, not the session's) has
    nothing to commit; ``Session.commit`` would begin one to commit it (about 40 µs)."""

    def run(session: Session) -> Any:
        try:
            result = work(session)
            if session.in_transaction():  # session.add() begins one, so pending rows count
                session.commit()
            return result
        except BaseException:
            session.rollback()
            raise

    return run
