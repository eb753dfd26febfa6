"""``POST /payments/callback/c2b`` through the router: stored first (also when refused),
authenticated by token and caller address, answered in the provider's ``output_*`` shape, applied
once, never demoting a settled payment, and replayable."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from payments.models import PaymentAuditLog, PaymentTransaction, PaymentWebhookLog
from tests.support import (
    CANCELS,
    DROPPED,
    SUCCESS,
    PaymentApi,
    PaymentApiFactory,
    RecordingService,
    build_payment_api,
)

TOKEN = "cb-token-5d1e"
CALLBACK = "/api/payments/callback/c2b"
OUTPUT_KEYS = {
    "output_OriginalConversationID",
    "output_ResponseCode",
    "output_ResponseDesc",
    "output_ThirdPartyConversationID",
}

sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def events_of(api: PaymentApi) -> list[tuple[str, str, str]]:
    assert isinstance(api.service, RecordingService)
    return api.service.events


async def recording_api(
    factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch, **env: str
) -> PaymentApi:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return await factory(service_class=RecordingService)


def notification(payment: dict[str, Any], code: str, description: str = "") -> dict[str, str]:
    """The result shape, for one of our payments."""
    return {
        "input_OriginalConversationID": payment.get("conversation_id") or "",
        "input_ThirdPartyReference": payment["third_party_reference"],
        "input_TransactionID": payment.get("provider_transaction_id") or "",
        "input_ResultCode": code,
        "input_ResultDesc": description or f"result {code}",
    }


async def make_payment(api: PaymentApi, phone: str) -> dict[str, Any]:
    response = await api.http.post(
        "/api/payments/initiate", json={"phone_number": phone, "amount": 100}
    )
    body: dict[str, Any] = response.json()
    if response.status_code == 402:
        body = body["details"]["payment"]
    return body


async def unknown_payment(api: PaymentApi, *, provider_status: str = "Cancelled") -> dict[str, Any]:
    """A payment whose answer was lost; M-Pesa's record of it (what a status query will say) is
    ``provider_status``: by default the customer cancelled it."""
    payment = await make_payment(api, DROPPED)
    assert payment["status"] == "unknown", payment
    recorded = api.simulator.find(payment["third_party_reference"])
    assert recorded is not None
    recorded.status = provider_status  # type: ignore[assignment]
    return payment


async def status_of(api: PaymentApi, transaction_id: str) -> str:
    response = await api.http.get(f"/api/payments/status/{transaction_id}")
    assert response.status_code == 200, response.text
    status: str = response.json()["status"]
    return status


async def webhooks(api: PaymentApi, **params: Any) -> list[dict[str, Any]]:
    response = await api.http.get("/api/payments/webhooks", params=params)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return sorted(items, key=lambda item: item["id"])


def assert_answer(response: httpx.Response, status: int, code: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    body: dict[str, str] = response.json()
    assert set(body) == OUTPUT_KEYS, body
    assert body["output_ResponseCode"] == code, body
    assert "Traceback" not in response.text
    return body


async def audit_actions(api: PaymentApi, transaction_id: str) -> list[str]:
    async with api.session_factory() as session:
        row = (
            await session.scalars(
                select(PaymentTransaction).where(
                    PaymentTransaction.transaction_id == transaction_id
                )
            )
        ).one()
        entries = await session.scalars(
            select(PaymentAuditLog.action)
            .where(PaymentAuditLog.payment_id == row.id)
            .order_by(PaymentAuditLog.id)
        )
        return list(entries)


# --- authentication -----------------------------------------------------------------------------


async def test_missing_or_wrong_token_is_401_and_the_request_is_stored(
    payment_api_factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = await recording_api(payment_api_factory, monkeypatch, MPESA_CALLBACK_TOKEN=TOKEN)
    payment = await unknown_payment(api)
    body = notification(payment, "INS-5")

    refused = [
        await api.http.post(CALLBACK, json=body),
        await api.http.post(CALLBACK, json=body, headers={"X-Callback-Token": "wrong"}),
        await api.http.post(CALLBACK, json=body, params={"token": "wrong"}),
        await api.http.post(CALLBACK, json=body, headers={"X-Callback-Token": TOKEN + "x"}),
        await api.http.post(CALLBACK, json=body, headers={"Authorization": f"Bearer {TOKEN}"}),
    ]
    for response in refused:
        answer = assert_answer(response, 401, "INS-2")
        assert answer["output_ThirdPartyConversationID"] == payment["third_party_reference"]

    stored = await webhooks(api)
    assert len(stored) == len(refused)
    for item in stored:
        assert item["is_valid"] is False
        assert item["is_processed"] is False
        assert item["validation_error"] == "missing or wrong callback token"
        assert item["raw_body"] and payment["third_party_reference"] in item["raw_body"]
        assert item["remote_ip"] == "127.0.0.1"
    # Nothing was applied: the payment is still unknown, and no hook fired after initiation.
    assert await status_of(api, payment["transaction_id"]) == "unknown"
    assert [event[0] for event in events_of(api)] == ["unknown"]
    assert "callback_received" not in await audit_actions(api, payment["transaction_id"])
    # Secrets presented with a notification are not stored.
    async with api.session_factory() as session:
        headers = list(await session.scalars(select(PaymentWebhookLog.headers)))
    assert all(TOKEN not in str(h) for h in headers)
    assert any((h or {}).get("x-callback-token") == "***" for h in headers)


@sqlite_only
async def test_right_token_in_header_or_query_is_accepted_in_output_shape(
    payment_api_factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = await recording_api(payment_api_factory, monkeypatch, MPESA_CALLBACK_TOKEN=TOKEN)
    first, second = await unknown_payment(api), await unknown_payment(api)

    by_header = await api.http.post(
        CALLBACK, json=notification(first, "INS-5"), headers={"X-Callback-Token": TOKEN}
    )
    answer = assert_answer(by_header, 200, "0")
    assert answer["output_ResponseDesc"] == "Successfully Accepted Result"
    assert answer["output_ThirdPartyConversationID"] == first["third_party_reference"]

    by_query = await api.http.post(
        CALLBACK,
        json=notification(second, "INS-5"),
        params={"token": TOKEN},
        headers={"X-Callback-Token": ""},  # not the harness's default token
    )
    assert_answer(by_query, 200, "0")

    assert await status_of(api, first["transaction_id"]) == "cancelled"
    assert await status_of(api, second["transaction_id"]) == "cancelled"
    stored = await webhooks(api)
    assert [(item["is_valid"], item["is_processed"]) for item in stored] == [(True, True)] * 2
    assert TOKEN not in (await api.http.get("/api/payments/webhooks")).text


# --- processing ---------------------------------------------------------------------------------


async def test_failure_callback_settles_an_unknown_payment_cancelled(
    payment_api_factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = await recording_api(payment_api_factory, monkeypatch)
    payment = await unknown_payment(api)
    response = await api.http.post(
        CALLBACK, json=notification(payment, "INS-5", "Transaction cancelled by customer")
    )
    assert_answer(response, 200, "0")
    status = await api.http.get(f"/api/payments/status/{payment['transaction_id']}")
    assert status.json()["status"] == "cancelled"
    assert status.json()["response_code"] == "INS-5"
    assert status.json()["completed_at"] is not None
    assert events_of(api) == [
        ("unknown", payment["transaction_id"], "unknown"),
        ("failed", payment["transaction_id"], "cancelled"),
    ]
    actions = await audit_actions(api, payment["transaction_id"])
    assert actions.count("callback_received") == 1
    assert actions.count("failed") == 1
    stored = await webhooks(api)
    assert stored[0]["transaction_id"] is not None and stored[0]["is_processed"] is True


async def test_success_callback_is_confirmed_by_a_status_query(
    payment_api_factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = await recording_api(payment_api_factory, monkeypatch)
    payment = await unknown_payment(api, provider_status="Completed")
    queries = api.simulator.calls("query_status")
    response = await api.http.post(CALLBACK, json=notification(payment, "INS-0"))
    assert_answer(response, 200, "0")
    assert api.simulator.calls("query_status") == queries + 1  # trust, but verify
    assert await status_of(api, payment["transaction_id"]) == "completed"
    assert events_of(api)[-1] == ("completed", payment["transaction_id"], "completed")

    # A second delivery finds it settled: no second query, no second hook.
    again = await api.http.post(CALLBACK, json=notification(payment, "0"))
    assert_answer(again, 200, "0")
    assert api.simulator.calls("query_status") == queries + 1
    assert [event[0] for event in events_of(api)] == ["unknown", "completed"]


async def test_unconfirmed_success_callback_leaves_the_payment_unknown(
    payment_api_factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = await recording_api(payment_api_factory, monkeypatch)
    payment = await unknown_payment(api)
    api.simulator.reset()  # M-Pesa no longer knows the reference: the claim cannot be confirmed
    response = await api.http.post(CALLBACK, json=notification(payment, "INS-0"))
    assert 500 <= response.status_code < 600  # the provider should redeliver
    assert set(response.json()) == OUTPUT_KEYS
    assert await status_of(api, payment["transaction_id"]) == "unknown"
    stored = await webhooks(api)
    assert stored[0]["is_valid"] is True and stored[0]["is_processed"] is False
    assert stored[0]["processing_error"]
    assert [event[0] for event in events_of(api)] == ["unknown"]


async def test_a_cancellation_notice_never_overrides_what_m_pesa_reports(
    payment_api_factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = await recording_api(payment_api_factory, monkeypatch)
    payment = await unknown_payment(api, provider_status="Completed")
    response = await api.http.post(CALLBACK, json=notification(payment, "INS-5"))
    assert_answer(response, 200, "0")
    assert await status_of(api, payment["transaction_id"]) == "completed"
    assert [event[0] for event in events_of(api)] == ["unknown", "completed"]


async def test_duplicate_delivery_is_stored_twice_applied_once(
    payment_api_factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = await recording_api(payment_api_factory, monkeypatch)
    payment = await unknown_payment(api)
    body = notification(payment, "INS-5")
    for _ in range(2):
        assert_answer(await api.http.post(CALLBACK, json=body), 200, "0")
    stored = await webhooks(api)
    assert len(stored) == 2
    assert all(item["is_processed"] for item in stored)
    assert {item["raw_body"] for item in stored} == {stored[0]["raw_body"]}
    assert events_of(api).count(("failed", payment["transaction_id"], "cancelled")) == 1
    actions = await audit_actions(api, payment["transaction_id"])
    assert actions.count("callback_received") == 2
    assert actions.count("failed") == 1


@sqlite_only
async def test_concurrent_duplicate_deliveries_fire_the_hook_once(
    payment_api_factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = await recording_api(payment_api_factory, monkeypatch)
    payment = await unknown_payment(api)
    body = notification(payment, "INS-2006")
    responses = await asyncio.gather(*(api.http.post(CALLBACK, json=body) for _ in range(4)))
    assert all(response.status_code < 600 for response in responses)
    assert await api.webhook_count() == 4
    assert await status_of(api, payment["transaction_id"]) == "failed"
    failed = [event for event in events_of(api) if event[0] == "failed"]
    assert failed == [("failed", payment["transaction_id"], "failed")]
    # Whatever lost a race can be replayed; it changes nothing.
    for item in await webhooks(api, is_processed=False):
        replay = await api.http.post(f"/api/payments/webhooks/{item['id']}/replay")
        assert replay.status_code == 200
    assert [event for event in events_of(api) if event[0] == "failed"] == failed


async def test_callbacks_never_demote_a_settled_payment(
    payment_api_factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = await recording_api(payment_api_factory, monkeypatch)
    cancelled = await make_payment(api, CANCELS)
    completed = await make_payment(api, SUCCESS)
    assert (cancelled["status"], completed["status"]) == ("cancelled", "completed")
    hooks_before = list(events_of(api))
    queries = api.simulator.calls("query_status")

    for body in (
        notification(cancelled, "INS-0"),
        notification(cancelled, "0"),
        notification(completed, "INS-5"),
        notification(completed, "INS-2006"),
        notification(completed, "INS-9"),
    ):
        assert_answer(await api.http.post(CALLBACK, json=body), 200, "0")

    assert await status_of(api, cancelled["transaction_id"]) == "cancelled"
    assert await status_of(api, completed["transaction_id"]) == "completed"
    assert events_of(api) == hooks_before
    # A success notice for the cancelled payment is checked with M-Pesa (which reports it
    # cancelled) and flagged for an operator; the completed payment's notices need no query.
    assert api.simulator.calls("query_status") == queries + 2
    flagged = await api.http.get(f"/api/payments/status/{cancelled['transaction_id']}")
    assert flagged.json()["attention_required"] is True
    unflagged = await api.http.get(f"/api/payments/status/{completed['transaction_id']}")
    assert unflagged.json()["attention_required"] is False
    assert all(item["is_processed"] for item in await webhooks(api))


# --- unmatched notifications and replay ---------------------------------------------------------


async def test_unmatched_callback_is_stored_unprocessed_and_replay_keeps_it_so(
    payment_api_factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = await recording_api(payment_api_factory, monkeypatch)
    body = {
        "input_OriginalConversationID": "no-such-conversation",
        "input_ThirdPartyReference": "NOSUCHREFERENCE",
        "input_TransactionID": "abc123",
        "input_ResultCode": "INS-0",
        "input_ResultDesc": "Request processed successfully",
    }
    response = await api.http.post(CALLBACK, json=body)
    # Delivering it again cannot make it match: accepted, so the sender stops (issue 11.9),
    # and kept unprocessed with its error, flagged for an operator.
    answer = assert_answer(response, 200, "0")
    assert "no payment matches" in answer["output_ResponseDesc"]
    assert answer["output_ThirdPartyConversationID"] == "NOSUCHREFERENCE"
    assert answer["output_OriginalConversationID"] == "no-such-conversation"

    [stored] = await webhooks(api)
    assert stored["is_valid"] is True
    assert stored["is_processed"] is False
    assert stored["transaction_id"] is None
    assert stored["processing_error"]
    assert [item["id"] for item in await webhooks(api, is_processed=False)] == [stored["id"]]
    assert await webhooks(api, is_processed=True) == []

    replay = await api.http.post(f"/api/payments/webhooks/{stored['id']}/replay")
    assert replay.status_code == 200, replay.text
    result = replay.json()
    assert result["webhook_id"] == stored["id"]
    assert result["processed"] is False
    assert result["transaction_id"] is None
    assert result["error"]
    [after] = await webhooks(api)
    assert after["is_processed"] is False and after["attempts"] == stored["attempts"] + 1
    assert await api.count() == 0
    assert events_of(api) == []


async def test_replaying_a_processed_callback_is_harmless(
    payment_api_factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = await recording_api(payment_api_factory, monkeypatch)
    payment = await unknown_payment(api)
    assert_answer(await api.http.post(CALLBACK, json=notification(payment, "INS-5")), 200, "0")
    [stored] = await webhooks(api)
    hooks_before = list(events_of(api))

    for attempt in (1, 2):
        replay = await api.http.post(f"/api/payments/webhooks/{stored['id']}/replay")
        assert replay.status_code == 200, replay.text
        assert replay.json() == {
            "webhook_id": stored["id"],
            "processed": True,
            "transaction_id": payment["transaction_id"],
            "status": "cancelled",
            "error": None,
        }
        [after] = await webhooks(api)
        assert after["attempts"] == stored["attempts"] + attempt
    assert events_of(api) == hooks_before
    assert await status_of(api, payment["transaction_id"]) == "cancelled"
    assert (await audit_actions(api, payment["transaction_id"])).count("failed") == 1


@sqlite_only
async def test_malformed_body_with_the_right_token_is_stored_and_refused(
    payment_api_factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = await recording_api(payment_api_factory, monkeypatch, MPESA_CALLBACK_TOKEN=TOKEN)
    bodies = [b"{not json", b"[1, 2, 3]", b'"text"', b"", b"\xff\xfe not utf-8"]
    for raw in bodies:
        response = await api.http.post(
            CALLBACK,
            content=raw,
            headers={"X-Callback-Token": TOKEN, "Content-Type": "application/json"},
        )
        assert 400 <= response.status_code < 500, response.text
        assert set(response.json()) == OUTPUT_KEYS
    stored = await webhooks(api)
    assert len(stored) == len(bodies)
    assert all(not item["is_valid"] and not item["is_processed"] for item in stored)
    assert {item["validation_error"] for item in stored} == {"body is not a JSON object"}


# --- caller address -----------------------------------------------------------------------------

ALLOWED = "196.200.0.0/16"


@sqlite_only
@pytest.mark.parametrize(
    ("proxies", "peer", "forwarded_for", "accepted", "recorded_ip"),
    [
        # No proxies trusted: the peer is the caller, X-Forwarded-For is ignored.
        (None, "127.0.0.1", None, False, "127.0.0.1"),
        (None, "196.200.1.2", None, True, "196.200.1.2"),
        (None, "127.0.0.1", "196.200.1.2", False, "127.0.0.1"),
        (None, "196.201.1.2", None, False, "196.201.1.2"),
        # Behind a trusted proxy: the right-most untrusted hop is the caller.
        ("127.0.0.1", "127.0.0.1", "196.200.1.2", True, "196.200.1.2"),
        ("127.0.0.1", "127.0.0.1", "196.200.1.2, 6.6.6.6", False, "6.6.6.6"),
        ("127.0.0.1", "127.0.0.1", "6.6.6.6, 196.200.1.2", True, "196.200.1.2"),
        ("127.0.0.1,10.0.0.0/8", "127.0.0.1", "196.200.1.2, 10.1.1.1", True, "196.200.1.2"),
        ("127.0.0.1", "127.0.0.1", None, False, "127.0.0.1"),
        # A proxy that is not trusted cannot vouch for anyone.
        ("10.0.0.0/8", "127.0.0.1", "196.200.1.2", False, "127.0.0.1"),
        ("10.0.0.0/8", "10.9.9.9", "196.200.1.2", True, "196.200.1.2"),
    ],
)
async def test_ip_allowlist_with_trusted_proxies(
    payment_api_factory: PaymentApiFactory,
    monkeypatch: pytest.MonkeyPatch,
    proxies: str | None,
    peer: str,
    forwarded_for: str | None,
    accepted: bool,
    recorded_ip: str,
) -> None:
    monkeypatch.setenv("MPESA_CALLBACK_ALLOWED_IPS", ALLOWED)
    if proxies is not None:
        monkeypatch.setenv("PAYMENT_TRUSTED_PROXIES", proxies)
    api = await payment_api_factory(service_class=RecordingService, client_address=(peer, 4567))
    payment = await unknown_payment(api)
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    response = await api.http.post(CALLBACK, json=notification(payment, "INS-5"), headers=headers)
    [stored] = await webhooks(api)
    assert stored["remote_ip"] == recorded_ip
    if accepted:
        assert_answer(response, 200, "0")
        assert stored["is_valid"] is True
        assert await status_of(api, payment["transaction_id"]) == "cancelled"
    else:
        assert_answer(response, 401, "INS-2")
        assert stored["is_valid"] is False
        assert "MPESA_CALLBACK_ALLOWED_IPS" in stored["validation_error"]
        assert await status_of(api, payment["transaction_id"]) == "unknown"


@sqlite_only
async def test_token_and_allowlist_are_both_required(
    payment_api_factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MPESA_CALLBACK_TOKEN", TOKEN)
    monkeypatch.setenv("MPESA_CALLBACK_ALLOWED_IPS", ALLOWED)
    api = await payment_api_factory(client_address=("196.200.7.7", 1))
    payment = await unknown_payment(api)
    body = notification(payment, "INS-5")
    assert_answer(await api.http.post(CALLBACK, json=body), 401, "INS-2")
    assert_answer(
        await api.http.post(CALLBACK, json=body, headers={"X-Callback-Token": TOKEN}), 200, "0"
    )


# --- storage failure ----------------------------------------------------------------------------


async def test_callback_that_cannot_be_stored_is_not_acknowledged(
    unreachable_sessions: async_sessionmaker[AsyncSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MPESA_CALLBACK_TOKEN", TOKEN)
    async with build_payment_api(unreachable_sessions) as api:
        body = {
            "input_OriginalConversationID": "c1",
            "input_ThirdPartyReference": "REF1",
            "input_TransactionID": "t1",
            "input_ResultCode": "INS-0",
            "input_ResultDesc": "ok",
        }
        for headers in ({"X-Callback-Token": TOKEN}, {}):
            response = await api.http.post(CALLBACK, json=body, headers=headers)
            assert not 200 <= response.status_code < 300
            assert response.status_code >= 500  # redeliver, it was not our caller's fault
            answer = response.json()
            assert set(answer) == OUTPUT_KEYS
            assert answer["output_ResponseCode"] != "0"
            assert answer["output_ThirdPartyConversationID"] == "REF1"


# --- input PostgreSQL cannot hold -----------------------------------------------------------------


async def test_overlong_forwarded_address_does_not_make_the_callback_unstorable(
    payment_api_factory: PaymentApiFactory,
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    request: pytest.FixtureRequest,
) -> None:
    monkeypatch.setenv("PAYMENT_TRUSTED_PROXIES", "127.0.0.1")
    api = await payment_api_factory()
    payment = await unknown_payment(api)
    response = await api.http.post(
        CALLBACK,
        json=notification(payment, "INS-5"),
        headers={"X-Forwarded-For": "196.200.1.2, " + "not-an-address-" * 5},
    )
    assert response.status_code != 503, response.text
    assert await api.webhook_count() == 1


async def test_callback_with_a_nul_in_a_reference_is_answered_in_output_shape(
    payment_api: PaymentApi, database_url: str, request: pytest.FixtureRequest
) -> None:
    response = await payment_api.http.post(
        CALLBACK,
        content=b'{"input_ThirdPartyReference": "A\\u0000B", "input_ResultCode": "INS-5"}',
        headers={"Content-Type": "application/json"},
    )
    assert not 200 <= response.status_code < 300
    assert set(response.json()) == OUTPUT_KEYS
    assert await payment_api.webhook_count() == 1
