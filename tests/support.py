"""What tests share besides fixtures: the test keys, the scripted phone numbers, the
PostgreSQL test server's URL and the HTTP API harness (the router mounted on a FastAPI app with
its own in-process simulator, driven through httpx's ASGI transport)."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from payments.config import PaymentSettings, load_settings
from payments.exceptions import PaymentError
from payments.models import PaymentTransaction, PaymentWebhookLog
from payments.mpesa.client import ClientConfig, MpesaClient
from payments.repository import PaymentRecord
from payments.router import create_payment_router
from payments.service import PaymentService
from payments.simulator.app import MpesaSimulator, SimulatorConfig
from payments.simulator.transport import SimulatorTransport

POSTGRES_URL_VARIABLE = "PAYMENT_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_VARIABLE = "PAYMENT_REQUIRE_POSTGRES"
KEPT_VARIABLES = {POSTGRES_URL_VARIABLE, REQUIRE_POSTGRES_VARIABLE}
#: The API is closed without a key and callbacks need a token in every environment: tests get
#: these by default, and the HTTP harness sends them unless a test says otherwise.
TEST_ADMIN_KEY = "test-admin-key-0123456789"
TEST_CALLBACK_TOKEN = "test-callback-token-0123456789"

# --- the simulator's scripted numbers (payments/simulator/app.py), defined once -----------------

SUCCESS = "258841234567"  # any other valid number: success (INS-0)
PAYEE = "258851234567"  # another valid number (an 85 prefix): receives a B2C payout
OTHER = "258847654321"  # another valid number: success
INTERNAL_ERROR = "258841000001"  # INS-1, yet the payment went through (recorded Completed)
CANCELS = "258841000005"  # INS-5, cancelled by the customer
PIN_TIMEOUT = "258841000009"  # INS-9 after the PIN delay; the answer carries a ConversationID
OVERLOADED = "258841000016"  # INS-16
INSUFFICIENT = "258841002006"  # INS-2006, insufficient balance
DROPPED = "258842000001"  # recorded Completed, then the connection is dropped
SLOW = "258842000002"  # recorded Completed, answered after the slow-response delay
MALFORMED = "258842000004"  # recorded Completed, answered 200 with truncated JSON


# --- the PostgreSQL test server -----------------------------------------------------------------


def postgres_admin_url() -> str | None:
    """The admin URL of the test PostgreSQL server, or ``None`` when there is none (the caller
    skips; with ``PAYMENT_REQUIRE_POSTGRES=1`` a missing server fails the test instead)."""
    url = os.environ.get(POSTGRES_URL_VARIABLE, "").strip()
    if url:
        return url
    if os.environ.get(REQUIRE_POSTGRES_VARIABLE, "").strip() == "1":
        pytest.fail(f"{REQUIRE_POSTGRES_VARIABLE}=1 but {POSTGRES_URL_VARIABLE} is not set")
    return None


def libpq_url(url: str) -> str:
    """``postgresql+driver://…`` → ``postgresql://…``, which psycopg connects to directly."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# --- HTTP API harness ---------------------------------------------------------------------------


class RecordingService(PaymentService):
    """A host's subclass: records every completed, failed and unknown hook call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[tuple[str, str, str]] = []

    async def on_payment_completed(self, transaction: PaymentRecord) -> None:
        self.events.append(("completed", transaction.transaction_id, transaction.status))

    async def on_payment_failed(
        self, transaction: PaymentRecord, error: PaymentError | None
    ) -> None:
        self.events.append(("failed", transaction.transaction_id, transaction.status))

    async def on_payment_unknown(self, transaction: PaymentRecord) -> None:
        self.events.append(("unknown", transaction.transaction_id, transaction.status))


async def no_sleep(_: float) -> None:
    """The client's backoff sleep, skipped."""
    return None


def simulated_client(
    simulator: MpesaSimulator,
    settings: PaymentSettings,
    transport: httpx.AsyncBaseTransport | None = None,
) -> MpesaClient:
    """A client on ``settings`` talking to ``simulator`` in process, without backoff waits."""
    return MpesaClient(
        ClientConfig.from_settings(settings),
        transport=transport or SimulatorTransport(simulator),
        sleep=no_sleep,
    )


async def payment_row(
    sessions: async_sessionmaker[AsyncSession], transaction_id: str
) -> PaymentTransaction:
    """The stored row of a payment, by its ``TXN-…`` id."""
    async with sessions() as session:
        return (
            await session.scalars(
                select(PaymentTransaction).where(
                    PaymentTransaction.transaction_id == transaction_id
                )
            )
        ).one()


#: Routes and the error answer's keys, as the tests of the HTTP API use them.
CALLBACK = "/api/payments/callback/c2b"
INITIATE = "/api/payments/initiate"
ERROR_KEYS = {"error_code", "message", "details"}


def c2b_body(phone: str = SUCCESS) -> dict[str, object]:
    """A C2B request body for the HTTP API."""
    return {"phone_number": phone, "amount": 100}


def error_body(response: httpx.Response, status: int) -> dict[str, Any]:
    """The error answer, checked for its status and its one shape."""
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == ERROR_KEYS, body
    return body


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
    client = simulated_client(simulator, settings)
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


def join_failed_sqlite_workers() -> None:
    """aiosqlite stops the worker thread of a connection that failed to open without awaiting
    it; let those threads finish while the test's event loop is still open."""
    for thread in threading.enumerate():
        if "_connection_worker_thread" in thread.name:
            thread.join(timeout=0.5)
