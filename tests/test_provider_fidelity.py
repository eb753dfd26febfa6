"""The module under each simulator switch for what the wire reference leaves open (issue 10).

Each test runs the module (service, or the mounted router) against the simulator with one switch
of ``SimulatorConfig`` on, on SQLite and PostgreSQL: the module must hold whichever way M-Pesa
turns out to behave. The last part proves at the socket that no money-moving request is re-sent
below the module (issue 9.3).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import uvicorn
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from payments.config import load_settings
from payments.exceptions import InvalidPaymentRequestError, PaymentOutcomeUnknownError
from payments.models import PaymentAuditLog, PaymentTransaction
from payments.reconciliation import reconcile_once
from payments.schemas import (
    PaymentInitiateRequest,
    PayoutRequest,
    ReversalRequest,
    TransferRequest,
)
from payments.service import PaymentService
from payments.simulator.app import MpesaSimulator, SimulatorConfig
from tests.support import (
    DROPPED,
    INTERNAL_ERROR,
    PIN_TIMEOUT,
    SLOW,
    SUCCESS,
    PaymentApiFactory,
    simulated_client,
)
from tests.support import payment_row as row_of


@pytest.fixture
def simulator() -> MpesaSimulator:
    return MpesaSimulator(SimulatorConfig(slow_response_seconds=5))


@pytest.fixture
async def service(simulator: MpesaSimulator) -> AsyncIterator[PaymentService]:
    settings = load_settings(mpesa_environment="simulator", payment_c2b_timeout=1)
    client = simulated_client(simulator, settings)
    service = PaymentService(settings, client, db_retry_delays=(0.01,))
    yield service
    await service.aclose()


async def unknown_c2b(
    service: PaymentService,
    sessions: async_sessionmaker[AsyncSession],
    phone: str,
    **request: Any,
) -> str:
    async with sessions() as db:
        with pytest.raises(PaymentOutcomeUnknownError) as info:
            await service.initiate_payment(
                PaymentInitiateRequest(phone_number=phone, amount="10", **request), db
            )
    return info.value.payment.transaction_id  # type: ignore[attr-defined, no-any-return]




async def query_exchanges(
    sessions: async_sessionmaker[AsyncSession], transaction_id: str
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(request fields, response body) of every status query audited for the payment."""
    row = await row_of(sessions, transaction_id)
    async with sessions() as session:
        entries = (
            await session.scalars(
                select(PaymentAuditLog)
                .where(PaymentAuditLog.payment_id == row.id)
                .order_by(PaymentAuditLog.id)
            )
        ).all()
    pairs = []
    for request, response in zip(entries, entries[1:], strict=False):
        if request.action == "api_request" and request.request_body["operation"] == "query_status":
            pairs.append((request.request_body["fields"], response.response_body))
    return pairs


async def set_ids(
    sessions: async_sessionmaker[AsyncSession], transaction_id: str, **ids: str | None
) -> None:
    async with sessions() as session:
        await session.execute(
            update(PaymentTransaction)
            .where(PaymentTransaction.transaction_id == transaction_id)
            .values(**ids)
        )
        await session.commit()


# --- 10.1: every ID any answer carries, and a query by each -------------------------------------


@pytest.mark.parametrize("not_found_as_ins_23", [False, True])
async def test_a_timed_out_pin_prompt_is_recovered_by_its_conversation_id(
    service: PaymentService,
    session_factory: async_sessionmaker[AsyncSession],
    simulator: MpesaSimulator,
    not_found_as_ins_23: bool,
) -> None:
    """The gateway will not take a third-party reference as query reference (§8 Q2): the
    ConversationID of the INS-9 answer is the way back, so it is kept and asked by."""
    simulator.config.query_by_third_party_reference = False
    simulator.config.not_found_as_ins_23 = not_found_as_ins_23
    transaction_id = await unknown_c2b(service, session_factory, PIN_TIMEOUT)
    [sent] = simulator.transactions()
    row = await row_of(session_factory, transaction_id)
    assert (row.status, row.conversation_id) == ("unknown", sent.conversation_id)

    async with session_factory() as db:
        refreshed = await service.refresh(transaction_id, db)
    assert refreshed.status == "expired"
    [(fields, answer)] = await query_exchanges(session_factory, transaction_id)
    assert fields["input_QueryReference"] == sent.conversation_id
    assert answer["output_ResponseTransactionStatus"] == "Expired"


async def test_queries_go_transaction_id_then_conversation_id_then_reference(
    service: PaymentService,
    session_factory: async_sessionmaker[AsyncSession],
    simulator: MpesaSimulator,
) -> None:
    simulator.config.not_found_as_ins_23 = True
    transaction_id = await unknown_c2b(service, session_factory, INTERNAL_ERROR)
    [sent] = simulator.transactions()
    # A TransactionID M-Pesa's status index does not know (yet): not found, so the next key.
    await set_ids(session_factory, transaction_id, provider_transaction_id="notindexed123")
    async with session_factory() as db:
        assert (await service.refresh(transaction_id, db)).status == "completed"
    asked = await query_exchanges(session_factory, transaction_id)
    assert [fields["input_QueryReference"] for fields, _ in asked] == [
        "notindexed123",
        sent.conversation_id,
    ]
    assert asked[0][1]["output_ResponseCode"] == "INS-23"
    assert simulator.calls("query_status") == 2  # a not-found answer is not retried


async def test_nothing_found_by_any_key_leaves_the_payment_unknown(
    service: PaymentService,
    session_factory: async_sessionmaker[AsyncSession],
    simulator: MpesaSimulator,
) -> None:
    transaction_id = await unknown_c2b(service, session_factory, INTERNAL_ERROR)
    await set_ids(session_factory, transaction_id, provider_transaction_id="notindexed123")
    simulator.reset()  # M-Pesa knows nothing of it (yet)
    async with session_factory() as db:
        refreshed = await service.refresh(transaction_id, db)
    assert refreshed.status == "unknown"
    asked = await query_exchanges(session_factory, transaction_id)
    row = await row_of(session_factory, transaction_id)
    assert [fields["input_QueryReference"] for fields, _ in asked] == [
        "notindexed123",
        row.conversation_id,
        row.third_party_reference,
    ]
    # Each query is a request of its own: a fresh input_ThirdPartyReference every time.
    references = [fields["input_ThirdPartyReference"] for fields, _ in asked]
    assert len(set(references)) == 3 and row.third_party_reference not in references


# --- 10.2: a retry past the database is the same request on the wire --------------------------


async def forget_everything(engine: AsyncEngine) -> None:
    """What a database restored from an old backup looks like: the payments are gone."""
    async with engine.begin() as connection:
        await connection.execute(delete(PaymentAuditLog.__table__))
        await connection.execute(delete(PaymentTransaction.__table__))


async def pay_once(service: PaymentService, db: AsyncSession, operation: str, key: str) -> Any:
    if operation == "c2b":
        request: Any = PaymentInitiateRequest(
            phone_number=SUCCESS, amount="10", idempotency_key=key
        )
        return await service.initiate_payment(request, db)
    if operation == "b2c":
        request = PayoutRequest(phone_number=SUCCESS, amount="10", idempotency_key=key)
        return await service.payout(request, db)
    request = TransferRequest(receiver_party_code="979797", amount="10", idempotency_key=key)
    return await service.transfer(request, db)


@pytest.mark.parametrize("operation", ["c2b", "b2c", "b2b"])
async def test_a_retry_past_the_database_meets_ins_10_even_keyed_on_the_transaction_reference(
    service: PaymentService,
    session_factory: async_sessionmaker[AsyncSession],
    async_engine: AsyncEngine,
    simulator: MpesaSimulator,
    operation: str,
) -> None:
    simulator.config.duplicates_match_transaction_reference = True
    async with session_factory() as db:
        first = await pay_once(service, db, operation, "order-77")  # no account_reference
    assert first.status == "completed"
    await forget_everything(async_engine)
    async with session_factory() as db:
        with pytest.raises(PaymentOutcomeUnknownError) as info:
            await pay_once(service, db, operation, "order-77")
    again = info.value.payment  # type: ignore[attr-defined]
    # M-Pesa said INS-10 and reports an earlier completed payment: an operator confirms it.
    assert (again.status, again.attention_required) == ("unknown", True)
    assert len(simulator.transactions()) == 1  # charged once
    assert simulator.calls_for_reference(first.third_party_reference) == 2
    row = await row_of(session_factory, again.transaction_id)
    assert row.transaction_reference == simulator.transactions()[0].transaction_reference


async def test_a_same_key_retry_is_stopped_by_the_database_whatever_m_pesas_window(
    service: PaymentService,
    session_factory: async_sessionmaker[AsyncSession],
    simulator: MpesaSimulator,
) -> None:
    simulator.config.duplicate_window_seconds = 0.0  # M-Pesa forgets at once
    async with session_factory() as db:
        first = await pay_once(service, db, "c2b", "order-78")
        again = await pay_once(service, db, "c2b", "order-78")
    assert again.transaction_id == first.transaction_id
    assert simulator.calls("c2b") == 1


async def test_past_the_database_and_past_m_pesas_window_a_retry_charges_again(
    service: PaymentService,
    session_factory: async_sessionmaker[AsyncSession],
    async_engine: AsyncEngine,
    simulator: MpesaSimulator,
) -> None:
    """What the README says is NOT guaranteed: if M-Pesa's duplicate check has a window and the
    database lost the payment, a retry after the window is a new payment."""
    simulator.config.duplicate_window_seconds = 0.0
    async with session_factory() as db:
        await pay_once(service, db, "c2b", "order-79")
    await forget_everything(async_engine)
    async with session_factory() as db:
        assert (await pay_once(service, db, "c2b", "order-79")).status == "completed"
    assert len(simulator.transactions()) == 2


# --- 10.3: an odd header byte never loses an answer (over a real socket) -----------------------


@pytest.fixture
def live_simulator() -> Iterator[tuple[str, MpesaSimulator]]:
    simulator = MpesaSimulator()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(simulator.app(), log_level="critical", timeout_graceful_shutdown=1)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", simulator
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


async def test_a_non_ascii_response_header_loses_no_answer(
    live_simulator: tuple[str, MpesaSimulator],
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    base_url, simulator = live_simulator
    simulator.config.non_ascii_header = True
    settings = load_settings(
        mpesa_environment="simulator", mpesa_base_url=base_url, payment_c2b_timeout=5
    )
    service = PaymentService(settings)  # the production transport (aiohttp)
    try:
        async with session_factory() as db:
            paid = await service.initiate_payment(
                PaymentInitiateRequest(phone_number=SUCCESS, amount="10"), db
            )
            assert paid.status == "completed"
            refreshed = await service.refresh(paid.transaction_id, db)
    finally:
        await service.aclose()
    assert refreshed.status == "completed"
    assert simulator.calls("c2b") == 1


# --- 10.4: a refusal in the gateway's own words -------------------------------------------------


async def test_a_refusal_without_a_code_fails_the_payment_and_shows_in_the_health_check(
    payment_api_factory: PaymentApiFactory,
) -> None:
    api = await payment_api_factory()
    api.simulator.config.refusal_output_error = "Origin not allowed"
    response = await api.http.post(
        "/api/payments/initiate", json={"phone_number": SUCCESS, "amount": 10}
    )
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error_code"] == "configuration_refused"
    assert "Origin not allowed" in body["message"]
    payment = body["details"]["payment"]
    # Provably refused: nothing is left open for reconciliation.
    assert payment["status"] == "failed"
    assert "Origin not allowed" in payment["status_description"]
    report = await reconcile_once(api.service, api.session_factory, min_age=0)
    assert report.examined == 0

    health = await api.http.get("/api/payments/health", params={"deep": "true"})
    assert health.status_code == 503
    assert "Origin not allowed" in health.json()["provider_access"]
    api.simulator.config.refusal_output_error = None
    health = await api.http.get("/api/payments/health", params={"deep": "true"})
    assert (health.status_code, health.json()["provider_access"]) == (200, "ok")


# --- 10.5: a status answer's ConversationID is the query's ------------------------------------


async def test_a_status_answers_conversation_id_never_becomes_the_payments(
    service: PaymentService,
    session_factory: async_sessionmaker[AsyncSession],
    simulator: MpesaSimulator,
) -> None:
    simulator.config.status_answer_own_conversation_id = True
    lost = await unknown_c2b(service, session_factory, DROPPED)
    async with session_factory() as db:
        paid = await service.initiate_payment(
            PaymentInitiateRequest(phone_number=SUCCESS, amount="10"), db
        )
        assert (await service.refresh(lost, db)).status == "completed"
        await service.refresh(paid.transaction_id, db)
    for transaction_id, own in ((lost, None), (paid.transaction_id, paid.conversation_id)):
        row = await row_of(session_factory, transaction_id)
        assert row.conversation_id == own
        [(_, answer)] = await query_exchanges(session_factory, transaction_id)
        assert answer["output_ConversationID"] not in (None, own)  # kept in the audit only


# --- 10.6: M-Pesa's own IDs contain "_" ----------------------------------------------------------


async def test_a_portal_shaped_conversation_id_settles_a_payment(
    payment_api_factory: PaymentApiFactory,
) -> None:
    api = await payment_api_factory()
    api.simulator.config.portal_conversation_ids = True
    api.simulator.config.query_by_third_party_reference = False
    answer = await api.http.post(
        "/api/payments/initiate", json={"phone_number": INTERNAL_ERROR, "amount": 10}
    )
    assert answer.status_code == 202, answer.text
    transaction_id = answer.json()["transaction_id"]
    assert answer.json()["conversation_id"].startswith("AG_")
    refreshed = await api.http.post(f"/api/payments/{transaction_id}/refresh")
    assert (refreshed.status_code, refreshed.json()["status"]) == (200, "completed")


async def test_a_recorded_id_with_an_underscore_is_queried_not_refused(
    payment_api_factory: PaymentApiFactory,
) -> None:
    api = await payment_api_factory()
    answer = await api.http.post(
        "/api/payments/initiate", json={"phone_number": DROPPED, "amount": 10}
    )
    transaction_id = answer.json()["transaction_id"]
    # Recorded from an answer or a notice, as the portal shapes them.
    await set_ids(
        api.session_factory, transaction_id, conversation_id="AG_20180206_00005e7dccc6da08efa8"
    )
    refreshed = await api.http.post(f"/api/payments/{transaction_id}/refresh")
    assert refreshed.status_code == 200, refreshed.text
    assert refreshed.json()["status"] == "completed"  # not found by it, found by the reference
    report = await reconcile_once(api.service, api.session_factory, min_age=0)
    assert report.errors == 0


# --- 10.7: the remaining switches ---------------------------------------------------------------


async def test_the_gateways_own_c2b_timeout_ends_expired_never_completed(
    service: PaymentService,
    session_factory: async_sessionmaker[AsyncSession],
    simulator: MpesaSimulator,
) -> None:
    """M-Pesa gives up on the PIN after about 66 s (§5.1), before our C2B timeout: INS-9 is
    ambiguous, so unknown, and the status query settles it as expired."""
    simulator.config.pin_delay_seconds = 0.6  # the customer is too slow ...
    simulator.config.c2b_server_timeout_seconds = 0.1  # ... for the gateway's timeout
    started = time.monotonic()
    transaction_id = await unknown_c2b(service, session_factory, SUCCESS)
    assert time.monotonic() - started < 0.5  # the gateway's answer, not our timeout
    row = await row_of(session_factory, transaction_id)
    assert (row.response_code, row.conversation_id is not None) == ("INS-9", True)
    await asyncio.sleep(0.6)  # the PIN the customer types late does not count
    report = await reconcile_once(service, session_factory, min_age=0)
    assert report.settled_ids == [transaction_id]
    assert (await row_of(session_factory, transaction_id)).status == "expired"


async def test_customer_name_not_authorized_is_a_clear_4xx_asked_once(
    payment_api_factory: PaymentApiFactory,
) -> None:
    api = await payment_api_factory()
    api.simulator.config.customer_name_not_authorized = True  # the real sandbox (§2.7)
    with pytest.raises(InvalidPaymentRequestError, match="Not authorized") as info:
        await api.service.query_customer_name(SUCCESS)
    assert info.value.provider_code == "INS-26"
    response = await api.http.get("/api/payments/customer-name", params={"phone_number": SUCCESS})
    assert response.status_code == 400
    assert response.json()["details"]["provider_code"] == "INS-26"
    assert api.simulator.calls("query_customer_name") == 2  # one each: never retried


async def test_a_lost_answer_not_found_as_ins_23_is_asked_once_and_stays_unknown(
    service: PaymentService,
    session_factory: async_sessionmaker[AsyncSession],
    simulator: MpesaSimulator,
) -> None:
    simulator.config.not_found_as_ins_23 = True
    transaction_id = await unknown_c2b(service, session_factory, SLOW)
    simulator.reset()
    report = await reconcile_once(service, session_factory, min_age=0)
    assert (report.unresolved, report.errors) == (1, 0)
    assert (await row_of(session_factory, transaction_id)).status == "unknown"
    assert simulator.calls("query_status") == 1


# --- issue 9.3: nothing is re-sent below the module (counted at the socket) ---------------------


class CommitThenDrop:
    """A loopback M-Pesa that reads each request in full and counts it (as M-Pesa would commit
    it); money-moving paths in ``drop`` then lose the connection without an answer, the others
    answer INS-0."""

    def __init__(self, drop: set[str]) -> None:
        self.drop = drop
        self.received: list[tuple[str, str]] = []
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path = head.split(b" ")[:2]
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                await reader.readexactly(length)
                self.received.append((method.decode(), path.decode()))
                if path.decode() in self.drop:
                    writer.close()
                    return
                body = (
                    b'{"output_ResponseCode":"INS-0","output_ResponseDesc":"Request processed'
                    b' successfully","output_TransactionID":"3cr8whltpb6m","output_ConversationID"'
                    b':"25230e0e20514ba790c1273b866e98d1","output_ThirdPartyReference":"x",'
                    b'"output_ResponseTransactionStatus":"N/A"}'
                )
                writer.write(
                    b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


PATHS = {
    "c2b": "/ipg/v1x/c2bPayment/singleStage/",
    "b2c": "/ipg/v1x/b2cPayment/",
    "b2b": "/ipg/v1x/b2bPayment/",
    "reversal": "/ipg/v1x/reversal/",
}


def socket_service(base_url: str) -> PaymentService:
    settings = load_settings(
        mpesa_environment="simulator", mpesa_base_url=base_url, payment_c2b_timeout=5
    )
    return PaymentService(settings, db_retry_delays=(0.01,))  # the production transport


@pytest.mark.parametrize("operation", ["c2b", "b2c", "b2b"])
async def test_a_payment_whose_connection_drops_is_sent_once_and_ends_unknown(
    session_factory: async_sessionmaker[AsyncSession], operation: str
) -> None:
    server = CommitThenDrop({PATHS[operation]})
    async with server as base_url:
        service = socket_service(base_url)
        try:
            async with session_factory() as db:
                with pytest.raises(PaymentOutcomeUnknownError) as info:
                    await pay_once(service, db, operation, "drop-1")
        finally:
            await service.aclose()
    assert server.received == [("POST", PATHS[operation])]
    assert info.value.payment.status == "unknown"  # type: ignore[attr-defined]


async def test_a_reversal_whose_connection_drops_is_sent_once_and_ends_unknown(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    server = CommitThenDrop({PATHS["reversal"]})
    async with server as base_url:
        service = socket_service(base_url)
        try:
            async with session_factory() as db:
                paid = await pay_once(service, db, "c2b", "paid-1")
                with pytest.raises(PaymentOutcomeUnknownError) as info:
                    await service.reverse(paid.transaction_id, ReversalRequest(), db)
        finally:
            await service.aclose()
    assert server.received == [("POST", PATHS["c2b"]), ("PUT", PATHS["reversal"])]
    reversal = info.value.payment  # type: ignore[attr-defined]
    assert (reversal.operation, reversal.status) == ("reversal", "unknown")
    async with session_factory() as session:
        audited = (
            await session.scalars(
                select(PaymentAuditLog.request_body).where(
                    PaymentAuditLog.action == "api_request"
                )
            )
        ).all()
    assert [entry["method"] for entry in audited] == ["POST", "PUT"]  # what left, audited
