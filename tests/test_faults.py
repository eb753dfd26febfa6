"""Fault tests with real processes: crashes, lost and ambiguous answers, a failing database,
concurrent duplicates across gateway processes, late results and lost reversal answers.

The provider is ``python -m payments simulator`` on a free loopback port (one process for the
module, reset and reconfigured through its control endpoints before each test), and the gateways
are ``python -m payments serve`` subprocesses where the fault needs one (a SIGKILL, a database
dropped under a running process, several processes over one PostgreSQL). Each subprocess gets an
explicit environment, every wait is bounded, and every process is terminated (then killed) in a
``finally`` or fixture teardown. Only the hook and ordering tests use an in-process simulator,
where the test has to hold an answer in transit or count hook calls.

What is asserted throughout is the module's money-safety contract: the intent row exists before
the provider is called, ambiguous answers leave payments ``unknown`` (never ``failed``), only a
status query settles them, nothing is sent twice, and a settled payment is never demoted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from psycopg import sql
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from payments.config import get_settings
from payments.database import create_engine_for
from payments.exceptions import PaymentOutcomeUnknownError, PaymentValidationError
from payments.logger import payment_logger, shutdown_logging
from payments.models import (
    AuditAction,
    Base,
    PaymentAuditLog,
    PaymentStatus,
    PaymentTransaction,
    utcnow,
)
from payments.mpesa.client import MpesaClient
from payments.outcomes import Outcome
from payments.reconciliation import reconcile_once
from payments.repository import PaymentRecord
from payments.router import create_payment_router
from payments.schemas import PaymentInitiateRequest, ReversalRequest
from payments.service import PaymentService
from payments.simulator.app import MpesaSimulator, SimulatorConfig
from payments.simulator.transport import SimulatorTransport
from tests.support import DROPPED as DROP
from tests.support import INTERNAL_ERROR as INS_1
from tests.support import (
    MALFORMED,
    SLOW,
    TEST_ADMIN_KEY,
    TEST_CALLBACK_TOKEN,
    PaymentApiFactory,
    postgres_admin_url,
)
from tests.support import OVERLOADED as INS_16
from tests.support import SUCCESS as CUSTOMER

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 30.0  # seconds for a subprocess to answer HTTP
SLOW_RESPONSE_SECONDS = 2.0  # the simulator's delay for the slow number
C2B_TIMEOUT = "0.5"  # the client's C2B read timeout in the read-timeout scenario
ADMIN_KEY = "faults-admin-key-0123456789"
CALLBACK_TOKEN = "faults-callback-token-0123456789"

HTML_502 = "258842000003"  # recorded Completed, answered with an HTML 502

T = TypeVar("T")


# --- processes ----------------------------------------------------------------------------------


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child_env(**variables: str) -> dict[str, str]:
    """The test runner's environment without any ``MPESA_*``/``PAYMENT_*`` variable, plus
    ``variables``: a child process sees exactly the configuration the test gives it."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("MPESA_", "PAYMENT_"))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(variables)
    return env


@dataclass
class Child:
    """One ``python -m payments …`` subprocess answering HTTP on ``base_url``."""

    name: str
    process: subprocess.Popen[bytes]
    base_url: str
    output: Path

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def stop(self) -> None:
        """Terminate, then kill; never leaves the process behind."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def sigkill(self) -> None:
        self.process.kill()  # SIGKILL: no shutdown, no cleanup, no flushing
        self.process.wait(timeout=10)


def spawn(name: str, args: list[str], env: dict[str, str], work: Path) -> Child:
    port = free_loopback_port()
    work.mkdir(parents=True, exist_ok=True)
    output = work / f"{name}-{port}.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "payments", *args, "--host", "127.0.0.1", "--port", str(port)],
            cwd=work,  # not the repository: no stray .env, payments.db or logs/ there
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    return Child(name, process, f"http://127.0.0.1:{port}", output)


def wait_ready_sync(child: Child, path: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if child.process.poll() is not None:
            pytest.fail(f"{child.name} exited with {child.process.returncode}:\n{child.text()}")
        try:
            if httpx.get(child.base_url + path, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{child.name} did not answer within {STARTUP_TIMEOUT} s:\n{child.text()}")
        time.sleep(0.1)


async def wait_ready(child: Child, path: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    async with httpx.AsyncClient(timeout=1) as http:
        while True:
            if child.process.poll() is not None:
                pytest.fail(f"{child.name} exited with {child.process.returncode}:\n{child.text()}")
            try:
                if (await http.get(child.base_url + path)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{child.name} did not answer within {STARTUP_TIMEOUT} s:\n{child.text()}"
                )
            await asyncio.sleep(0.1)


async def eventually(check: Callable[[], Awaitable[T | None]], *, timeout: float, what: str) -> T:
    """Poll ``check`` until it returns something other than None (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


# --- the simulator ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveSimulator:
    """Control of the simulator process through its ``/simulator/*`` endpoints."""

    base_url: str

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=10) as http:
            response = await http.request(method, path, **kwargs)
        response.raise_for_status()
        return response.json()

    async def reset(self) -> None:
        await self._request("POST", "/simulator/reset")

    async def configure(self, *, pin_delay: float = 0.0, slow_response: float = 300.0) -> None:
        await self._request(
            "PUT",
            "/simulator/config",
            json={"pin_delay_seconds": pin_delay, "slow_response_seconds": slow_response},
        )

    async def calls(self) -> dict[str, int]:
        stats = await self._request("GET", "/simulator/stats")
        calls: dict[str, int] = stats["calls"]
        return calls

    async def transactions(self) -> list[dict[str, Any]]:
        transactions: list[dict[str, Any]] = await self._request("GET", "/simulator/transactions")
        return transactions

    async def recorded(self, third_party_reference: str) -> list[dict[str, Any]]:
        return [
            t
            for t in await self.transactions()
            if t["third_party_reference"] == third_party_reference
        ]


@pytest.fixture(scope="module")
def simulator_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    """``python -m payments simulator`` for the whole module (reset before every test)."""
    work = tmp_path_factory.mktemp("fault-simulator")
    env = child_env(MPESA_ENVIRONMENT="simulator", PAYMENT_LOG_DIR=str(work / "logs"))
    child = spawn(
        "simulator", ["simulator", "--slow-response", str(SLOW_RESPONSE_SECONDS)], env, work
    )
    try:
        wait_ready_sync(child, "/simulator/public-key")
        yield child
    finally:
        child.stop()


@pytest.fixture
async def simulator(simulator_process: Child) -> LiveSimulator:
    """The simulator process, forgotten everything, no PIN delay, the slow number at 2 s."""
    if simulator_process.process.poll() is not None:
        pytest.fail(f"the simulator process died:\n{simulator_process.text()}")
    live = LiveSimulator(simulator_process.base_url)
    await live.reset()
    await live.configure(pin_delay=0.0, slow_response=SLOW_RESPONSE_SECONDS)
    return live


# --- gateways -----------------------------------------------------------------------------------


@dataclass
class Gateways:
    """Starts ``python -m payments serve`` processes; the fixture stops all of them."""

    work: Path
    simulator_url: str
    children: list[Child] = field(default_factory=list)

    def env(self, database_url: str, **overrides: str) -> dict[str, str]:
        return child_env(
            MPESA_ENVIRONMENT="simulator",
            MPESA_BASE_URL=self.simulator_url,
            PAYMENT_DATABASE_URL=database_url,
            PAYMENT_ADMIN_API_KEY=ADMIN_KEY,
            PAYMENT_RECONCILE_IN_APP="false",
            PAYMENT_LOG_DIR=str(self.work / "logs"),
            **overrides,
        )

    async def start(self, database_url: str, count: int = 1, **overrides: str) -> list[Child]:
        started = [
            spawn(
                f"gateway{len(self.children) + i}",
                ["serve"],
                self.env(database_url, **overrides),
                self.work,
            )
            for i in range(count)
        ]
        self.children.extend(started)
        await asyncio.gather(*(wait_ready(child, "/api/payments/health") for child in started))
        return started

    async def reconcile(self, database_url: str, *args: str, **overrides: str) -> str:
        """``python -m payments reconcile ARGS`` with a gateway's environment; its output."""
        completed = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "payments", "reconcile", *args],
            cwd=self.work,
            env=self.env(database_url, **overrides),
            capture_output=True,
            timeout=60,
        )
        output = (completed.stdout + completed.stderr).decode(errors="replace")
        assert completed.returncode == 0, output
        return output

    def stop_all(self) -> None:
        for child in self.children:
            child.stop()


@pytest.fixture
def gateways(tmp_path: Path, simulator: LiveSimulator) -> Iterator[Gateways]:
    started = Gateways(tmp_path / "gateways", simulator.base_url)
    try:
        yield started
    finally:
        started.stop_all()


# --- databases ----------------------------------------------------------------------------------


@asynccontextmanager
async def open_db(
    url: str, *, create: bool = False
) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine_for(url, pool_size=2)
    try:
        if create:
            async with engine.begin() as connection:
                await connection.run_sync(Base.metadata.create_all)
        yield async_sessionmaker(engine, expire_on_commit=False)
    finally:
        await engine.dispose()


async def all_payments(sessions: async_sessionmaker[AsyncSession]) -> list[PaymentRecord]:
    async with sessions() as session:
        rows = await session.scalars(select(PaymentTransaction).order_by(PaymentTransaction.id))
        return [PaymentRecord.of(row) for row in rows]


async def payment(sessions: async_sessionmaker[AsyncSession], transaction_id: str) -> PaymentRecord:
    found = [p for p in await all_payments(sessions) if p.transaction_id == transaction_id]
    assert len(found) == 1, transaction_id
    return found[0]


async def audit_entries(
    sessions: async_sessionmaker[AsyncSession], record: PaymentRecord
) -> list[PaymentAuditLog]:
    async with sessions() as session:
        rows = await session.scalars(
            select(PaymentAuditLog)
            .where(PaymentAuditLog.payment_id == record.id)
            .order_by(PaymentAuditLog.id)
        )
        return list(rows)


async def audit_actions(
    sessions: async_sessionmaker[AsyncSession], record: PaymentRecord
) -> list[str]:
    return [entry.action for entry in await audit_entries(sessions, record)]


# --- in-process API over a real provider --------------------------------------------------------


def settings_for_simulator(
    monkeypatch: pytest.MonkeyPatch, simulator: LiveSimulator, **variables: str
) -> None:
    """Configure this process from the environment only, as a host would."""
    monkeypatch.setenv("MPESA_ENVIRONMENT", "simulator")
    monkeypatch.setenv("MPESA_BASE_URL", simulator.base_url)
    monkeypatch.setenv("PAYMENT_RETRY_BACKOFF_BASE", "0.01")
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()


@asynccontextmanager
async def api_over(
    service: PaymentService, sessions: async_sessionmaker[AsyncSession]
) -> AsyncIterator[httpx.AsyncClient]:
    """The router under /api in this process, with ``service`` and ``sessions`` behind it."""

    async def get_session() -> AsyncIterator[AsyncSession]:
        async with sessions() as session:
            yield session

    app = FastAPI()
    app.include_router(
        create_payment_router(get_session=get_session, service=lambda: service), prefix="/api"
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    # The API is closed without a key in every environment: send the tests' key and token.
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://gateway",
        timeout=30,
        headers={"X-API-Key": TEST_ADMIN_KEY, "X-Callback-Token": TEST_CALLBACK_TOKEN},
    ) as http:
        yield http


def initiate_body(phone: str, amount: str = "100.00", **extra: Any) -> dict[str, Any]:
    return {"phone_number": phone, "amount": amount, **extra}


def assert_error_shape(body: Any, error_code: str) -> None:
    assert isinstance(body, dict), body
    assert set(body) == {"error_code", "message", "details"}, body
    assert body["error_code"] == error_code
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["details"], dict)


# === 1. SIGKILL mid-C2B ===========================================================================


async def test_gateway_sigkilled_while_waiting_for_the_pin_loses_nothing(
    simulator: LiveSimulator, gateways: Gateways, database_url: str
) -> None:
    pin_delay = 3.0
    await simulator.configure(pin_delay=pin_delay)
    # The C2B call's window (its read timeout plus connect attempts): until it has passed, the
    # gateway's own call could still be answered, so no query may settle the payment.
    window = {
        "PAYMENT_C2B_TIMEOUT": "10",
        "PAYMENT_CONNECT_TIMEOUT": "0.5",
        "PAYMENT_RETRY_BACKOFF_MAX": "0.1",
    }
    window_seconds = 10 + 3 * (0.5 + 0.1)
    (gateway,) = await gateways.start(database_url, **window)

    async with httpx.AsyncClient(timeout=30) as http:
        request = asyncio.create_task(
            http.post(
                f"{gateway.base_url}/api/payments/initiate",
                json=initiate_body(CUSTOMER, "150.00", account_reference="ORDER42"),
                headers={"X-API-Key": ADMIN_KEY, "Idempotency-Key": f"kill-{uuid.uuid4().hex}"},
            )
        )
        try:

            async def c2b_arrived() -> bool | None:
                return True if (await simulator.calls())["c2b"] >= 1 else None

            await eventually(c2b_arrived, timeout=15, what="the C2B call at the simulator")
            gateway.sigkill()
            with pytest.raises(httpx.TransportError):
                await asyncio.wait_for(request, timeout=10)
        finally:
            if not request.done():
                request.cancel()
            await asyncio.gather(request, return_exceptions=True)

    async with open_db(database_url) as sessions:
        (killed,) = await all_payments(sessions)
        # Rule 1: the intent was committed before the provider was called.
        assert killed.status == PaymentStatus.PROCESSING
        assert killed.operation == "c2b"
        assert killed.amount == Decimal("150.00")
        reference = killed.third_party_reference

        async def provider_completed() -> dict[str, Any] | None:
            found = await simulator.recorded(reference)
            return found[0] if found and found[0]["status"] == "Completed" else None

        # The customer enters the PIN after the gateway died: the money moves anyway.
        recorded = await eventually(
            provider_completed, timeout=pin_delay + 10, what="the simulator to record the payment"
        )
        assert recorded["amount"] == "150.00"

        early = await gateways.reconcile(database_url, "--min-age", "0", **window)
        assert "examined=0" in early, early  # whatever --min-age says
        wait = killed.created_at + timedelta(seconds=window_seconds + 0.5) - utcnow()
        await asyncio.sleep(max(0.0, wait.total_seconds()))
        output = await gateways.reconcile(database_url, "--min-age", "0", **window)
        assert "settled=1" in output, output

        settled = await payment(sessions, killed.transaction_id)
        assert settled.status == PaymentStatus.COMPLETED
        assert settled.completed_at is not None
        entries = await audit_entries(sessions, settled)
        reconciled = [e for e in entries if e.action == AuditAction.RECONCILED]
        assert len(reconciled) == 1
        assert (reconciled[0].status_before, reconciled[0].status_after) == (
            "processing",
            "completed",
        )
        assert reconciled[0].actor == "reconciler"
        assert len(await all_payments(sessions)) == 1

    # Charged exactly once: one C2B call, one recorded transaction for the reference.
    assert (await simulator.calls())["c2b"] == 1
    assert len(await simulator.recorded(reference)) == 1
    assert len(await simulator.transactions()) == 1


# === 2. ambiguous answers over the real network ==================================================

AMBIGUOUS_CASES: dict[str, str] = {
    "dropped connection": DROP,
    "read timeout": SLOW,
    "HTML 502": HTML_502,
    "INS-1": INS_1,
    "INS-16": INS_16,
    "malformed JSON": MALFORMED,
}


async def test_ambiguous_answers_end_unknown_and_reconcile_to_the_providers_truth(
    simulator: LiveSimulator,
    monkeypatch: pytest.MonkeyPatch,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    settings_for_simulator(monkeypatch, simulator, PAYMENT_C2B_TIMEOUT=C2B_TIMEOUT)
    service = PaymentService(get_settings(), db_retry_delays=(0.01,))
    try:
        async with api_over(service, session_factory) as api:
            ids: dict[str, str] = {}
            for case, msisdn in AMBIGUOUS_CASES.items():
                started = time.monotonic()
                response = await api.post(
                    "/api/payments/initiate", json=initiate_body(msisdn, "42.00")
                )
                elapsed = time.monotonic() - started
                # Accepted, not failed: 202 with the payment, whose outcome is unknown.
                assert response.status_code == 202, (case, response.text)
                body = response.json()
                assert body["status"] == "unknown", (case, body)
                assert body["success"] is False
                ids[case] = body["transaction_id"]
                if case == "read timeout":
                    assert elapsed < SLOW_RESPONSE_SECONDS, elapsed

            # One provider call each: a money-moving call is never repeated on an ambiguity.
            assert (await simulator.calls())["c2b"] == len(AMBIGUOUS_CASES)
            for case, transaction_id in ids.items():
                record = await payment(session_factory, transaction_id)
                assert record.status == PaymentStatus.UNKNOWN, case
                assert record.completed_at is None, case

            report = await reconcile_once(service, session_factory, min_age=0, attention_after=0)
            assert (report.examined, report.settled, report.unresolved, report.flagged) == (
                6,
                5,
                1,
                1,
            ), str(report)
            assert report.errors == 0

            for case, transaction_id in ids.items():
                record = await payment(session_factory, transaction_id)
                actions = await audit_actions(session_factory, record)
                if case == "INS-16":
                    # Not recorded by the provider: no evidence either way, so never failed.
                    assert record.status == PaymentStatus.UNKNOWN
                    assert record.attention_required is True
                    assert AuditAction.ATTENTION_REQUIRED in actions
                    assert AuditAction.RECONCILED not in actions
                else:
                    assert record.status == PaymentStatus.COMPLETED, case
                    assert record.attention_required is False, case
                    assert AuditAction.RECONCILED in actions, case
                    assert AuditAction.ATTENTION_REQUIRED not in actions, case

            flagged = await api.get("/api/payments/", params={"attention_required": "true"})
            assert flagged.status_code == 200, flagged.text
            assert [item["transaction_id"] for item in flagged.json()["items"]] == [ids["INS-16"]]
            summary = await api.get("/api/payments/summary")
            assert summary.status_code == 200, summary.text
            assert summary.json()["attention_required"] == 1
            assert summary.json()["by_status"]["completed"]["count"] == 5
            assert summary.json()["by_status"]["unknown"]["count"] == 1

            # Reconciliation asked, it never re-sent the payment.
            calls = await simulator.calls()
            assert calls["c2b"] == len(AMBIGUOUS_CASES)
            assert calls["query_status"] >= len(AMBIGUOUS_CASES)
            recorded = await simulator.transactions()
            assert len(recorded) == 5
            assert all(t["status"] == "Completed" for t in recorded)
    finally:
        await service.aclose()


# === 3. the database unavailable =================================================================


def _unusable_sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/no/such/directory/payments.db"


def _closed_postgres_port(tmp_path: Path) -> str:
    return f"postgresql://postgres@127.0.0.1:{free_loopback_port()}/payments"


@pytest.mark.parametrize(
    "unusable_url",
    [
        pytest.param(_unusable_sqlite, id="sqlite-missing-directory"),
        pytest.param(
            _closed_postgres_port,
            id="postgresql-nothing-listening",
        ),
    ],
)
async def test_database_unavailable_before_the_intent_sends_nothing(
    simulator: LiveSimulator,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    unusable_url: Callable[[Path], str],
) -> None:
    settings_for_simulator(monkeypatch, simulator)
    service = PaymentService(get_settings(), db_retry_delays=(0.01,))
    try:
        async with open_db(unusable_url(tmp_path)) as sessions, api_over(service, sessions) as api:
            response = await api.post(
                "/api/payments/initiate",
                json=initiate_body(CUSTOMER),
                headers={"Idempotency-Key": f"down-{uuid.uuid4().hex}"},
            )
            assert response.status_code == 503, response.text
            assert_error_shape(response.json(), "storage_unavailable")
            assert "nothing was sent" in response.json()["message"]
    finally:
        await service.aclose()
    assert (await simulator.calls())["c2b"] == 0
    assert await simulator.transactions() == []


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_gateway_whose_database_disappears_answers_503_and_sends_nothing(
    simulator: LiveSimulator, gateways: Gateways, database_url: str
) -> None:
    """A running gateway process loses its PostgreSQL database (dropped, connections killed)."""
    (gateway,) = await gateways.start(database_url)
    admin_url = postgres_admin_url()
    assert admin_url is not None
    name = make_url(database_url).database
    assert name
    with psycopg.connect(
        make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False),
        autocommit=True,
    ) as admin:
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))

    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
        response = await http.post(
            "/api/payments/initiate",
            json=initiate_body(CUSTOMER),
            headers={"X-API-Key": ADMIN_KEY, "Idempotency-Key": f"gone-{uuid.uuid4().hex}"},
        )
        assert response.status_code == 503, response.text
        assert_error_shape(response.json(), "storage_unavailable")
        health = await http.get("/api/payments/health")
        assert health.status_code == 503
        assert health.json()["status"] == "degraded"
    assert gateway.process.poll() is None  # degraded, not dead
    assert (await simulator.calls())["c2b"] == 0


class RefusedOutcomes:
    """A database that refuses every write of an outcome (a trigger fails each UPDATE of a
    payment) while still taking new payments: like a database that goes away between the intent
    and the outcome. The failed attempts are counted by the sessions' rollbacks."""

    _SQL = {
        "postgresql": (
            "CREATE FUNCTION refuse_outcome() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " RAISE EXCEPTION 'disk I/O error (injected by the test)' USING ERRCODE = '58030';"
            " END $$",
            "CREATE TRIGGER refuse_outcome BEFORE UPDATE ON payment_transactions"
            " FOR EACH ROW EXECUTE FUNCTION refuse_outcome()",
        ),
        "sqlite": (
            "CREATE TRIGGER refuse_outcome BEFORE UPDATE ON payment_transactions"
            " BEGIN SELECT RAISE(ABORT, 'disk I/O error (injected by the test)'); END",
        ),
    }
    _UNDO = {
        "postgresql": (
            "DROP TRIGGER refuse_outcome ON payment_transactions",
            "DROP FUNCTION refuse_outcome()",
        ),
        "sqlite": ("DROP TRIGGER refuse_outcome",),
    }

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.failed = 0

    async def _run(self, statements: tuple[str, ...]) -> None:
        async with self.engine.begin() as connection:
            for statement in statements:
                await connection.exec_driver_sql(statement)

    async def start(self) -> None:
        await self._run(self._SQL[self.engine.dialect.name])

    async def stop(self) -> None:
        await self._run(self._UNDO[self.engine.dialect.name])

    def session_class(self) -> type[Session]:
        faults = self

        class CountingSession(Session):
            def rollback(self) -> None:
                faults.failed += 1
                super().rollback()

        return CountingSession


@pytest.fixture
def payment_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh PAYMENT_LOG_DIR: logging reconfigures itself from the settings on next use."""
    log_dir = tmp_path / "payment-logs"
    monkeypatch.setenv("PAYMENT_LOG_DIR", str(log_dir))
    get_settings.cache_clear()
    shutdown_logging()
    yield log_dir
    shutdown_logging()


async def test_database_failing_after_the_provider_answered_is_reported_and_reconciled(
    simulator: LiveSimulator,
    monkeypatch: pytest.MonkeyPatch,
    session_factory: async_sessionmaker[AsyncSession],
    payment_logs: Path,
) -> None:
    # A short call window: a query may settle the payment only once its own call is over.
    settings_for_simulator(
        monkeypatch,
        simulator,
        PAYMENT_C2B_TIMEOUT="1",
        PAYMENT_CONNECT_TIMEOUT="0.2",
        PAYMENT_RETRY_BACKOFF_MAX="0.05",
    )
    service = PaymentService(get_settings(), db_retry_delays=(0.01, 0.01))
    engine = session_factory.kw["bind"]
    faults = RefusedOutcomes(engine)  # the intent is written; the outcome is not
    counted = async_sessionmaker(
        engine, expire_on_commit=False, sync_session_class=faults.session_class()
    )
    await faults.start()
    try:
        async with api_over(service, counted) as api:
            response = await api.post("/api/payments/initiate", json=initiate_body(CUSTOMER))
        await faults.stop()
        # M-Pesa may have the money: accepted with the recorded payment, not a retryable 503
        # (a client retrying without an idempotency key would charge twice).
        assert response.status_code == 202, response.text
        body = response.json()
        assert body["status"] == "processing"
        assert body["success"] is False
        transaction_id = body["transaction_id"]
        assert faults.failed == 3  # the first try and both retries

        for handler in payment_logger.logger.handlers:
            handler.flush()
        logs = "\n".join(p.read_text(encoding="utf-8") for p in sorted(payment_logs.iterdir()))
        not_recorded = [line for line in logs.splitlines() if "NOT recorded" in line]
        assert len(not_recorded) == 1, logs
        assert transaction_id in not_recorded[0]
        assert "outcome=completed" in not_recorded[0]
        # The line is the last place M-Pesa's answer survives: it carries the receipt and IDs.
        (answered,) = await simulator.recorded(body["third_party_reference"])
        assert f"mpesa_receipt={answered['transaction_id']}" in not_recorded[0]
        assert f"conversation_id={answered['conversation_id']}" in not_recorded[0]
        assert f"third_party_reference={body['third_party_reference']}" in not_recorded[0]

        # Nothing half-written: the row is still the intent; M-Pesa has the money.
        stuck = await payment(session_factory, transaction_id)
        assert stuck.status == PaymentStatus.PROCESSING
        assert stuck.provider_transaction_id is None
        (recorded,) = await simulator.recorded(stuck.third_party_reference)
        assert recorded["status"] == "Completed"

        wait = service.in_flight_until(stuck) - utcnow()
        await asyncio.sleep(max(0.0, wait.total_seconds()) + 0.1)
        report = await reconcile_once(service, session_factory, min_age=0)
        assert report.settled_ids == [transaction_id], str(report)
        settled = await payment(session_factory, transaction_id)
        assert settled.status == PaymentStatus.COMPLETED
        assert AuditAction.RECONCILED in await audit_actions(session_factory, settled)
        assert (await simulator.calls())["c2b"] == 1
    finally:
        await service.aclose()


# === 4. one idempotency key, 200 concurrent requests, three gateway processes ====================


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_200_concurrent_duplicates_across_three_gateways_make_one_provider_call(
    simulator: LiveSimulator, gateways: Gateways, database_url: str
) -> None:
    await simulator.configure(pin_delay=1.0)
    # Create the tables once, so three starting gateways do not race on CREATE TABLE.
    async with open_db(database_url, create=True):
        pass
    started = await gateways.start(database_url, count=3)

    key = f"dup-{uuid.uuid4().hex}"
    body = initiate_body(CUSTOMER, "75.00", account_reference="CART7")
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:

        async def post(i: int) -> httpx.Response:
            return await http.post(
                f"{started[i % len(started)].base_url}/api/payments/initiate",
                json=body,
                headers={"X-API-Key": ADMIN_KEY, "Idempotency-Key": key},
            )

        responses = await asyncio.wait_for(
            asyncio.gather(*(post(i) for i in range(200))), timeout=60
        )

    statuses = sorted({r.status_code for r in responses})
    assert set(statuses) <= {200, 202}, [(r.status_code, r.text) for r in responses[:5]]
    bodies = [r.json() for r in responses]
    assert len({b["transaction_id"] for b in bodies}) == 1
    assert {b["status"] for b in bodies} <= {"processing", "completed"}
    assert any(b["status"] == "completed" for b in bodies)  # the one that made the call
    transaction_id = bodies[0]["transaction_id"]

    calls = await simulator.calls()
    assert calls["c2b"] == 1, calls
    (recorded,) = await simulator.transactions()
    assert recorded["third_party_reference"] == bodies[0]["third_party_reference"]

    async with open_db(database_url) as sessions:
        (only,) = await all_payments(sessions)
        assert only.transaction_id == transaction_id
        assert only.status == PaymentStatus.COMPLETED
        assert only.idempotency_key == key


class HoldAnswers(httpx.AsyncBaseTransport):
    """In front of another transport: the answers to requests whose path ends with ``suffix``
    are held (the provider already processed them) until the test sets ``release``. Makes
    "the answer is still in transit" deterministic."""

    def __init__(self, inner: httpx.AsyncBaseTransport, suffix: str) -> None:
        self.inner = inner
        self.suffix = suffix
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path.endswith(self.suffix):
            self.arrived.set()
            await asyncio.wait_for(self.release.wait(), timeout=30)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def held_c2b_service(
    service_class: type[PaymentService] = PaymentService,
) -> tuple[PaymentService, MpesaSimulator, HoldAnswers]:
    """A service over an in-process simulator whose C2B answers wait for the test."""
    settings = get_settings()
    simulator = MpesaSimulator(SimulatorConfig())
    held = HoldAnswers(SimulatorTransport(simulator), "/c2bPayment/singleStage/")
    client = MpesaClient.from_settings(settings, transport=held)
    return service_class(settings, client, db_retry_delays=(0.01,)), simulator, held


async def test_duplicate_while_the_original_is_in_flight_is_not_200(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    service, simulator, held = held_c2b_service()
    request = initiate_body(CUSTOMER, "30.00")
    headers = {"Idempotency-Key": f"inflight-{uuid.uuid4().hex}"}
    try:
        async with api_over(service, session_factory) as api:
            first = asyncio.create_task(
                api.post("/api/payments/initiate", json=request, headers=headers)
            )
            try:
                await asyncio.wait_for(held.arrived.wait(), timeout=10)
                duplicate = await api.post("/api/payments/initiate", json=request, headers=headers)
            finally:
                held.release.set()
                original = await asyncio.wait_for(first, timeout=10)
    finally:
        await service.aclose()
    assert original.status_code == 200 and original.json()["status"] == "completed"
    assert duplicate.json()["transaction_id"] == original.json()["transaction_id"]
    assert duplicate.json()["status"] == "processing"
    assert simulator.stats()["calls"]["c2b"] == 1
    assert duplicate.status_code == 202


# === 5. duplicate and out-of-order results =======================================================


class HookRecorder(PaymentService):
    """Records every hook call, to check each transition fires once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.completed: list[str] = []
        self.failed: list[str] = []
        self.unknown: list[str] = []

    async def on_payment_completed(self, transaction: PaymentRecord) -> None:
        self.completed.append(transaction.transaction_id)

    async def on_payment_failed(self, transaction: PaymentRecord, error: Any) -> None:
        self.failed.append(transaction.transaction_id)

    async def on_payment_unknown(self, transaction: PaymentRecord) -> None:
        self.unknown.append(transaction.transaction_id)


def callback_body(record: dict[str, Any], code: str, description: str) -> dict[str, str]:
    return {
        "input_OriginalConversationID": record["conversation_id"] or "",
        "input_ThirdPartyReference": record["third_party_reference"],
        "input_TransactionID": record["provider_transaction_id"] or "",
        "input_ResultCode": code,
        "input_ResultDesc": description,
    }


async def test_late_and_duplicate_results_never_demote_a_completed_payment(
    monkeypatch: pytest.MonkeyPatch,
    payment_api_factory: PaymentApiFactory,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    monkeypatch.setenv("MPESA_CALLBACK_TOKEN", CALLBACK_TOKEN)
    api = await payment_api_factory(service_class=HookRecorder)
    service = api.service
    assert isinstance(service, HookRecorder)

    response = await api.http.post("/api/payments/initiate", json=initiate_body(CUSTOMER))
    assert response.status_code == 200, response.text
    paid = response.json()
    assert paid["status"] == "completed"
    transaction_id = paid["transaction_id"]
    assert service.completed == [transaction_id]

    headers = {"X-Callback-Token": CALLBACK_TOKEN}
    for code, description in (
        ("INS-5", "Transaction cancelled by customer"),  # late and contradicting
        ("INS-0", "Request processed successfully"),  # duplicate success
        ("INS-5", "Transaction cancelled by customer"),  # redelivered
    ):
        answer = await api.http.post(
            "/api/payments/callback/c2b",
            json=callback_body(paid, code, description),
            headers=headers,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["output_ResponseCode"] == "0"

    # A reconciler that claimed the payment while it was processing answers late, with a
    # contradicting result: applied through a stale snapshot, it must change nothing.
    current = await payment(session_factory, transaction_id)
    stale = dataclasses.replace(current, status=PaymentStatus.PROCESSING.value)
    async with session_factory() as db:
        updated, changed = await service.apply_outcome(
            db,
            stale,
            Outcome(PaymentStatus.CANCELLED, "late cancellation", response_code="INS-5"),
            actor="reconciler",
        )
    assert (updated.status, changed) == (PaymentStatus.COMPLETED, False)

    report = await reconcile_once(service, session_factory, min_age=0, attention_after=0)
    assert report.examined == 0, str(report)

    final = await payment(session_factory, transaction_id)
    assert final.status == PaymentStatus.COMPLETED
    assert final.response_code == "INS-0"
    assert final.attention_required is False
    assert service.completed == [transaction_id]  # fired once
    assert service.failed == [] and service.unknown == []
    assert api.simulator.stats()["calls"]["c2b"] == 1

    actions = await audit_actions(session_factory, final)
    assert actions.count(AuditAction.COMPLETED) == 1
    assert actions.count(AuditAction.CALLBACK_RECEIVED) == 3
    webhooks = await api.http.get("/api/payments/webhooks")
    assert webhooks.status_code == 200
    assert webhooks.json()["total"] == 3
    assert all(item["is_processed"] for item in webhooks.json()["items"])


async def test_cancellation_notice_overtaken_by_a_success_is_not_silently_lost(
    monkeypatch: pytest.MonkeyPatch, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    monkeypatch.setenv("MPESA_CALLBACK_TOKEN", CALLBACK_TOKEN)
    get_settings.cache_clear()
    service, simulator, held = held_c2b_service(HookRecorder)
    assert isinstance(service, HookRecorder)
    try:
        async with api_over(service, session_factory) as api:
            first = asyncio.create_task(
                api.post("/api/payments/initiate", json=initiate_body(CUSTOMER, "60.00"))
            )
            try:
                await asyncio.wait_for(held.arrived.wait(), timeout=10)
                (pending,) = await all_payments(session_factory)
                # The notice arrives while M-Pesa's answer (INS-0) is still in transit.
                notice = await api.post(
                    "/api/payments/callback/c2b",
                    json={
                        "input_ThirdPartyReference": pending.third_party_reference,
                        "input_ResultCode": "INS-5",
                        "input_ResultDesc": "Transaction cancelled by customer",
                    },
                    headers={"X-Callback-Token": CALLBACK_TOKEN},
                )
            finally:
                held.release.set()
                answer = await asyncio.wait_for(first, timeout=10)
    finally:
        await service.aclose()
    # The payment's own call may still be answered: no status answer settles it yet, so the
    # notice is not acknowledged (the sender delivers it again), and the call's INS-0 settles it.
    assert notice.status_code == 500, notice.text
    assert answer.status_code == 200, answer.text
    (recorded,) = simulator.transactions()  # M-Pesa took the money
    assert recorded.status == "Completed"
    final = await payment(session_factory, pending.transaction_id)
    assert final.status == PaymentStatus.COMPLETED, (
        answer.status_code,
        final.status,
        service.completed,
        service.failed,
    )


# === 6. a reversal whose answer is lost ==========================================================


class LoseReversalAnswers(httpx.AsyncBaseTransport):
    """Real HTTP to the simulator; a reversal's answer is read and then thrown away, as when the
    connection breaks after M-Pesa processed the request."""

    def __init__(self) -> None:
        self._network = httpx.AsyncHTTPTransport()
        self.lost: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._network.handle_async_request(request)
        if request.method == "PUT" and request.url.path.endswith("/reversal/"):
            await response.aread()
            await response.aclose()
            self.lost.append(response.status_code)
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a response (injected).", request=request
            )
        return response

    async def aclose(self) -> None:
        await self._network.aclose()


@pytest.mark.parametrize("settle_with", ["refresh", "reconcile"])
async def test_reversal_with_a_lost_answer_is_settled_by_query_and_never_sent_twice(
    simulator: LiveSimulator,
    monkeypatch: pytest.MonkeyPatch,
    session_factory: async_sessionmaker[AsyncSession],
    settle_with: str,
) -> None:
    settings_for_simulator(monkeypatch, simulator)
    settings = get_settings()
    transport = LoseReversalAnswers()
    service = PaymentService(
        settings, MpesaClient.from_settings(settings, transport=transport), db_retry_delays=(0.01,)
    )
    try:
        async with session_factory() as db:
            paid = await service.initiate_payment(
                PaymentInitiateRequest(phone_number=CUSTOMER, amount=Decimal("80.00")), db
            )
            assert paid.status == "completed" and paid.provider_transaction_id

            key = f"rev-{uuid.uuid4().hex}"
            with pytest.raises(PaymentOutcomeUnknownError) as lost:
                await service.reverse(
                    paid.transaction_id, ReversalRequest(reason="refund", idempotency_key=key), db
                )
        assert transport.lost == [200]  # M-Pesa processed it; the answer never arrived
        reversal_id = lost.value.details["transaction_id"]
        reversal = await payment(session_factory, reversal_id)
        assert reversal.status == PaymentStatus.UNKNOWN
        assert (await payment(session_factory, paid.transaction_id)).status == "completed"

        reversals = [t for t in await simulator.transactions() if t["operation"] == "reversal"]
        assert len(reversals) == 1
        assert reversals[0]["original_transaction_id"] == paid.provider_transaction_id
        assert reversals[0]["amount"] == "80.00"

        # Asking again never re-sends: the same key replays the unknown reversal, and without a
        # key nothing is left to reverse while this one is in flight.
        async with session_factory() as db:
            with pytest.raises(PaymentOutcomeUnknownError):
                await service.reverse(
                    paid.transaction_id, ReversalRequest(reason="refund", idempotency_key=key), db
                )
            with pytest.raises(PaymentValidationError):
                await service.reverse(paid.transaction_id, ReversalRequest(reason="again"), db)
        assert (await simulator.calls())["reversal"] == 1

        if settle_with == "refresh":
            async with session_factory() as db:
                refreshed = await service.refresh(reversal_id, db)
            assert refreshed.status == "completed"
        else:
            report = await reconcile_once(service, session_factory, min_age=0)
            assert report.settled_ids == [reversal_id], str(report)

        settled = await payment(session_factory, reversal_id)
        assert settled.status == PaymentStatus.COMPLETED
        original = await payment(session_factory, paid.transaction_id)
        assert original.status == PaymentStatus.REVERSED
        assert original.reversed_amount == Decimal("80.00")
        assert AuditAction.REVERSED in await audit_actions(session_factory, original)

        # Settling again (a second refresh, a later pass) changes nothing and sends nothing.
        async with session_factory() as db:
            again = await service.refresh(reversal_id, db)
        assert again.status == "completed"
        assert (await reconcile_once(service, session_factory, min_age=0)).examined == 0
        original = await payment(session_factory, paid.transaction_id)
        assert original.reversed_amount == Decimal("80.00")

        calls = await simulator.calls()
        assert calls["reversal"] == 1
        reversals = [t for t in await simulator.transactions() if t["operation"] == "reversal"]
        assert len(reversals) == 1
        assert transport.lost == [200]
    finally:
        await service.aclose()
