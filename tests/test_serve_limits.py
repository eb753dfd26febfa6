"""``python -m payments serve`` under hostile clients, on loopback: memory stays bounded when huge
bodies arrive, slow clients are disconnected, oversized headers are refused, and the client address
is never taken from ``X-Forwarded-For`` unless ``PAYMENT_TRUSTED_PROXIES`` says so (issue 11.1,
11.3, 11.4). Each test starts the real demo gateway in a subprocess."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "serve-limits-admin-key-0123"
CALLBACK_TOKEN = "serve-limits-callback-token-0123"

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="measures memory through /proc"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Gateway:
    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@contextmanager
def gateway(tmp_path: Path, *args: str, **env: str) -> Iterator[Gateway]:
    port = _free_port()
    variables = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("MPESA_", "PAYMENT_"))
    }
    variables |= {
        "PYTHONPATH": str(REPO),
        "PAYMENT_ADMIN_API_KEY": ADMIN_KEY,
        "MPESA_CALLBACK_TOKEN": CALLBACK_TOKEN,
        "PAYMENT_DATABASE_URL": f"sqlite:///{tmp_path}/gateway.db",
        "PAYMENT_LOG_DIR": str(tmp_path / "logs"),
        "PAYMENT_RECONCILE_IN_APP": "false",
        **env,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "payments", "serve", "--port", str(port), *args],
        cwd=tmp_path,
        env=variables,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/payments/health", timeout=1).is_success:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(process.stderr.read().decode() if process.stderr else "")
            time.sleep(0.2)
        yield Gateway(process, port)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _post_huge(url: str, headers: dict[str, str], megabytes: int) -> int:
    chunk = b" " * (1024 * 1024)

    async def body():  # type: ignore[no-untyped-def]
        for _ in range(megabytes):
            yield chunk

    async with httpx.AsyncClient(timeout=60) as http:
        try:
            response = await http.post(
                url, content=body(), headers={"Content-Type": "application/json", **headers}
            )
        except httpx.HTTPError:
            return 0  # the server stopped reading and closed: nothing was held
        return response.status_code


async def test_huge_bodies_do_not_grow_the_process(tmp_path: Path) -> None:
    with gateway(tmp_path) as server:
        before = server.rss_kib()
        for headers in ({}, {"X-API-Key": ADMIN_KEY}):  # refused by key, then by size
            statuses = await asyncio.gather(
                *(_post_huge(f"{server.url}/api/payments/initiate", headers, 40) for _ in range(5))
            )
            assert set(statuses) <= {401, 413, 0}, statuses
        statuses = await asyncio.gather(
            *(_post_huge(f"{server.url}/api/payments/callback/c2b", {}, 40) for _ in range(5))
        )
        assert set(statuses) <= {401, 429, 0}, statuses
        grown_mib = (server.rss_kib() - before) / 1024
        # 600 MB were offered; a server that buffers them grows by hundreds of MB.
        assert grown_mib < 40, f"grew by {grown_mib:.0f} MiB"
        assert httpx.get(f"{server.url}/api/payments/health", timeout=5).status_code == 200


def test_slow_clients_are_disconnected_and_huge_headers_refused(tmp_path: Path) -> None:
    with gateway(tmp_path, "--header-timeout", "1", "--max-header-bytes", "8192") as server:
        slow = []
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"GET /api/payments/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            slow.append(sock)
        silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
        time.sleep(2.5)
        for sock in slow + silent:
            sock.settimeout(5)
            try:
                assert sock.recv(1024) == b""  # closed by the server
            except ConnectionResetError:
                pass
            sock.close()

        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.settimeout(5)
            sock.sendall(
                b"GET /api/payments/health HTTP/1.1\r\nHost: x\r\nX-Big: "
                + b"a" * 100_000
                + b"\r\n\r\n"
            )
            answer = b""
            try:
                while chunk := sock.recv(65536):
                    answer += chunk
            except ConnectionResetError:
                pass
            assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
        assert httpx.get(f"{server.url}/api/payments/health", timeout=5).status_code == 200


@pytest.mark.parametrize("trusted", ["", "127.0.0.1"])
def test_forwarded_addresses_are_believed_only_from_trusted_proxies(
    tmp_path: Path, trusted: str
) -> None:
    with gateway(
        tmp_path,
        PAYMENT_TRUSTED_PROXIES=trusted,
        MPESA_CALLBACK_ALLOWED_IPS="196.10.10.10",
    ) as server:
        for forwarded in ("196.10.10.10", "not-an-ip"):
            response = httpx.post(
                f"{server.url}/api/payments/callback/c2b",
                json={"input_ResultCode": "INS-0"},
                headers={"X-Callback-Token": CALLBACK_TOKEN, "X-Forwarded-For": forwarded},
                timeout=10,
            )
            # Only a trusted proxy can vouch for an allowed sender.
            expected = 200 if trusted and forwarded == "196.10.10.10" else 401
            assert response.status_code == expected, (forwarded, response.text)
        stored = httpx.get(
            f"{server.url}/api/payments/webhooks", headers={"X-API-Key": ADMIN_KEY}, timeout=10
        ).json()["items"]
        addresses = sorted((item["remote_ip"] or "") for item in stored)
        assert addresses == (["", "196.10.10.10"] if trusted else ["127.0.0.1", "127.0.0.1"])
