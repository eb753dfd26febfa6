"""Issue 12, item by item: what a host relies on (auth roles, its own errors, money as exact text,
the summary's directions, the command line's service loader and sessions)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI, Header, HTTPException
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from payments.config import get_settings, load_settings
from payments.database import ModuleDatabase, normalize_database_url
from payments.exceptions import PaymentConfigurationError, PaymentOutcomeUnknownError
from payments.host import HostSetupError, load_service, open_host
from payments.models import Base
from payments.mpesa.client import ClientConfig, MpesaClient
from payments.mpesa.values import money_text
from payments.reconciliation import reconcile_once
from payments.router import create_payment_router
from payments.schemas import PaymentInitiateRequest
from payments.service import PaymentService
from payments.simulator.app import MpesaSimulator, SimulatorConfig
from payments.simulator.transport import SimulatorTransport
from tests.support import PaymentApi, PaymentApiFactory

SUCCESS = "258841234567"
DROPPED = "258842000001"


# --- money ------------------------------------------------------------------------------------


def test_money_text_is_exact_and_refuses_floats() -> None:
    assert money_text(Decimal("100")) == "100.00"
    assert money_text(Decimal("0.1")) == "0.10"
    assert money_text(150000) == "150000.00"
    assert money_text(Decimal("9999999999.99")) == "9999999999.99"
    with pytest.raises(TypeError):
        money_text(100.0)  # type: ignore[arg-type]


async def test_every_answer_writes_money_as_two_place_text(payment_api: PaymentApi) -> None:
    api = payment_api
    paid = await api.http.post(
        "/api/payments/initiate", json={"phone_number": SUCCESS, "amount": 100}
    )
    assert paid.json()["amount"] == "100.00" and paid.json()["reversed_amount"] == "0.00"
    # A string amount is still accepted, and so is a number with decimals.
    assert (
        await api.http.post(
            "/api/payments/initiate", json={"phone_number": SUCCESS, "amount": "12.5"}
        )
    ).json()["amount"] == "12.50"
    listing = (await api.http.get("/api/payments/")).json()
    assert {item["amount"] for item in listing["items"]} == {"100.00", "12.50"}
    summary = (await api.http.get("/api/payments/summary")).json()
    assert summary["total_amount"] == "112.50"
    assert summary["received"]["amount"] == "112.50"
    assert summary["by_operation"]["c2b"]["completed_amount"] == "112.50"


async def test_the_openapi_document_says_money_is_a_string(payment_api: PaymentApi) -> None:
    document = (await payment_api.http.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    response = schemas.get("PaymentResponse-Output", schemas.get("PaymentResponse"))
    for field in ("amount", "reversed_amount"):
        assert response["properties"][field]["type"] == "string"
        assert response["properties"][field]["pattern"] == r"^-?[0-9]+\.[0-9]{2}$"
    summary = schemas.get("PaymentSummary-Output", schemas.get("PaymentSummary"))
    assert summary["properties"]["net_received"]["type"] == "string"
    # Inputs keep accepting numbers and strings.
    request = schemas.get("PaymentInitiateRequest-Input", schemas.get("PaymentInitiateRequest"))
    kinds = {option["type"] for option in request["properties"]["amount"]["anyOf"]}
    assert kinds == {"number", "string"}


# --- the summary ------------------------------------------------------------------------------


async def test_summary_keeps_money_in_and_out_apart(payment_api: PaymentApi) -> None:
    api = payment_api
    paid = (
        await api.http.post("/api/payments/initiate", json={"phone_number": SUCCESS, "amount": 100})
    ).json()
    reversal = await api.http.post(
        f"/api/payments/{paid['transaction_id']}/reverse", json={"amount": 30}
    )
    assert reversal.status_code == 200, reversal.text
    assert reversal.json()["message"] == "Reversal completed successfully"
    payout = await api.http.post(
        "/api/payments/payouts", json={"phone_number": SUCCESS, "amount": 20}
    )
    assert payout.json()["message"] == "Payout completed successfully"
    transfer = await api.http.post(
        "/api/payments/transfers", json={"receiver_party_code": "171718", "amount": 7}
    )
    assert transfer.status_code == 200, transfer.text
    refused = await api.http.post(
        "/api/payments/transfers", json={"receiver_party_code": "999999", "amount": 3}
    )
    assert refused.status_code == 400

    summary = (await api.http.get("/api/payments/summary")).json()
    assert summary["received"] == {"count": 1, "amount": "100.00"}
    assert summary["paid_out"] == {"count": 1, "amount": "20.00"}
    assert summary["transferred"] == {"count": 1, "amount": "7.00"}
    assert summary["reversed"] == {"count": 1, "amount": "30.00"}
    assert summary["net_received"] == "70.00"
    assert summary["success_rate_by_operation"] == {
        "c2b": 1.0,
        "b2c": 1.0,
        "b2b": 0.5,
        "reversal": 1.0,
    }
    assert summary["by_operation"]["b2b"]["success_rate"] == 0.5
    # The earlier fields read as the customer payments', not a sum of every direction.
    assert summary["completed_amount"] == "100.00"
    assert summary["success_rate"] == 1.0


async def test_a_reversal_refused_by_state_names_what_can_be_reversed(
    payment_api: PaymentApi,
) -> None:
    cancelled = await payment_api.http.post(
        "/api/payments/initiate", json={"phone_number": "258841000005", "amount": 10}
    )
    transaction_id = cancelled.json()["details"]["payment"]["transaction_id"]
    refused = await payment_api.http.post(f"/api/payments/{transaction_id}/reverse")
    assert refused.status_code == 409
    assert refused.json()["message"] == (
        "only completed or partially reversed payments can be reversed;"
        f" {transaction_id} is cancelled"
    )


# --- auth roles -------------------------------------------------------------------------------


def bearer_identity(authorization: str | None = Header(None)) -> str:
    if not authorization or not authorization.startswith("Bearer "):
        raise HTTPException(401, "no token", headers={"WWW-Authenticate": "Bearer"})
    return authorization.removeprefix("Bearer ")


def staff_only(user: str = Depends(bearer_identity)) -> str:
    if not user.startswith("staff-"):
        raise HTTPException(403, "staff only", headers={"X-Shop-Reason": "role"})
    return user


def customer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "X-API-Key": ""}


async def test_customer_auth_guards_initiate_and_own_status_only(
    payment_api_factory: PaymentApiFactory,
) -> None:
    api = await payment_api_factory(
        router_options={"customer_auth": bearer_identity, "staff_auth": staff_only}
    )
    paid = await api.http.post(
        "/api/payments/initiate",
        headers=customer("alice"),
        json={"phone_number": SUCCESS, "amount": 10},
    )
    assert paid.status_code == 200, paid.text
    transaction_id = paid.json()["transaction_id"]
    path = f"/api/payments/status/{transaction_id}"
    assert (await api.http.get(path, headers=customer("alice"))).status_code == 200
    other = await api.http.get(path, headers=customer("bob"))
    assert other.status_code == 404 and other.json()["error_code"] == "payment_not_found"
    assert (await api.http.get(path, headers=customer("staff-carol"))).status_code == 200
    # The identity is recorded on the payment.
    listing = await api.http.get(
        "/api/payments/", params={"user_id": "alice"}, headers=customer("staff-carol")
    )
    assert listing.json()["total"] == 1
    # The customer's token reaches no staff endpoint; the host's 403 passes through as it is.
    for method, route in (
        ("POST", "/api/payments/payouts"),
        ("GET", "/api/payments/"),
        ("GET", "/api/payments/summary"),
        ("GET", f"/api/payments/audit/{transaction_id}"),
        ("POST", f"/api/payments/{transaction_id}/reverse"),
        ("GET", "/api/payments/webhooks"),
    ):
        answer = await api.http.request(method, route, headers=customer("alice"))
        assert answer.status_code == 403, (route, answer.text)
        assert answer.json() == {"detail": "staff only"}
        assert answer.headers["x-shop-reason"] == "role"
    anonymous = await api.http.get(path, headers={"X-API-Key": ""})
    assert anonymous.status_code == 401 and anonymous.json() == {"detail": "no token"}
    assert anonymous.headers["www-authenticate"] == "Bearer"
    # The admin key is no credential of this host's.
    admin = await api.http.get("/api/payments/summary")
    assert admin.status_code == 401


async def test_without_customer_auth_the_admin_key_still_guards_both(
    payment_api: PaymentApi,
) -> None:
    api = payment_api
    wrong = {"X-API-Key": "wrong"}
    assert (
        await api.http.post(
            "/api/payments/initiate", headers=wrong, json={"phone_number": SUCCESS, "amount": 1}
        )
    ).status_code == 401
    paid = await api.http.post(
        "/api/payments/initiate", json={"phone_number": SUCCESS, "amount": 1}
    )
    assert paid.status_code == 200
    status = await api.http.get(f"/api/payments/status/{paid.json()['transaction_id']}")
    assert status.status_code == 200
    assert (await api.http.get("/api/payments/summary")).status_code == 200


async def test_the_old_auth_parameter_means_both_roles(
    payment_api_factory: PaymentApiFactory,
) -> None:
    api = await payment_api_factory(router_options={"auth": staff_only})
    headers = customer("staff-dave")
    paid = await api.http.post(
        "/api/payments/initiate", headers=headers, json={"phone_number": SUCCESS, "amount": 1}
    )
    assert paid.status_code == 200
    assert (await api.http.get("/api/payments/summary", headers=headers)).status_code == 200
    refused = await api.http.post(
        "/api/payments/initiate",
        headers=customer("erin"),
        json={"phone_number": SUCCESS, "amount": 1},
    )
    # The host's HTTPException as it raised it, not re-wrapped as bad_request.
    assert refused.status_code == 403 and refused.json() == {"detail": "staff only"}
    assert refused.headers["x-shop-reason"] == "role"


async def test_an_identity_that_is_not_a_string_is_the_hosts_mistake_said_plainly(
    payment_api_factory: PaymentApiFactory,
) -> None:
    api = await payment_api_factory(router_options={"auth": lambda: {"id": 1}})
    answer = await api.http.get("/api/payments/summary")
    assert answer.status_code == 500
    assert answer.json()["error_code"] == "configuration_error"
    assert "non-empty str" in answer.json()["message"]


async def test_fastapis_own_body_error_keeps_the_modules_shape(payment_api: PaymentApi) -> None:
    answer = await payment_api.http.post(
        "/api/payments/initiate",
        content=b"phone_number=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert answer.status_code == 422
    assert answer.json()["error_code"] == "validation_error"


def test_create_payment_router_without_host_auth_still_mounts() -> None:
    app = FastAPI()
    app.include_router(create_payment_router(), prefix="/api")
    assert "/api/payments/initiate" in app.openapi()["paths"]


# --- the garbage collector ----------------------------------------------------------------------

_GC_PROBE = """
import gc
from fastapi import FastAPI
from fastapi.testclient import TestClient
from payments.router import create_payment_router

app = FastAPI()
app.include_router(create_payment_router(), prefix="/api")
print(gc.get_freeze_count(), gc.get_threshold()[0])
with TestClient(app):
    print(gc.get_freeze_count(), gc.get_threshold()[0])
"""


@pytest.mark.parametrize(
    ("setting", "young_threshold"), [(None, None), ("false", 700), ("true", 50_000)]
)
def test_a_host_app_tunes_the_garbage_collector_unless_told_not_to(
    tmp_path: Path, setting: str | None, young_threshold: int | None
) -> None:
    """A host app (``FastAPI()`` + ``include_router``, default settings) freezes the heap it
    started with out of the garbage collector's scans when the app starts, and collects the
    young generation every 10,000 allocations: full collections walked the startup heap and
    every payment in flight every few hundred payments. A higher threshold the host set is kept;
    ``PAYMENT_GC_TUNING=false`` leaves the collector alone."""
    environment = {k: v for k, v in os.environ.items() if k != "PAYMENT_GC_TUNING"}
    environment["PAYMENT_DATABASE_URL"] = f"sqlite:///{tmp_path / 'payments.db'}"
    environment["PAYMENT_DISPATCH_IN_APP"] = "false"
    probe = _GC_PROBE
    if setting is not None:
        environment["PAYMENT_GC_TUNING"] = setting
    if young_threshold == 50_000:  # the host tuned it itself, before the app started
        probe = "import gc; gc.set_threshold(50_000, 10, 10)\n" + probe
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=Path(__file__).resolve().parent.parent,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    before, started = ([int(n) for n in line.split()] for line in result.stdout.splitlines())
    assert before == [0, young_threshold or 700]
    if setting == "false":
        assert started == [0, 700]
    else:
        # The app, its routes and models, every module: tens of thousands of objects.
        assert started[0] > 10_000
        assert started[1] == (young_threshold if young_threshold == 50_000 else 10_000)


# --- the command line's service and database ---------------------------------------------------


@pytest.fixture
def host_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "shop_hooks.py").write_text(
        textwrap.dedent(
            f"""
            from sqlalchemy import create_engine, text
            from sqlalchemy.orm import sessionmaker

            from payments.service import PaymentService

            SessionLocal = sessionmaker(create_engine("sqlite:///{tmp_path}/shop.db"))


            class ShopPayments(PaymentService):
                pass


            instance = ShopPayments(sessions=SessionLocal)
            bare = ShopPayments()


            def factory():
                return ShopPayments(sessions=SessionLocal)


            async def async_factory():
                return ShopPayments(sessions=SessionLocal)


            def not_a_service():
                return 42


            NUMBER = 7
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("shop_hooks", None)


@pytest.mark.parametrize("attribute", ["instance", "factory", "async_factory"])
async def test_open_host_loads_the_hosts_service_every_way(
    host_modules: Path, attribute: str
) -> None:
    async with open_host(f"shop_hooks:{attribute}") as host:
        assert type(host.service).__name__ == "ShopPayments"
        assert host.database is None  # the service's own sessions, not the module's engine
        async with host.sessions() as db:
            assert isinstance(db, Session)


async def test_open_host_refuses_what_it_cannot_know(
    host_modules: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for spec, message in (
        ("shop_hooks", "module:attr"),
        ("no_such_module:x", "cannot import"),
        ("shop_hooks:missing", "has no attribute"),
        ("shop_hooks:NUMBER", "must be a PaymentService"),
        ("shop_hooks:not_a_service", "not a PaymentService"),
        ("shop_hooks:bare", "refusing to guess the database"),
    ):
        with pytest.raises(HostSetupError, match=message):
            async with open_host(spec):
                pass
    with pytest.raises(HostSetupError, match="refusing to guess"):
        async with open_host(None):
            pass
    with pytest.raises(HostSetupError, match="async factory"):
        load_service("shop_hooks:async_factory")
    assert not (host_modules / "payments.db").exists()


async def test_the_payment_service_setting_names_the_service(
    host_modules: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAYMENT_SERVICE", "shop_hooks:factory")
    async with open_host(None) as host:
        assert type(host.service).__name__ == "ShopPayments"
    monkeypatch.delenv("PAYMENT_SERVICE")
    (host_modules / ".env").write_text("PAYMENT_SERVICE=shop_hooks:instance\n")
    async with open_host(None) as host:
        assert type(host.service).__name__ == "ShopPayments"


async def test_an_explicit_database_url_is_the_modules_own_engine(
    host_modules: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAYMENT_DATABASE_URL", f"sqlite:///{host_modules}/missing.db")
    with pytest.raises(HostSetupError, match="does not exist"):
        async with open_host("shop_hooks:bare"):
            pass
    assert not (host_modules / "missing.db").exists()
    get_settings.cache_clear()  # the command reads its settings once; this test twice
    database = ModuleDatabase(f"sqlite:///{host_modules}/there.db")
    await database.create_all(Base.metadata)
    await database.dispose()
    monkeypatch.setenv("PAYMENT_DATABASE_URL", f"sqlite:///{host_modules}/there.db")
    async with open_host("shop_hooks:ShopPayments") as host:  # a subclass: instantiated
        assert type(host.service).__name__ == "ShopPayments"
        assert host.database is not None


def test_postgresql_without_asyncpg_is_refused_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec

    def without_asyncpg(name: str, *args: Any) -> Any:
        return None if name == "asyncpg" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_asyncpg)
    with pytest.raises(PaymentConfigurationError, match=r"\[postgres\]"):
        normalize_database_url("postgresql://u@db/pay")
    # An explicit driver is the host's choice.
    assert normalize_database_url("postgresql+psycopg://u@db/pay").startswith("postgresql+psycopg")


# --- reconcile_once on a synchronous sessionmaker --------------------------------------------


def _sync_url(database_url: str) -> str:
    url = make_url(database_url)
    if url.get_backend_name() == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return url.render_as_string(hide_password=False)


async def test_reconcile_once_accepts_a_synchronous_sessionmaker(database_url: str) -> None:
    engine = create_engine(_sync_url(database_url))
    Base.metadata.create_all(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)
    settings = load_settings(mpesa_environment="simulator")

    async def no_sleep(_: float) -> None:
        return None

    client = MpesaClient(
        ClientConfig.from_settings(settings),
        transport=SimulatorTransport(MpesaSimulator(SimulatorConfig())),
        sleep=no_sleep,
    )
    service = PaymentService(settings, client)
    try:
        with sessions() as db, pytest.raises(PaymentOutcomeUnknownError):
            await service.initiate_payment(
                request=PaymentInitiateRequest(phone_number=DROPPED, amount="10"), db=db
            )
        report = await reconcile_once(service, sessions, min_age=0)
        assert (report.examined, report.settled, report.errors) == (1, 1, 0)
        with sessions() as db:
            listed = await service.list(db)
        assert [item.status for item in listed.items] == ["completed"]
    finally:
        await service.aclose()
        engine.dispose()


# --- the README's warning: a host dependency holding a session across the PIN wait -----------


#: The shop's sessionmaker of the test below (module level: FastAPI resolves the dependencies'
#: annotations from the module's globals).
_shop_sessions: list[sessionmaker[Session]] = []


def _shop_get_db() -> Iterator[Session]:
    db = _shop_sessions[0]()
    try:
        yield db
    finally:
        db.close()


def _holding_auth(db: Annotated[Session, Depends(_shop_get_db)]) -> str:
    db.execute(text("SELECT 1"))
    return "alice"


def _releasing_auth() -> str:
    with _shop_sessions[0]() as db:
        db.execute(text("SELECT 1"))
    return "alice"


async def test_a_dependency_holding_a_session_keeps_a_connection_through_the_pin_wait(
    tmp_path: Path,
) -> None:
    """What README.md warns about, measured: ``Depends(get_db)`` in the host's auth keeps one
    connection checked out while the customer types the PIN; the pattern it shows (open and
    close the session inside the dependency) keeps none."""
    import asyncio

    import httpx

    from payments import get_db as payments_get_db

    engine = create_engine(f"sqlite:///{tmp_path}/shop.db")
    Base.metadata.create_all(engine)
    _shop_sessions[:] = [sessionmaker(engine, expire_on_commit=False)]
    holding, releasing, host_get_db = _holding_auth, _releasing_auth, _shop_get_db

    async def connections_during_the_pin(auth: Any) -> int:
        settings = load_settings(mpesa_environment="simulator")
        simulator = MpesaSimulator(SimulatorConfig(pin_delay_seconds=2.0))
        client = MpesaClient(
            ClientConfig.from_settings(settings), transport=SimulatorTransport(simulator)
        )
        service = PaymentService(settings, client)
        app = FastAPI()
        app.include_router(create_payment_router(auth=auth, service=lambda: service), prefix="/api")
        app.dependency_overrides[payments_get_db] = host_get_db
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://shop") as http:
                paying = asyncio.create_task(
                    http.post(
                        "/api/payments/initiate", json={"phone_number": SUCCESS, "amount": 10}
                    )
                )
                # Sample once the request is with the provider: the customer is typing the PIN.
                # (Waiting for the call rather than a fixed time: on a loaded machine the
                # request can take longer than any fixed sleep to get there.)
                for _ in range(500):
                    if simulator.calls("c2b"):
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.05)
                during = engine.pool.checkedout()
                assert (await paying).status_code == 200
            return during
        finally:
            await service.aclose()

    try:
        assert await connections_during_the_pin(holding) == 1
        assert await connections_during_the_pin(releasing) == 0
    finally:
        engine.dispose()


async def test_a_customer_cannot_replay_another_customers_idempotency_key(
    payment_api_factory: PaymentApiFactory,
) -> None:
    api = await payment_api_factory(
        router_options={"customer_auth": bearer_identity, "staff_auth": staff_only}
    )
    body = {"phone_number": SUCCESS, "amount": 10, "idempotency_key": "order-1"}
    first = await api.http.post("/api/payments/initiate", headers=customer("alice"), json=body)
    assert first.status_code == 200
    again = await api.http.post("/api/payments/initiate", headers=customer("alice"), json=body)
    assert again.json()["transaction_id"] == first.json()["transaction_id"]  # her own replay
    stolen = await api.http.post("/api/payments/initiate", headers=customer("bob"), json=body)
    assert stolen.status_code == 409 and stolen.json()["error_code"] == "idempotency_conflict"
    assert first.json()["transaction_id"] not in stolen.text
    assert await api.count() == 1
