"""The console in a real browser: Playwright driving Debian's Chromium (``/usr/bin/chromium``, or
``PAYMENT_TEST_CHROMIUM``), against the app served on a loopback port. Screenshots of every page
go to ``artifacts/console/`` (gitignored)."""

from __future__ import annotations

import csv
import io
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import async_sessionmaker

from payments.config import load_settings
from payments.database import create_engine_for
from payments.exceptions import PaymentError
from payments.models import Base, PaymentTransaction, utcnow
from payments.mpesa.client import ClientConfig, MpesaClient
from payments.reconciliation import reconcile_once
from payments.schemas import PaymentInitiateRequest
from payments.service import PaymentService
from payments.simulator.app import MpesaSimulator, SimulatorConfig
from payments.simulator.transport import SimulatorTransport

from .console_server import live_console
from .support import TEST_ADMIN_KEY, TEST_CALLBACK_TOKEN

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = os.environ.get("PAYMENT_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "console"
#: The customer whose answer M-Pesa's gateway drops (the simulator's fault 1): recorded there as
#: Completed, unknown here.
LOST_ANSWER_PHONE = "258842000001"

_HAVE_CHROMIUM = shutil.which(CHROMIUM) is not None or Path(CHROMIUM).exists()
if not _HAVE_CHROMIUM and os.environ.get("PAYMENT_REQUIRE_BROWSER") == "1":
    raise RuntimeError(f"PAYMENT_REQUIRE_BROWSER=1 but there is no Chromium at {CHROMIUM}")
pytestmark = pytest.mark.skipif(
    not _HAVE_CHROMIUM,
    reason=f"needs Chromium at {CHROMIUM} (.ci/run installs Debian's chromium)",
)


async def _no_sleep(_: float) -> None:
    return None


@asynccontextmanager
async def seeded(url: str, simulator: MpesaSimulator) -> AsyncIterator[dict[str, Any]]:
    """Payments made the way production makes them, through the service and the simulator: four
    completed, one cancelled, and one whose answer was lost and that reconciliation flagged."""
    engine = create_engine_for(url)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    settings = load_settings(mpesa_environment="simulator", payment_c2b_timeout=5)
    client = MpesaClient(
        ClientConfig.from_settings(settings),
        transport=SimulatorTransport(simulator),
        sleep=_no_sleep,
    )
    service = PaymentService(settings, client, db_retry_delays=(0.01,))
    made: dict[str, Any] = {"completed": []}
    try:
        async with sessions() as db:
            for i, amount in enumerate(("100.00", "250.50", "75.00", "1200.00")):
                paid = await service.initiate_payment(
                    PaymentInitiateRequest(
                        amount=Decimal(amount),
                        phone_number=f"25884{1230000 + i}",
                        account_reference=f"ORDER-{i}",
                    ),
                    db,
                    actor="shop",
                )
                made["completed"].append(paid.transaction_id)
                made.setdefault("paid", []).append(paid)
            with pytest.raises(PaymentError):
                await service.initiate_payment(
                    PaymentInitiateRequest(
                        amount=Decimal("30"),
                        phone_number="258841000005",
                        account_reference="ORDER-C",
                    ),
                    db,
                    actor="shop",
                )
            with pytest.raises(PaymentError):
                await service.initiate_payment(
                    PaymentInitiateRequest(
                        amount=Decimal("500"),
                        phone_number=LOST_ANSWER_PHONE,
                        account_reference="ORDER-L",
                    ),
                    db,
                    actor="shop",
                )
            lost = (
                await db.scalars(
                    select(PaymentTransaction).where(PaymentTransaction.status == "unknown")
                )
            ).one()
            made["flagged"] = lost.transaction_id
            made["flagged_reference"] = lost.third_party_reference
            # An hour older, so the work queue shows a real age.
            await db.execute(
                update(PaymentTransaction)
                .where(PaymentTransaction.id == lost.id)
                .values(created_at=utcnow().replace(microsecond=0) - _hours(2))
            )
            await db.commit()
        report = await reconcile_once(service, sessions, min_age=0, attention_after=0)
        assert report.flagged == 1, report
        yield made
    finally:
        await service.aclose()
        await engine.dispose()


def _hours(n: int) -> Any:
    from datetime import timedelta

    return timedelta(hours=n)


async def _shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def test_operator_resolves_and_reverses_a_flagged_payment_in_the_browser(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/console.db"
    # A status query by our third-party reference finds nothing: M-Pesa's answers cannot settle
    # the lost payment, so it waits in the work queue for an operator.
    simulator = MpesaSimulator(SimulatorConfig(query_by_third_party_reference=False))
    async with seeded(url, simulator) as made:
        mpesa_id = simulator._by_reference[made["flagged_reference"]].transaction_id
        with live_console(url, simulator=simulator) as live:
            async with playwright_api.async_playwright() as p:
                browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                try:
                    await _walk_through(browser, live, made, mpesa_id)
                    await _phone_screen(browser, live)
                finally:
                    await browser.close()


async def _walk_through(browser: Any, live: Any, made: dict[str, Any], mpesa_id: str) -> None:
    context = await browser.new_context(
        accept_downloads=True, viewport={"width": 1280, "height": 900}
    )
    page = await context.new_page()

    # Signed out: the console sends the browser to the sign-in form.
    await page.goto(live.console)
    assert page.url.endswith("/console/login")
    await _shot(page, "01-sign-in")

    # A wrong key is refused, and no session cookie is set.
    await page.fill("#api_key", "not-the-key")
    await page.click("button[type=submit]")
    assert "Wrong key" in await page.inner_text("main")
    assert not [c for c in await context.cookies() if c["name"] == "payments_console"]
    await _shot(page, "02-wrong-key")

    await page.fill("#api_key", TEST_ADMIN_KEY)
    await page.fill("#operator", "ana.m")
    await page.click("button[type=submit]")
    assert page.url == live.console
    session = next(c for c in await context.cookies() if c["name"] == "payments_console")
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert TEST_ADMIN_KEY not in session["value"]

    # The flagged payment waits in the work queue, with its age.
    queue = page.locator("#work-queue")
    assert made["flagged"] in await queue.inner_text()
    assert "2 h" in await queue.inner_text()
    assert "attention required" in await queue.inner_text()
    await _shot(page, "03-overview")

    await queue.locator(f"a:has-text('{made['flagged']}')").click()
    assert page.url.endswith(f"/payments/{made['flagged']}")
    body = await page.inner_text("main")
    assert "258842000001" not in body and "2588420*****" in body
    await _shot(page, "04-detail-flagged")

    # Resolve it with M-Pesa's transaction ID and a reason, behind a confirmation.
    await page.select_option("#resolve-status", "completed")
    await page.fill("#resolve-id", mpesa_id)
    await page.fill("#resolve-reason", "Customer showed the M-Pesa SMS; confirmed on the portal")
    await page.click("#resolve-form button[type=submit]")
    assert "Confirm: resolve" in await page.inner_text("h1")
    await _shot(page, "05-confirm-resolve")
    await page.click("#confirm")
    assert "Resolved: completed" in await page.inner_text(".notice")
    assert "completed" in await page.inner_text("h1")
    audit = await page.inner_text("#audit")
    assert "operator_resolved" in audit and "ana.m (admin key)" in audit
    assert "unknown → completed" in audit
    await _shot(page, "06-detail-resolved")

    # Reverse part of it.
    await page.fill("#reverse-amount", "120.00")
    await page.fill("#reverse-reason", "Customer returned one item")
    await page.click("#reverse-form button[type=submit]")
    assert "Confirm: reverse" in await page.inner_text("h1")
    await page.click("#confirm")
    notice = await page.inner_text(".notice")
    assert "Reversal" in notice and "completed" in notice and "120.00" in notice
    assert "partially_reversed" in await page.inner_text("h1")
    assert "120.00 reversed" in await page.inner_text("main")
    audit = await page.inner_text("#audit")
    assert "operator_action" in audit and "ana.m (admin key)" in audit
    await _shot(page, "07-detail-reversed")

    # The list, filtered, and its CSV export.
    await page.goto(live.console + "payments?operation=c2b&status=completed")
    await _shot(page, "08-payments")
    async with page.expect_download() as download_info:
        await page.click("#csv")
    download = await download_info.value
    rows = list(csv.DictReader(io.StringIO(Path(await download.path()).read_text())))
    assert sorted(r["transaction_id"] for r in rows) == sorted(made["completed"])
    assert sorted(r["amount"] for r in rows) == ["100.00", "1200.00", "250.50", "75.00"]
    assert all(r["status"] == "completed" and r["phone_number"].endswith("*****") for r in rows)

    # Filtering by a phone number never leaves the number on the page.
    await page.fill("#phone", "841230001")
    await page.click("form.filters button[type=submit]")
    html = await page.content()
    assert "841230001" not in html and "258841230001" not in html
    assert "1 payment" in await page.inner_text("main")

    # M-Pesa's notice of a paid payment, and a forged one; then the operator replays the first.
    paid = made["paid"][0]
    notice = {
        "input_OriginalConversationID": paid.conversation_id,
        "input_ThirdPartyReference": paid.third_party_reference,
        "input_TransactionID": paid.provider_transaction_id,
        "input_ResultCode": "INS-0",
        "input_ResultDesc": "Request processed successfully",
    }
    callback = live.base_url + "/api/payments/callback/c2b"
    stored = await context.request.post(
        callback, data=notice, headers={"X-Callback-Token": TEST_CALLBACK_TOKEN}
    )
    assert stored.status == 200
    forged = await context.request.post(callback, data=notice, headers={"X-Callback-Token": "x"})
    assert forged.status == 401
    await page.goto(live.console + "notifications")
    listing = await page.inner_text("main")
    assert "2 stored" in listing and "invalid" in listing and paid.transaction_id in listing
    await _shot(page, "09-notifications")
    await page.click("form[action$='/replay'] button")
    assert "Confirm: replay" in await page.inner_text("h1")
    await page.click("#confirm")
    assert "replayed: processed" in await page.inner_text(".notice")

    # A POST without the CSRF token is refused, even with the session cookie.
    refused = await context.request.post(
        live.console + f"payments/{made['flagged']}/refresh",
        form={"confirmed": "yes"},
        max_redirects=0,
    )
    assert refused.status == 403
    # Sign-out clears the session.
    await page.goto(live.console)
    await page.click("header button[type=submit]")
    assert page.url.endswith("/console/login")
    assert not [c for c in await context.cookies() if c["name"] == "payments_console"]
    await context.close()


async def _phone_screen(browser: Any, live: Any) -> None:
    """The overview on a phone-sized screen (the tables turn into stacked rows)."""
    context = await browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    page = await context.new_page()
    await page.goto(live.console + "login")
    await page.fill("#api_key", TEST_ADMIN_KEY)
    await page.click("button[type=submit]")
    await _shot(page, "10-overview-phone")
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 400, f"the page scrolls sideways on a phone ({width} px)"
    await page.goto(live.console + "payments")
    await _shot(page, "11-payments-phone")
    await page.locator("td[data-label=Payment] a").first.click()
    await _shot(page, "12-detail-phone")
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 400, f"the detail page scrolls sideways on a phone ({width} px)"
    await context.close()


async def test_operator_redelivers_an_event_and_sees_the_new_attempt(tmp_path: Path) -> None:
    """The events page in a browser: deliveries to a real loopback receiver (one answered 500),
    redeliver an event behind its confirmation, and the new attempt appears."""
    from payments.dispatcher import dispatch_once

    from .test_events import Receiver, make_service, pay, serving, webhook_settings

    url = f"sqlite:///{tmp_path}/events.db"
    engine = create_engine_for(url)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    async with serving(Receiver(answers=[500])) as receiver:
        settings = webhook_settings(
            receiver.url, payment_dispatch_in_app=False, payment_webhook_retry_base_seconds=600
        )
        service = make_service(**settings)
        try:
            paid = [await pay(service, sessions) for _ in range(2)]
            report = await dispatch_once(service, sessions, prune=False)
            assert (report.delivered, report.retried) == (1, 1)
            with live_console(url, settings_overrides=settings) as live:
                async with playwright_api.async_playwright() as p:
                    browser = await p.chromium.launch(
                        executable_path=CHROMIUM, args=["--no-sandbox"]
                    )
                    try:
                        await _redeliver(browser, live, paid, receiver, service, sessions)
                    finally:
                        await browser.close()
        finally:
            await service.aclose()
            await engine.dispose()


async def _redeliver(
    browser: Any, live: Any, paid: list[str], receiver: Any, service: Any, sessions: Any
) -> None:
    from payments.dispatcher import dispatch_once

    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    await page.goto(live.console + "login")
    await page.fill("#api_key", TEST_ADMIN_KEY)
    await page.fill("#operator", "rita")
    await page.click("button[type=submit]")
    await page.click("header a:has-text('Events')")
    assert page.url.endswith("/console/events")
    cards = page.locator("article.event")
    assert await cards.count() == 2
    text = await page.inner_text("main")
    assert "HTTP 500" in text and "HTTP 200" in text and receiver.url in text
    assert "pending" in text and "delivered" in text
    await _shot(page, "13-events")

    # Redeliver the event that was delivered (200): its receiver gets it once more.
    delivered = cards.filter(has_text="HTTP 200").first
    event_id = await delivered.get_attribute("id")
    assert event_id and receiver.event_ids().count(event_id) == 1
    await delivered.locator("button:has-text('Redeliver')").click()
    assert "Confirm: redeliver" in await page.inner_text("h1")
    assert receiver.url in await page.inner_text("main")
    await _shot(page, "14-confirm-redeliver")
    await page.click("#confirm")
    assert page.url.split("?")[0].endswith("/console/events")
    assert "due again at 1 endpoint" in await page.inner_text(".notice")
    card = page.locator(f"article[id='{event_id}']")
    assert "pending" in await card.inner_text()

    await dispatch_once(service, sessions, prune=False)
    assert receiver.event_ids().count(event_id) == 2
    await page.goto(live.console + "events")
    card = page.locator(f"article[id='{event_id}']")
    attempts = card.locator("ol.attempts li")
    assert await attempts.count() == 2  # the new attempt, listed after the first
    assert "HTTP 200" in await attempts.nth(1).inner_text()
    assert "delivered" in await card.inner_text()
    await _shot(page, "15-events-redelivered")

    # The payment's page lists its events; the audit names the operator.
    card_text = await card.inner_text()
    transaction_id = next(t for t in paid if t in card_text)
    await card.locator(f"a:has-text('{transaction_id}')").click()
    assert event_id in await page.inner_text("main")
    audit = await page.inner_text("#audit")
    assert "operator_action" in audit and "rita (admin key)" in audit
    await _shot(page, "16-detail-events")

    phone = await browser.new_context(
        viewport={"width": 390, "height": 844},
        is_mobile=True,
        storage_state=await context.storage_state(),
    )
    small = await phone.new_page()
    await small.goto(live.console + "events")
    await _shot(small, "17-events-phone")
    width = await small.evaluate("document.documentElement.scrollWidth")
    assert width <= 400, f"the events page scrolls sideways on a phone ({width} px)"
    await phone.close()
    await context.close()
