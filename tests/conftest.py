"""Shared fixtures: a clean settings environment for every test, and fresh databases.

PostgreSQL tests need ``PAYMENT_TEST_POSTGRES_URL`` (an admin URL such as
``postgresql://postgres@127.0.0.1:54329/postgres``; ``.ci/run`` starts a server and sets it).
Without it they are skipped, unless ``PAYMENT_REQUIRE_POSTGRES=1`` makes that a failure.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from payments.config import get_settings
from payments.database import create_engine_for
from payments.models import Base

POSTGRES_URL_VARIABLE = "PAYMENT_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_VARIABLE = "PAYMENT_REQUIRE_POSTGRES"
_KEPT_VARIABLES = {POSTGRES_URL_VARIABLE, REQUIRE_POSTGRES_VARIABLE}
#: The API is closed without a key and callbacks need a token in every environment: tests get
#: these by default, and the HTTP harness sends them unless a test says otherwise.
TEST_ADMIN_KEY = "test-admin-key-0123456789"
TEST_CALLBACK_TOKEN = "test-callback-token-0123456789"


# --- settings -----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """No ``MPESA_*``/``PAYMENT_*`` variable of the developer's machine leaks into a test; the
    simulator environment needs no credentials, and logs go to a temporary folder."""
    for name in list(os.environ):
        if name.startswith(("MPESA_", "PAYMENT_")) and name not in _KEPT_VARIABLES:
            monkeypatch.delenv(name)
    monkeypatch.setenv("MPESA_ENVIRONMENT", "simulator")
    monkeypatch.setenv("PAYMENT_ADMIN_API_KEY", TEST_ADMIN_KEY)
    monkeypatch.setenv("MPESA_CALLBACK_TOKEN", TEST_CALLBACK_TOKEN)
    monkeypatch.setenv("PAYMENT_LOG_DIR", str(tmp_path_factory.mktemp("logs")))
    # Tests read a log file right after the call that wrote it: lines written on the caller's
    # thread (the default writer thread is tested on its own in test_logger.py).
    monkeypatch.setenv("PAYMENT_LOG_BACKGROUND", "false")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


# --- databases ----------------------------------------------------------------------------------


def postgres_admin_url() -> str | None:
    """The admin URL of the test PostgreSQL server, or ``None`` when there is none (the caller
    skips; with ``PAYMENT_REQUIRE_POSTGRES=1`` a missing server fails the test instead)."""
    url = os.environ.get(POSTGRES_URL_VARIABLE, "").strip()
    if url:
        return url
    if os.environ.get(REQUIRE_POSTGRES_VARIABLE, "").strip() == "1":
        pytest.fail(f"{REQUIRE_POSTGRES_VARIABLE}=1 but {POSTGRES_URL_VARIABLE} is not set")
    return None


def _libpq_url(url: str) -> str:
    """``postgresql+driver://…`` → ``postgresql://…``, which psycopg connects to directly."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A sync-style URL (``sqlite:///…`` or ``postgresql://…``) of a fresh, empty database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/test.db"
        return

    admin_url = postgres_admin_url()
    if admin_url is None:
        pytest.skip(f"PostgreSQL tests need {POSTGRES_URL_VARIABLE}")
    admin_url = _libpq_url(admin_url)
    name = f"payments_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
async def async_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """The module's async engine on ``database_url``, with the models' tables created."""
    engine = create_engine_for(database_url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def session_factory(async_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(async_engine, expire_on_commit=False)


# --- HTTP API harness (tests/test_router.py, test_callbacks.py, test_api_fuzz.py) ---------------
# The router mounted under /api on a FastAPI app, with its own in-process simulator, service and
# database sessions, driven through httpx's ASGI transport.

from collections.abc import Awaitable, Callable  # noqa: E402
from contextlib import AsyncExitStack, asynccontextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from payments.config import load_settings  # noqa: E402
from payments.models import PaymentTransaction, PaymentWebhookLog  # noqa: E402
from payments.mpesa.client import ClientConfig, MpesaClient  # noqa: E402
from payments.router import create_payment_router  # noqa: E402
from payments.service import PaymentService  # noqa: E402
from payments.simulator.app import MpesaSimulator, SimulatorConfig  # noqa: E402
from payments.simulator.transport import SimulatorTransport  # noqa: E402


async def _no_sleep(_: float) -> None:
    return None


@dataclass
class PaymentApi:
    """One mounted router and everything behind it."""

    app: FastAPI
    http: httpx.AsyncClient
    service: PaymentService
    simulator: MpesaSimulator
    session_factory: async_sessionmaker[AsyncSession]

    async def count(self, model: type[Any] = PaymentTransaction) -> int:
        async with self.session_factory() as session:
            return int(await session.scalar(select(func.count()).select_from(model)) or 0)

    async def webhook_count(self) -> int:
        return await self.count(PaymentWebhookLog)


@asynccontextmanager
async def build_payment_api(
    session_factory: async_sessionmaker[AsyncSession],
    *,
    service_class: type[PaymentService] = PaymentService,
    client_address: tuple[str, int] = ("127.0.0.1", 123),
    router_options: dict[str, Any] | None = None,
    settings_overrides: dict[str, Any] | None = None,
) -> AsyncIterator[PaymentApi]:
    """Settings come from the environment (set it first) plus ``settings_overrides``; the
    provider is always an in-process simulator."""
    overrides: dict[str, Any] = {"mpesa_environment": "simulator", "payment_c2b_timeout": 5}
    settings = load_settings(**(overrides | (settings_overrides or {})))
    simulator = MpesaSimulator(SimulatorConfig())
    client = MpesaClient(
        ClientConfig.from_settings(settings),
        transport=SimulatorTransport(simulator),
        sleep=_no_sleep,
    )
    service = service_class(settings, client, db_retry_delays=(0.01,))

    async def get_session() -> AsyncIterator[AsyncSession]:
        async with session_factory() as session:
            yield session

    options: dict[str, Any] = {"get_session": get_session, "service": lambda: service}
    options |= router_options or {}
    app = FastAPI()
    app.include_router(create_payment_router(**options), prefix="/api")
    transport = httpx.ASGITransport(app=app, client=client_address, raise_app_exceptions=False)
    default_headers = {"X-API-Key": TEST_ADMIN_KEY, "X-Callback-Token": TEST_CALLBACK_TOKEN}
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", headers=default_headers
    ) as http:
        try:
            yield PaymentApi(app, http, service, simulator, session_factory)
        finally:
            await service.aclose()


PaymentApiFactory = Callable[..., Awaitable[PaymentApi]]


@pytest.fixture
async def payment_api_factory(
    session_factory: async_sessionmaker[AsyncSession],
) -> AsyncIterator[PaymentApiFactory]:
    """``await payment_api_factory(**build_payment_api options)``: built after the test has set
    its environment; everything is closed at teardown."""
    async with AsyncExitStack() as stack:

        async def make(**options: Any) -> PaymentApi:
            return await stack.enter_async_context(build_payment_api(session_factory, **options))

        yield make


@pytest.fixture
async def payment_api(payment_api_factory: PaymentApiFactory) -> PaymentApi:
    """The API with default settings (simulator environment; the harness sends the test admin
    key and callback token)."""
    return await payment_api_factory()


# --- an unreachable database --------------------------------------------------------------------


def join_failed_sqlite_workers() -> None:
    """aiosqlite stops the worker thread of a connection that failed to open without awaiting
    it; let those threads finish while the test's event loop is still open."""
    for thread in threading.enumerate():
        if "_connection_worker_thread" in thread.name:
            thread.join(timeout=0.5)


@pytest.fixture
async def unreachable_sessions(tmp_path: Path) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Sessions on a SQLite file in a folder that does not exist: every connection fails."""
    engine = create_engine_for(f"sqlite:///{tmp_path}/no/such/folder/payments.db")
    try:
        yield async_sessionmaker(engine, expire_on_commit=False)
    finally:
        await engine.dispose()
        join_failed_sqlite_workers()
