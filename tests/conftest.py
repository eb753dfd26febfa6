"""Shared fixtures: a clean settings environment for every test, and fresh databases.

Helpers and constants that tests import live in ``tests/support.py`` (a test never imports
this file).

PostgreSQL tests need ``PAYMENT_TEST_POSTGRES_URL`` (an admin URL such as
``postgresql://postgres@127.0.0.1:54329/postgres``; ``.ci/run`` starts a server and sets it).
Without it they are skipped, unless ``PAYMENT_REQUIRE_POSTGRES=1`` makes that a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from payments.config import get_settings
from payments.database import create_engine_for
from payments.models import Base
from tests.support import (
    KEPT_VARIABLES,
    POSTGRES_URL_VARIABLE,
    TEST_ADMIN_KEY,
    TEST_CALLBACK_TOKEN,
    PaymentApi,
    PaymentApiFactory,
    build_payment_api,
    join_failed_sqlite_workers,
    libpq_url,
    postgres_admin_url,
)

# --- settings -----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """No ``MPESA_*``/``PAYMENT_*`` variable of the developer's machine leaks into a test; the
    simulator environment needs no credentials, and logs go to a temporary folder."""
    for name in list(os.environ):
        if name.startswith(("MPESA_", "PAYMENT_")) and name not in KEPT_VARIABLES:
            monkeypatch.delenv(name)
    monkeypatch.setenv("MPESA_ENVIRONMENT", "simulator")
    monkeypatch.setenv("PAYMENT_ADMIN_API_KEY", TEST_ADMIN_KEY)
    monkeypatch.setenv("MPESA_CALLBACK_TOKEN", TEST_CALLBACK_TOKEN)
    monkeypatch.setenv("PAYMENT_LOG_DIR", str(tmp_path_factory.mktemp("logs")))
    # Tests read a log file right after the call that wrote it: lines written on the caller's
    # thread (the default writer thread is tested on its own in test_logger.py).
    monkeypatch.setenv("PAYMENT_LOG_BACKGROUND", "false")
    # An app started in the test process would freeze pytest's whole heap, once per app; the
    # default is tested in a process of its own (test_host_contract.py).
    monkeypatch.setenv("PAYMENT_GC_TUNING", "false")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


# --- databases ----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A sync-style URL (``sqlite:///…`` or ``postgresql://…``) of a fresh, empty database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/test.db"
        return

    admin_url = postgres_admin_url()
    if admin_url is None:
        pytest.skip(f"PostgreSQL tests need {POSTGRES_URL_VARIABLE}")
    admin_url = libpq_url(admin_url)
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


@pytest.fixture
async def unreachable_sessions(tmp_path: Path) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Sessions on a SQLite file in a folder that does not exist: every connection fails."""
    engine = create_engine_for(f"sqlite:///{tmp_path}/no/such/folder/payments.db")
    try:
        yield async_sessionmaker(engine, expire_on_commit=False)
    finally:
        await engine.dispose()
        join_failed_sqlite_workers()
