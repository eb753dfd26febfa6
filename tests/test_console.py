"""The console over HTTP (SQLite and PostgreSQL): sign-in and its cookie, CSRF, a host's own auth,
filters and search, CSV, actions audited with the operator, and no full phone number anywhere."""

from __future__ import annotations

import csv
import io
import re
from datetime import timedelta

import pytest
from fastapi import Header, HTTPException
from sqlalchemy import select, update

from payments.models import PaymentAuditLog, PaymentTransaction, utcnow
from payments.router import require_api_key

from .support import TEST_ADMIN_KEY, TEST_CALLBACK_TOKEN, PaymentApi, PaymentApiFactory

CONSOLE = "/api/payments/console/"
NO_KEY = {"X-API-Key": ""}
PHONES = ("258841230001", "258841230002", "258851230003")


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


async def sign_in(api: PaymentApi, name: str = "ana.m") -> str:
    """Signs the client in; returns the session's CSRF token."""
    api.http.headers.pop("X-API-Key", None)
    form = await api.http.get(CONSOLE + "login")
    assert form.status_code == 200
    answer = await api.http.post(
        CONSOLE + "login",
        data={"csrf_token": csrf_of(form.text), "api_key": TEST_ADMIN_KEY, "operator": name},
    )
    assert answer.status_code == 303, answer.text
    overview = await api.http.get(CONSOLE)
    assert overview.status_code == 200
    return csrf_of(overview.text)


async def seed(api: PaymentApi) -> list[dict]:
    made = []
    for i, phone in enumerate(PHONES):
        answer = await api.http.post(
            "/api/payments/initiate",
            json={
                "phone_number": phone,
                "amount": f"{100 + i}.25",
                "account_reference": f"ORDER-{i}",
                "entity_type": "order",
                "entity_id": str(i),
            },
            headers={"X-API-Key": TEST_ADMIN_KEY},
        )
        assert answer.status_code == 200, answer.text
        made.append(answer.json())
    return made


async def test_sign_in_sets_a_signed_strict_http_only_cookie_never_the_key(
    payment_api: PaymentApi,
) -> None:
    payment_api.http.headers.pop("X-API-Key")
    first = await payment_api.http.get(CONSOLE)
    assert first.status_code == 303 and first.headers["location"].endswith("/console/login")
    form = await payment_api.http.get(CONSOLE + "login")
    token = csrf_of(form.text)

    wrong = await payment_api.http.post(
        CONSOLE + "login", data={"csrf_token": token, "api_key": "wrong-key"}
    )
    assert wrong.status_code == 401 and "payments_console=" not in wrong.headers.get(
        "set-cookie", ""
    )
    no_csrf = await payment_api.http.post(CONSOLE + "login", data={"api_key": TEST_ADMIN_KEY})
    assert no_csrf.status_code == 403

    ok = await payment_api.http.post(
        CONSOLE + "login", data={"csrf_token": token, "api_key": TEST_ADMIN_KEY}
    )
    assert ok.status_code == 303
    cookie = next(c for c in ok.headers.get_list("set-cookie") if c.startswith("payments_console="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert "Path=/api/payments/console/" in cookie
    assert TEST_ADMIN_KEY not in cookie
    page = await payment_api.http.get(CONSOLE)
    assert page.status_code == 200 and "Overview" in page.text
    assert TEST_ADMIN_KEY not in page.text

    # A tampered cookie is no session.
    value = payment_api.http.cookies.get("payments_console")
    assert value
    payment_api.http.cookies.set(
        "payments_console", value[:-3] + "AAA", path="/api/payments/console/"
    )
    assert (await payment_api.http.get(CONSOLE)).status_code == 303


async def test_every_post_needs_the_csrf_token_and_sign_out_clears_the_session(
    payment_api: PaymentApi,
) -> None:
    made = await seed(payment_api)
    csrf = await sign_in(payment_api)
    target = CONSOLE + f"payments/{made[0]['transaction_id']}/refresh"
    assert (await payment_api.http.post(target, data={"confirmed": "yes"})).status_code == 403
    wrong = await payment_api.http.post(target, data={"confirmed": "yes", "csrf_token": "x" * 32})
    assert wrong.status_code == 403
    cross_site = await payment_api.http.post(
        target,
        data={"confirmed": "yes", "csrf_token": csrf},
        headers={"Origin": "https://evil.example"},
    )
    assert cross_site.status_code == 403
    async with payment_api.session_factory() as db:
        actions = await db.scalars(
            select(PaymentAuditLog.action).where(PaymentAuditLog.action == "operator_action")
        )
        assert list(actions) == []  # nothing refused was done

    confirm = await payment_api.http.post(target, data={"csrf_token": csrf})
    assert confirm.status_code == 200 and "Confirm: refresh" in confirm.text
    done = await payment_api.http.post(target, data={"csrf_token": csrf, "confirmed": "yes"})
    assert done.status_code == 303 and "done=" in done.headers["location"]
    async with payment_api.session_factory() as db:
        actors = list(
            await db.scalars(
                select(PaymentAuditLog.actor).where(PaymentAuditLog.action == "operator_action")
            )
        )
    assert actors == ["ana.m (admin key)"]

    out = await payment_api.http.post(CONSOLE + "logout", data={"csrf_token": csrf})
    assert out.status_code == 303
    assert (
        'payments_console=""' in out.headers["set-cookie"]
        or "Max-Age=0" in out.headers["set-cookie"]
    )
    assert (await payment_api.http.get(CONSOLE)).status_code == 303


async def test_pages_filters_search_and_csv_show_no_full_phone_number(
    payment_api: PaymentApi,
) -> None:
    made = await seed(payment_api)
    await sign_in(payment_api)
    pages = [
        await payment_api.http.get(CONSOLE),
        await payment_api.http.get(CONSOLE + "payments"),
        await payment_api.http.get(CONSOLE + "notifications"),
        *[await payment_api.http.get(CONSOLE + f"payments/{p['transaction_id']}") for p in made],
    ]
    for page in pages:
        assert page.status_code == 200
        for phone in PHONES:
            assert phone not in page.text and phone[3:] not in page.text
        assert TEST_ADMIN_KEY not in page.text and TEST_CALLBACK_TOKEN not in page.text
        assert "<script" not in page.text.lower()  # usable without JavaScript

    async def listed(query: str) -> set[str]:
        page = await payment_api.http.get(CONSOLE + "payments" + query, follow_redirects=True)
        assert page.status_code == 200, page.text
        for phone in PHONES:
            assert phone not in page.text and phone not in str(page.url)
        return {p["transaction_id"] for p in made if p["transaction_id"] in page.text}

    everyone = {p["transaction_id"] for p in made}
    assert await listed("") == everyone
    assert await listed("?phone=851230003") == {made[2]["transaction_id"]}
    assert await listed("?reference=ORDER-1") == {made[1]["transaction_id"]}
    assert await listed("?entity_type=order&entity_id=0") == {made[0]["transaction_id"]}
    assert await listed(f"?q={made[1]['provider_transaction_id']}") == {made[1]["transaction_id"]}
    assert await listed(f"?q={made[2]['third_party_reference']}") == {made[2]["transaction_id"]}
    assert await listed(f"?q={made[0]['transaction_id']}") == {made[0]["transaction_id"]}
    assert await listed("?status=failed") == set()
    assert await listed("?operation=c2b&status=completed") == everyone
    today = utcnow().date()
    assert await listed(f"?from_date={today}&to_date={today}") == everyone
    assert await listed(f"?to_date={today - timedelta(days=1)}") == set()
    bad = await payment_api.http.get(CONSOLE + "payments?from_date=yesterday")
    assert bad.status_code == 200 and "from_date" in bad.text

    redirected = await payment_api.http.get(CONSOLE + "payments?phone=841230001&status=completed")
    assert redirected.status_code == 303
    location = redirected.headers["location"]
    assert "841230001" not in location and "phone_token=" in location
    exported = await payment_api.http.get(CONSOLE + "payments.csv" + location)
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [(r["transaction_id"], r["amount"], r["phone_number"]) for r in rows] == [
        (made[0]["transaction_id"], "100.25", "2588412*****")
    ]
    everything = await payment_api.http.get(CONSOLE + "payments.csv")
    assert sorted(r["amount"] for r in csv.DictReader(io.StringIO(everything.text))) == [
        "100.25",
        "101.25",
        "102.25",
    ]


async def test_work_queue_lists_open_payments_oldest_first(payment_api: PaymentApi) -> None:
    made = await seed(payment_api)
    async with payment_api.session_factory() as db:
        for payment, status, flagged, minutes in (
            (made[0], "unknown", False, 30),
            (made[1], "processing", False, 90),
            (made[2], "failed", True, 10),
        ):
            await db.execute(
                update(PaymentTransaction)
                .where(PaymentTransaction.transaction_id == payment["transaction_id"])
                .values(
                    status=status,
                    attention_required=flagged,
                    created_at=utcnow() - timedelta(minutes=minutes),
                )
            )
        await db.commit()
    await sign_in(payment_api)
    page = (await payment_api.http.get(CONSOLE)).text
    queue = page[page.index('id="work-queue"') :]
    positions = [queue.index(made[i]["transaction_id"]) for i in (1, 0, 2)]
    assert positions == sorted(positions)  # oldest first
    assert "1 h 30 min" in queue and "30 min" in queue and "10 min" in queue
    assert "stuck in processing" in queue and "attention required" in queue


@pytest.mark.parametrize("option", ["staff_auth", "auth"])
async def test_a_hosts_own_auth_works_without_a_sign_in_form(
    payment_api_factory: PaymentApiFactory, option: str
) -> None:
    async def host_staff(x_staff: str | None = Header(default=None)) -> str:
        if x_staff != "ops-lead":
            raise HTTPException(status_code=403, detail="staff only")
        return "ops-lead"

    api = await payment_api_factory(router_options={option: host_staff})
    made = await seed_with(api, {"X-Staff": "ops-lead"})
    assert (await api.http.get(CONSOLE)).status_code == 403
    api.http.headers["X-Staff"] = "ops-lead"
    overview = await api.http.get(CONSOLE)
    assert overview.status_code == 200 and "ops-lead" in overview.text
    assert "Sign out" not in overview.text
    assert (await api.http.get(CONSOLE + "login")).status_code == 303
    detail = await api.http.get(CONSOLE + f"payments/{made['transaction_id']}")
    csrf = csrf_of(detail.text)
    target = CONSOLE + f"payments/{made['transaction_id']}/refresh"
    assert (await api.http.post(target, data={"confirmed": "yes"})).status_code == 403
    done = await api.http.post(target, data={"confirmed": "yes", "csrf_token": csrf})
    assert done.status_code == 303


async def seed_with(api: PaymentApi, headers: dict[str, str]) -> dict:
    answer = await api.http.post(
        "/api/payments/initiate",
        json={"phone_number": PHONES[0], "amount": "10"},
        headers=headers,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


async def test_an_app_override_of_the_key_check_is_the_console_auth(
    payment_api: PaymentApi,
) -> None:
    async def everyone_is_ops() -> str:
        return "sso:maria"

    payment_api.app.dependency_overrides[require_api_key] = everyone_is_ops
    payment_api.http.headers.pop("X-API-Key")
    overview = await payment_api.http.get(CONSOLE)
    assert overview.status_code == 200 and "sso:maria" in overview.text


async def test_console_can_be_switched_off(payment_api_factory: PaymentApiFactory) -> None:
    api = await payment_api_factory(router_options={"console": False})
    assert (await api.http.get(CONSOLE)).status_code == 404
    assert (await api.http.get(CONSOLE + "login")).status_code == 404
    assert (await api.http.get("/api/payments/metrics")).status_code == 200


async def test_replaying_a_notification_is_audited_with_the_operator(
    payment_api: PaymentApi,
) -> None:
    made = await seed(payment_api)
    notice = {
        "input_ThirdPartyReference": made[0]["third_party_reference"],
        "input_ResultCode": "INS-0",
        "input_TransactionID": made[0]["provider_transaction_id"],
        "input_ConversationID": made[0]["conversation_id"],
    }
    stored = await payment_api.http.post("/api/payments/callback/c2b", json=notice)
    assert stored.status_code in (200, 500), stored.text
    csrf = await sign_in(payment_api, "joao")
    page = await payment_api.http.get(CONSOLE + "notifications?valid=true")
    assert page.status_code == 200
    webhook_id = re.search(r"notifications/(\d+)/replay", page.text)
    assert webhook_id, page.text
    target = CONSOLE + f"notifications/{webhook_id.group(1)}/replay"
    done = await payment_api.http.post(target, data={"csrf_token": csrf, "confirmed": "yes"})
    assert done.status_code == 303, done.text
    async with payment_api.session_factory() as db:
        rows = list(
            await db.execute(
                select(PaymentAuditLog.actor, PaymentAuditLog.request_body).where(
                    PaymentAuditLog.action == "operator_action"
                )
            )
        )
    assert len(rows) == 1 and rows[0][0] == "joao (admin key)"
    assert rows[0][1]["action"] == "replay_notification"


async def test_events_page_and_redelivery_audited_with_the_operator(
    payment_api_factory: PaymentApiFactory,
) -> None:
    """Events with their deliveries and attempts (a real loopback receiver answering 500, then
    200), on the events page and the payment's page; redelivery behind a confirmation, CSRF,
    audited with the operator; the receiver gets the same event id again."""
    from payments.dispatcher import dispatch_once

    from .test_events import Receiver, serving, webhook_settings

    async with serving(Receiver(answers=[500])) as receiver:
        api = await payment_api_factory(
            settings_overrides=webhook_settings(
                receiver.url, payment_dispatch_in_app=False, payment_webhook_retry_base_seconds=60
            )
        )
        made = await seed(api)
        transaction_id = made[0]["transaction_id"]
        await dispatch_once(api.service, api.session_factory, prune=False)
        csrf = await sign_in(api, "rita")

        listed = await api.http.get(CONSOLE + "events")
        assert listed.status_code == 200
        assert 'href="/api/payments/console/events"' in listed.text  # in the navigation
        assert listed.text.count("payment.completed") >= 3
        assert "HTTP 500" in listed.text and "HTTP 200" in listed.text
        assert receiver.url in listed.text and "pending" in listed.text  # the 500 is due again
        for phone in PHONES:
            assert phone not in listed.text
        filtered = await api.http.get(CONSOLE + "events", params={"transaction_id": transaction_id})
        event_ids = re.findall(r"events/(evt_[0-9a-f]+)/redeliver", filtered.text)
        assert len(event_ids) == 1
        event_id = event_ids[0]
        typed = await api.http.get(CONSOLE + "events", params={"type": "payment.failed"})
        assert "No events." in typed.text
        bad = await api.http.get(CONSOLE + "events", params={"type": "nope"})
        assert bad.status_code == 200 and "not an event type" in bad.text

        detail = await api.http.get(CONSOLE + f"payments/{transaction_id}")
        assert event_id in detail.text and receiver.url in detail.text

        target = CONSOLE + f"events/{event_id}/redeliver"
        refused = await api.http.post(target, data={"confirmed": "yes"})
        assert refused.status_code == 403
        confirm = await api.http.post(target, data={"csrf_token": csrf, "back": "detail"})
        assert confirm.status_code == 200 and "Confirm: redeliver" in confirm.text
        assert receiver.url in confirm.text
        sent_before = receiver.event_ids().count(event_id)
        done = await api.http.post(
            target, data={"csrf_token": csrf, "back": "detail", "confirmed": "yes"}
        )
        assert done.status_code == 303, done.text
        assert done.headers["location"].startswith(CONSOLE + f"payments/{transaction_id}?done=")
        await dispatch_once(api.service, api.session_factory, prune=False)
        assert receiver.event_ids().count(event_id) == sent_before + 1
        shown = await api.http.get(CONSOLE + "events", params={"transaction_id": transaction_id})
        answers = re.findall(r'class="badge d-(?:delivered|failed)">HTTP (\d+)<', shown.text)
        assert len(answers) == sent_before + 1 and answers[-1] == "200"  # the new attempt

        missing = await api.http.post(
            CONSOLE + "events/evt_nope/redeliver", data={"csrf_token": csrf, "confirmed": "yes"}
        )
        assert missing.status_code == 303 and "failed=" in missing.headers["location"]
        async with api.session_factory() as db:
            rows = list(
                await db.execute(
                    select(PaymentAuditLog.actor, PaymentAuditLog.request_body).where(
                        PaymentAuditLog.action == "operator_action"
                    )
                )
            )
        assert len(rows) == 1 and rows[0][0] == "rita (admin key)"
        assert rows[0][1] == {
            "action": "redeliver_event",
            "event_id": event_id,
            "type": "payment.completed",
            "via": "console",
        }


async def test_deep_list_pages_are_read_from_a_cursor_not_an_offset(
    payment_api: PaymentApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Older → carries a keyset cursor (the page after the last row shown), so a deep page is an
    index range whatever its depth; page numbers reach only the first pages."""
    import payments.console as console
    from payments import repository

    monkeypatch.setattr(console, "PER_PAGE", 2)
    monkeypatch.setattr(console, "OFFSET_PAGES", 1)
    offsets: list[int] = []
    real_page = repository.console_page

    def spy(session, filters, **options):  # type: ignore[no-untyped-def]
        offsets.append(0 if options.get("after") else options["page"])
        return real_page(session, filters, **options)

    monkeypatch.setattr(repository, "console_page", spy)
    made = await seed(payment_api)
    newest_first = [m["transaction_id"] for m in reversed(made)]
    await sign_in(payment_api)

    first = await payment_api.http.get(CONSOLE + "payments")
    assert "Page 1 of 2" in first.text
    shown = re.findall(r"payments/(TXN-[A-Z0-9-]+)\"", first.text)
    assert shown[:2] == newest_first[:2]
    older = re.search(r'id="older" href="\?([^"]+)"', first.text)
    assert older and "cursor=" in older.group(1) and "page=" not in older.group(1)
    second = await payment_api.http.get(
        CONSOLE + "payments?" + older.group(1).replace("&amp;", "&")
    )
    assert second.status_code == 200 and "Page 2 of 2" in second.text
    assert re.findall(r"payments/(TXN-[A-Z0-9-]+)\"", second.text)[:1] == newest_first[2:]
    assert 'id="older"' not in second.text
    assert offsets == [1, 0]  # the second page came from the cursor, no OFFSET

    deep = await payment_api.http.get(CONSOLE + "payments?page=2")  # beyond the OFFSET pages
    assert deep.status_code == 200 and "Older →" in deep.text and "Page 1 of 2" in deep.text
    broken = await payment_api.http.get(CONSOLE + "payments?cursor=not-a-cursor")
    assert broken.status_code == 200 and "not valid any more" in broken.text
    filtered = await payment_api.http.get(CONSOLE + "payments?operation=c2b")
    assert "cursor=" in filtered.text and "operation=c2b" in filtered.text
