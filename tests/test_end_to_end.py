"""End to end over real sockets: a client configured only from environment variables against
``python -m payments simulator`` on a loopback port, and the payment log files that run leaves.

The simulator runs as a separate process (one per module), so everything crosses the network
stack: connection drops, read timeouts and refused connections are the real ones, not the
in-process ``SimulatorTransport``'s imitations.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from payments.config import get_settings
from payments.exceptions import (
    PaymentCancelledError,
    PaymentOutcomeUnknownError,
    ProviderUnavailableError,
)
from payments.logger import payment_logger, shutdown_logging
from payments.mpesa.auth import MpesaAuth
from payments.mpesa.client import (
    CustomerNameResult,
    MpesaClient,
    Operation,
    ProviderResult,
    TransactionStatusResult,
)
from payments.mpesa.transport import AiohttpTransport
from payments.mpesa.values import Msisdn
from payments.simulator.app import masked_customer_name
from payments.simulator.keys import SIMULATOR_API_KEY, SIMULATOR_SECURITY_CREDENTIAL
from tests.support import CANCELS as CANCEL
from tests.support import DROPPED as DROP
from tests.support import PAYEE, SLOW
from tests.support import SUCCESS as CUSTOMER

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 15.0
SLOW_RESPONSE_SECONDS = 2.0  # the simulator's delay for the slow number
C2B_TIMEOUT = "0.5"  # the client's read timeout for C2B in the fault scenario

RECEIVER_SHORTCODE = "979797"
USED_MSISDNS = (CUSTOMER, PAYEE, DROP, SLOW, CANCEL)

LOG_FILE_NAME = re.compile(r"payment_\d{4}-\d{2}-\d{2}\.log")


@dataclass(frozen=True, slots=True)
class LiveSimulator:
    base_url: str
    log_dir: Path  # the simulator process's own PAYMENT_LOG_DIR
    output: Path  # its stdout and stderr


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def live_simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveSimulator]:
    """``python -m payments simulator`` on a free loopback port, stopped after the module."""
    work = tmp_path_factory.mktemp("simulator")
    port = free_loopback_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("MPESA_", "PAYMENT_"))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["MPESA_ENVIRONMENT"] = "simulator"
    env["PAYMENT_LOG_DIR"] = str(work / "logs")
    output = work / "output.txt"
    command = [
        sys.executable,
        "-m",
        "payments",
        "simulator",
        "--port",
        str(port),
        "--slow-response",
        str(SLOW_RESPONSE_SECONDS),
    ]
    with output.open("wb") as sink:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"the simulator exited with {process.returncode}:\n"
                    + output.read_text(errors="replace")
                )
            try:
                if httpx.get(f"{base_url}/simulator/public-key", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the simulator did not answer within {STARTUP_TIMEOUT} s:\n"
                    + output.read_text(errors="replace")
                )
            time.sleep(0.1)
        yield LiveSimulator(base_url, work / "logs", output)
    finally:
        _stop(process)


@pytest.fixture
def payment_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh PAYMENT_LOG_DIR; logging is unconfigured, so the first record configures it from
    the settings (the environment), as in production. Handlers are closed afterwards."""
    log_dir = tmp_path / "payment-logs"
    monkeypatch.setenv("PAYMENT_LOG_DIR", str(log_dir))
    get_settings.cache_clear()
    shutdown_logging()
    yield log_dir
    shutdown_logging()


# --- helpers --------------------------------------------------------------------------------


def reference(prefix: str) -> str:
    """A unique, provider-valid reference (alphanumeric, at most 20 characters)."""
    return (prefix + uuid.uuid4().hex)[:20]


def client_from_env(
    monkeypatch: pytest.MonkeyPatch, sent_tokens: list[str], **variables: str
) -> MpesaClient:
    """A client built only from environment variables; every bearer token it sends is recorded."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    settings = get_settings()
    # The client's own transport (aiohttp over the network), wrapped to see what goes on the wire.
    return MpesaClient.from_settings(
        settings,
        transport=TokenRecorder(AiohttpTransport(max_connections=10), sent_tokens),
    )


class TokenRecorder(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport, sent_tokens: list[str]) -> None:
        self.inner = inner
        self.sent_tokens = sent_tokens

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        assert scheme == "Bearer" and token
        self.sent_tokens.append(token)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def simulator_transactions(simulator: LiveSimulator) -> dict[str, dict[str, Any]]:
    """What the simulator process recorded, by transaction ID."""
    async with httpx.AsyncClient(base_url=simulator.base_url, timeout=5) as http:
        response = await http.get("/simulator/transactions")
    response.raise_for_status()
    return {entry["transaction_id"]: entry for entry in response.json()}


def assert_money_moved(
    result: ProviderResult, operation: Operation, third_party_reference: str, status: int
) -> str:
    assert result.operation is operation
    assert result.response_code == "INS-0"
    assert result.http_status == status
    assert result.provider_transaction_id
    assert result.conversation_id
    assert result.third_party_reference == third_party_reference
    assert len(result.exchanges) == 1
    return result.provider_transaction_id


async def complete_six_operations(
    simulator: LiveSimulator, monkeypatch: pytest.MonkeyPatch, sent_tokens: list[str]
) -> None:
    """C2B, B2C, B2B, a status query, a partial then a full reversal and a name query."""
    async with client_from_env(
        monkeypatch,
        sent_tokens,
        MPESA_ENVIRONMENT="simulator",
        MPESA_BASE_URL=simulator.base_url,
    ) as client:
        assert isinstance(client._auth, MpesaAuth)
        c2b_reference = reference("C2B")
        c2b = await client.c2b_payment(
            msisdn=Msisdn(CUSTOMER),
            amount=Decimal("150.00"),
            transaction_reference=reference("T"),
            third_party_reference=c2b_reference,
        )
        c2b_id = assert_money_moved(c2b, Operation.C2B, c2b_reference, 201)
        # It went over the loopback port, not through an in-process transport.
        assert c2b.exchanges[0].url == f"{simulator.base_url}/ipg/v1x/c2bPayment/singleStage/"

        b2c_reference = reference("B2C")
        b2c = await client.b2c_payment(
            msisdn=Msisdn(PAYEE),
            amount=Decimal("75.50"),
            transaction_reference=reference("T"),
            third_party_reference=b2c_reference,
        )
        b2c_id = assert_money_moved(b2c, Operation.B2C, b2c_reference, 201)

        b2b_reference = reference("B2B")
        b2b = await client.b2b_payment(
            receiver_party_code=RECEIVER_SHORTCODE,
            amount=Decimal("1000"),
            transaction_reference=reference("T"),
            third_party_reference=b2b_reference,
        )
        b2b_id = assert_money_moved(b2b, Operation.B2B, b2b_reference, 201)

        query_reference = reference("Q")
        status = await client.query_transaction_status(
            query_reference=c2b_id, third_party_reference=query_reference
        )
        assert isinstance(status, TransactionStatusResult)
        assert (status.response_code, status.http_status) == ("INS-0", 200)
        assert status.transaction_status == "Completed"
        assert status.conversation_id == c2b.conversation_id
        assert status.third_party_reference == query_reference

        partial_reference = reference("RP")
        partial = await client.reversal(
            provider_transaction_id=c2b_id,
            third_party_reference=partial_reference,
            amount=Decimal("50.00"),
        )
        partial_id = assert_money_moved(partial, Operation.REVERSAL, partial_reference, 200)
        rest_reference = reference("RR")
        rest = await client.reversal(
            provider_transaction_id=c2b_id, third_party_reference=rest_reference
        )
        rest_id = assert_money_moved(rest, Operation.REVERSAL, rest_reference, 200)
        assert len({c2b_id, partial_id, rest_id}) == 3

        name = await client.query_customer_name(
            msisdn=Msisdn(CUSTOMER), third_party_reference=reference("N")
        )
        assert isinstance(name, CustomerNameResult)
        assert (name.response_code, name.http_status) == ("INS-0", 200)
        assert name.customer_name == masked_customer_name(CUSTOMER)
        assert name.customer_name is not None and "*" in name.customer_name

    recorded = await simulator_transactions(simulator)
    assert recorded[c2b_id]["operation"] == "c2b"
    # The standalone simulator shows numbers masked (issue 11.13).
    assert recorded[c2b_id]["msisdn"] == Msisdn(CUSTOMER).masked
    assert (recorded[c2b_id]["amount"], recorded[c2b_id]["reversed_amount"]) == ("150.00",) * 2
    assert recorded[c2b_id]["status"] == "Completed"
    assert (recorded[b2c_id]["operation"], recorded[b2c_id]["amount"]) == ("b2c", "75.50")
    assert recorded[b2b_id]["receiver_party_code"] == RECEIVER_SHORTCODE
    assert recorded[partial_id]["amount"] == "50.00"
    assert recorded[rest_id]["amount"] == "100.00"
    assert recorded[rest_id]["original_transaction_id"] == c2b_id


async def survive_network_faults(
    simulator: LiveSimulator, monkeypatch: pytest.MonkeyPatch, sent_tokens: list[str]
) -> None:
    """A dropped connection, a read timeout, a cancellation and nothing listening."""
    async with client_from_env(
        monkeypatch,
        sent_tokens,
        MPESA_ENVIRONMENT="simulator",
        MPESA_BASE_URL=simulator.base_url,
        PAYMENT_C2B_TIMEOUT=C2B_TIMEOUT,
    ) as client:

        async def c2b(msisdn: str, third_party_reference: str) -> ProviderResult:
            return await client.c2b_payment(
                msisdn=Msisdn(msisdn),
                amount=Decimal("10"),
                transaction_reference=reference("T"),
                third_party_reference=third_party_reference,
            )

        async def status_of(third_party_reference: str) -> str | None:
            result = await client.query_transaction_status(
                query_reference=third_party_reference, third_party_reference=reference("Q")
            )
            return result.transaction_status

        dropped_reference = reference("DROP")
        with pytest.raises(PaymentOutcomeUnknownError) as dropped:
            await c2b(DROP, dropped_reference)
        assert dropped.value.outcome_known is False
        assert dropped.value.details["reason"] == "RemoteProtocolError"
        assert [e.http_status for e in dropped.value.exchanges] == [None]
        assert await status_of(dropped_reference) == "Completed"

        slow_reference = reference("SLOW")
        started = time.monotonic()
        with pytest.raises(PaymentOutcomeUnknownError) as timed_out:
            await c2b(SLOW, slow_reference)
        assert time.monotonic() - started < SLOW_RESPONSE_SECONDS
        assert timed_out.value.details["reason"] == "ReadTimeout"
        assert len(timed_out.value.exchanges) == 1  # a money-moving call is not repeated
        assert await status_of(slow_reference) == "Completed"

        cancelled_reference = reference("CANCEL")
        with pytest.raises(PaymentCancelledError) as cancelled:
            await c2b(CANCEL, cancelled_reference)
        assert cancelled.value.outcome_known is True
        assert (cancelled.value.provider_code, cancelled.value.http_status) == ("INS-5", 401)
        assert await status_of(cancelled_reference) == "Cancelled"

    unreachable_reference = reference("DOWN")
    async with client_from_env(
        monkeypatch,
        sent_tokens,
        MPESA_BASE_URL=f"http://127.0.0.1:{free_loopback_port()}",
        PAYMENT_RETRY_BACKOFF_BASE="0.01",
    ) as unreachable:
        with pytest.raises(ProviderUnavailableError) as refused:
            await unreachable.c2b_payment(
                msisdn=Msisdn(CUSTOMER),
                amount=Decimal("10"),
                transaction_reference=reference("T"),
                third_party_reference=unreachable_reference,
            )
    assert "the request was not sent" in refused.value.message
    assert refused.value.details["reason"] == "ConnectError"
    # Provably never sent, so the money-moving call was retried up to the limit.
    attempts = get_settings().payment_query_max_attempts
    assert [e.attempt for e in refused.value.exchanges] == list(range(1, attempts + 1))
    recorded = await simulator_transactions(simulator)
    assert unreachable_reference not in {t["third_party_reference"] for t in recorded.values()}


def read_logs(log_dir: Path) -> dict[str, str]:
    if not log_dir.is_dir():
        return {}
    return {path.name: path.read_text(encoding="utf-8") for path in sorted(log_dir.iterdir())}


def flush_payment_handlers() -> None:
    for handler in payment_logger.logger.handlers:
        handler.flush()


# --- tests ----------------------------------------------------------------------------------


async def test_client_from_environment_completes_all_six_operations(
    live_simulator: LiveSimulator, monkeypatch: pytest.MonkeyPatch, payment_logs: Path
) -> None:
    sent_tokens: list[str] = []
    await complete_six_operations(live_simulator, monkeypatch, sent_tokens)
    assert len(sent_tokens) == 7  # one request per call, no retries
    assert len(set(sent_tokens)) == 1  # the token is derived once per client


async def test_network_faults_over_the_loopback_port(
    live_simulator: LiveSimulator, monkeypatch: pytest.MonkeyPatch, payment_logs: Path
) -> None:
    sent_tokens: list[str] = []
    await survive_network_faults(live_simulator, monkeypatch, sent_tokens)


async def test_log_files_hold_no_phone_number_key_or_token(
    live_simulator: LiveSimulator, monkeypatch: pytest.MonkeyPatch, payment_logs: Path
) -> None:
    sent_tokens: list[str] = []
    await complete_six_operations(live_simulator, monkeypatch, sent_tokens)
    await survive_network_faults(live_simulator, monkeypatch, sent_tokens)
    flush_payment_handlers()

    logs = read_logs(payment_logs)
    assert logs, "the client wrote no payment log file"
    assert all(LOG_FILE_NAME.fullmatch(name) for name in logs), sorted(logs)
    text = "\n".join(logs.values())
    base_url = live_simulator.base_url
    for line in (
        f"API Request: POST {base_url}/ipg/v1x/c2bPayment/singleStage/",
        f"API Request: POST {base_url}/ipg/v1x/b2cPayment/",
        f"API Request: POST {base_url}/ipg/v1x/b2bPayment/",
        f"API Request: PUT {base_url}/ipg/v1x/reversal/",
        f"API Request: GET {base_url}/ipg/v1x/queryTransactionStatus/",
        f"API Request: GET {base_url}/ipg/v1x/queryCustomerName/",
        "API Response: 201 (",
        "API Response: 200 (",
        "API Response: 401 (",
        "API call failed",
    ):
        assert line in text

    assert sent_tokens
    forbidden = {
        "API key": SIMULATOR_API_KEY,
        "security credential": SIMULATOR_SECURITY_CREDENTIAL,
        **{f"MSISDN {msisdn}": msisdn for msisdn in USED_MSISDNS},
        **{f"local MSISDN {msisdn[3:]}": msisdn[3:] for msisdn in USED_MSISDNS},
        **{f"bearer token {i}": token for i, token in enumerate(set(sent_tokens))},
    }
    # The simulator process's own payment logs (it logs the connection drop) too.
    simulator_logs = {f"simulator/{k}": v for k, v in read_logs(live_simulator.log_dir).items()}
    for name, content in {**logs, **simulator_logs}.items():
        for what, value in forbidden.items():
            assert value not in content, f"{name} holds the {what}"
