import asyncio
import json
from decimal import Decimal
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import respx

from payments.exceptions import (
    DuplicateTransactionError,
    InsufficientFundsError,
    InvalidPaymentRequestError,
    PaymentCancelledError,
    PaymentConfigurationError,
    PaymentOutcomeUnknownError,
    ProviderUnavailableError,
)
from payments.mpesa.auth import decrypt_bearer_token
from payments.mpesa.client import (
    ClientConfig,
    MpesaClient,
    Operation,
    RetryPolicy,
    backoff_delay,
    should_retry,
)
from payments.mpesa.codes import ResponseCodeTable
from payments.mpesa.transport import RequestNotWritten
from payments.mpesa.values import Msisdn

from .keys import rsa_key_pair

SANDBOX = "https://api.sandbox.vm.co.mz"
OK_BODY = {
    "output_ResponseCode": "INS-0",
    "output_ResponseDesc": "Request processed successfully",
    "output_TransactionID": "3cr8whltpb6m",
    "output_ConversationID": "25230e0e20514ba790c1273b866e98d1",
    "output_ThirdPartyReference": "TPR1",
}


def make_client(**overrides: object) -> tuple[MpesaClient, list[float]]:
    _, der_b64, _ = rsa_key_pair()
    sleeps: list[float] = []

    async def record_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    values: dict[str, object] = {
        "api_key": "test-api-key",
        "public_key": der_b64,
        "service_provider_code": "171717",
        "initiator_identifier": "MPesa2018",
        "security_credential": "Mpesa2019",
    }
    values.update(overrides)
    client = MpesaClient(
        ClientConfig(**values),  # type: ignore[arg-type]
        transport=httpx.AsyncHTTPTransport(),  # what respx intercepts
        sleep=record_sleep,
        jitter=lambda: 0.0,
    )
    return client, sleeps


def assert_common_headers(request: httpx.Request) -> None:
    private_key, _, _ = rsa_key_pair()
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Origin"] == "developer.mpesa.vm.co.mz"
    token = request.headers["Authorization"].removeprefix("Bearer ")
    assert decrypt_bearer_token(token, private_key) == "test-api-key"


@respx.mock
async def test_c2b_request_shape() -> None:
    route = respx.post(f"{SANDBOX}:18352/ipg/v1x/c2bPayment/singleStage/").mock(
        return_value=httpx.Response(201, json=OK_BODY)
    )
    client, _ = make_client()
    async with client:
        result = await client.c2b_payment(
            msisdn=Msisdn("841234567"),
            amount=Decimal("100"),
            transaction_reference="T12344C",
            third_party_reference="TPR1",
        )
    request = route.calls.last.request
    assert_common_headers(request)
    assert json.loads(request.content) == {
        "input_TransactionReference": "T12344C",
        "input_CustomerMSISDN": "258841234567",
        "input_Amount": "100.00",
        "input_ThirdPartyReference": "TPR1",
        "input_ServiceProviderCode": "171717",
    }
    assert result.provider_transaction_id == "3cr8whltpb6m"
    assert result.conversation_id == "25230e0e20514ba790c1273b866e98d1"
    assert result.response_code == "INS-0"
    assert result.http_status == 201
    assert len(result.exchanges) == 1
    assert result.exchanges[0].request_fields["input_CustomerMSISDN"] == "2588412*****"


@respx.mock
async def test_b2c_request_shape() -> None:
    route = respx.post(f"{SANDBOX}:18345/ipg/v1x/b2cPayment/").mock(
        return_value=httpx.Response(201, json=OK_BODY)
    )
    client, _ = make_client()
    async with client:
        await client.b2c_payment(
            msisdn=Msisdn("258851234567"),
            amount=Decimal("10.5"),
            transaction_reference="PAY1",
            third_party_reference="TPR2",
        )
    request = route.calls.last.request
    assert request.method == "POST"
    assert_common_headers(request)
    assert json.loads(request.content) == {
        "input_TransactionReference": "PAY1",
        "input_CustomerMSISDN": "258851234567",
        "input_Amount": "10.50",
        "input_ThirdPartyReference": "TPR2",
        "input_ServiceProviderCode": "171717",
    }


@respx.mock
async def test_b2b_request_shape() -> None:
    route = respx.post(f"{SANDBOX}:18349/ipg/v1x/b2bPayment/").mock(
        return_value=httpx.Response(201, json=OK_BODY)
    )
    client, _ = make_client()
    async with client:
        await client.b2b_payment(
            receiver_party_code="979797",
            amount=Decimal("10"),
            transaction_reference="B2B1",
            third_party_reference="TPR3",
        )
    request = route.calls.last.request
    assert_common_headers(request)
    assert json.loads(request.content) == {
        "input_TransactionReference": "B2B1",
        "input_Amount": "10.00",
        "input_ThirdPartyReference": "TPR3",
        "input_PrimaryPartyCode": "171717",
        "input_ReceiverPartyCode": "979797",
    }


@respx.mock
async def test_reversal_request_shape_full_and_partial() -> None:
    route = respx.put(f"{SANDBOX}:18354/ipg/v1x/reversal/").mock(
        return_value=httpx.Response(200, json=OK_BODY)
    )
    client, _ = make_client()
    async with client:
        await client.reversal(provider_transaction_id="49XCDF6", third_party_reference="REV1")
        await client.reversal(
            provider_transaction_id="49XCDF6", third_party_reference="REV2", amount=Decimal("5")
        )
    full, partial = (json.loads(call.request.content) for call in route.calls)
    assert full == {
        "input_TransactionID": "49XCDF6",
        "input_SecurityCredential": "Mpesa2019",
        "input_InitiatorIdentifier": "MPesa2018",
        "input_ThirdPartyReference": "REV1",
        "input_ServiceProviderCode": "171717",
    }
    assert partial["input_ReversalAmount"] == "5.00"
    assert route.calls.last.request.method == "PUT"
    assert_common_headers(route.calls.last.request)


async def test_reversal_requires_initiator_and_credential() -> None:
    client, _ = make_client(initiator_identifier=None)
    async with client:
        with pytest.raises(PaymentConfigurationError, match="MPESA_INITIATOR_IDENTIFIER"):
            await client.reversal(provider_transaction_id="X1", third_party_reference="R1")
    client, _ = make_client(security_credential=None)
    async with client:
        with pytest.raises(PaymentConfigurationError, match="MPESA_SECURITY_CREDENTIAL"):
            await client.reversal(provider_transaction_id="X1", third_party_reference="R1")


@respx.mock
async def test_query_status_sends_parameters_in_the_query_string() -> None:
    body = {
        "output_ResponseCode": "INS-0",
        "output_ResponseDesc": "Request processed successfully",
        "output_ResponseTransactionStatus": "Completed",
        "output_ConversationID": "7552194cb219468fa8da3356eed77feb",
        "output_ThirdPartyReference": "Q1",
    }
    route = respx.get(url__startswith=f"{SANDBOX}:18353/ipg/v1x/queryTransactionStatus/").mock(
        return_value=httpx.Response(200, json=body)
    )
    client, _ = make_client()
    async with client:
        result = await client.query_transaction_status(
            query_reference="3cr8whltpb6m", third_party_reference="Q1"
        )
    request = route.calls.last.request
    assert request.method == "GET"
    assert request.content == b""
    assert_common_headers(request)
    url = urlsplit(str(request.url))
    assert url.path == "/ipg/v1x/queryTransactionStatus/"
    assert parse_qs(url.query) == {
        "input_ThirdPartyReference": ["Q1"],
        "input_QueryReference": ["3cr8whltpb6m"],
        "input_ServiceProviderCode": ["171717"],
    }
    assert result.transaction_status == "Completed"
    assert result.provider_transaction_id is None


@respx.mock
async def test_query_customer_name_shape() -> None:
    route = respx.get(url__startswith=f"{SANDBOX}:19323/ipg/v1x/queryCustomerName/").mock(
        return_value=httpx.Response(
            200,
            json={
                "output_ResponseCode": "INS-0",
                "output_ResponseDesc": "Request processed successfully",
                "output_CustomerName": "Jo*o Ma****",
                "output_ConversationID": "f4f9e06d93b7439eb79bd61c7de6f642",
                "output_ThirdPartyReference": "N1",
            },
        )
    )
    client, _ = make_client()
    async with client:
        result = await client.query_customer_name(
            msisdn=Msisdn("841234567"), third_party_reference="N1"
        )
    query = parse_qs(urlsplit(str(route.calls.last.request.url)).query)
    assert query == {
        "input_CustomerMSISDN": ["258841234567"],
        "input_ThirdPartyReference": ["N1"],
        "input_ServiceProviderCode": ["171717"],
    }
    assert result.customer_name == "Jo*o Ma****"


@respx.mock
async def test_base_url_sends_every_operation_to_one_origin() -> None:
    route = respx.post("http://127.0.0.1:9999/ipg/v1x/c2bPayment/singleStage/").mock(
        return_value=httpx.Response(201, json=OK_BODY)
    )
    client, _ = make_client(base_url="http://127.0.0.1:9999")
    async with client:
        await client.c2b_payment(
            msisdn=Msisdn("841234567"),
            amount=Decimal("1"),
            transaction_reference="T1",
            third_party_reference="TPR1",
        )
    assert route.called


def test_production_urls_use_each_operations_port() -> None:
    config, _ = make_client(environment="production")
    assert config.config.url_for(Operation.B2C) == "https://api.vm.co.mz:18345/ipg/v1x/b2cPayment/"
    assert (
        config.config.url_for(Operation.QUERY_CUSTOMER_NAME)
        == "https://api.vm.co.mz:19323/ipg/v1x/queryCustomerName/"
    )


def error_response(status: int, code: str, description: str) -> httpx.Response:
    return httpx.Response(
        status, json={"output_ResponseCode": code, "output_ResponseDesc": description}
    )


async def c2b(client: MpesaClient) -> object:
    return await client.c2b_payment(
        msisdn=Msisdn("841234567"),
        amount=Decimal("100"),
        transaction_reference="T1",
        third_party_reference="TPR1",
    )


@pytest.mark.parametrize(
    ("response", "error_type", "known"),
    [
        (
            error_response(401, "INS-5", "Transaction cancelled by customer"),
            PaymentCancelledError,
            True,
        ),
        (error_response(401, "INS-6", "Transaction Failed"), PaymentCancelledError, True),
        (error_response(422, "INS-2006", "Insufficient balance"), InsufficientFundsError, True),
        (error_response(400, "INS-2051", "MSISDN invalid."), InvalidPaymentRequestError, True),
        (error_response(401, "INS-2", "Invalid API Key"), InvalidPaymentRequestError, True),
        (error_response(409, "INS-10", "Duplicate Transaction"), DuplicateTransactionError, False),
        (error_response(500, "INS-1", "Internal Error"), PaymentOutcomeUnknownError, False),
        (error_response(503, "INS-16", "Overloaded"), PaymentOutcomeUnknownError, False),
        (error_response(408, "INS-9", "Request timeout"), PaymentOutcomeUnknownError, False),
        (error_response(400, "INS-999", "Invalid Use Case"), PaymentOutcomeUnknownError, False),
        (error_response(500, "INS-6", "Transaction Failed"), PaymentOutcomeUnknownError, False),
        (error_response(400, "INS-0", "odd"), PaymentOutcomeUnknownError, False),
        (httpx.Response(200, json={"unexpected": True}), PaymentOutcomeUnknownError, False),
        (
            httpx.Response(502, text="<html><body>Bad Gateway</body></html>"),
            PaymentOutcomeUnknownError,
            False,
        ),
        (
            httpx.Response(200, text='{"output_ResponseCode": "INS-0", '),
            PaymentOutcomeUnknownError,
            False,
        ),
    ],
)
@respx.mock
async def test_money_moving_answers_map_to_errors(
    response: httpx.Response, error_type: type[Exception], known: bool
) -> None:
    route = respx.post(f"{SANDBOX}:18352/ipg/v1x/c2bPayment/singleStage/").mock(
        return_value=response
    )
    client, sleeps = make_client()
    async with client:
        with pytest.raises(error_type) as info:
            await c2b(client)
    error = info.value
    assert type(error) is error_type
    assert error.outcome_known is known  # type: ignore[attr-defined]
    assert error.http_status == response.status_code  # type: ignore[attr-defined]
    assert len(error.exchanges) == 1  # type: ignore[attr-defined]
    assert route.call_count == 1  # money-moving calls are never repeated on an answer
    assert sleeps == []


@respx.mock
async def test_code_overrides_change_the_outcome() -> None:
    respx.post(f"{SANDBOX}:18352/ipg/v1x/c2bPayment/singleStage/").mock(
        return_value=error_response(408, "INS-9", "Request timeout")
    )
    codes = ResponseCodeTable.from_json_overrides('{"INS-9": "customer_declined"}')
    client, _ = make_client(codes=codes)
    async with client:
        with pytest.raises(PaymentCancelledError):
            await c2b(client)


@pytest.mark.parametrize(
    "failure", [httpx.ReadTimeout("read"), httpx.RemoteProtocolError("peer closed")]
)
@respx.mock
async def test_sent_but_unanswered_money_call_is_outcome_unknown(failure: Exception) -> None:
    route = respx.post(f"{SANDBOX}:18352/ipg/v1x/c2bPayment/singleStage/").mock(side_effect=failure)
    client, _ = make_client()
    async with client:
        with pytest.raises(PaymentOutcomeUnknownError) as info:
            await c2b(client)
    assert route.call_count == 1
    assert info.value.outcome_known is False
    assert info.value.exchanges[0].error


@pytest.mark.parametrize(
    "never_left",
    [httpx.ConnectError("refused"), RequestNotWritten("Can not write request body (closing)")],
)
@respx.mock
async def test_money_call_retries_only_when_the_request_never_left(never_left: Exception) -> None:
    route = respx.post(f"{SANDBOX}:18352/ipg/v1x/c2bPayment/singleStage/").mock(
        side_effect=[never_left, httpx.Response(201, json=OK_BODY)]
    )
    client, sleeps = make_client()
    async with client:
        result = await c2b(client)
    assert route.call_count == 2
    assert len(result.exchanges) == 2
    assert sleeps == [0.25]


@respx.mock
async def test_connect_failure_everywhere_is_provider_unavailable_with_the_port() -> None:
    route = respx.post(f"{SANDBOX}:18352/ipg/v1x/c2bPayment/singleStage/").mock(
        side_effect=httpx.ConnectError("refused")
    )
    client, sleeps = make_client(query_max_attempts=3)
    async with client:
        with pytest.raises(ProviderUnavailableError, match="18352") as info:
            await c2b(client)
    assert info.value.outcome_known is True
    assert route.call_count == 3
    assert len(sleeps) == 2


@respx.mock
async def test_reversal_never_retries() -> None:
    route = respx.put(f"{SANDBOX}:18354/ipg/v1x/reversal/").mock(
        side_effect=httpx.ConnectError("refused")
    )
    client, _ = make_client()
    async with client:
        with pytest.raises(ProviderUnavailableError):
            await client.reversal(provider_transaction_id="X1", third_party_reference="R1")
    assert route.call_count == 1


@respx.mock
async def test_queries_retry_with_capped_jittered_backoff() -> None:
    ok = httpx.Response(
        200,
        json={"output_ResponseCode": "INS-0", "output_ResponseTransactionStatus": "Completed"},
    )
    route = respx.get(url__startswith=f"{SANDBOX}:18353/").mock(
        side_effect=[
            httpx.ReadTimeout("slow"),
            error_response(503, "INS-16", "Overloaded"),
            httpx.Response(502, text="<html>bad gateway</html>"),
            ok,
        ]
    )
    client, sleeps = make_client(query_max_attempts=4, backoff_base=1.0, backoff_max=3.0)
    async with client:
        result = await client.query_transaction_status(
            query_reference="ABC", third_party_reference="Q1"
        )
    assert result.transaction_status == "Completed"
    assert route.call_count == 4
    assert sleeps == [0.5, 1.0, 1.5]  # 1, 2, 4→3 (capped), times the 50 % jitter floor


@respx.mock
async def test_query_gives_up_after_max_attempts() -> None:
    route = respx.get(url__startswith=f"{SANDBOX}:18353/").mock(
        return_value=error_response(500, "INS-1", "Internal Error")
    )
    client, _ = make_client(query_max_attempts=2)
    async with client:
        with pytest.raises(ProviderUnavailableError):
            await client.query_transaction_status(query_reference="A", third_party_reference="Q")
    assert route.call_count == 2


@respx.mock
async def test_query_does_not_retry_a_definite_rejection() -> None:
    route = respx.get(url__startswith=f"{SANDBOX}:19323/").mock(
        return_value=error_response(400, "INS-26", "Not authorized")
    )
    client, _ = make_client()
    async with client:
        with pytest.raises(InvalidPaymentRequestError, match="Not authorized"):
            await client.query_customer_name(msisdn=Msisdn("841234567"), third_party_reference="N1")
    assert route.call_count == 1


def test_retry_policy_is_a_pure_function() -> None:
    assert should_retry(RetryPolicy.QUERY, attempt=1, max_attempts=3, never_sent=False)
    assert not should_retry(RetryPolicy.QUERY, attempt=3, max_attempts=3, never_sent=True)
    assert should_retry(RetryPolicy.PRE_SEND_ONLY, attempt=1, max_attempts=3, never_sent=True)
    assert not should_retry(RetryPolicy.PRE_SEND_ONLY, attempt=1, max_attempts=3, never_sent=False)
    assert not should_retry(RetryPolicy.NEVER, attempt=1, max_attempts=3, never_sent=True)
    assert backoff_delay(1, 0.5, 5.0, 0.0) == 0.25
    assert backoff_delay(10, 0.5, 5.0, 0.999999) == pytest.approx(5.0)


async def test_inputs_are_validated_before_anything_is_sent() -> None:
    client, _ = make_client()
    async with client:
        with pytest.raises(ValueError, match="transaction_reference"):
            await client.c2b_payment(
                msisdn=Msisdn("841234567"),
                amount=Decimal("1"),
                transaction_reference="ORDER-1",
                third_party_reference="TPR1",
            )
        with pytest.raises(ValueError, match="2 decimal"):
            await client.b2c_payment(
                msisdn=Msisdn("841234567"),
                amount=Decimal("1.005"),
                transaction_reference="T1",
                third_party_reference="TPR1",
            )


# --- evidence in every answer (issue 10) ---------------------------------------------------------


@respx.mock
async def test_error_answers_keep_the_ids_they_carry() -> None:
    """INS-9 after the PIN wait (and INS-1, INS-16, …) carries M-Pesa's IDs: the only way back
    to the payment when the gateway will not take a third-party reference as query reference."""
    respx.post(f"{SANDBOX}:18352/ipg/v1x/c2bPayment/singleStage/").mock(
        return_value=httpx.Response(
            408,
            json={
                "output_ResponseCode": "INS-9",
                "output_ResponseDesc": "Request timeout",
                "output_TransactionID": "",
                "output_ConversationID": "AG_20180206_00005e7dccc6da08efa8",
                "output_ThirdPartyReference": "TPR1",
            },
        )
    )
    client, _ = make_client()
    async with client:
        with pytest.raises(PaymentOutcomeUnknownError) as info:
            await c2b(client)
    assert info.value.conversation_id == "AG_20180206_00005e7dccc6da08efa8"
    assert info.value.provider_transaction_id is None  # empty is no ID


@pytest.mark.parametrize("status", [401, 403])
@respx.mock
async def test_a_refusal_in_the_gateways_own_words_is_a_configuration_failure(
    status: int,
) -> None:
    route = respx.post(f"{SANDBOX}:18352/ipg/v1x/c2bPayment/singleStage/").mock(
        return_value=httpx.Response(status, json={"output_error": "Origin not allowed"})
    )
    client, sleeps = make_client()
    async with client:
        with pytest.raises(InvalidPaymentRequestError) as info:
            await c2b(client)
    error = info.value
    assert error.error_code == "configuration_refused"
    assert error.outcome_known is True  # refused before processing: nothing can have moved
    assert "Origin not allowed" in error.message and "MPESA_ORIGIN" in error.message
    assert error.provider_description == "Origin not allowed"
    assert (route.call_count, sleeps) == (1, [])


@respx.mock
async def test_output_error_on_a_5xx_stays_ambiguous_but_keeps_the_text() -> None:
    respx.post(f"{SANDBOX}:18352/ipg/v1x/c2bPayment/singleStage/").mock(
        return_value=httpx.Response(502, json={"output_error": "Upstream unavailable"})
    )
    client, _ = make_client()
    async with client:
        with pytest.raises(PaymentOutcomeUnknownError) as info:
            await c2b(client)
    assert info.value.provider_description == "Upstream unavailable"


@respx.mock
async def test_ins_23_status_answer_is_not_found_and_is_not_retried() -> None:
    route = respx.get(url__startswith=f"{SANDBOX}:18353/").mock(
        return_value=error_response(400, "INS-23", "Unknown Status. Contact M-Pesa Support")
    )
    client, sleeps = make_client()
    async with client:
        result = await client.query_transaction_status(
            query_reference="3cr8whltpb6m", third_party_reference="Q1"
        )
    assert (result.found, result.response_code, result.transaction_status) == (
        False,
        "INS-23",
        None,
    )
    assert (route.call_count, sleeps) == (1, [])


@pytest.mark.parametrize(
    ("status", "found"), [("Completed", True), ("Expired", True), ("N/A", False), (None, False)]
)
def test_a_status_answer_is_found_unless_n_a(status: str | None, found: bool) -> None:
    from payments.mpesa.client import TransactionStatusResult

    result = TransactionStatusResult(
        operation=Operation.QUERY_STATUS,
        response_code="INS-0",
        response_description="",
        http_status=200,
        provider_transaction_id=None,
        conversation_id=None,
        third_party_reference=None,
        raw={},
        transaction_status=status,
    )
    assert result.found is found


@respx.mock
async def test_m_pesa_ids_with_underscores_are_valid_query_and_reversal_references() -> None:
    """The portal's example ConversationID is ``AG_20180206_00005e7dccc6da08efa8``."""
    query = respx.get(url__startswith=f"{SANDBOX}:18353/").mock(
        return_value=httpx.Response(
            200,
            json={"output_ResponseCode": "INS-0", "output_ResponseTransactionStatus": "Completed"},
        )
    )
    reversal = respx.put(f"{SANDBOX}:18354/ipg/v1x/reversal/").mock(
        return_value=httpx.Response(200, json=OK_BODY)
    )
    client, _ = make_client()
    async with client:
        await client.query_transaction_status(
            query_reference="AG_20180206_00005e7dccc6da08efa8", third_party_reference="Q1"
        )
        await client.reversal(provider_transaction_id="49X_CDF6", third_party_reference="R1")
        with pytest.raises(ValueError, match="query_reference"):
            await client.query_transaction_status(
                query_reference="AG 2018&x=1", third_party_reference="Q2"
            )
    assert parse_qs(urlsplit(str(query.calls.last.request.url)).query)[
        "input_QueryReference"
    ] == ["AG_20180206_00005e7dccc6da08efa8"]
    assert json.loads(reversal.calls.last.request.content)["input_TransactionID"] == "49X_CDF6"
    assert query.call_count == 1


# --- at most once at the socket (issue 9.3) ------------------------------------------------------


async def _commit_then_drop_server(
    received: list[bytes],
) -> tuple[asyncio.AbstractServer, str]:
    """A loopback server that reads each request in full, counts it (as M-Pesa would commit
    it), then closes the connection without answering."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        received.append(head + await reader.readexactly(length))
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize("operation", ["c2b", "b2c", "b2b", "reversal"])
async def test_every_money_moving_request_leaves_at_most_once(operation: str) -> None:
    received: list[bytes] = []
    server, base_url = await _commit_then_drop_server(received)
    _, der_b64, _ = rsa_key_pair()
    client = MpesaClient(  # the production transport (aiohttp), over a real socket
        ClientConfig(
            api_key="test-api-key",
            public_key=der_b64,
            service_provider_code="171717",
            initiator_identifier="MPesa2018",
            security_credential="Mpesa2019",
            base_url=base_url,
        )
    )
    calls = {
        "c2b": lambda: c2b(client),
        "b2c": lambda: client.b2c_payment(
            msisdn=Msisdn("841234567"),
            amount=Decimal("1"),
            transaction_reference="T1",
            third_party_reference="TPR1",
        ),
        "b2b": lambda: client.b2b_payment(
            receiver_party_code="979797",
            amount=Decimal("1"),
            transaction_reference="T1",
            third_party_reference="TPR1",
        ),
        "reversal": lambda: client.reversal(
            provider_transaction_id="49XCDF6", third_party_reference="R1"
        ),
    }
    try:
        async with client:
            with pytest.raises(PaymentOutcomeUnknownError) as info:
                await calls[operation]()
    finally:
        server.close()
        await server.wait_closed()
    assert len(received) == 1, [request.split(b"\r\n")[0] for request in received]
    assert received[0].split(b" ")[0] == (b"PUT" if operation == "reversal" else b"POST")
    assert len(info.value.exchanges) == 1
