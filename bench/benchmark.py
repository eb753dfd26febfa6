"""Benchmark of the payments module over real HTTP: overhead, concurrency and throughput.

It starts the M-Pesa simulator (``python -m payments simulator``) and the demo gateway
(``python -m payments serve``, uvicorn) as subprocesses on free loopback ports, drives them with
aiohttp (httpx for the sequential overhead samples), and prints a Markdown table::

    python bench/benchmark.py                      # SQLite (and PostgreSQL if configured)
    python bench/benchmark.py --postgres postgresql://postgres@127.0.0.1:5432/postgres
    python bench/benchmark.py --quick              # a smoke run with smaller numbers

PostgreSQL runs when ``--postgres URL`` or ``PAYMENT_BENCH_POSTGRES_URL`` gives an admin URL;
a fresh database is created on that server for the run and dropped afterwards.

Phases, per database:

1. overhead: sequential C2B payments through the gateway, interleaved with raw C2B calls to the
   same simulator (same httpx client, valid bearer token): the difference of the median and p99
   latencies is what the module adds;
2. concurrency: N customers pay at once while the simulator holds each C2B for a PIN delay; every
   request must answer ``completed`` and the gateway's summary must count as many completed rows;
   peak RSS of the gateway (``VmHWM``) and peak database connections are sampled from outside
   (``/proc/PID/fd`` entries pointing at the SQLite file, ``pg_stat_activity`` on PostgreSQL);
3. throughput without PIN delay: C2B payments, status reads and callbacks per second.

The exit code is 1 when a target is missed (``--no-check`` turns the checks off), 2 on a setup
error. Every subprocess is stopped on exit, also on Ctrl-C or an exception.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import platform
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from payments.mpesa.auth import derive_bearer_token
from payments.simulator.keys import (
    SIMULATOR_API_KEY,
    SIMULATOR_PUBLIC_KEY,
    SIMULATOR_SERVICE_PROVIDER_CODE,
)

ADMIN_KEY = "bench-admin-key-0123456789"
CALLBACK_TOKEN = "bench-callback-token-0123456789"
POSTGRES_VARIABLE = "PAYMENT_BENCH_POSTGRES_URL"
C2B_PATH = "/ipg/v1x/c2bPayment/singleStage/"

# Targets (issue #6), for a 2-core machine where load generator and simulator share the cores.
TARGET_OVERHEAD_MEDIAN_MS = 5.0  # on SQLite
TARGET_WALL_RATIO = 3.0  # concurrent wall time / ideal (the PIN delay)
TARGET_PEAK_RSS_MB = 300.0


@dataclass(frozen=True)
class Settings:
    quick: bool
    check: bool
    postgres_url: str | None
    sqlite: bool
    pool_size: int
    overhead_samples: int
    concurrency: int
    pin_delay: float
    throughput_seconds: float
    read_seconds: float
    callback_seconds: float
    workers: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        quick = bool(args.quick)

        def pick(value: Any, full: Any, small: Any) -> Any:
            return value if value is not None else (small if quick else full)

        postgres = args.postgres or os.environ.get(POSTGRES_VARIABLE, "").strip() or None
        return cls(
            quick=quick,
            check=not args.no_check,
            postgres_url=None if args.no_postgres else postgres,
            sqlite=not args.no_sqlite,
            pool_size=args.pool_size,
            overhead_samples=pick(args.overhead_samples, 300, 60),
            concurrency=pick(args.concurrency, 1000, 100),
            pin_delay=args.pin_delay,
            throughput_seconds=pick(args.throughput_seconds, 30.0, 5.0),
            read_seconds=pick(args.read_seconds, 10.0, 3.0),
            callback_seconds=pick(args.callback_seconds, 10.0, 3.0),
            workers=args.workers,
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/benchmark.py",
        description="Measure the payments module's overhead, concurrency and throughput.",
    )
    parser.add_argument("--quick", action="store_true", help="smaller numbers, for a smoke run")
    parser.add_argument(
        "--postgres",
        metavar="URL",
        default=None,
        help=f"admin URL of a PostgreSQL server (default ${POSTGRES_VARIABLE}); a fresh"
        " database is created on it",
    )
    parser.add_argument("--no-postgres", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--no-sqlite", action="store_true", help="skip SQLite")
    parser.add_argument("--no-check", action="store_true", help="exit 0 even if targets are missed")
    parser.add_argument("--pool-size", type=int, default=10, help="PAYMENT_DATABASE_POOL_SIZE")
    parser.add_argument("--overhead-samples", type=int, default=None, help="sequential pairs")
    parser.add_argument("--concurrency", type=int, default=None, help="customers paying at once")
    parser.add_argument("--pin-delay", type=float, default=2.0, help="PIN delay (s), phase 2")
    parser.add_argument("--throughput-seconds", type=float, default=None)
    parser.add_argument("--read-seconds", type=float, default=None)
    parser.add_argument("--callback-seconds", type=float, default=None)
    parser.add_argument(
        "--workers", type=int, default=32, help="concurrent requests in the throughput phases"
    )
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """Subprocesses started by the benchmark; ``stop_all`` ends each of them, and only them."""

    def __init__(self) -> None:
        self._running: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, args: list[str], env: dict[str, str], cwd: Path
    ) -> subprocess.Popen[bytes]:
        output = (cwd / f"{name}.log").open("wb")
        process = subprocess.Popen(
            args,
            env=env,
            cwd=cwd,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        output.close()
        self._running.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if process in self._running:
            self._running.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self._running)):
            self.stop(process)


def base_env(workdir: Path) -> dict[str, str]:
    """The parent's environment without any MPESA_*/PAYMENT_* variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPESA_", "PAYMENT_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["PAYMENT_LOG_DIR"] = str(workdir / "logs")
    return env


async def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s")


# -- /proc sampling -----------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_status_kb(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def sqlite_connections(pid: int, database: Path) -> int:
    """Open SQLite connections of ``pid``: each holds one descriptor on the database file."""
    target = str(database.resolve())
    count = 0
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            if os.readlink(f"{fd_dir}/{name}") == target:
                count += 1
    return count


class Sampler:
    """Samples the gateway's database connections every ``interval`` seconds for the whole run,
    keeping the overall peak and the peak since ``open_window()``."""

    def __init__(self, count: Callable[[], Awaitable[int]], interval: float = 0.05) -> None:
        self._count = count
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self.peak = 0
        self.window_peak = 0
        self.samples = 0

    async def sample(self) -> None:
        value = await self._count()
        self.peak = max(self.peak, value)
        self.window_peak = max(self.window_peak, value)
        self.samples += 1

    async def _run(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(self._interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def open_window(self) -> None:
        self.window_peak = 0

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            await self.sample()


# -- statistics ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]


# -- workload -----------------------------------------------------------------------------------

_phones = itertools.count(3_000_000)


def next_phone() -> str:
    """A valid number that no simulator script reacts to (258843…/258845…)."""
    n = next(_phones) - 3_000_000
    prefix = "25884" if (n // 7_000_000) % 2 == 0 else "25885"
    return f"{prefix}{3_000_000 + n % 7_000_000:07d}"


def payment_body() -> dict[str, Any]:
    return {"phone_number": next_phone(), "amount": 10, "account_reference": "BENCH"}


@dataclass
class Gateway:
    base: str
    pid: int
    connections: Callable[[], Awaitable[int]]

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": ADMIN_KEY}

    def initiate_headers(self) -> dict[str, str]:
        return {"X-API-Key": ADMIN_KEY, "Idempotency-Key": uuid.uuid4().hex}


@dataclass
class Result:
    database: str
    figures: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, name: str, value: str) -> None:
        self.figures[name] = value


def raw_c2b_fields() -> dict[str, str]:
    return {
        "input_TransactionReference": "BENCH",
        "input_CustomerMSISDN": next_phone(),
        "input_Amount": "10.00",
        "input_ThirdPartyReference": "R" + uuid.uuid4().hex[:19].upper(),
        "input_ServiceProviderCode": SIMULATOR_SERVICE_PROVIDER_CODE,
    }


async def phase_overhead(
    gateway: Gateway, simulator: str, samples: int, result: Result
) -> tuple[float, float]:
    """Sequential gateway payments and raw provider calls, interleaved, through one httpx client."""
    token = derive_bearer_token(SIMULATOR_API_KEY, SIMULATOR_PUBLIC_KEY)
    raw_headers = {"Authorization": f"Bearer {token}", "Origin": "developer.mpesa.vm.co.mz"}
    raw: list[float] = []
    module: list[float] = []
    errors = 0
    async with httpx.AsyncClient(timeout=30) as client:

        async def raw_call() -> float:
            started = time.perf_counter()
            response = await client.post(
                simulator + C2B_PATH, json=raw_c2b_fields(), headers=raw_headers
            )
            elapsed = time.perf_counter() - started
            if response.status_code != 201 or response.json().get("output_ResponseCode") != "INS-0":
                raise RuntimeError(f"raw C2B call failed: {response.status_code} {response.text}")
            return elapsed

        async def gateway_call() -> float:
            nonlocal errors
            started = time.perf_counter()
            response = await client.post(
                gateway.base + "/api/payments/initiate",
                json=payment_body(),
                headers=gateway.initiate_headers(),
            )
            elapsed = time.perf_counter() - started
            if response.status_code != 200 or response.json().get("status") != "completed":
                errors += 1
            return elapsed

        for _ in range(max(10, samples // 10)):  # warm-up, not measured
            await raw_call()
            await gateway_call()
        errors = 0
        cpu_before = proc_cpu_seconds(gateway.pid)
        for i in range(samples):
            if i % 2:
                raw.append(await raw_call())
                module.append(await gateway_call())
            else:
                module.append(await gateway_call())
                raw.append(await raw_call())
        cpu = proc_cpu_seconds(gateway.pid) - cpu_before
    ms = 1000.0
    raw_median, raw_p99 = statistics.median(raw) * ms, percentile(raw, 0.99) * ms
    gw_median, gw_p99 = statistics.median(module) * ms, percentile(module, 0.99) * ms
    result.add("Overhead: samples (sequential pairs)", f"{samples}")
    result.add(
        "Provider alone (raw httpx call): median / p99", f"{raw_median:.2f} / {raw_p99:.2f} ms"
    )
    result.add("Through the module: median / p99", f"{gw_median:.2f} / {gw_p99:.2f} ms")
    added_median, added_p99 = gw_median - raw_median, gw_p99 - raw_p99
    result.add(
        "**Added by the module: median / p99**", f"**{added_median:.2f} / {added_p99:.2f} ms**"
    )
    result.add("Gateway CPU per sequential payment", f"{cpu / samples * ms:.2f} ms")
    result.add("Overhead: failed payments", str(errors))
    if errors:
        result.failures.append(f"overhead: {errors} payments did not complete")
    return added_median, added_p99


async def summary_completed(session: aiohttp.ClientSession, gateway: Gateway) -> tuple[int, int]:
    """(completed C2B rows, rows still unsettled) according to the gateway's own summary."""
    async with session.get(
        gateway.base + "/api/payments/summary", headers=gateway.headers
    ) as response:
        response.raise_for_status()
        summary = await response.json()
    by_status = summary["by_status"]
    completed = int(by_status.get("completed", {}).get("count", 0))
    unsettled = sum(
        int(by_status.get(status, {}).get("count", 0))
        for status in ("pending", "processing", "unknown")
    )
    return completed, unsettled


async def set_pin_delay(session: aiohttp.ClientSession, simulator: str, seconds: float) -> None:
    async with session.put(
        simulator + "/simulator/config", json={"pin_delay_seconds": seconds}
    ) as response:
        response.raise_for_status()


def unlimited_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=300),
    )


async def phase_concurrency(
    gateway: Gateway,
    simulator: str,
    settings: Settings,
    sampler: Sampler,
    result: Result,
) -> None:
    n, delay = settings.concurrency, settings.pin_delay
    async with unlimited_session() as session:
        completed_before, _ = await summary_completed(session, gateway)
        await set_pin_delay(session, simulator, delay)
        latencies: list[float] = []
        failures: list[str] = []
        start_gate = asyncio.Event()

        async def pay() -> bool:
            body, headers = payment_body(), gateway.initiate_headers()
            await start_gate.wait()
            started = time.perf_counter()
            try:
                async with session.post(
                    gateway.base + "/api/payments/initiate", json=body, headers=headers
                ) as response:
                    answer = await response.json(content_type=None)
                    ok = response.status == 200 and answer.get("status") == "completed"
                    if not ok:
                        failures.append(f"{response.status} {str(answer)[:200]}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                ok = False
            latencies.append(time.perf_counter() - started)
            return ok

        cpu_before = proc_cpu_seconds(gateway.pid)
        tasks = [asyncio.create_task(pay()) for _ in range(n)]
        await asyncio.sleep(0.05)  # every task is waiting at the gate
        sampler.open_window()
        started = time.perf_counter()
        start_gate.set()
        outcomes = await asyncio.gather(*tasks)
        wall = time.perf_counter() - started
        peak_connections = sampler.window_peak
        cpu = proc_cpu_seconds(gateway.pid) - cpu_before
        peak_rss_mb = proc_status_kb(gateway.pid, "VmHWM") / 1024
        await set_pin_delay(session, simulator, 0.0)
        completed_after, unsettled = await summary_completed(session, gateway)

    succeeded = sum(outcomes)
    recorded = completed_after - completed_before
    lost = max(0, succeeded - recorded) + (n - succeeded)
    ratio = wall / delay if delay > 0 else float("nan")
    result.add("Concurrency: customers paying at once", f"{n} (PIN delay {delay:g} s)")
    result.add("**Wall time**", f"**{wall:.2f} s**")
    result.add("Payments per second", f"{n / wall:.0f}")
    result.add("**Ratio to ideal (wall / PIN delay)**", f"**{ratio:.2f}×**")
    result.add(
        "Latency per payment: median / p99 / max",
        f"{statistics.median(latencies):.2f} / {percentile(latencies, 0.99):.2f}"
        f" / {max(latencies):.2f} s",
    )
    result.add("Completed (answers / rows in the summary)", f"{succeeded} / {recorded}")
    result.add("**Payments lost or failed**", f"**{lost}**")
    result.add("Rows left unsettled", str(unsettled))
    result.add("**Gateway peak RSS (VmHWM)**", f"**{peak_rss_mb:.0f} MB**")
    result.add("**Peak DB connections in the burst (pool size)**", f"**{peak_connections}**")
    result.add("Gateway CPU during the burst", f"{cpu:.2f} s ({cpu / n * 1000:.2f} ms/payment)")
    if failures:
        log(f"concurrency failures ({len(failures)}), first: {failures[:3]}")
    if lost:
        result.failures.append(f"concurrency: {lost} payments lost or failed")
    if unsettled:
        result.failures.append(f"concurrency: {unsettled} payments left unsettled")
    if delay > 0 and ratio > TARGET_WALL_RATIO:
        result.failures.append(f"concurrency: wall {ratio:.2f}× ideal > {TARGET_WALL_RATIO}×")
    if peak_rss_mb >= TARGET_PEAK_RSS_MB:
        result.failures.append(f"concurrency: peak RSS {peak_rss_mb:.0f} MB")


@dataclass
class Counted:
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    first_error: str | None = None

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


async def run_for(
    seconds: float, workers: int, request: Callable[[], Awaitable[str | None]]
) -> Counted:
    """``workers`` loops calling ``request`` until the time is up; it returns an error or None."""
    counted = Counted()
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            try:
                error = await request()
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            if error is None:
                counted.ok += 1
            else:
                counted.errors += 1
                counted.first_error = counted.first_error or error

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    counted.seconds = time.perf_counter() - started
    return counted


async def phase_throughput(gateway: Gateway, settings: Settings, result: Result) -> None:
    paid: list[dict[str, Any]] = []
    async with unlimited_session() as session:

        async def pay() -> str | None:
            async with session.post(
                gateway.base + "/api/payments/initiate",
                json=payment_body(),
                headers=gateway.initiate_headers(),
            ) as response:
                answer = await response.json(content_type=None)
                if response.status != 200 or answer.get("status") != "completed":
                    return f"{response.status} {str(answer)[:200]}"
                paid.append(answer)
                return None

        async def read() -> str | None:
            transaction_id = random.choice(paid)["transaction_id"]
            async with session.get(
                f"{gateway.base}/api/payments/status/{transaction_id}", headers=gateway.headers
            ) as response:
                await response.read()
                return None if response.status == 200 else f"{response.status}"

        sequence = itertools.cycle(range(1 << 30))

        async def callback() -> str | None:
            payment = paid[next(sequence) % len(paid)]
            body = {
                "input_OriginalConversationID": payment["conversation_id"],
                "input_ThirdPartyReference": payment["third_party_reference"],
                "input_TransactionID": payment["provider_transaction_id"],
                "input_ResultCode": "INS-0",
                "input_ResultDesc": "Request processed successfully",
            }
            async with session.post(
                gateway.base + "/api/payments/callback/c2b",
                json=body,
                headers={"X-Callback-Token": CALLBACK_TOKEN},
            ) as response:
                await response.read()
                return None if response.status == 200 else f"{response.status}"

        phases: list[tuple[str, float, Callable[[], Awaitable[str | None]]]] = [
            ("C2B payments", settings.throughput_seconds, pay),
            ("Status reads", settings.read_seconds, read),
            ("Callbacks ingested", settings.callback_seconds, callback),
        ]
        for name, seconds, request in phases:
            log(f"throughput: {name} for {seconds:g} s, {settings.workers} workers")
            cpu_before = proc_cpu_seconds(gateway.pid)
            counted = await run_for(seconds, settings.workers, request)
            cpu = proc_cpu_seconds(gateway.pid) - cpu_before
            result.add(
                f"**{name} per second** ({seconds:g} s, {settings.workers} at a time)",
                f"**{counted.rate:.0f}** (gateway CPU {cpu / counted.seconds * 100:.0f} %,"
                f" errors {counted.errors})",
            )
            if counted.errors:
                log(f"{name}: {counted.errors} errors, first: {counted.first_error}")
                result.failures.append(f"throughput: {counted.errors} {name.lower()} failed")


# -- one database -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def postgres_database(admin_url: str) -> Any:
    """A fresh database on the server (dropped afterwards): (gateway URL, connection counter)."""
    import asyncpg  # dev dependency; only needed for PostgreSQL
    from sqlalchemy.engine import make_url

    url = make_url(admin_url.replace("postgres://", "postgresql://", 1))
    url = url.set(drivername="postgresql")
    name = f"payments_bench_{uuid.uuid4().hex[:12]}"
    admin_dsn = url.render_as_string(hide_password=False)
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')

        async def connections() -> int:
            return int(
                await admin.fetchval(
                    # Client connections only: autovacuum workers show up on the database too.
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = $1 AND backend_type = 'client backend'",
                    name,
                )
            )

        yield url.set(database=name).render_as_string(hide_password=False), connections
    finally:
        with contextlib.suppress(Exception):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def bench_database(
    label: str,
    database_url: str,
    connections_for: Callable[[int], Callable[[], Awaitable[int]]],
    settings: Settings,
    processes: Processes,
    workdir: Path,
    simulator: str,
) -> Result:
    result = Result(label)
    port = free_port()
    env = base_env(workdir) | {
        "MPESA_ENVIRONMENT": "simulator",
        "MPESA_BASE_URL": simulator,
        "MPESA_CALLBACK_TOKEN": CALLBACK_TOKEN,
        "PAYMENT_DATABASE_URL": database_url,
        "PAYMENT_DATABASE_POOL_SIZE": str(settings.pool_size),
        "PAYMENT_ADMIN_API_KEY": ADMIN_KEY,
        "PAYMENT_RECONCILE_IN_APP": "false",
    }
    args = [sys.executable, "-m", "payments", "serve", "--port", str(port)]
    log(f"{label}: starting gateway on port {port}")
    process = processes.start(f"gateway-{label.lower()}", args, env, workdir)
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_ready(base + "/api/payments/health", process)
        gateway = Gateway(base, process.pid, connections_for(process.pid))
        sampler = Sampler(gateway.connections)
        sampler.start()
        log(f"{label}: overhead, {settings.overhead_samples} sequential pairs")
        added_median, _ = await phase_overhead(
            gateway, simulator, settings.overhead_samples, result
        )
        if label == "SQLite" and added_median > TARGET_OVERHEAD_MEDIAN_MS:
            result.failures.append(
                f"overhead: median {added_median:.2f} ms > {TARGET_OVERHEAD_MEDIAN_MS} ms"
            )
        log(f"{label}: concurrency, {settings.concurrency} at once")
        await phase_concurrency(gateway, simulator, settings, sampler, result)
        await phase_throughput(gateway, settings, result)
        await sampler.stop()
        result.add(
            "**Peak DB connections, whole run (pool size)**",
            f"**{sampler.peak} ({settings.pool_size})** [{sampler.samples} samples]",
        )
        if sampler.peak > settings.pool_size:
            result.failures.append(
                f"{sampler.peak} DB connections open at once > pool size {settings.pool_size}"
            )
        if process.poll() is not None:
            result.failures.append(f"gateway exited with {process.returncode}")
    finally:
        processes.stop(process)
    return result


# -- report -------------------------------------------------------------------------------------


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def report(results: list[Result], settings: Settings, command: str, load_at_start: str) -> str:
    lines = [
        "| | " + " | ".join(r.database for r in results) + " |",
        "|---|" + "---|" * len(results),
        "| Machine | "
        + " | ".join(f"{os.cpu_count()} cores, Python {platform.python_version()}" for _ in results)
        + " |",
        "| Database pool size | " + " | ".join(str(settings.pool_size) for _ in results) + " |",
    ]
    names: list[str] = []
    for result in results:
        names += [name for name in result.figures if name not in names]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(r.figures.get(name, "—") for r in results) + " |")
    verdicts = [
        "all met" if not r.failures else "MISSED: " + "; ".join(r.failures) for r in results
    ]
    lines.append("| Targets | " + " | ".join(verdicts) + " |")
    header = [
        f"Command: `{command}`",
        f"Load average (1 min) at start / end: {load_at_start} / {load_average()}",
        f"Cores: {os.cpu_count()} (gateway, simulator and load generator share them)",
        f"Targets: overhead median ≤ {TARGET_OVERHEAD_MEDIAN_MS:g} ms (SQLite); all"
        f" concurrent payments complete, none lost, wall ≤ {TARGET_WALL_RATIO:g}× ideal, peak"
        f" RSS < {TARGET_PEAK_RSS_MB:g} MB, DB connections ≤ pool size",
        "",
    ]
    return "\n".join(header + lines)


async def run(settings: Settings, processes: Processes, workdir: Path) -> list[Result]:
    sim_port = free_port()
    simulator = f"http://127.0.0.1:{sim_port}"
    log(f"starting simulator on port {sim_port}")
    sim_process = processes.start(
        "simulator",
        [sys.executable, "-m", "payments", "simulator", "--port", str(sim_port)],
        base_env(workdir),
        workdir,
    )
    await wait_ready(simulator + "/simulator/stats", sim_process)
    results: list[Result] = []
    if settings.sqlite:
        database = workdir / "bench.db"

        def sqlite_counter(pid: int) -> Callable[[], Awaitable[int]]:
            async def count() -> int:
                return await asyncio.to_thread(sqlite_connections, pid, database)

            return count

        results.append(
            await bench_database(
                "SQLite",
                f"sqlite:///{database}",
                sqlite_counter,
                settings,
                processes,
                workdir,
                simulator,
            )
        )
    if settings.postgres_url:
        async with postgres_database(settings.postgres_url) as (url, connections):
            results.append(
                await bench_database(
                    "PostgreSQL",
                    url,
                    lambda _pid: connections,
                    settings,
                    processes,
                    workdir,
                    simulator,
                )
            )
    return results


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the ``finally`` blocks stop the subprocesses."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings.from_args(args)
    command = shlex.join(
        ["python", "bench/benchmark.py", *(sys.argv[1:] if argv is None else argv)]
    )
    processes = Processes()
    load_at_start = load_average()
    with terminate_as_interrupt(), tempfile.TemporaryDirectory(prefix="payments-bench-") as tmp:
        workdir = Path(tmp)
        try:
            results = asyncio.run(run(settings, processes, workdir))
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        except Exception as exc:
            log(f"benchmark failed: {type(exc).__name__}: {exc}")
            for path in sorted(workdir.glob("*.log")):
                log(f"--- {path.name} (tail) ---\n{path.read_text(errors='replace')[-3000:]}")
            return 2
        finally:
            processes.stop_all()
    print(report(results, settings, command, load_at_start))
    missed = [failure for result in results for failure in result.failures]
    if missed and settings.check:
        log(f"targets missed: {missed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
