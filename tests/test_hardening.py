"""Defects a reviewer's read found, each pinned by the behaviour a user depends on."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import select
from uvicorn.logging import AccessFormatter

from payments.logger import configure_logging
from payments.models import PaymentAuditLog, PaymentTransaction
from payments.repository import PaymentRecord
from payments.service import PaymentService

from .conftest import PaymentApi, PaymentApiFactory

CALLBACK = "/api/payments/callback/c2b"


def test_uvicorn_access_lines_keep_working_and_are_masked(tmp_path: object) -> None:
    configure_logging(log_dir=str(tmp_path), console=False)
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/api/payments/?phone_number=258841234567", "1.1", 200),
        None,
    )
    assert logging.getLogger("uvicorn.access").filter(record)
    line = AccessFormatter("%(message)s", use_colors=False).format(record)
    assert "2588412*****" in line and "258841234567" not in line
    assert '"GET /api/payments/' in line


async def test_reversal_without_portal_credentials_records_and_reserves_nothing(
    payment_api_factory: PaymentApiFactory,
) -> None:
    api = await payment_api_factory(settings_overrides={"mpesa_initiator_identifier": ""})
    paid = (await api.http.post("/api/payments/initiate", json=_c2b())).json()
    response = await api.http.post(f"/api/payments/{paid['transaction_id']}/reverse")
    assert response.status_code == 500
    assert response.json()["details"] == {"variable": "MPESA_INITIATOR_IDENTIFIER"}
    assert await api.count() == 1  # no reversal row holding the amount
    assert api.simulator.calls("reversal") == 0


async def test_oversized_callback_is_refused_and_stored_truncated(payment_api: PaymentApi) -> None:
    response = await payment_api.http.post(
        CALLBACK, content=b'{"input_ResultDesc": "' + b"x" * 100_000 + b'"}'
    )
    assert response.status_code == 413
    [stored] = (await payment_api.http.get("/api/payments/webhooks")).json()["items"]
    assert stored["is_valid"] is False and len(stored["raw_body"]) == 64 * 1024


async def test_webhook_list_masks_phone_numbers_in_stored_bodies(payment_api: PaymentApi) -> None:
    await payment_api.http.post(CALLBACK, json={"input_Note": "customer 258841234567"})
    text = (await payment_api.http.get("/api/payments/webhooks")).text
    assert "258841234567" not in text and "2588412*****" in text


class FailingHook(PaymentService):
    async def on_payment_completed(self, transaction: PaymentRecord) -> None:
        raise RuntimeError(f"could not notify {transaction.phone_number}")


async def test_a_failing_hooks_message_is_masked_in_the_audit_trail(
    payment_api_factory: PaymentApiFactory,
) -> None:
    api = await payment_api_factory(service_class=FailingHook)
    paid = (await api.http.post("/api/payments/initiate", json=_c2b())).json()
    async with api.session_factory() as session:
        row = (
            await session.scalars(
                select(PaymentTransaction).where(
                    PaymentTransaction.transaction_id == paid["transaction_id"]
                )
            )
        ).one()
        [message] = (
            await session.scalars(
                select(PaymentAuditLog.error_message).where(
                    PaymentAuditLog.payment_id == row.id,
                    PaymentAuditLog.action == "hook_failed",
                )
            )
        ).all()
    assert message is not None and "258841234567" not in message and "2588412*****" in message


@pytest.mark.parametrize("notice_code", ["INS-0", "0"])
async def test_a_payment_settled_by_a_confirmed_notice_can_be_reversed(
    payment_api: PaymentApi, notice_code: str
) -> None:
    lost = await payment_api.http.post("/api/payments/initiate", json=_c2b("258842000001"))
    payment = lost.json()
    assert payment["status"] == "unknown"
    recorded = payment_api.simulator.find(payment["third_party_reference"])
    assert recorded is not None
    notice = {
        "input_ThirdPartyReference": payment["third_party_reference"],
        "input_TransactionID": recorded.transaction_id,
        "input_ResultCode": notice_code,
        "input_ResultDesc": "Request processed successfully",
    }
    assert (await payment_api.http.post(CALLBACK, json=notice)).status_code == 200
    status = (
        await payment_api.http.get(f"/api/payments/status/{payment['transaction_id']}")
    ).json()
    assert status["status"] == "completed"
    assert status["provider_transaction_id"] == recorded.transaction_id
    reversal = await payment_api.http.post(f"/api/payments/{payment['transaction_id']}/reverse")
    assert reversal.status_code == 200, reversal.text
    assert reversal.json()["status"] == "completed"


def _c2b(phone: str = "258841234567") -> dict[str, object]:
    return {"phone_number": phone, "amount": 100}


# =================================================================================================
# Issue 11: hostile input and resource limits
# =================================================================================================

import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402

from payments.config import get_settings, load_settings  # noqa: E402
from payments.models import PaymentWebhookLog, as_utc, utcnow  # noqa: E402
from payments.notifications import (  # noqa: E402
    REJECTED_BODY_BYTES,
    REJECTED_HEADER_BYTES,
    STORED_HEADER_BYTES,
    TRUNCATED_MARK,
    client_ip,
    parse_address,
)

from .conftest import TEST_ADMIN_KEY  # noqa: E402

INITIATE = "/api/payments/initiate"
ERROR_KEYS = {"error_code", "message", "details"}
REPO = Path(__file__).resolve().parents[1]


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == ERROR_KEYS, body
    return body


async def _webhook_rows(api: PaymentApi) -> list[PaymentWebhookLog]:
    async with api.session_factory() as session:
        return list(
            (await session.scalars(select(PaymentWebhookLog).order_by(PaymentWebhookLog.id))).all()
        )


# --- 11.1 auth before the body, every body capped ------------------------------------------------


async def _asgi_post(
    app: Any, path: str, headers: dict[str, str], chunks: list[bytes]
) -> tuple[int, dict[str, Any], int]:
    """POST through the ASGI interface; returns status, JSON body, and how many body chunks the
    app pulled (so a test can tell whether the body was read at all)."""
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            return {
                "type": "http.request",
                "body": chunks[pulled - 1],
                "more_body": pulled < len(chunks),
            }
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 5000),
        "server": ("test", 80),
    }
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), pulled


async def test_a_request_without_a_valid_key_is_refused_before_its_body_is_read(
    payment_api: PaymentApi,
) -> None:
    chunk = b'{"phone_number": "258841234567", "amount": 100' + b" " * 60_000
    for headers in ({}, {"x-api-key": "wrong"}):
        status, body, pulled = await _asgi_post(
            payment_api.app, INITIATE, {"content-type": "application/json", **headers}, [chunk] * 50
        )
        assert status == 401 and body["error_code"] == "unauthorized"
        assert pulled == 0  # not one byte of the body was read
    assert await payment_api.count() == 0


async def test_bodies_past_the_limit_are_413_by_length_and_while_streaming(
    payment_api: PaymentApi,
) -> None:
    limit = get_settings().payment_max_body_bytes
    headers = {"content-type": "application/json", "x-api-key": TEST_ADMIN_KEY}
    # Declared too large: refused on the header alone.
    status, body, pulled = await _asgi_post(
        payment_api.app, INITIATE, {**headers, "content-length": str(limit + 1)}, [b"{}"]
    )
    assert (status, body["error_code"], pulled) == (413, "payload_too_large", 0)
    assert body["details"]["max_bytes"] == limit
    # Streamed without a length: reading stops at the first chunk past the limit.
    chunks = [b" " * 16_384] * 1000  # 16 MB on offer
    status, body, pulled = await _asgi_post(payment_api.app, INITIATE, headers, chunks)
    assert status == 413 and body["error_code"] == "payload_too_large"
    assert pulled <= limit // 16_384 + 1
    # Just under the limit is still read and validated as usual.
    small = json.dumps({"phone_number": "258841234567", "amount": 100}).encode()
    status, _, _ = await _asgi_post(payment_api.app, INITIATE, headers, [small])
    assert status == 200
    assert await payment_api.count() == 1


async def test_the_body_limit_is_a_setting(
    payment_api_factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAYMENT_MAX_BODY_BYTES", "2048")
    get_settings.cache_clear()
    api = await payment_api_factory()
    big = {
        "phone_number": "258841234567",
        "amount": 100,
        "description": "x" * 200,
        "metadata": {"note": "y" * 3000},
    }
    _error(await api.http.post(INITIATE, json=big), 413)
    assert await api.count() == 0


# --- 11.2 notices: bounded, rate limited, pruned ------------------------------------------------


async def test_rejected_notices_are_small_and_rate_limited_per_source_and_in_total(
    payment_api_factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAYMENT_TRUSTED_PROXIES", "127.0.0.1")  # sources from X-Forwarded-For
    api = await payment_api_factory()
    big_header = "h" * 1_000_000
    big_body = b'{"input_ResultDesc": "' + b"b" * 60_000 + b'"}'
    statuses: list[int] = []
    started = time.perf_counter()
    for _ in range(100):  # one source
        response = await api.http.post(
            CALLBACK,
            content=big_body,
            headers={
                "X-Callback-Token": "wrong",
                "X-Big": big_header,
                "X-Forwarded-For": "196.1.1.1",
            },
        )
        statuses.append(response.status_code)
    elapsed = time.perf_counter() - started
    per_source = int(get_settings().payment_rejected_notices_per_minute)
    assert statuses[:per_source] == [401] * per_source
    assert set(statuses[per_source:]) == {429}
    assert elapsed < 10  # 100 MB of headers offered; each is cut before it is masked
    for index in range(100):  # many sources: the total bound holds
        await api.http.post(
            CALLBACK,
            content=b"{}",
            headers={"X-Callback-Token": "wrong", "X-Forwarded-For": f"196.2.{index}.1"},
        )
    rows = await _webhook_rows(api)
    total = int(get_settings().payment_rejected_notices_per_minute_total)
    assert len(rows) == total
    for row in rows:
        assert row.is_valid is False
        assert len(row.raw_body) <= REJECTED_BODY_BYTES
        assert len(json.dumps(row.headers)) <= REJECTED_HEADER_BYTES + 200
    first = rows[0]
    assert first.headers is not None and TRUNCATED_MARK in first.headers
    assert first.validation_error is not None and "stored cut" in first.validation_error


async def test_an_authentic_notice_stores_bounded_headers_and_is_not_rate_limited(
    payment_api: PaymentApi,
) -> None:
    for _ in range(40):
        response = await payment_api.http.post(
            CALLBACK,
            json={"input_ResultCode": "INS-0"},
            headers={f"X-Extra-{n}": "v" * 2000 for n in range(20)},
        )
        assert response.status_code == 200, response.text
    rows = await _webhook_rows(payment_api)
    assert len(rows) == 40
    for row in rows:
        assert row.is_valid is True
        assert len(json.dumps(row.headers)) <= STORED_HEADER_BYTES + 400
        assert row.headers is not None and TRUNCATED_MARK in row.headers


async def test_old_rejected_notices_are_pruned_and_authentic_ones_kept(
    payment_api: PaymentApi,
) -> None:
    long_ago = utcnow() - timedelta(seconds=get_settings().payment_rejected_notice_retention + 60)
    async with payment_api.session_factory() as session:
        for valid in (False, True):
            session.add(
                PaymentWebhookLog(
                    source="c2b",
                    raw_body="{}",
                    headers={},
                    received_at=long_ago,
                    is_valid=valid,
                    is_processed=False,
                    attempts=0,
                )
            )
        await session.commit()
    await payment_api.http.post(CALLBACK, json={}, headers={"X-Callback-Token": "wrong"})
    rows = await _webhook_rows(payment_api)
    hour_ago = utcnow() - timedelta(hours=1)
    assert [(row.is_valid, as_utc(row.received_at) < hour_ago) for row in rows] == [
        (True, True),  # an authentic notice is never pruned
        (False, False),  # the new rejected one
    ]


# --- 11.4 addresses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("196.1.2.3", "196.1.2.3"),
        ("196.1.2.3:4711", "196.1.2.3"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("2001:DB8::1", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("[fe80::1%" + "x" * 80 + "]:80", "fe80::1"),
        ("not-an-ip", None),
        ("1.2.3.4:port", None),
        ("", None),
    ],
)
def test_addresses_with_ports_and_scopes_are_parsed(text: str, address: str | None) -> None:
    assert parse_address(text) == address


def test_a_client_controlled_hop_is_never_believed() -> None:
    settings = load_settings(payment_trusted_proxies="10.0.0.0/8")
    # The right-most untrusted hop is the client, whatever it wrote itself to the left.
    assert client_ip("10.0.0.5", {"x-forwarded-for": "6.6.6.6, 196.1.2.3:5555"}, settings) == (
        "196.1.2.3"
    )
    assert client_ip("10.0.0.5", {"x-forwarded-for": "6.6.6.6, [2001:db8::7]:1"}, settings) == (
        "2001:db8::7"
    )
    # Garbage where the proxy writes: the client's address is unknown, not the hop to its left.
    assert client_ip("10.0.0.5", {"x-forwarded-for": "6.6.6.6, junk"}, settings) is None
    # An untrusted peer's header is ignored; an invalid peer is no address at all.
    assert client_ip("196.9.9.9", {"x-forwarded-for": "6.6.6.6"}, settings) == "196.9.9.9"
    assert client_ip("not-an-ip", {}, settings) is None


async def test_every_notice_is_stored_whatever_its_forwarded_header(
    payment_api_factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAYMENT_TRUSTED_PROXIES", "127.0.0.1")
    api = await payment_api_factory()
    for hop in ("fe80::1%" + "eth" * 40, "[2001:db8::9]:8443", "196.3.3.3:1", "x" * 500):
        response = await api.http.post(
            CALLBACK, json={"input_ResultCode": "INS-0"}, headers={"X-Forwarded-For": hop}
        )
        assert response.status_code == 200, response.text
    stored = [row.remote_ip for row in await _webhook_rows(api)]
    assert stored == ["fe80::1", "2001:db8::9", "196.3.3.3", None]


# --- 11.5 nesting ------------------------------------------------------------------------------


async def test_deeply_nested_json_is_a_4xx_and_the_callback_is_stored(
    payment_api: PaymentApi,
) -> None:
    deep = b"[" * 30_000 + b"]" * 30_000
    for body in (deep, b'{"a": ' + deep + b"}", b'{"input_ResultDesc": [[[[[["x"]]]]]]}'):
        response = await payment_api.http.post(CALLBACK, content=body)
        assert response.status_code == 400, response.text
    rows = await _webhook_rows(payment_api)
    assert len(rows) == 3 and not any(row.is_valid for row in rows)


@pytest.mark.parametrize("depth", [9, 500])
async def test_deep_or_large_metadata_is_refused(payment_api: PaymentApi, depth: int) -> None:
    nested: Any = "leaf"
    for _ in range(depth):
        nested = {"n": nested}
    body = {"phone_number": "258841234567", "amount": 10, "metadata": nested}
    _error(await payment_api.http.post(INITIATE, json=body), 422)
    large = {"phone_number": "258841234567", "amount": 10, "metadata": {"k": "v" * 9000}}
    _error(await payment_api.http.post(INITIATE, json=large), 422)
    assert await payment_api.count() == 0
    shallow = {"phone_number": "258841234567", "amount": 10, "metadata": {"a": {"b": [1, 2]}}}
    assert (await payment_api.http.post(INITIATE, json=shallow)).status_code == 200


# --- 11.6 dates ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/payments/", "/api/payments/summary"])
async def test_one_date_rule_for_the_list_and_the_summary(
    payment_api: PaymentApi, path: str
) -> None:
    for params in (
        {"to_date": "9999-12-31"},
        {"from_date": "9999-12-31"},
        {"to_date": "0"},
        {"to_date": "1700000000"},
        {"from_date": "2024-02-30"},
        {"from_date": "1969-12-31"},
        {"from_date": "2024-05-02", "to_date": "2024-05-01"},
    ):
        _error(await payment_api.http.get(path, params=params), 422)
    ok = await payment_api.http.get(
        path, params={"from_date": "1970-01-01", "to_date": "9999-12-30"}
    )
    assert ok.status_code == 200, ok.text


# --- 11.7 / 11.8 ids and NUL ---------------------------------------------------------------------


async def test_out_of_range_webhook_ids_are_404(payment_api: PaymentApi) -> None:
    for webhook_id in (2**31, 2**63, 0, -1):
        _error(await payment_api.http.post(f"/api/payments/webhooks/{webhook_id}/replay"), 404)


async def test_nul_in_a_path_or_query_is_422_not_a_storage_alarm(
    payment_api: PaymentApi, caplog: pytest.LogCaptureFixture
) -> None:
    for url in (
        "/api/payments/status/TXN%00x",
        "/api/payments/audit/%00",
        "/api/payments/TXN%00/refresh",
        "/api/payments/?status=a%00b",
        "/api/payments/?entity_id=%00",
        "/api/payments/webhooks?page=1&x%00=1",
    ):
        method = "POST" if url.endswith("refresh") else "GET"
        body = _error(await payment_api.http.request(method, url), 422)
        assert body["details"]["errors"][0]["reason"] == "must not contain NUL characters"
    assert "Database unavailable" not in caplog.text


async def test_nul_and_nan_in_a_callback_are_stored_and_refused(
    payment_api: PaymentApi,
) -> None:
    for body in (
        b'{"input_ResultCode": "INS-0", "x": "\x00"}',
        b'{"input_ResultCode": "INS-0", "x": "\\u0000"}',
        b'{"input_ResultCode": "INS-0", "input_ResultDesc": NaN}',
        b'{"input_ResultCode": "INS-0", "x": "\\ud800"}',
    ):
        response = await payment_api.http.post(CALLBACK, content=body)
        assert response.status_code == 400, response.text
    rows = await _webhook_rows(payment_api)
    assert len(rows) == 4 and "\x00" not in rows[0].raw_body


# --- 11.10 / 11.11 / 11.12 semantics -------------------------------------------------------------


async def test_empty_idempotency_keys_are_refused(payment_api: PaymentApi) -> None:
    order = {"phone_number": "258841234567", "amount": 100}
    for key in ("", "   "):
        _error(
            await payment_api.http.post(INITIATE, json=order, headers={"Idempotency-Key": key}), 422
        )
        _error(await payment_api.http.post(INITIATE, json={**order, "idempotency_key": key}), 422)
    assert await payment_api.count() == 0


@pytest.mark.parametrize(
    "amount", ["10_0", "١٠٠", "１００", "1e2", "100.000", " 100", "+100", "0x64"]
)
async def test_amounts_are_ascii_digits_only(payment_api: PaymentApi, amount: str) -> None:
    body = {"phone_number": "258841234567", "amount": amount}
    _error(await payment_api.http.post(INITIATE, json=body), 422)
    assert await payment_api.count() == 0


async def test_spaced_numbers_are_masked_in_audit_rows_answers_and_notices(
    payment_api: PaymentApi,
) -> None:
    spaced = "+258 84 333 0999"
    paid = await payment_api.http.post(
        INITIATE,
        json={
            "phone_number": "258841234567",
            "amount": 100,
            "account_reference": "258843330999",
            "description": f"call {spaced}",
            "metadata": {"contact": "84-333-0999"},
        },
    )
    assert paid.status_code == 200, paid.text
    assert paid.json()["account_reference"] == "2588433*****"
    status = await payment_api.http.get(f"/api/payments/status/{paid.json()['transaction_id']}")
    trail = await payment_api.http.get(f"/api/payments/audit/{paid.json()['transaction_id']}")
    await payment_api.http.post(CALLBACK, json={"input_Note": f"from {spaced} / 84 333 0999"})
    notices = await payment_api.http.get("/api/payments/webhooks")
    for response in (paid, status, trail, notices):
        text = response.text
        assert "333 0999" not in text and "333-0999" not in text and "3330999" not in text, text


# --- 11.13 closed in every environment ----------------------------------------------------------


async def test_the_simulator_environment_is_closed_without_a_key_and_a_token(
    payment_api_factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PAYMENT_ADMIN_API_KEY")
    monkeypatch.delenv("MPESA_CALLBACK_TOKEN")
    get_settings.cache_clear()
    api = await payment_api_factory()
    order = {"phone_number": "258841234567", "amount": 100}
    for path, body in (
        (INITIATE, order),
        ("/api/payments/payouts", order),
        ("/api/payments/transfers", {"receiver_party_code": "979797", "amount": 100}),
    ):
        _error(await api.http.post(path, json=body, headers={"X-API-Key": ""}), 401)
    callback = await api.http.post(CALLBACK, json={"input_ResultCode": "INS-0"})
    assert callback.status_code == 401
    assert api.simulator.calls() == 0 and await api.count() == 0


@pytest.mark.parametrize("command", ["serve", "simulator"])
def test_demo_and_simulator_refuse_a_public_address_without_the_flag(command: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "payments", command, "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode != 0
    assert "--allow-remote" in result.stderr


# --- 11.15 the OpenAPI document ------------------------------------------------------------------


def test_openapi_documents_real_responses_the_error_model_and_the_key(
    payment_api: PaymentApi,
) -> None:
    document = payment_api.app.openapi()
    schemes = document["components"]["securitySchemes"]
    assert schemes == {"APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" in responses and "503" in responses, (method, path)
            if path.endswith("/callback/c2b"):
                assert "security" not in operation
                continue
            assert responses["401"]["content"]["application/json"]["schema"] == error_ref
            assert responses["422"]["content"]["application/json"]["schema"] == error_ref
            assert {"APIKeyHeader": []} in operation["security"], (method, path)
            if method == "post":
                assert "413" in responses, (method, path)
    money = document["paths"]["/api/payments/initiate"]["post"]["responses"]
    assert {
        "200",
        "202",
        "400",
        "401",
        "402",
        "409",
        "413",
        "422",
        "500",
        "502",
        "503",
        "504",
    } <= set(money)


async def test_limit_and_validation_errors_share_one_detail_shape(
    payment_api: PaymentApi,
) -> None:
    over_limit = await payment_api.http.post(
        INITIATE, json={"phone_number": "258841234567", "amount": 999_999}
    )
    bad_type = await payment_api.http.post(INITIATE, json={"phone_number": 1, "amount": 1})
    for response in (over_limit, bad_type):
        details = _error(response, 422)["details"]
        assert "field" not in details
        assert all(set(item) == {"field", "reason"} for item in details["errors"]), details
    assert over_limit.json()["details"]["errors"][0]["field"] == "amount"
