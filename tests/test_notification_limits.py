"""Inbound notifications under hostile input: oversized, nested, NUL or NaN bodies, rejected ones
bounded and rate limited per source and in total, pruned, and the caller's address parsed."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from payments.config import get_settings, load_settings
from payments.models import PaymentWebhookLog, as_utc, utcnow
from payments.notifications import (
    REJECTED_BODY_BYTES,
    REJECTED_HEADER_BYTES,
    STORED_HEADER_BYTES,
    TRUNCATED_MARK,
    client_ip,
    parse_address,
)
from tests.support import CALLBACK, PaymentApi, PaymentApiFactory
from tests.support import c2b_body as _c2b
from tests.support import error_body as _error


async def _webhook_rows(api: PaymentApi) -> list[PaymentWebhookLog]:
    async with api.session_factory() as session:
        return list(
            (await session.scalars(select(PaymentWebhookLog).order_by(PaymentWebhookLog.id))).all()
        )


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


async def test_deeply_nested_json_is_a_4xx_and_the_callback_is_stored(
    payment_api: PaymentApi,
) -> None:
    deep = b"[" * 30_000 + b"]" * 30_000
    for body in (deep, b'{"a": ' + deep + b"}", b'{"input_ResultDesc": [[[[[["x"]]]]]]}'):
        response = await payment_api.http.post(CALLBACK, content=body)
        assert response.status_code == 400, response.text
    rows = await _webhook_rows(payment_api)
    assert len(rows) == 3 and not any(row.is_valid for row in rows)


async def test_out_of_range_webhook_ids_are_404(payment_api: PaymentApi) -> None:
    for webhook_id in (2**31, 2**63, 0, -1):
        _error(await payment_api.http.post(f"/api/payments/webhooks/{webhook_id}/replay"), 404)


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
