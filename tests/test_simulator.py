"""The M-Pesa Mozambique simulator: wire shapes, validation, scripted outcomes, faults, state."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
import uvicorn

from payments.mpesa.auth import derive_bearer_token, load_public_key
from payments.simulator.app import (
    SCRIPTED_OUTCOMES,
    MpesaSimulator,
    SimulatorConfig,
    create_simulator_app,
)
from payments.simulator.keys import (
    SIMULATOR_API_KEY,
    SIMULATOR_INITIATOR_IDENTIFIER,
    SIMULATOR_PUBLIC_KEY,
    SIMULATOR_SECURITY_CREDENTIAL,
)
from payments.simulator.transport import SimulatorTransport
from tests.support import SUCCESS as GOOD_MSISDN

C2B = "/ipg/v1x/c2bPayment/singleStage/"
B2C = "/ipg/v1x/b2cPayment/"
B2B = "/ipg/v1x/b2bPayment/"
REVERSAL = "/ipg/v1x/reversal/"
QUERY = "/ipg/v1x/queryTransactionStatus/"
NAME = "/ipg/v1x/queryCustomerName/"

TOKEN = derive_bearer_token(SIMULATOR_API_KEY, SIMULATOR_PUBLIC_KEY)
HEADERS = {
    "Authorization": f"Bearer {TOKEN}",
    "Content-Type": "application/json",
    "Origin": "developer.mpesa.vm.co.mz",
}
TRANSACTION_ID = re.compile(r"[a-z0-9]{12}")
CONVERSATION_ID = re.compile(r"[0-9a-f]{32}")

_counter = itertools.count(1)


def ref() -> str:
    return f"REF{next(_counter)}"


def c2b_body(msisdn: str = GOOD_MSISDN, amount: object = "10.00", **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "input_TransactionReference": "T12344C",
        "input_CustomerMSISDN": msisdn,
        "input_Amount": amount,
        "input_ThirdPartyReference": ref(),
        "input_ServiceProviderCode": "171717",
    }
    body.update(changes)
    return body


def b2b_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "input_TransactionReference": "T12344C",
        "input_Amount": "25.50",
        "input_ThirdPartyReference": ref(),
        "input_PrimaryPartyCode": "171717",
        "input_ReceiverPartyCode": "979797",
    }
    body.update(changes)
    return body


def reversal_body(transaction_id: str, amount: str | None = None, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "input_TransactionID": transaction_id,
        "input_SecurityCredential": SIMULATOR_SECURITY_CREDENTIAL,
        "input_InitiatorIdentifier": SIMULATOR_INITIATOR_IDENTIFIER,
        "input_ThirdPartyReference": ref(),
        "input_ServiceProviderCode": "171717",
    }
    if amount is not None:
        body["input_ReversalAmount"] = amount
    body.update(changes)
    return body


def query_params(query_reference: str, **changes: str) -> dict[str, str]:
    params = {
        "input_ThirdPartyReference": ref(),
        "input_QueryReference": query_reference,
        "input_ServiceProviderCode": "171717",
    }
    params.update(changes)
    return params


@pytest.fixture
def simulator() -> MpesaSimulator:
    return MpesaSimulator(SimulatorConfig(slow_response_seconds=5.0))


@pytest.fixture
async def client(simulator: MpesaSimulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=SimulatorTransport(simulator), base_url="http://simulator", headers=HEADERS
    ) as http:
        yield http


async def pay(client: httpx.AsyncClient, path: str = C2B, **kwargs: Any) -> httpx.Response:
    return await client.post(path, json=c2b_body(**kwargs))


async def status_of(client: httpx.AsyncClient, query_reference: str) -> str:
    response = await client.get(QUERY, params=query_params(query_reference))
    assert response.status_code == 200
    return str(response.json()["output_ResponseTransactionStatus"])


# ------------------------------------------------------------------------------ success shapes


@pytest.mark.parametrize("path,operation", [(C2B, "c2b"), (B2C, "b2c")])
async def test_customer_payment_success_shape(
    client: httpx.AsyncClient, simulator: MpesaSimulator, path: str, operation: str
) -> None:
    body = c2b_body(amount="10")
    response = await client.post(path, json=body)

    assert response.status_code == 201
    data = response.json()
    assert set(data) == {
        "output_ResponseCode",
        "output_ResponseDesc",
        "output_TransactionID",
        "output_ConversationID",
        "output_ThirdPartyReference",
    }
    assert data["output_ResponseCode"] == "INS-0"
    assert data["output_ResponseDesc"] == "Request processed successfully"
    assert TRANSACTION_ID.fullmatch(data["output_TransactionID"])
    assert CONVERSATION_ID.fullmatch(data["output_ConversationID"])
    assert data["output_ThirdPartyReference"] == body["input_ThirdPartyReference"]

    [recorded] = simulator.transactions()
    assert recorded.operation == operation
    assert recorded.status == "Completed"
    assert recorded.amount == Decimal("10.00")
    assert recorded.msisdn == GOOD_MSISDN
    assert recorded.transaction_id == data["output_TransactionID"]
    assert recorded.conversation_id == data["output_ConversationID"]
    assert recorded.third_party_reference == body["input_ThirdPartyReference"]
    assert recorded.reversed_amount == Decimal("0")


async def test_b2b_success_shape(client: httpx.AsyncClient, simulator: MpesaSimulator) -> None:
    body = b2b_body()
    response = await client.post(B2B, json=body)

    assert response.status_code == 201
    data = response.json()
    assert data["output_ResponseCode"] == "INS-0"
    assert TRANSACTION_ID.fullmatch(data["output_TransactionID"])
    assert CONVERSATION_ID.fullmatch(data["output_ConversationID"])
    assert data["output_ThirdPartyReference"] == body["input_ThirdPartyReference"]
    [recorded] = simulator.transactions()
    assert (recorded.operation, recorded.msisdn, recorded.amount) == ("b2b", None, Decimal("25.5"))
    assert recorded.receiver_party_code == "979797"


@pytest.mark.parametrize("amount", ["10", "10.5", "10.50", 10, 10.5, "0.01"])
async def test_accepted_amount_forms(client: httpx.AsyncClient, amount: object) -> None:
    response = await pay(client, amount=amount)
    assert response.status_code == 201, response.text


async def test_customer_name_is_masked_and_deterministic(client: httpx.AsyncClient) -> None:
    params = {
        "input_CustomerMSISDN": GOOD_MSISDN,
        "input_ThirdPartyReference": "NAME1",
        "input_ServiceProviderCode": "171717",
    }
    first = await client.get(NAME, params=params)
    second = await client.get(NAME, params={**params, "input_ThirdPartyReference": "NAME2"})

    assert first.status_code == 200
    data = first.json()
    assert data["output_ResponseCode"] == "INS-0"
    assert data["output_ThirdPartyReference"] == "NAME1"
    assert CONVERSATION_ID.fullmatch(data["output_ConversationID"])
    assert re.fullmatch(r"[A-Z][a-z]\**[a-z]? [A-Z][a-z]\*+", data["output_CustomerName"])
    assert second.json()["output_CustomerName"] == data["output_CustomerName"]

    invalid = await client.get(NAME, params={**params, "input_CustomerMSISDN": "841234567"})
    assert invalid.status_code == 400
    assert invalid.json()["output_ResponseCode"] == "INS-2051"
    assert invalid.json()["output_CustomerName"] == "N/A"


# ------------------------------------------------------------------------------------ auth


def _wrong_key_token() -> str:
    return derive_bearer_token("some-other-api-key", load_public_key(SIMULATOR_PUBLIC_KEY))


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer ", "Bearer not-base64!!", f"Basic {TOKEN}", "Bearer wrong", "wrong-key"],
)
async def test_bad_credentials_are_ins_2(
    simulator: MpesaSimulator, authorization: str | None
) -> None:
    headers = {"Content-Type": "application/json"}
    if authorization == "wrong-key":
        headers["Authorization"] = f"Bearer {_wrong_key_token()}"
    elif authorization is not None:
        headers["Authorization"] = authorization
    async with httpx.AsyncClient(
        transport=SimulatorTransport(simulator), base_url="http://simulator", headers=headers
    ) as http:
        paid = await http.post(C2B, json=c2b_body())
        queried = await http.get(QUERY, params=query_params("x"))

    expected = {"output_ResponseCode": "INS-2", "output_ResponseDesc": "Invalid API Key"}
    assert (paid.status_code, paid.json()) == (401, expected)
    assert (queried.status_code, queried.json()) == (401, expected)
    assert simulator.transactions() == []
    assert simulator.calls() == 2  # refused calls still count as received


async def test_origin_is_checked_only_when_configured(simulator: MpesaSimulator) -> None:
    simulator.config.check_origin = True
    transport = SimulatorTransport(simulator)
    async with httpx.AsyncClient(transport=transport, base_url="http://simulator") as http:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        missing = await http.post(C2B, json=c2b_body(), headers=auth)
        star = await http.post(C2B, json=c2b_body(), headers={**auth, "Origin": "*"})
        portal = await http.post(C2B, json=c2b_body(), headers=HEADERS)
        simulator.config.check_origin = False
        unchecked = await http.post(C2B, json=c2b_body(), headers=auth)

    assert (missing.status_code, missing.json()["output_ResponseCode"]) == (400, "INS-26")
    assert star.status_code == portal.status_code == unchecked.status_code == 201


# ------------------------------------------------------------------------------ validation

_MISSING = object()


@pytest.mark.parametrize(
    "field,value,code",
    [
        ("input_TransactionReference", _MISSING, "INS-20"),
        ("input_CustomerMSISDN", _MISSING, "INS-20"),
        ("input_Amount", _MISSING, "INS-20"),
        ("input_ThirdPartyReference", _MISSING, "INS-20"),
        ("input_ServiceProviderCode", _MISSING, "INS-20"),
        ("input_Amount", None, "INS-20"),
        ("input_CustomerMSISDN", "841234567", "INS-2051"),
        ("input_CustomerMSISDN", "258821234567", "INS-2051"),
        ("input_CustomerMSISDN", "2588412345678", "INS-2051"),
        ("input_Amount", "0", "INS-15"),
        ("input_Amount", "-5", "INS-15"),
        ("input_Amount", "10.001", "INS-15"),
        ("input_Amount", "ten", "INS-15"),
        ("input_Amount", "1e3", "INS-15"),
        ("input_Amount", 10.005, "INS-15"),
        ("input_Amount", 0, "INS-15"),
        ("input_Amount", True, "INS-15"),
        ("input_TransactionReference", "T" * 21, "INS-17"),
        ("input_TransactionReference", "#ref-1234", "INS-17"),
        ("input_TransactionReference", " T1", "INS-17"),
        ("input_ThirdPartyReference", "R" * 21, "INS-19"),
        ("input_ThirdPartyReference", "ab-c", "INS-19"),
        ("input_ServiceProviderCode", "999999", "INS-13"),
        ("input_CustomerMSISDN", ["258841234567"], "INS-21"),
    ],
)
async def test_c2b_validation_codes(
    client: httpx.AsyncClient, simulator: MpesaSimulator, field: str, value: object, code: str
) -> None:
    body = c2b_body()
    if value is _MISSING:
        del body[field]
    else:
        body[field] = value
    response = await client.post(C2B, json=body)

    assert response.status_code == 400, response.text
    assert response.json()["output_ResponseCode"] == code
    assert response.json()["output_TransactionID"] == ""
    assert simulator.transactions() == []


@pytest.mark.parametrize("raw", [b"[]", b"not json", b"", b'"text"'])
async def test_body_not_a_json_object_is_ins_21(client: httpx.AsyncClient, raw: bytes) -> None:
    response = await client.post(C2B, content=raw)
    assert response.status_code == 400
    assert response.json()["output_ResponseCode"] == "INS-21"


@pytest.mark.parametrize(
    "changes,code",
    [
        ({"input_PrimaryPartyCode": "123456"}, "INS-13"),
        ({"input_ReceiverPartyCode": "999999"}, "INS-2002"),
        ({"input_ReceiverPartyCode": "12"}, "INS-2002"),
        ({"input_ReceiverPartyCode": None}, "INS-20"),
        ({"input_Amount": "1.234"}, "INS-15"),
        ({"input_ThirdPartyReference": "bad ref"}, "INS-19"),
    ],
)
async def test_b2b_validation_codes(
    client: httpx.AsyncClient, simulator: MpesaSimulator, changes: dict[str, Any], code: str
) -> None:
    response = await client.post(B2B, json=b2b_body(**changes))
    assert response.status_code == 400
    assert response.json()["output_ResponseCode"] == code
    assert simulator.transactions() == []


async def test_paths_need_their_trailing_slash_and_method(client: httpx.AsyncClient) -> None:
    assert (await client.post(C2B.rstrip("/"), json=c2b_body())).status_code == 404
    assert (await client.get(QUERY.rstrip("/"), params=query_params("x"))).status_code == 404
    assert (await client.get(C2B)).status_code == 405
    assert (await client.post(REVERSAL, json={})).status_code == 405


# ------------------------------------------------------------------------------- duplicates


async def test_reused_third_party_reference_is_ins_10(
    client: httpx.AsyncClient, simulator: MpesaSimulator
) -> None:
    first = c2b_body()
    assert (await client.post(C2B, json=first)).status_code == 201

    again = await client.post(C2B, json=first)
    as_b2c = await client.post(
        B2C, json=c2b_body(input_ThirdPartyReference=first["input_ThirdPartyReference"])
    )
    as_b2b = await client.post(
        B2B, json=b2b_body(input_ThirdPartyReference=first["input_ThirdPartyReference"])
    )

    for response in (again, as_b2c, as_b2b):
        assert response.status_code == 409
        data = response.json()
        assert data["output_ResponseCode"] == "INS-10"
        assert data["output_ResponseDesc"] == "Duplicate Transaction"
        assert data["output_ThirdPartyReference"] == first["input_ThirdPartyReference"]
    assert len(simulator.transactions()) == 1
    assert simulator.calls_for_reference(first["input_ThirdPartyReference"]) == 4


async def test_reversal_reference_is_deduplicated_too(
    client: httpx.AsyncClient, simulator: MpesaSimulator
) -> None:
    paid = (await pay(client)).json()
    body = reversal_body(paid["output_TransactionID"], "1")
    assert (await client.put(REVERSAL, json=body)).status_code == 200
    repeat = await client.put(REVERSAL, json=body)
    assert (repeat.status_code, repeat.json()["output_ResponseCode"]) == (409, "INS-10")
    assert simulator.find(paid["output_TransactionID"]).reversed_amount == Decimal("1.00")  # type: ignore[union-attr]


async def test_queries_do_not_take_part_in_duplicates(client: httpx.AsyncClient) -> None:
    body = c2b_body()
    reference = body["input_ThirdPartyReference"]
    for _ in range(2):
        query = await client.get(
            QUERY, params=query_params("x", input_ThirdPartyReference=reference)
        )
        assert query.status_code == 200
    assert (await client.post(C2B, json=body)).status_code == 201
    query = await client.get(QUERY, params=query_params("x", input_ThirdPartyReference=reference))
    assert query.status_code == 200


async def test_only_recorded_outcomes_consume_the_reference(client: httpx.AsyncClient) -> None:
    cancelled = c2b_body("258841000005")
    assert (await client.post(C2B, json=cancelled)).status_code == 401
    retry = await client.post(C2B, json={**cancelled, "input_CustomerMSISDN": GOOD_MSISDN})
    assert retry.status_code == 409

    overloaded = c2b_body("258841000016")
    assert (await client.post(C2B, json=overloaded)).status_code == 503
    retry = await client.post(C2B, json={**overloaded, "input_CustomerMSISDN": GOOD_MSISDN})
    assert retry.status_code == 201

    invalid = c2b_body(amount="0")
    assert (await client.post(C2B, json=invalid)).status_code == 400
    assert (await client.post(C2B, json={**invalid, "input_Amount": "5"})).status_code == 201


async def test_concurrent_duplicates_during_the_pin_wait(
    client: httpx.AsyncClient, simulator: MpesaSimulator
) -> None:
    simulator.config.pin_delay_seconds = 0.2
    body = c2b_body()
    first, second = await asyncio.gather(client.post(C2B, json=body), client.post(C2B, json=body))
    assert sorted([first.status_code, second.status_code]) == [201, 409]
    assert len(simulator.transactions()) == 1


# ------------------------------------------------------------------------- scripted numbers

SCRIPTED_CODES = [
    ("258841000005", 401, "INS-5", "Cancelled"),
    ("258841000006", 401, "INS-6", "Cancelled"),
    ("258841002006", 422, "INS-2006", "Cancelled"),
    ("258841000009", 408, "INS-9", "Expired"),
    ("258841000004", 401, "INS-4", None),
    ("258841000996", 400, "INS-996", None),
    ("258841000001", 500, "INS-1", "Completed"),
    ("258841000016", 503, "INS-16", None),
]


@pytest.mark.parametrize("path", [C2B, B2C])
@pytest.mark.parametrize("msisdn,http_status,code,recorded", SCRIPTED_CODES)
async def test_scripted_numbers(
    client: httpx.AsyncClient,
    simulator: MpesaSimulator,
    path: str,
    msisdn: str,
    http_status: int,
    code: str,
    recorded: str | None,
) -> None:
    body = c2b_body(msisdn)
    response = await client.post(path, json=body)

    assert response.status_code == http_status
    data = response.json()
    assert data["output_ResponseCode"] == code
    assert data["output_TransactionID"] == ""
    assert data["output_ThirdPartyReference"] == body["input_ThirdPartyReference"]
    statuses = [t.status for t in simulator.transactions()]
    assert statuses == ([recorded] if recorded else [])
    expected_query = recorded or "N/A"
    assert await status_of(client, body["input_ThirdPartyReference"]) == expected_query
    if recorded:  # the error answer's ConversationID leads to the recorded entry
        assert await status_of(client, data["output_ConversationID"]) == recorded


def test_docstring_table_matches_the_script() -> None:
    import payments.simulator.app as module

    assert module.__doc__ is not None
    for msisdn in SCRIPTED_OUTCOMES:
        assert f"`{msisdn}`" in module.__doc__
    assert len(SCRIPTED_OUTCOMES) == 13


async def test_drop_fault_in_process(client: httpx.AsyncClient, simulator: MpesaSimulator) -> None:
    body = c2b_body("258842000001")
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post(C2B, json=body)
    assert await status_of(client, body["input_ThirdPartyReference"]) == "Completed"


async def test_slow_fault_hits_the_read_timeout(
    client: httpx.AsyncClient, simulator: MpesaSimulator
) -> None:
    body = c2b_body("258842000002")
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        await client.post(C2B, json=body, timeout=httpx.Timeout(5.0, read=0.2))
    assert time.monotonic() - started < 2.0
    [recorded] = simulator.transactions()
    assert (recorded.status, recorded.third_party_reference) == (
        "Completed",
        body["input_ThirdPartyReference"],
    )


async def test_slow_fault_answers_after_the_delay(
    client: httpx.AsyncClient, simulator: MpesaSimulator
) -> None:
    simulator.config.slow_response_seconds = 0.3
    started = time.monotonic()
    response = await pay(client, msisdn="258842000002")
    assert time.monotonic() - started >= 0.3
    assert (response.status_code, response.json()["output_ResponseCode"]) == (201, "INS-0")


async def test_html_502_fault(client: httpx.AsyncClient, simulator: MpesaSimulator) -> None:
    response = await pay(client, msisdn="258842000003")
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("text/html")
    assert "<html>" in response.text
    assert [t.status for t in simulator.transactions()] == ["Completed"]


async def test_malformed_json_fault(client: httpx.AsyncClient, simulator: MpesaSimulator) -> None:
    response = await pay(client, msisdn="258842000004")
    assert response.status_code == 200
    assert response.text == '{"output_ResponseCode": "INS-0", '
    with pytest.raises(json.JSONDecodeError):
        response.json()
    assert [t.status for t in simulator.transactions()] == ["Completed"]


async def test_html_500_fault_records_nothing(
    client: httpx.AsyncClient, simulator: MpesaSimulator
) -> None:
    body = c2b_body("258842000005")
    response = await client.post(C2B, json=body)
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("text/html")
    assert simulator.transactions() == []
    retry = await client.post(C2B, json={**body, "input_CustomerMSISDN": GOOD_MSISDN})
    assert retry.status_code == 201


# ---------------------------------------------------------------------------- status query


async def test_status_query_by_each_identifier(client: httpx.AsyncClient) -> None:
    body = c2b_body()
    paid = (await client.post(C2B, json=body)).json()

    for identifier in (
        paid["output_TransactionID"],
        paid["output_ConversationID"],
        body["input_ThirdPartyReference"],
    ):
        params = query_params(identifier)
        response = await client.get(QUERY, params=params)
        assert response.status_code == 200
        data = response.json()
        assert data["output_ResponseCode"] == "INS-0"
        assert data["output_ResponseTransactionStatus"] == "Completed"
        assert data["output_ConversationID"] == paid["output_ConversationID"]
        assert data["output_ThirdPartyReference"] == params["input_ThirdPartyReference"]
        assert "output_TransactionID" not in data


async def test_status_query_unknown_reference_is_na(client: httpx.AsyncClient) -> None:
    response = await client.get(QUERY, params=query_params("nosuchthing"))
    assert response.status_code == 200
    data = response.json()
    assert (data["output_ResponseCode"], data["output_ResponseTransactionStatus"]) == (
        "INS-0",
        "N/A",
    )
    assert "output_TransactionID" not in data


@pytest.mark.parametrize(
    "changes,code",
    [
        ({"input_ThirdPartyReference": "bad-ref"}, "INS-19"),
        ({"input_ServiceProviderCode": "111111"}, "INS-13"),
        ({"input_QueryReference": ""}, "INS-20"),
    ],
)
async def test_status_query_validation(
    client: httpx.AsyncClient, changes: dict[str, str], code: str
) -> None:
    response = await client.get(QUERY, params=query_params("x", **changes))
    assert (response.status_code, response.json()["output_ResponseCode"]) == (400, code)


# -------------------------------------------------------------------------------- reversals


async def test_full_reversal(client: httpx.AsyncClient, simulator: MpesaSimulator) -> None:
    paid = (await pay(client, amount="10.00")).json()
    body = reversal_body(paid["output_TransactionID"])  # no amount: everything that remains
    response = await client.put(REVERSAL, json=body)

    assert response.status_code == 200
    data = response.json()
    assert data["output_ResponseCode"] == "INS-0"
    assert TRANSACTION_ID.fullmatch(data["output_TransactionID"])
    assert data["output_TransactionID"] != paid["output_TransactionID"]
    assert data["output_ThirdPartyReference"] == body["input_ThirdPartyReference"]
    original, reversal = simulator.transactions()
    assert original.reversed_amount == Decimal("10.00")
    assert (reversal.operation, reversal.amount) == ("reversal", Decimal("10.00"))
    assert reversal.original_transaction_id == original.transaction_id
    assert await status_of(client, paid["output_TransactionID"]) == "Completed"

    again = await client.put(REVERSAL, json=reversal_body(paid["output_TransactionID"], "0.01"))
    assert (again.status_code, again.json()["output_ResponseCode"]) == (400, "INS-15")


async def test_partial_reversals_until_nothing_remains(
    client: httpx.AsyncClient, simulator: MpesaSimulator
) -> None:
    paid = (await pay(client, amount="10.00")).json()
    transaction_id = paid["output_TransactionID"]

    first = await client.put(REVERSAL, json=reversal_body(transaction_id, "4"))
    assert first.status_code == 200
    assert simulator.find(transaction_id).reversed_amount == Decimal("4")  # type: ignore[union-attr]

    over = await client.put(REVERSAL, json=reversal_body(transaction_id, "6.01"))
    assert (over.status_code, over.json()["output_ResponseCode"]) == (400, "INS-15")

    rest = await client.put(REVERSAL, json=reversal_body(transaction_id))
    assert rest.status_code == 200
    assert simulator.transactions()[-1].amount == Decimal("6.00")
    assert simulator.find(transaction_id).reversed_amount == Decimal("10")  # type: ignore[union-attr]


async def test_over_reversal_is_ins_15(
    client: httpx.AsyncClient, simulator: MpesaSimulator
) -> None:
    paid = (await pay(client, amount="10.00")).json()
    response = await client.put(REVERSAL, json=reversal_body(paid["output_TransactionID"], "11"))
    assert (response.status_code, response.json()["output_ResponseCode"]) == (400, "INS-15")
    assert len(simulator.transactions()) == 1


async def test_reversal_of_unknown_transaction_or_reversal_is_ins_18(
    client: httpx.AsyncClient,
) -> None:
    unknown = await client.put(REVERSAL, json=reversal_body("zzzzzzzzzzzz"))
    assert (unknown.status_code, unknown.json()["output_ResponseCode"]) == (400, "INS-18")

    # A reversal is not itself reversible.
    paid = (await pay(client)).json()
    reversal = (await client.put(REVERSAL, json=reversal_body(paid["output_TransactionID"]))).json()
    of_reversal = await client.put(REVERSAL, json=reversal_body(reversal["output_TransactionID"]))
    assert (of_reversal.status_code, of_reversal.json()["output_ResponseCode"]) == (400, "INS-18")


async def test_reversal_of_cancelled_payment_is_ins_18(
    client: httpx.AsyncClient, simulator: MpesaSimulator
) -> None:
    await pay(client, msisdn="258841000005")
    [cancelled] = simulator.transactions()
    response = await client.put(REVERSAL, json=reversal_body(cancelled.transaction_id))
    assert (response.status_code, response.json()["output_ResponseCode"]) == (400, "INS-18")


@pytest.mark.parametrize(
    "changes,code",
    [
        ({"input_InitiatorIdentifier": "someone"}, "INS-24"),
        ({"input_SecurityCredential": "guess"}, "INS-25"),
        ({"input_ServiceProviderCode": "222222"}, "INS-13"),
        ({"input_SecurityCredential": None}, "INS-20"),
        ({"input_ReversalAmount": "-1"}, "INS-15"),
    ],
)
async def test_reversal_validation(
    client: httpx.AsyncClient, simulator: MpesaSimulator, changes: dict[str, Any], code: str
) -> None:
    paid = (await pay(client)).json()
    response = await client.put(
        REVERSAL, json=reversal_body(paid["output_TransactionID"], **changes)
    )
    assert (response.status_code, response.json()["output_ResponseCode"]) == (400, code)
    assert simulator.find(paid["output_TransactionID"]).reversed_amount == 0  # type: ignore[union-attr]


# ------------------------------------------------------------------------------- PIN delay


async def test_pin_delay_is_honoured_for_c2b_only(
    client: httpx.AsyncClient, simulator: MpesaSimulator
) -> None:
    simulator.config.pin_delay_seconds = 0.3

    started = time.monotonic()
    assert (await pay(client)).status_code == 201
    assert time.monotonic() - started >= 0.3

    started = time.monotonic()
    assert (await pay(client, msisdn="258841000009")).status_code == 408
    assert time.monotonic() - started >= 0.3

    started = time.monotonic()
    assert (await pay(client, path=B2C)).status_code == 201
    assert (await pay(client, msisdn="258841000016")).status_code == 503  # refused up front
    assert time.monotonic() - started < 0.3


async def test_payment_completes_after_the_client_gives_up(
    client: httpx.AsyncClient, simulator: MpesaSimulator
) -> None:
    simulator.config.pin_delay_seconds = 0.5
    body = c2b_body()
    reference = body["input_ThirdPartyReference"]

    with pytest.raises(httpx.ReadTimeout):
        await client.post(C2B, json=body, timeout=httpx.Timeout(5.0, read=0.1))
    assert simulator.transactions() == []
    assert await status_of(client, reference) == "N/A"
    assert (await client.post(C2B, json=body)).status_code == 409  # reference already taken

    await asyncio.sleep(0.6)
    assert [t.status for t in simulator.transactions()] == ["Completed"]
    assert await status_of(client, reference) == "Completed"


async def test_concurrent_c2b_requests_wait_in_parallel(
    client: httpx.AsyncClient, simulator: MpesaSimulator
) -> None:
    simulator.config.pin_delay_seconds = 0.2
    started = time.monotonic()
    responses = await asyncio.gather(*(pay(client) for _ in range(200)))
    elapsed = time.monotonic() - started

    assert [r.status_code for r in responses] == [201] * 200
    assert elapsed < 5.0  # sequentially it would take 40 s
    assert len({t.transaction_id for t in simulator.transactions()}) == 200
    assert simulator.calls("c2b") == 200


# ------------------------------------------------------------------------------- transport


async def test_refused_connections_raise_connect_error(simulator: MpesaSimulator) -> None:
    transport = SimulatorTransport(simulator, refuse_connections=True)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://simulator", headers=HEADERS
    ) as http:
        with pytest.raises(httpx.ConnectError):
            await http.post(C2B, json=c2b_body())
        assert simulator.calls() == 0
        transport.refuse_connections = False
        assert (await http.post(C2B, json=c2b_body())).status_code == 201
    assert simulator.calls() == 1


async def test_transport_accepts_the_app(simulator: MpesaSimulator) -> None:
    app = create_simulator_app()
    transport = SimulatorTransport(app)
    assert isinstance(app.state.simulator, MpesaSimulator)
    assert transport.simulator is app.state.simulator
    async with httpx.AsyncClient(
        transport=transport, base_url="http://simulator", headers=HEADERS
    ) as http:
        assert (await http.post(C2B, json=c2b_body())).status_code == 201
    assert app.state.simulator.calls("c2b") == 1
    assert simulator.calls() == 0


@pytest.fixture
def live_server() -> Iterator[tuple[str, MpesaSimulator]]:
    simulator = MpesaSimulator()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            simulator.app(), log_level="critical", lifespan="on", timeout_graceful_shutdown=1
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", simulator
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


async def test_real_server_over_loopback(live_server: tuple[str, MpesaSimulator]) -> None:
    base_url, simulator = live_server
    async with httpx.AsyncClient(base_url=base_url, headers=HEADERS, timeout=5) as http:
        ok = await http.post(C2B, json=c2b_body())
        assert (ok.status_code, ok.json()["output_ResponseCode"]) == (201, "INS-0")

        body = c2b_body("258842000001")
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post(C2B, json=body)

        # The server survives the drop and knows the payment went through.
        status = await http.get(QUERY, params=query_params(body["input_ThirdPartyReference"]))
        assert status.json()["output_ResponseTransactionStatus"] == "Completed"
    assert [t.status for t in simulator.transactions()] == ["Completed", "Completed"]


# ------------------------------------------------- switches for what the wire reference leaves open
# Each switch's effect on the module is tested in tests/test_provider_fidelity.py.


async def test_switch_gateway_refuses_a_third_party_reference_as_query_reference(
    client: httpx.AsyncClient, simulator: MpesaSimulator
) -> None:
    simulator.config.query_by_third_party_reference = False
    body = c2b_body()
    paid = (await client.post(C2B, json=body)).json()
    assert await status_of(client, body["input_ThirdPartyReference"]) == "N/A"
    assert await status_of(client, paid["output_TransactionID"]) == "Completed"
    assert await status_of(client, paid["output_ConversationID"]) == "Completed"


async def test_switch_not_found_is_ins_23(
    client: httpx.AsyncClient, simulator: MpesaSimulator
) -> None:
    simulator.config.not_found_as_ins_23 = True
    response = await client.get(QUERY, params=query_params("nosuchthing"))
    data = response.json()
    assert (response.status_code, data["output_ResponseCode"]) == (400, "INS-23")
    assert "output_ResponseTransactionStatus" not in data
    paid = (await pay(client)).json()
    assert await status_of(client, paid["output_TransactionID"]) == "Completed"


async def test_switch_status_answer_carries_its_own_conversation_id(
    client: httpx.AsyncClient, simulator: MpesaSimulator
) -> None:
    simulator.config.status_answer_own_conversation_id = True
    paid = (await pay(client)).json()
    answers = [
        (await client.get(QUERY, params=query_params(paid["output_TransactionID"]))).json()
        for _ in range(2)
    ]
    ids = {answer["output_ConversationID"] for answer in answers}
    assert len(ids) == 2 and paid["output_ConversationID"] not in ids
    assert {answer["output_ResponseTransactionStatus"] for answer in answers} == {"Completed"}


async def test_switch_duplicates_also_match_the_transaction_reference(
    client: httpx.AsyncClient, simulator: MpesaSimulator
) -> None:
    simulator.config.duplicates_match_transaction_reference = True
    first = c2b_body()
    assert (await client.post(C2B, json=first)).status_code == 201
    same = await client.post(C2B, json=first)
    assert (same.status_code, same.json()["output_ResponseCode"]) == (409, "INS-10")
    other = await client.post(C2B, json={**first, "input_TransactionReference": "OTHER1"})
    assert other.status_code == 201  # same third-party reference, yet a second payment
    assert len(simulator.transactions()) == 2


async def test_switch_duplicates_only_within_a_window(
    client: httpx.AsyncClient, simulator: MpesaSimulator
) -> None:
    simulator.config.duplicate_window_seconds = 0.2
    first = c2b_body()
    assert (await client.post(C2B, json=first)).status_code == 201
    assert (await client.post(C2B, json=first)).status_code == 409
    await asyncio.sleep(0.3)
    assert (await client.post(C2B, json=first)).status_code == 201
    assert len(simulator.transactions()) == 2


async def test_switch_refusal_in_output_error_without_a_code(
    client: httpx.AsyncClient, simulator: MpesaSimulator
) -> None:
    simulator.config.refusal_output_error = "Origin not allowed"
    for response in (
        await pay(client),
        await client.get(QUERY, params=query_params("x")),
        await client.get(NAME, params={"input_CustomerMSISDN": GOOD_MSISDN}),
    ):
        assert response.status_code == 401
        assert response.json() == {"output_error": "Origin not allowed"}
    assert simulator.transactions() == []


async def test_switch_non_ascii_response_header(
    client: httpx.AsyncClient, simulator: MpesaSimulator
) -> None:
    simulator.config.non_ascii_header = True
    response = await pay(client)
    assert response.status_code == 201
    assert (b"x-gateway-note", "Transação aceite".encode("latin-1")) in response.headers.raw


async def test_switch_server_side_c2b_timeout(
    client: httpx.AsyncClient, simulator: MpesaSimulator
) -> None:
    simulator.config.pin_delay_seconds = 0.5  # the customer is slower than the gateway waits
    simulator.config.c2b_server_timeout_seconds = 0.1
    started = time.monotonic()
    body = c2b_body()
    response = await client.post(C2B, json=body)
    elapsed = time.monotonic() - started
    data = response.json()
    assert (response.status_code, data["output_ResponseCode"]) == (408, "INS-9")
    assert 0.1 <= elapsed < 0.45
    assert CONVERSATION_ID.fullmatch(data["output_ConversationID"])
    assert await status_of(client, data["output_ConversationID"]) == "Expired"
    assert await status_of(client, body["input_ThirdPartyReference"]) == "Expired"
    # A customer quicker than the timeout pays as usual; B2C never waits.
    simulator.config.pin_delay_seconds = 0.0
    assert (await pay(client)).status_code == 201
    # The scripted "never answers" number gets INS-9 at the gateway's timeout too.
    simulator.config.pin_delay_seconds = 5.0
    started = time.monotonic()
    assert (await pay(client, msisdn="258841000009")).status_code == 408
    assert time.monotonic() - started < 1.0


async def test_switch_customer_name_not_authorized_as_in_the_sandbox(
    client: httpx.AsyncClient, simulator: MpesaSimulator
) -> None:
    simulator.config.customer_name_not_authorized = True
    response = await client.get(
        NAME,
        params={
            "input_CustomerMSISDN": GOOD_MSISDN,
            "input_ThirdPartyReference": ref(),
            "input_ServiceProviderCode": "171717",
        },
    )
    data = response.json()
    assert response.status_code == 400
    assert data["output_ResponseCode"] == "INS-26"
    assert data["output_ResponseDesc"] == "Not authorized"
    assert data["output_CustomerName"] == "N/A"


async def test_switch_portal_shaped_conversation_ids(
    client: httpx.AsyncClient, simulator: MpesaSimulator
) -> None:
    simulator.config.portal_conversation_ids = True
    paid = (await pay(client)).json()
    assert re.fullmatch(r"AG_\d{8}_[0-9a-f]{20}", paid["output_ConversationID"])
    assert await status_of(client, paid["output_ConversationID"]) == "Completed"


async def test_switches_are_settable_over_http(simulator: MpesaSimulator) -> None:
    async with httpx.AsyncClient(
        transport=SimulatorTransport(simulator), base_url="http://simulator"
    ) as http:
        changed = await http.put(
            "/simulator/config",
            json={
                "query_by_third_party_reference": False,
                "duplicate_window_seconds": 30,
                "refusal_output_error": "Origin not allowed",
            },
        )
        assert changed.status_code == 200, changed.text
        assert changed.json()["duplicate_window_seconds"] == 30.0
        assert simulator.config.query_by_third_party_reference is False
        assert simulator.config.refusal_output_error == "Origin not allowed"
        cleared = await http.put(
            "/simulator/config",
            json={"duplicate_window_seconds": None, "refusal_output_error": None},
        )
        assert cleared.json()["refusal_output_error"] is None
        assert simulator.config.duplicate_window_seconds is None
        for bad in (
            {"not_found_as_ins_23": "yes"},
            {"c2b_server_timeout_seconds": -1},
            {"refusal_output_error": 3},
            {"check_origin": None},
        ):
            assert (await http.put("/simulator/config", json=bad)).status_code == 400, bad


# -------------------------------------------------------------------- counting and control


async def test_call_counting(client: httpx.AsyncClient, simulator: MpesaSimulator) -> None:
    body = c2b_body()
    await client.post(C2B, json=body)
    await client.post(C2B, json=body)  # duplicate
    await client.post(C2B, json=body, headers={"Authorization": "Bearer nope"})  # refused
    await client.post(B2C, json=c2b_body())
    await client.post(B2B, json=b2b_body())
    await client.put(REVERSAL, json=reversal_body("unknown"))
    await client.get(QUERY, params=query_params(body["input_ThirdPartyReference"]))
    await client.get(
        NAME,
        params={
            "input_CustomerMSISDN": GOOD_MSISDN,
            "input_ThirdPartyReference": "N1",
            "input_ServiceProviderCode": "171717",
        },
    )

    assert simulator.calls("c2b") == 3
    assert simulator.calls("b2c") == simulator.calls("b2b") == simulator.calls("reversal") == 1
    assert simulator.calls("query_status") == simulator.calls("query_customer_name") == 1
    assert simulator.calls() == 8
    assert simulator.calls_for_reference(body["input_ThirdPartyReference"]) == 3
    assert simulator.calls_for_reference("N1") == 0  # queries are not money-moving
    assert simulator.calls_for_reference("never") == 0
    with pytest.raises(ValueError):
        simulator.calls("c2c")

    stats = (await client.get("/simulator/stats")).json()
    assert stats == {
        "calls": {
            "c2b": 3,
            "b2c": 1,
            "b2b": 1,
            "reversal": 1,
            "query_status": 1,
            "query_customer_name": 1,
        },
        "total": 8,
    }
    assert simulator.calls() == 8  # control endpoints are not provider calls


async def test_control_endpoints(simulator: MpesaSimulator) -> None:
    async with httpx.AsyncClient(
        transport=SimulatorTransport(simulator), base_url="http://simulator"
    ) as http:
        keys = (await http.get("/simulator/public-key")).json()
        assert keys["public_key"] == SIMULATOR_PUBLIC_KEY
        assert keys["api_key"] == SIMULATOR_API_KEY
        token = derive_bearer_token(keys["api_key"], keys["public_key"])
        http.headers["Authorization"] = f"Bearer {token}"

        body = c2b_body(amount="12.5")
        assert (await http.post(C2B, json=body)).status_code == 201
        [listed] = (await http.get("/simulator/transactions")).json()
        assert listed["amount"] == "12.50"
        assert listed["status"] == "Completed"
        assert listed["third_party_reference"] == body["input_ThirdPartyReference"]

        changed = await http.put("/simulator/config", json={"pin_delay_seconds": 0.25})
        assert changed.status_code == 200
        assert changed.json()["pin_delay_seconds"] == 0.25
        assert simulator.config.pin_delay_seconds == 0.25
        started = time.monotonic()
        assert (await http.post(C2B, json=c2b_body())).status_code == 201
        assert time.monotonic() - started >= 0.25

        bad = await http.put("/simulator/config", json={"pin_delay_seconds": -1})
        assert bad.status_code == 400
        assert (await http.put("/simulator/config", json={"nope": 1})).status_code == 400
        assert simulator.config.pin_delay_seconds == 0.25

        assert (await http.post("/simulator/reset")).status_code == 200
        assert simulator.transactions() == []
        assert simulator.calls() == 0
        assert (await http.get("/simulator/transactions")).json() == []
        # After a reset the old reference is free again.
        assert (await http.post(C2B, json=body)).status_code == 201
