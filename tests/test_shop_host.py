"""Issue 12's "done when": a shop adopts the module and takes it to production.

The shop (``tests/host_project.py``) has its own Alembic head plus the module's revisions, its
own synchronous sessions (``app.dependency_overrides[get_db]``), its own customer and staff auth
dependencies, and a ``PaymentService`` subclass whose hook marks the order paid. A customer's
payment whose answer is lost stays ``unknown``; ``python -m app.payments reconcile --service
app.payments_hooks:shop_payments``, run as a separate process, settles it through the shop's
hook, on the shop's database. A customer's token reaches neither a staff endpoint nor another
customer's payment.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from .host_project import (
    CUSTOMER_TOKEN,
    HOST_HEAD,
    OTHER_CUSTOMER_TOKEN,
    STAFF_TOKEN,
    build_host_project,
    host_environment,
    simulator_server,
)

MAIN = """
    from fastapi import Depends, FastAPI, HTTPException

    from app.auth import CurrentUser, get_current_user
    from app.core.database import get_db
    from app.payments import create_payment_router
    from app.payments import get_db as payments_get_db
    from app.payments_hooks import shop_payments


    def current_customer(user: CurrentUser = Depends(get_current_user)) -> str:
        return str(user.id)


    def current_staff(user: CurrentUser = Depends(get_current_user)) -> str:
        if not user.is_staff:
            raise HTTPException(403, "staff only")
        return user.email


    app = FastAPI()
    app.include_router(
        create_payment_router(
            customer_auth=current_customer,
            staff_auth=current_staff,
            service=lambda: shop_payments,
        ),
        prefix="/api",
    )
    app.dependency_overrides[payments_get_db] = get_db  # the shop's synchronous sessions
"""

DRIVE = '''
    """Customers and staff use the shop's API (in process, over ASGI)."""
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
    from sqlalchemy.orm import Session

    from app.core.database import SessionLocal
    from app.main import app
    from app.models import Order

    with SessionLocal() as db, db.begin():
        db.add_all([Order(id=1, user_id=1, amount=100, status="pending"),
                    Order(id=2, user_id=1, amount=40, status="pending")])


    def bearer(token):
        return {"Authorization": f"Bearer {token}"}


    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as http:
            result = {}
            # The answer is lost (the scripted number drops the connection): unknown, 202.
            lost = await http.post(
                "/api/payments/initiate",
                headers=bearer("ALICE") | {"Idempotency-Key": "order-1"},
                json={"phone_number": "258842000001", "amount": "100.00",
                      "entity_type": "order", "entity_id": "1"},
            )
            result["lost"] = [lost.status_code, lost.json()]
            paid = await http.post(
                "/api/payments/initiate",
                headers=bearer("ALICE") | {"Idempotency-Key": "order-2"},
                json={"phone_number": "258841234567", "amount": 40,
                      "entity_type": "order", "entity_id": "2"},
            )
            result["paid"] = [paid.status_code, paid.json()]
            txn = lost.json()["transaction_id"]
            result["own_status"] = (await http.get(f"/api/payments/status/{txn}",
                                                   headers=bearer("ALICE"))).status_code
            other = await http.get(f"/api/payments/status/{txn}", headers=bearer("BOB"))
            result["other_status"] = [other.status_code, other.json()]
            missing = await http.get("/api/payments/status/TXN-NOPE", headers=bearer("BOB"))
            result["missing_status"] = [missing.status_code, missing.json()]
            result["staff_status"] = (await http.get(f"/api/payments/status/{txn}",
                                                     headers=bearer("STAFF"))).status_code
            anonymous = await http.get(f"/api/payments/status/{txn}")
            result["anonymous"] = [anonymous.status_code, anonymous.json(),
                                   anonymous.headers.get("www-authenticate")]
            staff_only = [
                ("POST", "/api/payments/payouts", {"phone_number": "258841234567", "amount": 5}),
                ("POST", "/api/payments/transfers", {"receiver_party_code": "171718",
                                                     "amount": 5}),
                ("POST", f"/api/payments/{txn}/reverse", {}),
                ("POST", f"/api/payments/{txn}/refresh", None),
                ("POST", f"/api/payments/{txn}/resolve", {"status": "failed", "reason": "x"}),
                ("GET", "/api/payments/", None),
                ("GET", "/api/payments/summary", None),
                ("GET", f"/api/payments/audit/{txn}", None),
                ("GET", "/api/payments/customer-name?phone_number=258841234567", None),
                ("GET", "/api/payments/webhooks", None),
                ("POST", "/api/payments/webhooks/1/replay", None),
                ("GET", "/api/payments/health?deep=true", None),
            ]
            result["customer_on_staff"] = {}
            for method, path, body in staff_only:
                answer = await http.request(method, path, headers=bearer("ALICE"), json=body)
                result["customer_on_staff"][f"{method} {path}"] = [answer.status_code,
                                                                   answer.json()]
            listing = await http.get("/api/payments/", headers=bearer("STAFF"))
            result["staff_list"] = [listing.status_code, listing.json().get("total")]
            summary = await http.get("/api/payments/summary", headers=bearer("STAFF"))
            result["summary"] = summary.json()
        return result


    print("RESULT " + json.dumps(asyncio.run(main())))
'''


def _orders(env: dict[str, str]) -> dict[int, tuple[str, str | None]]:
    engine = create_engine(env["SHOP_DATABASE_URL"])
    try:
        with engine.connect() as db:
            rows = db.execute(text("SELECT id, status, payment_id FROM orders")).all()
    finally:
        engine.dispose()
    return {row[0]: (row[1], row[2]) for row in rows}


def _run(root: Path, env: dict[str, str], *args: str, timeout: float = 120) -> Any:
    return subprocess.run(
        [sys.executable, *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def adopt_module_migrations(root: Path, env: dict[str, str]) -> None:
    """The README's path: the module's revisions after the shop's head, then ``upgrade head``."""
    heads = _run(root, env, "-m", "alembic", "heads")
    assert heads.returncode == 0, heads.stderr
    assert heads.stdout.split()[0] == HOST_HEAD
    for revision in sorted((root / "app/payments/migrations").glob("payment_*.py")):
        shutil.copy(revision, root / "alembic/versions" / revision.name)
    first = root / "alembic/versions/payment_001_create_tables.py"
    text = first.read_text()
    root_line = re.compile(r"^down_revision: .* = None$", re.M)
    assert root_line.search(text), "payment_001 is no longer a root revision"
    first.write_text(
        root_line.sub(f'down_revision: str | Sequence[str] | None = "{HOST_HEAD}"', text)
    )
    upgrade = _run(root, env, "-m", "alembic", "upgrade", "head")
    assert upgrade.returncode == 0, upgrade.stderr


@pytest.fixture
def shop(tmp_path: Path, database_url: str) -> tuple[Path, dict[str, str]]:
    """The shop on SQLite or PostgreSQL (its own synchronous engine: sqlite3 or psycopg)."""
    root = build_host_project(tmp_path / "shop")
    tokens = {"ALICE": CUSTOMER_TOKEN, "BOB": OTHER_CUSTOMER_TOKEN, "STAFF": STAFF_TOKEN}
    drive = textwrap.dedent(DRIVE)
    for name, token in tokens.items():
        drive = drive.replace(f'bearer("{name}")', f'bearer("{token}")')
    (root / "app/main.py").write_text(textwrap.dedent(MAIN).lstrip())
    (root / "drive.py").write_text(drive.lstrip())
    url = make_url(database_url)
    if url.get_backend_name() == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    env = host_environment(root, SHOP_DATABASE_URL=url.render_as_string(hide_password=False))
    adopt_module_migrations(root, env)
    return root, env


def test_reconcile_with_the_shops_service_marks_the_order_paid(
    shop: tuple[Path, dict[str, str]],
) -> None:
    root, base_env = shop
    with simulator_server(root) as simulator:
        env = base_env | {"MPESA_ENVIRONMENT": "simulator", "MPESA_BASE_URL": simulator}
        driven = _run(root, env, "drive.py")
        assert driven.returncode == 0, driven.stderr[-3000:]
        line = next(x for x in driven.stdout.splitlines() if x.startswith("RESULT "))
        result = json.loads(line.removeprefix("RESULT "))

        status, lost = result["lost"]
        assert status == 202 and lost["status"] == "unknown", lost
        assert lost["amount"] == "100.00"
        assert result["paid"][0] == 200 and result["paid"][1]["status"] == "completed"
        assert _orders(env) == {
            1: ("pending", None),
            2: ("paid", result["paid"][1]["transaction_id"]),
        }

        # Without the shop's service and database the command refuses, and opens nothing.
        bare = _run(root, env, "-m", "app.payments", "reconcile", "--min-age", "0")
        assert bare.returncode != 0
        assert "Traceback" not in bare.stderr
        assert "PAYMENT_DATABASE_URL" in bare.stderr and "--service" in bare.stderr
        assert not (root / "payments.db").exists()

        reconciled = _run(
            root,
            env,
            "-m",
            "app.payments",
            "reconcile",
            "--min-age",
            "0",
            "--service",
            "app.payments_hooks:shop_payments",
        )
        assert reconciled.returncode == 0, reconciled.stderr[-3000:]
        assert "settled=1" in reconciled.stdout, reconciled.stdout
        assert not (root / "payments.db").exists()

    # The shop's hook ran in the reconcile process, on the shop's database.
    assert _orders(env)[1] == ("paid", lost["transaction_id"])


def test_a_customer_reaches_neither_staff_endpoints_nor_other_customers_payments(
    shop: tuple[Path, dict[str, str]],
) -> None:
    root, base_env = shop
    with simulator_server(root) as simulator:
        env = base_env | {"MPESA_ENVIRONMENT": "simulator", "MPESA_BASE_URL": simulator}
        driven = _run(root, env, "drive.py")
    assert driven.returncode == 0, driven.stderr[-3000:]
    result = json.loads(
        next(x for x in driven.stdout.splitlines() if x.startswith("RESULT ")).removeprefix(
            "RESULT "
        )
    )
    assert result["own_status"] == 200
    assert result["staff_status"] == 200
    # Another customer's payment looks exactly like one that does not exist.
    other_code, other = result["other_status"]
    missing_code, missing = result["missing_status"]
    assert other_code == missing_code == 404
    assert other["error_code"] == missing["error_code"] == "payment_not_found"
    assert other["message"].endswith("not found") and other["details"] == missing["details"]
    # The shop's own 401 comes back as the shop wrote it, header included.
    assert result["anonymous"] == [401, {"detail": "sign in first"}, 'Bearer realm="shop"']
    for endpoint, (code, body) in result["customer_on_staff"].items():
        assert (code, body) == (403, {"detail": "staff only"}), endpoint
    assert result["staff_list"] == [200, 2]
    summary = result["summary"]
    assert summary["received"] == {"count": 1, "amount": "40.00"}
    assert summary["by_status"]["unknown"] == {"count": 1, "amount": "100.00"}
