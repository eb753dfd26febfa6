"""The module as users install it: the ``payments/`` folder copied into a host project as
``app/payments/``, imported as ``app.payments`` in a fresh interpreter whose path holds only the
host project, mounted with ``app.include_router(payment_router, prefix="/api")``.

Three ways a host provides sessions: the module's own engine (``PAYMENT_DATABASE_URL``), its own
synchronous ``Session`` through ``app.dependency_overrides[get_db]`` (the original README's
``get_db``), and its own ``AsyncSession`` through ``create_payment_router(get_session=...)``.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.support import SUCCESS as FULL_MSISDN

REPO_ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO_ROOT / "payments"

#: Prepended to every host script: importing the repository's top-level ``payments`` package
#: (installed in the venv in editable mode) would hide a non-relative import, so it is refused.
PRELUDE = """
import asyncio
import json
import sys


class _RefuseTopLevelPayments:
    def find_spec(self, name, path=None, target=None):
        if name == "payments" or name.startswith("payments."):
            raise ImportError(f"host app imported the top-level package: {name}")
        return None


sys.meta_path.insert(0, _RefuseTopLevelPayments())

import httpx
from fastapi import FastAPI

from app.payments import (
    PaymentInitiateRequest,
    PaymentService,
    payment_logger,
    payment_router,
)

PHONE = "258841234567"


async def drive(app):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://host", headers={"X-API-Key": "host-admin-key-0123"}
    ) as client:
        paid = await client.post(
            "/api/payments/initiate",
            json={"phone_number": PHONE, "amount": 100.00, "account_reference": "ORDER-12345"},
        )
        transaction_id = paid.json().get("transaction_id")
        status = await client.get(f"/api/payments/status/{transaction_id}")
        listing = await client.get("/api/payments/", params={"phone_number": PHONE})
        audit = await client.get(f"/api/payments/audit/{transaction_id}")
        health = await client.get("/api/payments/health")
        cancelled = await client.post(
            "/api/payments/initiate", json={"phone_number": "258841000005", "amount": 5}
        )
    return {
        "initiate": [paid.status_code, paid.json()],
        "status": [status.status_code, status.json()],
        "list_total": listing.json().get("total"),
        "audit_actions": [entry["action"] for entry in audit.json().get("entries", [])],
        "health": [health.status_code, health.json()],
        "cancelled": [cancelled.status_code, cancelled.json().get("error_code")],
        "texts": paid.text + status.text + listing.text + audit.text + cancelled.text,
    }


def report(result):
    result["service_module"] = PaymentService.__module__
    result["request_module"] = PaymentInitiateRequest.__module__
    result["top_level_payments_loaded"] = any(
        name == "payments" or name.startswith("payments.") for name in sys.modules
    )
    payment_logger.info("host app finished")
    print("RESULT " + json.dumps(result))
"""

OWN_ENGINE = """
from app.payments import default_payment_service
from app.payments.database import get_engine
from app.payments.models import Base

app = FastAPI()
app.include_router(payment_router, prefix="/api")


async def main():
    async with get_engine().begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    result = await drive(app)
    await default_payment_service().aclose()
    await get_engine().dispose()
    report(result)


asyncio.run(main())
"""

SYNC_SESSION = """
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import sessionmaker

from app.payments import default_payment_service, get_db
from app.payments.models import Base, PaymentTransaction

engine = create_engine(f"sqlite:///{DB_PATH}")
SessionLocal = sessionmaker(bind=engine)
Base.metadata.create_all(engine)


def host_get_db():
    db = SessionLocal()
    try:
        yield db
    finally:
        db.close()


app = FastAPI()
app.include_router(payment_router, prefix="/api")
app.dependency_overrides[get_db] = host_get_db


async def book_appointment_with_payment(db, appointment_id, patient_phone, amount):
    # The original README's integration example, verbatim in spirit.
    payment_service = PaymentService()
    request = PaymentInitiateRequest(
        phone_number=patient_phone,
        amount=amount,
        account_reference=f"APT-{appointment_id}",
        description="Appointment booking fee",
        entity_type="appointment",
        entity_id=appointment_id,
    )
    try:
        return await payment_service.initiate_payment(
            request=request, db=db, user_id="patient-123"
        )
    finally:
        await payment_service.aclose()


async def main():
    result = await drive(app)
    db = SessionLocal()
    try:
        direct = await book_appointment_with_payment(db, "A-77", "841234567", 250.5)
    finally:
        db.close()
    result["direct"] = [direct.status, direct.entity_type, direct.entity_id, float(direct.amount)]
    with SessionLocal() as session:
        result["rows"] = session.scalar(select(func.count()).select_from(PaymentTransaction))
        result["user_ids"] = sorted(
            set(session.scalars(select(PaymentTransaction.user_id)).all())
        )
    await default_payment_service().aclose()
    engine.dispose()
    report(result)


asyncio.run(main())
"""

ASYNC_SESSION = """
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from app.payments import create_payment_router, default_payment_service
from app.payments.models import Base, PaymentTransaction

engine = create_async_engine(f"sqlite+aiosqlite:///{DB_PATH}")
HostSession = async_sessionmaker(engine, expire_on_commit=False)


async def host_session():
    async with HostSession() as session:
        yield session


def host_user():
    return "host-user-1"


app = FastAPI()
app.include_router(
    create_payment_router(get_session=host_session, auth=host_user), prefix="/api"
)


async def main():
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    result = await drive(app)
    async with HostSession() as session:
        result["rows"] = await session.scalar(
            select(func.count()).select_from(PaymentTransaction)
        )
        result["user_ids"] = sorted(
            set((await session.scalars(select(PaymentTransaction.user_id))).all())
        )
    await default_payment_service().aclose()
    await engine.dispose()
    report(result)


asyncio.run(main())
"""


def _host_project(root: Path) -> Path:
    project = root / "hostproj"
    (project / "app").mkdir(parents=True)
    (project / "app" / "__init__.py").write_text("")
    shutil.copytree(
        MODULE_DIR,
        project / "app" / "payments",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.db", "*.db-*"),
    )
    return project


def run_host_script(tmp_path: Path, body: str) -> dict[str, Any]:
    project = _host_project(tmp_path)
    db_path = tmp_path / "host.db"
    log_dir = tmp_path / "logs"
    script = project / "main.py"
    script.write_text(
        textwrap.dedent(PRELUDE) + f"\nDB_PATH = {str(db_path)!r}\n" + textwrap.dedent(body)
    )
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("MPESA_", "PAYMENT_", "PYTHON"))
    }
    env |= {
        "PYTHONPATH": str(project),
        "MPESA_ENVIRONMENT": "simulator",
        "PAYMENT_DATABASE_URL": f"sqlite:///{db_path}",
        "PAYMENT_LOG_DIR": str(log_dir),
        # The API is closed without a key in every environment, the simulator's too.
        "PAYMENT_ADMIN_API_KEY": "host-admin-key-0123",
    }
    completed = subprocess.run(
        [sys.executable, str(script)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, completed.stdout[-2000:] + completed.stderr[-2000:]
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    logs = sorted(log_dir.glob("payment_*.log"))
    result["log_text"] = "".join(path.read_text() for path in logs)
    result["log_files"] = [path.name for path in logs]
    return result


def assert_host_flow(result: dict[str, Any]) -> None:
    status_code, paid = result["initiate"]
    assert status_code == 200, paid
    assert paid["success"] is True and paid["status"] == "completed"
    assert paid["phone_number"] == "2588412*****"
    assert paid["amount"] == "100.00" and paid["currency"] == "MZN"
    assert paid["account_reference"] == "ORDER-12345"
    status_code, status = result["status"]
    assert status_code == 200
    assert status["transaction_id"] == paid["transaction_id"]
    assert status["status"] == "completed"
    assert result["list_total"] == 1
    assert result["audit_actions"][0] == "initiated"
    assert "completed" in result["audit_actions"]
    assert result["health"] == [
        200,
        {
            "database": "ok",
            "provider_configuration": "ok",
            "environment": "simulator",
            "status": "ok",
        },
    ]
    assert result["cancelled"] == [402, "payment_cancelled"]
    assert FULL_MSISDN not in result["texts"]
    assert result["service_module"] == "app.payments.service"
    assert result["request_module"] == "app.payments.schemas"
    assert result["top_level_payments_loaded"] is False
    # The payment log, as the original README describes it, without the full number.
    assert result["log_files"], "no payment_<date>.log written"
    assert "Payment initiated" in result["log_text"]
    assert "host app finished" in result["log_text"]
    assert FULL_MSISDN not in result["log_text"]


def test_host_app_with_the_modules_own_engine(tmp_path: Path) -> None:
    result = run_host_script(tmp_path, OWN_ENGINE)
    assert_host_flow(result)
    assert (tmp_path / "host.db").exists()


def test_host_app_with_its_own_synchronous_session(tmp_path: Path) -> None:
    result = run_host_script(tmp_path, SYNC_SESSION)
    assert_host_flow(result)
    assert result["direct"] == ["completed", "appointment", "A-77", 250.5]
    assert result["rows"] == 3
    assert result["user_ids"] == ["admin-api-key", "patient-123"]


def test_host_app_with_its_own_async_session_and_auth(tmp_path: Path) -> None:
    result = run_host_script(tmp_path, ASYNC_SESSION)
    assert_host_flow(result)
    assert result["rows"] == 2
    assert result["user_ids"] == ["host-user-1"]


def _absolute_self_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                f"{path.name}:{node.lineno} import {alias.name}"
                for alias in node.names
                if alias.name == "payments" or alias.name.startswith("payments.")
            ]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "payments" or node.module.startswith("payments."):
                found.append(f"{path.name}:{node.lineno} from {node.module}")
    return found


def test_the_module_imports_itself_only_relatively() -> None:
    files = sorted(MODULE_DIR.rglob("*.py"))
    assert len(files) > 10
    offenders = [hit for path in files for hit in _absolute_self_imports(path)]
    assert offenders == []
    # And by text, for imports hidden in strings that are exec'd or in comments users copy.
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            stripped = line.strip()
            assert not stripped.startswith(("import payments", "from payments")), (
                f"{path.relative_to(REPO_ROOT)}:{number}: {stripped}"
            )


@pytest.mark.parametrize(
    "name",
    ["payment_router", "PaymentService", "PaymentInitiateRequest", "payment_logger", "get_db"],
)
def test_the_readme_names_are_exported_from_the_package(name: str) -> None:
    import payments

    assert name in payments.__all__
    assert getattr(payments, name) is not None
