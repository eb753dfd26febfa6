"""The HTTP API end to end through the router: every endpoint's happy and unhappy paths, the error
shape, input validation (nothing written on bad input), masking, and authorization.

Each test mounts the router under ``/api`` on its own FastAPI app with an in-process simulator
(see ``build_payment_api`` in ``support.py``), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Header, HTTPException
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from payments import get_db, get_payment_service, payment_router, require_api_key
from payments.config import get_settings
from payments.exceptions import UnauthorizedError
from payments.simulator.keys import SIMULATOR_API_KEY, SIMULATOR_PUBLIC_KEY
from tests.keys import rsa_key_pair
from tests.support import (
    CANCELS,
    DROPPED,
    INSUFFICIENT,
    PAYEE,
    SUCCESS,
    PaymentApi,
    PaymentApiFactory,
    build_payment_api,
)

RECEIVER = "979797"

TRANSACTION_ID = re.compile(r"^TXN-\d{14}-[A-Z0-9]{8}$")
ADMIN_KEY = "test-admin-key-7f3a"

#: For tests whose subject does not depend on the database (validation, auth): SQLite only.
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

#: The fields of the original README's initiate answer (plus what this module adds).
README_INITIATE_FIELDS = {
    "success",
    "transaction_id",
    "provider_transaction_id",
    "conversation_id",
    "third_party_reference",
    "status",
    "message",
    "phone_number",
    "amount",
    "currency",
    "response_code",
    "response_description",
    "created_at",
}
README_STATUS_FIELDS = {
    "transaction_id",
    "provider_transaction_id",
    "status",
    "status_description",
    "amount",
    "currency",
    "phone_number",
    "created_at",
    "completed_at",
}


# --- helpers ------------------------------------------------------------------------------------


def assert_clean(response: httpx.Response) -> None:
    """No full MSISDN and no stack trace, whatever the answer."""
    assert SUCCESS not in response.text, response.text
    assert "Traceback" not in response.text
    assert 'File "' not in response.text


def assert_error(response: httpx.Response, status: int, error_code: str | None = None) -> Any:
    """The module's one error shape: ``error_code``, ``message``, ``details``."""
    assert response.status_code == status, response.text
    assert_clean(response)
    body = response.json()
    assert set(body) == {"error_code", "message", "details"}, body
    assert isinstance(body["error_code"], str) and body["error_code"]
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["details"], dict)
    if error_code is not None:
        assert body["error_code"] == error_code, body
    return body


async def initiate(api: PaymentApi, phone: str = SUCCESS, amount: Any = 100, **extra: Any) -> Any:
    response = await api.http.post(
        "/api/payments/initiate", json={"phone_number": phone, "amount": amount, **extra}
    )
    assert_clean(response)
    return response


async def completed_payment(api: PaymentApi, amount: Any = 100, **extra: Any) -> dict[str, Any]:
    response = await initiate(api, amount=amount, **extra)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def status_of(api: PaymentApi, transaction_id: str) -> dict[str, Any]:
    response = await api.http.get(f"/api/payments/status/{transaction_id}")
    assert response.status_code == 200, response.text
    assert_clean(response)
    body: dict[str, Any] = response.json()
    return body


def today() -> str:
    return datetime.now(UTC).date().isoformat()


# --- initiate -----------------------------------------------------------------------------------


async def test_initiate_success_answers_with_the_original_readme_fields(
    payment_api: PaymentApi,
) -> None:
    response = await initiate(
        payment_api,
        amount=100.00,
        account_reference="ORDER-12345",
        description="Payment for order",
        entity_type="order",
        entity_id="12345",
        customer_name="John Doe",
        customer_email="john@example.com",
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert README_INITIATE_FIELDS <= set(body)
    assert body["success"] is True
    assert TRANSACTION_ID.match(body["transaction_id"])
    assert body["status"] == "completed"
    assert body["message"]
    assert body["provider_transaction_id"] and body["conversation_id"]
    assert re.fullmatch(r"[A-Z0-9]{1,20}", body["third_party_reference"])
    assert body["account_reference"] == "ORDER-12345"
    assert body["phone_number"] == "2588412*****"
    assert body["amount"] == "100.00" and body["reversed_amount"] == "0.00"
    assert body["currency"] == "MZN"
    assert body["response_code"] == "INS-0"
    assert body["response_description"]
    assert datetime.fromisoformat(body["created_at"]).tzinfo is not None
    assert (body["entity_type"], body["entity_id"]) == ("order", "12345")
    assert await payment_api.count() == 1

    status = await status_of(payment_api, body["transaction_id"])
    assert README_STATUS_FIELDS <= set(status)
    assert status["transaction_id"] == body["transaction_id"]
    assert status["status"] == "completed"
    assert status["provider_transaction_id"] == body["provider_transaction_id"]
    assert status["completed_at"] is not None
    assert status["phone_number"] == "2588412*****"


async def test_initiate_refused_by_the_customer_is_402_with_the_provider_code(
    payment_api: PaymentApi,
) -> None:
    for phone, error_code, provider_code, recorded in (
        (CANCELS, "payment_cancelled", "INS-5", "cancelled"),
        (INSUFFICIENT, "insufficient_funds", "INS-2006", "failed"),
    ):
        response = await initiate(payment_api, phone=phone)
        body = assert_error(response, 402, error_code)
        details = body["details"]
        assert details["provider_code"] == provider_code
        assert details["provider_description"]
        assert TRANSACTION_ID.match(details["transaction_id"])
        assert details["payment"]["status"] == recorded
        assert details["payment"]["success"] is False
        assert details["payment"]["phone_number"].endswith("*****")
        status = await status_of(payment_api, details["transaction_id"])
        assert status["status"] == recorded
        assert status["response_code"] == provider_code


async def test_dropped_connection_is_202_unknown_and_refresh_settles_it(
    payment_api: PaymentApi,
) -> None:
    response = await initiate(payment_api, phone=DROPPED)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "unknown"
    assert body["success"] is False
    assert body["completed_at"] is None
    transaction_id = body["transaction_id"]
    assert (await status_of(payment_api, transaction_id))["status"] == "unknown"

    refreshed = await payment_api.http.post(f"/api/payments/{transaction_id}/refresh")
    assert refreshed.status_code == 200, refreshed.text
    assert refreshed.json()["status"] == "completed"
    assert refreshed.json()["success"] is True
    assert (await status_of(payment_api, transaction_id))["status"] == "completed"
    # Refreshing a settled payment again changes nothing.
    again = await payment_api.http.post(f"/api/payments/{transaction_id}/refresh")
    assert again.status_code == 200 and again.json()["status"] == "completed"


async def test_idempotency_key_in_header_or_body_gives_the_same_transaction(
    payment_api: PaymentApi,
) -> None:
    request = {"phone_number": SUCCESS, "amount": 250, "account_reference": "ORDER-1"}
    first = await payment_api.http.post(
        "/api/payments/initiate", json=request, headers={"Idempotency-Key": "order-1-pay"}
    )
    assert first.status_code == 200, first.text
    second = await payment_api.http.post(
        "/api/payments/initiate", json=request | {"idempotency_key": "order-1-pay"}
    )
    assert second.status_code == 200, second.text
    # The same number, written differently, is the same request.
    third = await payment_api.http.post(
        "/api/payments/initiate",
        json=request | {"phone_number": "+258 84 123 4567"},
        headers={"Idempotency-Key": "order-1-pay"},
    )
    assert third.status_code == 200, third.text
    ids = {r.json()["transaction_id"] for r in (first, second, third)}
    assert len(ids) == 1
    assert payment_api.simulator.calls("c2b") == 1
    assert await payment_api.count() == 1


@sqlite_only
async def test_idempotent_replay_of_a_refused_payment_repeats_the_refusal(
    payment_api: PaymentApi,
) -> None:
    request = {"phone_number": CANCELS, "amount": 10, "idempotency_key": "cancel-me"}
    first = await payment_api.http.post("/api/payments/initiate", json=request)
    second = await payment_api.http.post("/api/payments/initiate", json=request)
    one, two = assert_error(first, 402), assert_error(second, 402)
    assert one["details"]["transaction_id"] == two["details"]["transaction_id"]
    assert payment_api.simulator.calls("c2b") == 1


async def test_same_idempotency_key_with_a_different_body_is_409(payment_api: PaymentApi) -> None:
    key = {"Idempotency-Key": "k-409"}
    first = await payment_api.http.post(
        "/api/payments/initiate", json={"phone_number": SUCCESS, "amount": 100}, headers=key
    )
    assert first.status_code == 200
    conflict = await payment_api.http.post(
        "/api/payments/initiate", json={"phone_number": SUCCESS, "amount": 101}, headers=key
    )
    body = assert_error(conflict, 409, "idempotency_conflict")
    assert body["details"]["transaction_id"] == first.json()["transaction_id"]
    assert await payment_api.count() == 1
    assert payment_api.simulator.calls("c2b") == 1


@sqlite_only
async def test_header_and_body_idempotency_keys_that_differ_are_422(
    payment_api: PaymentApi,
) -> None:
    response = await payment_api.http.post(
        "/api/payments/initiate",
        json={"phone_number": SUCCESS, "amount": 100, "idempotency_key": "body-key"},
        headers={"Idempotency-Key": "header-key"},
    )
    body = assert_error(response, 422, "validation_error")
    assert [e["field"] for e in body["details"]["errors"]] == ["idempotency_key"]
    assert await payment_api.count() == 0
    assert payment_api.simulator.calls() == 0


async def test_concurrent_requests_with_one_key_make_one_payment(
    payment_api: PaymentApi,
) -> None:
    payment_api.simulator.config.pin_delay_seconds = 0.2  # the customer takes a moment
    responses = await asyncio.gather(
        *(
            payment_api.http.post(
                "/api/payments/initiate",
                json={"phone_number": SUCCESS, "amount": 10},
                headers={"Idempotency-Key": "double-click"},
            )
            for _ in range(5)
        )
    )
    assert all(response.status_code in (200, 202) for response in responses)
    assert len({response.json()["transaction_id"] for response in responses}) == 1
    assert payment_api.simulator.calls("c2b") == 1
    assert await payment_api.count() == 1
    assert any(response.json()["status"] == "completed" for response in responses)


@sqlite_only
async def test_retry_while_the_first_request_is_in_flight_is_202(
    payment_api: PaymentApi,
) -> None:
    payment_api.simulator.config.pin_delay_seconds = 1.0
    request = {"phone_number": SUCCESS, "amount": 10}
    headers = {"Idempotency-Key": "in-flight"}
    first = asyncio.create_task(
        payment_api.http.post("/api/payments/initiate", json=request, headers=headers)
    )
    for _ in range(200):  # until the intent is committed
        if await payment_api.count():
            break
        await asyncio.sleep(0.01)
    retry = await payment_api.http.post("/api/payments/initiate", json=request, headers=headers)
    assert (await first).status_code == 200
    assert retry.json()["status"] == "processing"
    assert retry.status_code == 202


# --- reads --------------------------------------------------------------------------------------


@sqlite_only
async def test_unknown_ids_are_404_with_the_error_shape(payment_api: PaymentApi) -> None:
    for method, path in (
        ("GET", "/api/payments/status/TXN-20250101000000-NOTTHERE"),
        ("GET", "/api/payments/audit/TXN-20250101000000-NOTTHERE"),
        ("POST", "/api/payments/TXN-20250101000000-NOTTHERE/refresh"),
        ("POST", "/api/payments/TXN-20250101000000-NOTTHERE/reverse"),
        ("POST", "/api/payments/webhooks/424242/replay"),
    ):
        response = await payment_api.http.request(method, path)
        assert_error(response, 404, "payment_not_found")
    assert await payment_api.count() == 0


async def test_list_filters_and_pagination(payment_api: PaymentApi) -> None:
    api = payment_api
    orders = [
        (await completed_payment(api, amount=10 + i, entity_type="order", entity_id=str(i)))[
            "transaction_id"
        ]
        for i in range(3)
    ]
    cancelled = assert_error(await initiate(api, phone=CANCELS, entity_type="invoice"), 402)
    cancelled_id = cancelled["details"]["transaction_id"]
    payout = await api.http.post("/api/payments/payouts", json={"phone_number": PAYEE, "amount": 5})
    transfer = await api.http.post(
        "/api/payments/transfers", json={"receiver_party_code": RECEIVER, "amount": 7}
    )
    assert payout.status_code == 200 and transfer.status_code == 200

    async def listing(**params: Any) -> dict[str, Any]:
        response = await api.http.get("/api/payments/", params=params)
        assert response.status_code == 200, response.text
        assert_clean(response)
        body: dict[str, Any] = response.json()
        return body

    def ids(body: dict[str, Any]) -> set[str]:
        return {item["transaction_id"] for item in body["items"]}

    everything = await listing()
    assert everything["total"] == 6 and len(everything["items"]) == 6
    assert (everything["page"], everything["per_page"], everything["pages"]) == (1, 20, 1)

    assert ids(await listing(status="cancelled")) == {cancelled_id}
    assert ids(await listing(status="completed", operation="c2b")) == set(orders)
    assert ids(await listing(operation="b2c")) == {payout.json()["transaction_id"]}
    assert ids(await listing(operation="b2b")) == {transfer.json()["transaction_id"]}
    # Any accepted spelling of the number filters the same way.
    for spelling in (SUCCESS, "+258841234567", "841234567", "00258 84 123 4567"):
        assert ids(await listing(phone_number=spelling)) == set(orders), spelling
    assert ids(await listing(phone_number=PAYEE)) == {payout.json()["transaction_id"]}
    assert ids(await listing(entity_type="order")) == set(orders)
    assert ids(await listing(entity_type="order", entity_id="1")) == {orders[1]}
    assert ids(await listing(entity_type="invoice")) == {cancelled_id}
    assert ids(await listing(user_id="admin-api-key")) == ids(everything)
    assert (await listing(user_id="somebody-else"))["total"] == 0

    now = datetime.now(UTC).date()
    assert (await listing(from_date=now.isoformat(), to_date=now.isoformat()))["total"] == 6
    assert (await listing(to_date=(now - timedelta(days=1)).isoformat()))["total"] == 0
    assert (await listing(from_date=(now + timedelta(days=1)).isoformat()))["total"] == 0

    seen: list[str] = []
    for page in (1, 2, 3):
        body = await listing(per_page=2, page=page)
        assert (body["total"], body["pages"], body["page"], body["per_page"]) == (6, 3, page, 2)
        assert len(body["items"]) == 2
        seen += [item["transaction_id"] for item in body["items"]]
    assert sorted(seen) == sorted(ids(everything))
    beyond = await listing(per_page=2, page=4)
    assert beyond["items"] == [] and beyond["total"] == 6

    for params in (
        {"page": 0},
        {"per_page": 0},
        {"per_page": 101},
        {"page": "x"},
        {"from_date": "2025-13-01"},
        {"phone_number": "258821234567"},
        {"attention_required": "maybe"},
    ):
        assert_error(await api.http.get("/api/payments/", params=params), 422, "validation_error")


async def test_summary_counts_by_status_and_operation_within_dates(
    payment_api: PaymentApi,
) -> None:
    api = payment_api
    await completed_payment(api, amount=100)
    await completed_payment(api, amount=50.5)
    assert_error(await initiate(api, phone=CANCELS, amount=30), 402)
    payout = await api.http.post("/api/payments/payouts", json={"phone_number": PAYEE, "amount": 5})
    assert payout.status_code == 200

    response = await api.http.get(
        "/api/payments/summary", params={"from_date": today(), "to_date": today()}
    )
    assert response.status_code == 200, response.text
    summary = response.json()
    assert summary["from_date"] == summary["to_date"] == today()
    assert summary["total_count"] == 4
    assert summary["total_amount"] == "185.50"
    assert summary["by_status"]["completed"] == {"count": 3, "amount": "155.50"}
    assert summary["by_status"]["cancelled"] == {"count": 1, "amount": "30.00"}
    assert summary["by_operation"]["c2b"]["count"] == 3
    assert summary["by_operation"]["b2c"]["count"] == 1
    assert summary["by_operation"]["b2c"]["amount"] == "5.00"
    # Money in and money out apart: the payout is not "received".
    assert summary["received"] == {"count": 2, "amount": "150.50"}
    assert summary["paid_out"] == {"count": 1, "amount": "5.00"}
    assert summary["net_received"] == "150.50"
    assert summary["success_rate_by_operation"] == {
        "c2b": pytest.approx(2 / 3, abs=1e-4),
        "b2c": 1.0,
    }
    # The earlier fields, as the C2B figures.
    assert summary["completed_amount"] == "150.50"
    assert summary["success_rate"] == pytest.approx(0.6667)

    past = (datetime.now(UTC).date() - timedelta(days=30)).isoformat()
    empty = await api.http.get("/api/payments/summary", params={"from_date": past, "to_date": past})
    assert empty.status_code == 200
    assert empty.json()["total_count"] == 0 and empty.json()["success_rate"] is None

    everything = await api.http.get("/api/payments/summary")
    assert everything.status_code == 200 and everything.json()["total_count"] == 4

    inverted = await api.http.get(
        "/api/payments/summary", params={"from_date": today(), "to_date": past}
    )
    assert_error(inverted, 422, "validation_error")
    assert_error(
        await api.http.get("/api/payments/summary", params={"from_date": "yesterday"}), 422
    )


async def test_audit_trail_shows_every_step_masked(payment_api: PaymentApi) -> None:
    payment = await completed_payment(payment_api, account_reference="ORDER-9")
    response = await payment_api.http.get(f"/api/payments/audit/{payment['transaction_id']}")
    assert response.status_code == 200, response.text
    assert_clean(response)
    trail = response.json()
    assert trail["transaction_id"] == payment["transaction_id"]
    actions = [entry["action"] for entry in trail["entries"]]
    assert actions[0] == "initiated"
    assert {"api_request", "api_response", "completed"} <= set(actions)
    assert trail["entries"][0]["request_body"]["phone_number"] == "2588412*****"
    assert {entry["actor"] for entry in trail["entries"]} == {"admin-api-key"}
    completed = next(entry for entry in trail["entries"] if entry["action"] == "completed")
    assert (completed["status_before"], completed["status_after"]) == ("processing", "completed")


# --- payouts, transfers, reversals ---------------------------------------------------------------


async def test_payout_and_transfer(payment_api: PaymentApi) -> None:
    api = payment_api
    payout = await api.http.post(
        "/api/payments/payouts",
        json={"phone_number": PAYEE, "amount": "12.50", "account_reference": "REFUND-1"},
    )
    assert payout.status_code == 200, payout.text
    body = payout.json()
    assert (body["operation"], body["status"], body["amount"]) == ("b2c", "completed", "12.50")
    assert body["phone_number"] == "2588512*****"

    transfer = await api.http.post(
        "/api/payments/transfers", json={"receiver_party_code": RECEIVER, "amount": 1000}
    )
    assert transfer.status_code == 200, transfer.text
    body = transfer.json()
    assert (body["operation"], body["status"], body["receiver_party_code"]) == (
        "b2b",
        "completed",
        RECEIVER,
    )
    assert body["phone_number"] is None

    refused = await api.http.post(
        "/api/payments/payouts", json={"phone_number": CANCELS, "amount": 10}
    )
    assert assert_error(refused, 402)["details"]["provider_code"] == "INS-5"
    unknown = await api.http.post(
        "/api/payments/payouts", json={"phone_number": DROPPED, "amount": 10}
    )
    assert unknown.status_code == 202 and unknown.json()["status"] == "unknown"
    assert await api.count() == 4


async def test_full_reversal_without_a_body(payment_api: PaymentApi) -> None:
    payment = await completed_payment(payment_api, amount=80)
    reversal = await payment_api.http.post(f"/api/payments/{payment['transaction_id']}/reverse")
    assert reversal.status_code == 200, reversal.text
    body = reversal.json()
    assert body["operation"] == "reversal"
    assert body["status"] == "completed"
    assert body["amount"] == "80.00"
    assert body["message"] == "Reversal completed successfully"
    assert body["original_transaction_id"] == payment["transaction_id"]
    original = await status_of(payment_api, payment["transaction_id"])
    assert original["status"] == "reversed"
    assert original["reversed_amount"] == "80.00"
    # Nothing is left to reverse.
    again = await payment_api.http.post(f"/api/payments/{payment['transaction_id']}/reverse")
    assert_error(again, 409, "invalid_state_transition")
    assert again.json()["message"] == f"{payment['transaction_id']} is already fully reversed"
    assert await payment_api.count() == 2


async def test_partial_reversals_then_over_reversal(payment_api: PaymentApi) -> None:
    api = payment_api
    payment = await completed_payment(api, amount=100)
    path = f"/api/payments/{payment['transaction_id']}/reverse"
    first = await api.http.post(path, json={"amount": 30, "reason": "one item returned"})
    assert first.status_code == 200, first.text
    assert first.json()["amount"] == "30.00"
    original = await status_of(api, payment["transaction_id"])
    assert (original["status"], original["reversed_amount"]) == ("partially_reversed", "30.00")

    too_much = await api.http.post(path, json={"amount": 70.01})
    assert_error(too_much, 422, "validation_error")
    assert await api.count() == 2  # the refused reversal wrote nothing

    rest = await api.http.post(path, json={"amount": None})
    assert rest.status_code == 200, rest.text
    assert rest.json()["amount"] == "70.00"
    original = await status_of(api, payment["transaction_id"])
    assert (original["status"], original["reversed_amount"]) == ("reversed", "100.00")

    # A reversal itself cannot be reversed.
    reversal_id = rest.json()["transaction_id"]
    assert_error(await api.http.post(f"/api/payments/{reversal_id}/reverse"), 422)


async def test_reversing_a_failed_payment_is_409(payment_api: PaymentApi) -> None:
    refused = assert_error(await initiate(payment_api, phone=CANCELS), 402)
    transaction_id = refused["details"]["transaction_id"]
    response = await payment_api.http.post(
        f"/api/payments/{transaction_id}/reverse", json={"amount": 10}
    )
    body = assert_error(response, 409, "invalid_state_transition")
    assert body["details"]["status"] == "cancelled"
    assert await payment_api.count() == 1
    assert payment_api.simulator.calls("reversal") == 0


# --- customer name and health -------------------------------------------------------------------


@sqlite_only
async def test_customer_name(payment_api: PaymentApi) -> None:
    response = await payment_api.http.get(
        "/api/payments/customer-name", params={"phone_number": SUCCESS}
    )
    assert response.status_code == 200, response.text
    assert_clean(response)
    body = response.json()
    assert body["phone_number"] == "2588412*****"
    assert body["customer_name"] and "*" in body["customer_name"]
    assert body["response_code"] == "INS-0"

    bad = await payment_api.http.get(
        "/api/payments/customer-name", params={"phone_number": "258821234567"}
    )
    assert_error(bad, 422, "validation_error")
    assert "258821234567" not in bad.text
    assert_error(await payment_api.http.get("/api/payments/customer-name"), 422)
    too_long = await payment_api.http.get(
        "/api/payments/customer-name", params={"phone_number": "8" * 31}
    )
    assert_error(too_long, 422)


@sqlite_only
async def test_health_needs_no_key_and_deep_probes_the_provider(
    payment_api_factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAYMENT_ADMIN_API_KEY", ADMIN_KEY)
    get_settings.cache_clear()
    api = await payment_api_factory()
    shallow = await api.http.get("/api/payments/health")
    assert shallow.status_code == 200, shallow.text
    assert shallow.json() == {
        "database": "ok",
        "provider_configuration": "ok",
        "environment": "simulator",
        "status": "ok",
    }
    # deep=true opens connections to M-Pesa: staff only (issue 11.14).
    for headers in ({}, {"X-API-Key": "wrong"}):
        refused = await api.http.get(
            "/api/payments/health", params={"deep": "true"}, headers=headers
        )
        assert_error(refused, 401, "unauthorized")
    deep = await api.http.get(
        "/api/payments/health", params={"deep": "true"}, headers={"X-API-Key": ADMIN_KEY}
    )
    assert deep.status_code == 200, deep.text
    assert deep.json()["provider_ports"] == {"simulator": "ok"}
    assert deep.json()["status"] == "ok"
    assert ADMIN_KEY not in shallow.text + deep.text


# --- bad input: 4xx, the error shape, and nothing written ----------------------------------------

_VALID_C2B: dict[str, Any] = {"phone_number": SUCCESS, "amount": 100}

_BAD_AMOUNTS: list[Any] = [
    -1,
    0,
    "0.00",
    -0.01,
    "NaN",
    "nan",
    "Infinity",
    "-inf",
    "1.005",
    1.001,
    0.1 + 0.2,
    "abc",
    "",
    None,
    True,
    [100],
    {"value": 100},
    0.5,  # below PAYMENT_MIN_AMOUNT
    150000.01,  # above PAYMENT_MAX_AMOUNT
    "1e10",
    10**20,
]

_BAD_C2B_BODIES: list[Any] = [_VALID_C2B | {"amount": amount} for amount in _BAD_AMOUNTS] + [
    {"amount": 100},
    {"phone_number": SUCCESS},
    {},
    [],
    [_VALID_C2B],
    "just a string",
    42,
    None,
    _VALID_C2B | {"phone_number": "258821234567"},  # Movitel, not Vodacom
    _VALID_C2B | {"phone_number": "258861234567"},
    _VALID_C2B | {"phone_number": "25884123456"},
    _VALID_C2B | {"phone_number": "2588412345678"},
    _VALID_C2B | {"phone_number": "abc"},
    _VALID_C2B | {"phone_number": ""},
    _VALID_C2B | {"phone_number": None},
    _VALID_C2B | {"phone_number": True},
    _VALID_C2B | {"phone_number": [SUCCESS]},
    _VALID_C2B | {"phone_number": 25884123456.7},
    _VALID_C2B | {"phone_number": "٢٥٨٨٤١٢٣٤٥٦٧"},  # non-ASCII digits
    _VALID_C2B | {"account_reference": "R" * 101},
    _VALID_C2B | {"account_reference": ""},
    _VALID_C2B | {"description": "d" * 256},
    _VALID_C2B | {"entity_type": "e" * 51},
    _VALID_C2B | {"entity_id": "e" * 51},
    _VALID_C2B | {"customer_name": "n" * 256},
    _VALID_C2B | {"customer_email": "not-an-email"},
    _VALID_C2B | {"customer_email": "a@" + "b" * 300 + ".com"},
    _VALID_C2B | {"idempotency_key": "k" * 256},
    _VALID_C2B | {"idempotency_key": ""},
    _VALID_C2B | {"metadata": "not a dict"},
    _VALID_C2B | {"metadata": [1, 2]},
    _VALID_C2B | {"description": 12345},
    _VALID_C2B | {"ammount": 100},  # misspelt: unknown fields are refused
    _VALID_C2B | {"currency": "USD"},
    _VALID_C2B | {"status": "completed"},
]


def _raw(body: Any) -> bytes:
    return json.dumps(body).encode()


_MALFORMED_RAW: list[bytes] = [
    b"{not json",
    b'{"phone_number": "258841234567", "amount": 100',
    b"",
    b'{"phone_number": "258841234567", "amount": 100}{}',
    b'{"phone_number": "258841234567", "amount": 100, "amount": "x"}',
]


async def _assert_refused(api: PaymentApi, path: str, case: Any, *, raw: bool = False) -> None:
    content = case if raw else _raw(case)
    response = await api.http.post(
        path, content=content, headers={"Content-Type": "application/json"}
    )
    assert 400 <= response.status_code < 500, (case, response.status_code, response.text)
    assert_error(response, response.status_code)


@sqlite_only
async def test_bad_initiate_input_is_4xx_and_writes_nothing(payment_api: PaymentApi) -> None:
    for case in _BAD_C2B_BODIES:
        await _assert_refused(payment_api, "/api/payments/initiate", case)
    for raw in _MALFORMED_RAW:
        await _assert_refused(payment_api, "/api/payments/initiate", raw, raw=True)
    no_content_type = await payment_api.http.post(
        "/api/payments/initiate", content=b"phone_number=258841234567&amount=100"
    )
    assert_error(no_content_type, 422)
    assert await payment_api.count() == 0
    assert payment_api.simulator.calls() == 0


@sqlite_only
async def test_bad_payout_and_transfer_input_is_4xx_and_writes_nothing(
    payment_api: PaymentApi,
) -> None:
    payout_cases = [
        body
        for body in _BAD_C2B_BODIES
        if not (isinstance(body, dict) and "customer_email" in body)  # not a payout field
    ] + [{"phone_number": PAYEE, "amount": 10, "customer_email": "x@example.com"}]
    for case in payout_cases:
        await _assert_refused(payment_api, "/api/payments/payouts", case)
    valid_b2b: dict[str, Any] = {"receiver_party_code": RECEIVER, "amount": 10}
    transfer_cases: list[Any] = [valid_b2b | {"amount": amount} for amount in _BAD_AMOUNTS] + [
        valid_b2b | {"receiver_party_code": code}
        for code in ("1234", "1234567", "12a45", "", None, 979797, " 979797x")
    ]
    transfer_cases += [
        {"amount": 10},
        valid_b2b | {"phone_number": SUCCESS},
        valid_b2b | {"description": "d" * 256},
        [],
    ]
    for case in transfer_cases:
        await _assert_refused(payment_api, "/api/payments/transfers", case)
    for raw in _MALFORMED_RAW:
        await _assert_refused(payment_api, "/api/payments/payouts", raw, raw=True)
        await _assert_refused(payment_api, "/api/payments/transfers", raw, raw=True)
    assert await payment_api.count() == 0
    assert payment_api.simulator.calls() == 0


@sqlite_only
async def test_bad_reversal_input_is_4xx_and_writes_nothing(payment_api: PaymentApi) -> None:
    payment = await completed_payment(payment_api, amount=100)
    path = f"/api/payments/{payment['transaction_id']}/reverse"
    # PAYMENT_MIN_AMOUNT does not bind reversals (0.50 back is fine); everything else does.
    cases: list[Any] = [
        {"amount": amount} for amount in _BAD_AMOUNTS if amount is not None and amount != 0.5
    ]
    cases += [
        {"amount": "100.01"},  # more than was paid
        {"reason": "r" * 256},
        {"amount": 10, "unknown": 1},
        {"idempotency_key": ""},
        [],
        "full",
    ]
    for case in cases:
        await _assert_refused(payment_api, path, case)
    for raw in _MALFORMED_RAW[:2]:
        await _assert_refused(payment_api, path, raw, raw=True)
    assert await payment_api.count() == 1
    assert payment_api.simulator.calls("reversal") == 0
    assert (await status_of(payment_api, payment["transaction_id"]))["status"] == "completed"


@sqlite_only
async def test_overlong_idempotency_header_is_422(payment_api: PaymentApi) -> None:
    response = await payment_api.http.post(
        "/api/payments/initiate", json=_VALID_C2B, headers={"Idempotency-Key": "k" * 256}
    )
    assert_error(response, 422, "validation_error")
    assert await payment_api.count() == 0


@sqlite_only
async def test_non_utf8_body_is_4xx_in_the_error_shape(payment_api: PaymentApi) -> None:
    response = await payment_api.http.post(
        "/api/payments/initiate",
        content=b'{"phone_number": "\xff\xfe", "amount": 100}',
        headers={"Content-Type": "application/json"},
    )
    assert_error(response, response.status_code)
    assert 400 <= response.status_code < 500
    assert await payment_api.count() == 0


@sqlite_only
async def test_transfer_to_a_shortcode_in_non_ascii_digits_is_refused(
    payment_api: PaymentApi,
) -> None:
    response = await payment_api.http.post(
        "/api/payments/transfers", json={"receiver_party_code": "٩٧٩٧٩٧", "amount": 10}
    )
    assert_error(response, 422, "validation_error")
    assert await payment_api.count() == 0
    assert payment_api.simulator.calls() == 0


@sqlite_only
@pytest.mark.parametrize("amount", ["1e26", 10**30, 1e300, "9" * 40])
async def test_huge_amounts_are_422_not_500(payment_api: PaymentApi, amount: Any) -> None:
    for path, body in (
        ("/api/payments/initiate", {"phone_number": SUCCESS, "amount": amount}),
        ("/api/payments/payouts", {"phone_number": PAYEE, "amount": amount}),
        ("/api/payments/transfers", {"receiver_party_code": RECEIVER, "amount": amount}),
    ):
        response = await payment_api.http.post(path, json=body)
        assert_error(response, 422, "validation_error")
    assert await payment_api.count() == 0


async def test_input_the_database_cannot_store_is_not_a_5xx(
    payment_api: PaymentApi, database_url: str, request: pytest.FixtureRequest
) -> None:
    for raw in (
        b'{"phone_number": "258841234567", "amount": 10, "description": "a\\u0000b"}',
        b'{"phone_number": "258841234567", "amount": 10, "account_reference": "R\\u00001"}',
        b'{"phone_number": "258841234567", "amount": 10, "metadata": {"x": NaN}}',
        b'{"phone_number": "258841234567", "amount": 10, "metadata": {"x": Infinity}}',
    ):
        before = await payment_api.count()
        response = await payment_api.http.post(
            "/api/payments/initiate", content=raw, headers={"Content-Type": "application/json"}
        )
        assert response.status_code < 500, (raw, response.text)
        if response.status_code >= 400:
            assert_error(response, response.status_code)
            assert await payment_api.count() == before


async def test_webhook_list_with_a_huge_page_is_not_500(payment_api: PaymentApi) -> None:
    response = await payment_api.http.get(
        "/api/payments/webhooks", params={"page": 10**20, "per_page": 20}
    )
    assert response.status_code < 500, response.text


@sqlite_only
async def test_responses_never_contain_the_full_msisdn(payment_api: PaymentApi) -> None:
    """Every endpoint, driven with the full number; ``assert_clean`` checks each answer."""
    api = payment_api
    responses: list[httpx.Response] = []
    paid = await completed_payment(api, account_reference="ORDER-77", customer_name="Ana")
    transaction_id = paid["transaction_id"]
    responses.append(await initiate(api, phone="+258 84 123 4567", amount=1))
    responses.append(await initiate(api, phone=SUCCESS, amount="1.001"))
    responses.append(await initiate(api, phone=SUCCESS, amount=10**9))
    responses.append(await api.http.get(f"/api/payments/status/{transaction_id}"))
    responses.append(await api.http.get("/api/payments/", params={"phone_number": SUCCESS}))
    responses.append(await api.http.get("/api/payments/summary"))
    responses.append(await api.http.get(f"/api/payments/audit/{transaction_id}"))
    responses.append(await api.http.post(f"/api/payments/{transaction_id}/refresh"))
    responses.append(await api.http.post(f"/api/payments/{transaction_id}/reverse"))
    responses.append(
        await api.http.get("/api/payments/customer-name", params={"phone_number": SUCCESS})
    )
    responses.append(
        await api.http.post(
            "/api/payments/payouts", json={"phone_number": SUCCESS, "amount": "2.00"}
        )
    )
    responses.append(await api.http.get("/api/payments/", params={"phone_number": SUCCESS + "0"}))
    for response in responses:
        assert_clean(response)
    assert all(response.status_code < 500 for response in responses)


# --- the database is down -----------------------------------------------------------------------


async def test_database_down_health_is_503_and_payments_are_not_sent(
    unreachable_sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with build_payment_api(unreachable_sessions) as api:
        health = await api.http.get("/api/payments/health")
        assert health.status_code == 503
        assert health.json()["status"] == "degraded"
        assert health.json()["database"].startswith("unreachable")
        response = await initiate(api)
        assert_error(response, 503, "storage_unavailable")
        assert api.simulator.calls() == 0


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/payments/status/TXN-20250101000000-AAAAAAAA"),
        ("GET", "/api/payments/"),
        ("GET", "/api/payments/summary"),
        ("GET", "/api/payments/audit/TXN-20250101000000-AAAAAAAA"),
        ("POST", "/api/payments/TXN-20250101000000-AAAAAAAA/refresh"),
        ("GET", "/api/payments/webhooks"),
        ("POST", "/api/payments/webhooks/1/replay"),
    ],
)
async def test_database_down_reads_are_503_in_the_error_shape(
    unreachable_sessions: async_sessionmaker[AsyncSession], method: str, path: str
) -> None:
    async with build_payment_api(unreachable_sessions) as api:
        response = await api.http.request(method, path)
        assert_error(response, 503, "storage_unavailable")


# --- authorization ------------------------------------------------------------------------------

#: Every endpoint behind ``auth``: (method, path template, JSON body).
PROTECTED: list[tuple[str, str, Any]] = [
    ("POST", "/api/payments/initiate", {"phone_number": SUCCESS, "amount": 10}),
    ("POST", "/api/payments/payouts", {"phone_number": PAYEE, "amount": 10}),
    ("POST", "/api/payments/transfers", {"receiver_party_code": RECEIVER, "amount": 10}),
    ("POST", "/api/payments/{tid}/reverse", None),
    ("POST", "/api/payments/{tid}/refresh", None),
    ("GET", "/api/payments/status/{tid}", None),
    ("GET", "/api/payments/", None),
    ("GET", "/api/payments/summary", None),
    ("GET", "/api/payments/audit/{tid}", None),
    ("GET", "/api/payments/customer-name?phone_number=258851234567", None),
    ("GET", "/api/payments/webhooks", None),
    ("POST", "/api/payments/webhooks/1/replay", None),
]


async def _call(
    api: PaymentApi, method: str, path: str, body: Any, tid: str, headers: dict[str, str]
) -> httpx.Response:
    return await api.http.request(method, path.format(tid=tid), json=body, headers=headers)


async def _seed_payment_and_webhook(api: PaymentApi, headers: dict[str, str]) -> str:
    """A completed payment and one stored notification, made with the right credentials."""
    paid = await api.http.post(
        "/api/payments/initiate", json={"phone_number": SUCCESS, "amount": 100}, headers=headers
    )
    assert paid.status_code == 200, paid.text
    await api.http.post("/api/payments/callback/c2b", json={"input_ResultCode": "INS-0"})
    assert await api.webhook_count() == 1
    transaction_id: str = paid.json()["transaction_id"]
    return transaction_id


async def test_admin_key_guards_every_endpoint_but_health_and_callback(
    payment_api_factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAYMENT_ADMIN_API_KEY", ADMIN_KEY)
    get_settings.cache_clear()
    api = await payment_api_factory()
    right = {"X-API-Key": ADMIN_KEY}
    tid = await _seed_payment_and_webhook(api, right)
    rows = await api.count()

    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}, {"X-API-Key": ADMIN_KEY + "x"}):
        for method, path, body in PROTECTED:
            response = await _call(api, method, path, body, tid, headers)
            assert_error(response, 401, "unauthorized")
            assert ADMIN_KEY not in response.text
    assert await api.count() == rows  # nothing was written by a refused call
    assert api.simulator.calls("c2b") == 1

    for method, path, body in PROTECTED:
        response = await _call(api, method, path, body, tid, right)
        assert response.status_code != 401, (method, path, response.text)
        assert response.status_code < 500, (method, path, response.text)

    health = await api.http.get("/api/payments/health")
    assert health.status_code == 200
    callback = await api.http.post("/api/payments/callback/c2b", json={"input_ResultCode": "0"})
    assert "output_ResponseCode" in callback.json()  # the provider's shape, not a 401 error


@sqlite_only
async def test_sandbox_without_an_admin_key_closes_the_api(
    payment_api_factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MPESA_ENVIRONMENT", "sandbox")
    monkeypatch.setenv("MPESA_API_KEY", "sandbox-api-key")
    monkeypatch.setenv("MPESA_PUBLIC_KEY", rsa_key_pair()[1])
    monkeypatch.setenv("MPESA_CALLBACK_TOKEN", "cb-token")
    monkeypatch.delenv("PAYMENT_ADMIN_API_KEY")
    get_settings.cache_clear()
    assert get_settings().mpesa_environment == "sandbox"
    # The service still talks to the simulator; only the router's gate is under test.
    api = await payment_api_factory(
        settings_overrides={
            "mpesa_api_key": SIMULATOR_API_KEY,
            "mpesa_public_key": SIMULATOR_PUBLIC_KEY,
        }
    )
    for headers in ({}, {"X-API-Key": "anything"}):
        for method, path, body in PROTECTED:
            response = await _call(api, method, path, body, "TXN-1", headers)
            body_json = assert_error(response, 401, "unauthorized")
            assert "PAYMENT_ADMIN_API_KEY" in body_json["message"]
    assert await api.count() == 0
    assert api.simulator.calls() == 0

    assert (await api.http.get("/api/payments/health")).status_code == 200
    callback = await api.http.post(
        "/api/payments/callback/c2b",
        json={"input_ResultCode": "INS-0"},
        headers={"X-Callback-Token": "cb-token"},
    )
    assert "output_ResponseCode" in callback.json()
    assert callback.status_code != 401

    monkeypatch.setenv("PAYMENT_ADMIN_API_KEY", ADMIN_KEY)
    get_settings.cache_clear()
    opened = await api.http.get("/api/payments/", headers={"X-API-Key": ADMIN_KEY})
    assert opened.status_code == 200


@sqlite_only
async def test_custom_auth_replaces_the_api_key_and_names_the_actor(
    payment_api_factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAYMENT_ADMIN_API_KEY", ADMIN_KEY)  # ignored: the host's auth rules
    get_settings.cache_clear()

    def host_auth(authorization: str | None = Header(default=None)) -> str:
        if authorization == "Bearer alice-token":
            return "alice"
        if authorization == "Bearer mallory-token":
            raise HTTPException(status_code=403, detail="forbidden")
        raise UnauthorizedError("log in first")

    api = await payment_api_factory(router_options={"auth": host_auth})
    alice = {"Authorization": "Bearer alice-token"}
    assert_error(await initiate(api), 401, "unauthorized")
    with_admin_key = await api.http.get("/api/payments/", headers={"X-API-Key": ADMIN_KEY})
    assert_error(with_admin_key, 401, "unauthorized")
    forbidden = await api.http.get(
        "/api/payments/", headers={"Authorization": "Bearer mallory-token"}
    )
    assert forbidden.status_code == 403

    paid = await api.http.post(
        "/api/payments/initiate", json={"phone_number": SUCCESS, "amount": 10}, headers=alice
    )
    assert paid.status_code == 200, paid.text
    transaction_id = paid.json()["transaction_id"]
    trail = await api.http.get(f"/api/payments/audit/{transaction_id}", headers=alice)
    assert trail.status_code == 200
    actors = {entry["actor"] for entry in trail.json()["entries"]}
    assert actors == {"alice"}
    mine = await api.http.get("/api/payments/", params={"user_id": "alice"}, headers=alice)
    assert [item["transaction_id"] for item in mine.json()["items"]] == [transaction_id]
    assert (await api.http.get("/api/payments/health")).status_code == 200


@sqlite_only
async def test_default_router_with_dependency_overrides(
    session_factory: async_sessionmaker[AsyncSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README way: the module's ``payment_router`` and the host's overrides."""
    monkeypatch.setenv("PAYMENT_ADMIN_API_KEY", ADMIN_KEY)
    get_settings.cache_clear()
    async with build_payment_api(session_factory) as harness:
        app = FastAPI()
        app.include_router(payment_router, prefix="/api")

        async def host_session() -> AsyncIterator[AsyncSession]:
            async with session_factory() as session:
                yield session

        app.dependency_overrides[get_db] = host_session
        app.dependency_overrides[get_payment_service] = lambda: harness.service
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            refused = await http.get("/api/payments/")
            assert_error(refused, 401, "unauthorized")
            paid = await http.post(
                "/api/payments/initiate",
                json={"phone_number": SUCCESS, "amount": 10},
                headers={"X-API-Key": ADMIN_KEY},
            )
            assert paid.status_code == 200, paid.text
            assert_clean(paid)

            app.dependency_overrides[require_api_key] = lambda: "host-user-7"
            second = await http.post(
                "/api/payments/initiate", json={"phone_number": SUCCESS, "amount": 11}
            )
            assert second.status_code == 200, second.text
            trail = await http.get(f"/api/payments/audit/{second.json()['transaction_id']}")
            assert {entry["actor"] for entry in trail.json()["entries"]} == {"host-user-7"}
            first_trail = await http.get(f"/api/payments/audit/{paid.json()['transaction_id']}")
            assert {entry["actor"] for entry in first_trail.json()["entries"]} == {"admin-api-key"}
        assert harness.simulator.calls("c2b") == 2
        assert await harness.count() == 2


@sqlite_only
async def test_the_default_key_check_adds_no_dependency_solving(
    payment_api: PaymentApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default ``X-API-Key`` check runs without a probe route: one dependency solve per
    request (the endpoint's own), where the probe doubled FastAPI's work on every call; a wrong
    key is refused before any. An override of ``require_api_key`` still goes through FastAPI."""
    import fastapi.routing

    solved: list[int] = []
    real = fastapi.routing.solve_dependencies

    async def counting(*args: Any, **kwargs: Any) -> Any:
        solved.append(1)
        return await real(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    missing = "/api/payments/status/TXN-20250101000000-NOTTHERE"
    assert_error(await payment_api.http.get(missing), 404, "payment_not_found")
    assert len(solved) == 1
    assert_error(await payment_api.http.get(missing, headers={"X-API-Key": "wrong"}), 401)
    assert len(solved) == 1

    payment_api.app.dependency_overrides[require_api_key] = lambda: "staff-7"
    solved.clear()
    assert_error(await payment_api.http.get(missing, headers={"X-API-Key": "wrong"}), 404)
    assert len(solved) == 2  # the override's probe, then the endpoint
