"""The HTTP API under hostile input and its limits: authentication before the body, capped
bodies, nesting, dates, NUL, idempotency keys and amounts, closed in every environment, the
OpenAPI document and one error shape."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from payments.config import get_settings
from tests.support import CALLBACK, INITIATE, TEST_ADMIN_KEY, PaymentApi, PaymentApiFactory
from tests.support import c2b_body as _c2b
from tests.support import error_body as _error

REPO = Path(__file__).resolve().parents[1]


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


def test_the_schema_of_every_path_and_query_text_excludes_nul(payment_api: PaymentApi) -> None:
    """Schemathesis sent ``after=…%00…`` to the events list: schema-valid, yet refused with
    422 by the route class. Every free-text parameter in a path or query now says, in its
    pattern, that NUL is not accepted, and the pattern admits the ids the API issues."""
    import re

    document = payment_api.app.openapi()
    checked = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                if parameter["in"] not in ("path", "query"):
                    continue
                schema = parameter["schema"]
                for variant in schema.get("anyOf", [schema]):
                    if variant.get("type") != "string" or {"enum", "format"} & set(variant):
                        continue
                    where = (method, path, parameter["name"])
                    assert "pattern" in variant, where
                    pattern = re.compile(variant["pattern"])
                    assert not pattern.search("a\x00b"), where
                    checked.append(where)
    assert ("get", "/api/payments/events", "after") in checked
    assert ("get", "/api/payments/status/{transaction_id}", "transaction_id") in checked
    texts = {
        variant["pattern"]
        for operations in document["paths"].values()
        for operation in operations.values()
        for parameter in operation.get("parameters", [])
        for variant in parameter["schema"].get("anyOf", [parameter["schema"]])
        if variant.get("type") == "string" and parameter["name"] in ("after", "transaction_id")
    }
    for issued in ("evt_0193a1b2c3d4e5f60718293a4b5c", "TXN-20261203172811-5230432A"):
        assert all(re.search(pattern, issued) for pattern in texts), texts


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


def test_the_resolve_reasons_schema_admits_only_what_the_api_accepts() -> None:
    """Schemathesis found a reason of one vertical tab: schema-valid, yet refused (the request is
    stripped, as ``str.strip`` strips). The schema's pattern now excludes every reason that
    strips to nothing, so what the schema admits is what the API takes."""
    import re

    from pydantic import ValidationError

    from payments.schemas import ResolveRequest

    pattern = re.compile(ResolveRequest.model_json_schema()["properties"]["reason"]["pattern"])
    blanks = [chr(code) for code in range(0x3001) if chr(code).isspace()]
    for blank in blanks:
        assert not pattern.search(blank * 2), repr(blank)
        with pytest.raises(ValidationError):
            ResolveRequest(reason=blank * 2)
    for reason in ("paid at the counter", " x\u000b", "\ufeffnote"):
        assert pattern.search(reason)
        ResolveRequest(reason=reason)
