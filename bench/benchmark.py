"""Benchmark of the payments module in the configuration a host runs, beside its own floor.

Everything runs as real servers on loopback ports, driven over HTTP with aiohttp from this
process (httpx for the sequential overhead samples)::

    python bench/benchmark.py --postgres postgresql://postgres@127.0.0.1:5432/postgres
    python bench/benchmark.py --no-postgres          # SQLite only
    python bench/benchmark.py --quick                # smaller numbers, a smoke run (~1 min)
    python bench/benchmark.py --only bare,passthrough,host-sqlite   # a subset

PostgreSQL runs when ``--postgres URL`` or ``PAYMENT_BENCH_POSTGRES_URL`` gives an admin URL; a
fresh database is created on that server for each configuration and dropped afterwards.

What runs (``--only`` takes these names):

* ``bare``: the floor of the machine. A bare asyncio (aiohttp) client sends the burst (1,000
  C2B at once, the simulator holding each for a 2 s PIN) straight to the simulator.
* ``passthrough``: the floor of FastAPI plus the HTTP client. A minimal FastAPI app, one route
  that forwards the same C2B request to the same simulator through the module's own HTTP client
  (``AiohttpTransport``) and returns its answer: no database, no validation, no logging.
* ``host-sqlite`` / ``host-postgres``: the module as a host runs it, built the way the README
  says: ``payments/`` copied to ``app/payments/``, ``app/main.py`` is ``FastAPI()`` plus
  ``include_router(payment_router, prefix="/api")``, settings in the host's ``.env`` (simulator
  environment, admin key, callback token, database URL; every other setting its default), the
  module's migration applied with Alembic, ``uvicorn app.main:app`` with one worker.
* ``demo``: ``python -m payments serve`` (the demo gateway) on SQLite, for comparison.
* ``multi``: the host app under ``uvicorn --workers 2`` (SQLite, PostgreSQL) and as two separate
  uvicorn processes on one PostgreSQL: idempotency (every key sent several times at once, spread
  over the processes: one provider call per key), the reconciler (``python -m app.payments
  reconcile``, two at once on PostgreSQL: every unknown payment settled, asked about once) and
  C2B throughput beside one process.

Per server: sequential overhead (gateway payments interleaved with raw calls to the simulator:
the difference of the medians is what the module adds), the burst (wall time, server CPU per
payment read from ``/proc/PID/stat``, peak RSS, peak database connections, every payment answered
``completed`` and counted in the summary) and throughput (C2B, status reads, callbacks). The
burst runs ``--bursts`` times (3; the bare client's too): its wall time and CPU per payment are
the medians, since one run moves by a third between runs minutes apart on a shared machine.

The exit code is 1 when a target is missed (``--no-check``: always 0), 2 on a setup error.
Every subprocess started here is stopped on exit, also on Ctrl-C or an exception.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
import platform
import random
import shlex
import shutil
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

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "payments"
sys.path.insert(0, str(REPO))  # the payments package of this checkout, whatever is installed

from payments.mpesa.auth import derive_bearer_token  # noqa: E402
from payments.simulator.keys import (  # noqa: E402
    SIMULATOR_API_KEY,
    SIMULATOR_PUBLIC_KEY,
    SIMULATOR_SERVICE_PROVIDER_CODE,
)

ADMIN_KEY = "bench-admin-key-0123456789"
CALLBACK_TOKEN = "bench-callback-token-0123456789"
POSTGRES_VARIABLE = "PAYMENT_BENCH_POSTGRES_URL"
C2B_PATH = "/ipg/v1x/c2bPayment/singleStage/"
ORIGIN = "developer.mpesa.vm.co.mz"
#: The default pool size (PAYMENT_DATABASE_POOL_SIZE), which the host does not set.
POOL_SIZE = 10

# Targets (issue 17): a 2-core machine, load generator and simulator on the same cores.
TARGET_CPU_RATIO = 2.0  # server CPU per C2B payment, ours / the pass-through's (the burst)
TARGET_WALL_RATIO = 1.6  # the 1,000 burst's wall time, ours / the bare client's
TARGET_OVERHEAD_MEDIAN_MS = 5.0  # added over the provider's own time, median
TARGET_PEAK_RSS_MB = 300.0

SECTIONS = ("bare", "passthrough", "host-sqlite", "host-postgres", "demo", "multi")


@dataclass(frozen=True)
class Settings:
    quick: bool
    check: bool
    postgres_url: str | None
    sections: tuple[str, ...]
    overhead_samples: int
    concurrency: int
    bursts: int
    pin_delay: float
    throughput_seconds: float
    read_seconds: float
    callback_seconds: float
    workers: int
    idempotency_keys: int
    duplicates: int
    unknown_payments: int
    host_settings: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        quick = bool(args.quick)

        def pick(value: Any, full: Any, small: Any) -> Any:
            return value if value is not None else (small if quick else full)

        postgres = args.postgres or os.environ.get(POSTGRES_VARIABLE, "").strip() or None
        if args.no_postgres:
            postgres = None
        sections = tuple(s.strip() for s in args.only.split(",")) if args.only else SECTIONS
        unknown = [s for s in sections if s not in SECTIONS]
        if unknown:
            raise SystemExit(f"--only: unknown {unknown}; choose from {', '.join(SECTIONS)}")
        if args.no_demo:
            sections = tuple(s for s in sections if s != "demo")
        if args.no_multi:
            sections = tuple(s for s in sections if s != "multi")
        return cls(
            quick=quick,
            check=not args.no_check,
            postgres_url=postgres,
            sections=sections,
            overhead_samples=pick(args.overhead_samples, 300, 60),
            concurrency=pick(args.concurrency, 1000, 200),
            bursts=pick(args.bursts, 3, 1),
            pin_delay=args.pin_delay,
            throughput_seconds=pick(args.throughput_seconds, 10.0, 3.0),
            read_seconds=pick(args.read_seconds, 5.0, 2.0),
            callback_seconds=pick(args.callback_seconds, 5.0, 2.0),
            workers=args.workers,
            idempotency_keys=pick(None, 50, 10),
            duplicates=4,
            unknown_payments=pick(None, 20, 5),
            host_settings=tuple(args.set),
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/benchmark.py",
        description="Measure the payments module in a host app beside the floor of the machine,"
        " of FastAPI and of the HTTP client.",
    )
    parser.add_argument("--quick", action="store_true", help="smaller numbers, for a smoke run")
    parser.add_argument(
        "--postgres",
        metavar="URL",
        default=None,
        help=f"admin URL of a PostgreSQL server (default ${POSTGRES_VARIABLE}); fresh"
        " databases are created on it and dropped afterwards",
    )
    parser.add_argument("--no-postgres", action="store_true", help="skip PostgreSQL")
    parser.add_argument(
        "--only",
        metavar="LIST",
        default=None,
        help=f"comma-separated subset of: {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument("--no-demo", action="store_true", help="skip the demo gateway")
    parser.add_argument("--no-multi", action="store_true", help="skip the several-process runs")
    parser.add_argument("--no-check", action="store_true", help="exit 0 even if targets are missed")
    parser.add_argument("--overhead-samples", type=int, default=None, help="sequential pairs")
    parser.add_argument("--concurrency", type=int, default=None, help="customers paying at once")
    parser.add_argument(
        "--bursts",
        type=int,
        default=None,
        help="bursts per configuration (default 3, --quick 1); the median is the figure",
    )
    parser.add_argument("--pin-delay", type=float, default=2.0, help="PIN delay (s) of the burst")
    parser.add_argument("--throughput-seconds", type=float, default=None)
    parser.add_argument("--read-seconds", type=float, default=None)
    parser.add_argument("--callback-seconds", type=float, default=None)
    parser.add_argument(
        "--workers", type=int, default=32, help="concurrent requests in the throughput phases"
    )
    parser.add_argument(
        "--set",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="add a setting to the host app's .env (repeatable), to measure what it changes",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="record each host server with py-spy (if installed) into DIR (slows it down)",
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
        self, name: str, args: list[str], env: dict[str, str], cwd: Path, logdir: Path
    ) -> subprocess.Popen[bytes]:
        output = (logdir / f"{name}.log").open("wb")
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
            process.send_signal(signal.SIGINT)  # uvicorn (and py-spy) shut down gracefully
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if process in self._running:
            self._running.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self._running)):
            self.stop(process)


def clean_env() -> dict[str, str]:
    """The parent's environment without any MPESA_*/PAYMENT_* variable, and this checkout first
    on the import path (for ``python -m payments`` and the pass-through app)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPESA_", "PAYMENT_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


async def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
            try:
                async with session.get(url) as response:
                    if response.status in (200, 405):
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s")


# -- /proc sampling -----------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (uvicorn's workers, a py-spy's target)."""
    found = [pid]
    for parent in found:
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                found += [int(child) for child in (task / "children").read_text().split()]
    return found


def proc_status_kb(pid: int, field_name: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def sqlite_connections(pids: Sequence[int], database: Path) -> int:
    """Open SQLite connections of the processes: each holds one descriptor on the file."""
    target = str(database.resolve())
    count = 0
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        with contextlib.suppress(OSError):
            for name in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(f"{fd_dir}/{name}") == target:
                        count += 1
    return count


class Sampler:
    """Samples the server's database connections every ``interval`` seconds for the whole run,
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


def payment_body(phone: str | None = None) -> dict[str, Any]:
    return {"phone_number": phone or next_phone(), "amount": 10, "account_reference": "BENCH"}


def raw_c2b_fields() -> dict[str, str]:
    return {
        "input_TransactionReference": "BENCH",
        "input_CustomerMSISDN": next_phone(),
        "input_Amount": "10.00",
        "input_ThirdPartyReference": "R" + uuid.uuid4().hex[:19].upper(),
        "input_ServiceProviderCode": SIMULATOR_SERVICE_PROVIDER_CODE,
    }


def raw_headers() -> dict[str, str]:
    token = derive_bearer_token(SIMULATOR_API_KEY, SIMULATOR_PUBLIC_KEY)
    return {"Authorization": f"Bearer {token}", "Origin": ORIGIN}


@dataclass
class Server:
    """One server under test (one process, or several behind ``bases``)."""

    label: str
    bases: list[str]
    processes: list[subprocess.Popen[bytes]]
    #: Whether it is the module (status reads, callbacks, the summary) or the pass-through.
    module: bool = True
    connections: Callable[[], Awaitable[int]] | None = None
    pool_size: int | None = None
    _next: Iterator[int] = field(default_factory=lambda: itertools.cycle(range(1 << 30)))

    @property
    def base(self) -> str:
        return self.bases[next(self._next) % len(self.bases)]

    def pids(self) -> list[int]:
        return [pid for process in self.processes for pid in descendants(process.pid)]

    def cpu_seconds(self) -> float:
        return sum(proc_cpu_seconds(pid) for pid in self.pids())

    def peak_rss_mb(self) -> float:
        """The largest peak RSS (VmHWM) of one process of the server."""
        return max(proc_status_kb(pid, "VmHWM") for pid in self.pids()) / 1024

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": ADMIN_KEY}

    def initiate_headers(self, key: str | None = None) -> dict[str, str]:
        return {"X-API-Key": ADMIN_KEY, "Idempotency-Key": key or uuid.uuid4().hex}

    def paid(self, status: int, answer: Any) -> bool:
        if not isinstance(answer, dict):
            return False
        if self.module:
            return status == 200 and answer.get("status") == "completed"
        return 200 <= status < 300 and answer.get("output_ResponseCode") == "INS-0"


@dataclass
class Result:
    label: str
    figures: dict[str, str] = field(default_factory=dict)
    numbers: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, name: str, value: str) -> None:
        self.figures[name] = value


def unlimited_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=300),
    )


async def set_pin_delay(simulator: str, seconds: float) -> None:
    async with (
        unlimited_session() as session,
        session.put(
            simulator + "/simulator/config", json={"pin_delay_seconds": seconds}
        ) as response,
    ):
        response.raise_for_status()


async def simulator_calls(simulator: str) -> dict[str, int]:
    async with (
        unlimited_session() as session,
        session.get(simulator + "/simulator/stats") as response,
    ):
        response.raise_for_status()
        return dict((await response.json())["calls"])


async def summary_counts(server: Server) -> tuple[int, int]:
    """(completed C2B rows, rows still unsettled) according to the module's own summary."""
    async with (
        unlimited_session() as session,
        session.get(server.bases[0] + "/api/payments/summary", headers=server.headers) as response,
    ):
        response.raise_for_status()
        summary = await response.json()
    by_status = summary["by_status"]
    completed = int(by_status.get("completed", {}).get("count", 0))
    unsettled = sum(
        int(by_status.get(status, {}).get("count", 0))
        for status in ("pending", "processing", "unknown")
    )
    return completed, unsettled


# -- phases -------------------------------------------------------------------------------------


async def phase_bare(simulator: str, settings: Settings) -> Result:
    """The machine's floor: the burst sent straight to the simulator by a bare aiohttp client."""
    result = Result("Bare client → simulator")
    n, delay = settings.concurrency, settings.pin_delay
    headers = raw_headers()
    walls: list[float] = []
    failed = 0
    await set_pin_delay(simulator, delay)

    async def pay(session: aiohttp.ClientSession, gate: asyncio.Event) -> bool:
        fields = raw_c2b_fields()
        await gate.wait()
        try:
            async with session.post(simulator + C2B_PATH, json=fields, headers=headers) as response:
                answer = await response.json(content_type=None)
                return answer.get("output_ResponseCode") == "INS-0"
        except (aiohttp.ClientError, TimeoutError):
            return False

    try:
        for _ in range(settings.bursts):
            wall, paid = await one_burst(n, pay)
            walls.append(wall)
            failed += n - paid
    finally:
        await set_pin_delay(simulator, 0.0)
    wall = statistics.median(walls)
    result.numbers["wall"] = wall
    result.add("Burst: customers paying at once", f"{n} (PIN delay {delay:g} s)")
    result.add("**Burst wall time**", f"**{wall:.2f} s**{_of_bursts(walls, 's')}")
    result.add("Burst: payments lost or failed", str(failed))
    if failed:
        result.failures.append(f"bare client: {failed} calls failed")
    return result


def _of_bursts(values: list[float], unit: str) -> str:
    """`` (median of 3: 4.30, 5.02, 4.10 s)`` (in the order they ran) when there was more
    than one burst."""
    if len(values) < 2:
        return ""
    shown = ", ".join(f"{value:.2f}" for value in values)
    return f" (median of {len(values)}: {shown} {unit})"


async def one_burst(
    n: int,
    pay: Callable[[aiohttp.ClientSession, asyncio.Event], Awaitable[bool]],
    at_start: Callable[[], None] = lambda: None,
    at_end: Callable[[], None] = lambda: None,
) -> tuple[float, int]:
    """``n`` customers released at once (``pay`` waits for the gate), on new connections: kept
    ones could be closed by the server's keep-alive timeout just as a request goes out on them.
    The wall time, and how many paid; ``at_start`` runs just before the gate opens, ``at_end``
    once every customer has an answer (before the connections close)."""
    async with unlimited_session() as session:
        gate = asyncio.Event()
        tasks = [asyncio.create_task(pay(session, gate)) for _ in range(n)]
        await asyncio.sleep(0.05)  # every task is waiting at the gate
        at_start()
        started = time.perf_counter()
        gate.set()
        paid = sum(await asyncio.gather(*tasks))
        wall = time.perf_counter() - started
        at_end()
        return wall, paid


async def phase_overhead(server: Server, simulator: str, samples: int, result: Result) -> None:
    """Sequential payments through the server and raw provider calls, interleaved, over one
    httpx client: the difference of the medians is what the server adds."""
    headers = raw_headers()
    raw: list[float] = []
    through: list[float] = []
    errors = 0
    async with httpx.AsyncClient(timeout=30) as client:

        async def raw_call() -> float:
            started = time.perf_counter()
            response = await client.post(
                simulator + C2B_PATH, json=raw_c2b_fields(), headers=headers
            )
            elapsed = time.perf_counter() - started
            if response.status_code != 201 or response.json().get("output_ResponseCode") != "INS-0":
                raise RuntimeError(f"raw C2B call failed: {response.status_code} {response.text}")
            return elapsed

        async def server_call() -> float:
            nonlocal errors
            started = time.perf_counter()
            response = await client.post(
                server.base + "/api/payments/initiate",
                json=payment_body(),
                headers=server.initiate_headers(),
            )
            elapsed = time.perf_counter() - started
            if not server.paid(response.status_code, response.json()):
                errors += 1
            return elapsed

        for _ in range(max(10, samples // 10)):  # warm-up, not measured
            await raw_call()
            await server_call()
        errors = 0
        cpu_before = server.cpu_seconds()
        for i in range(samples):
            if i % 2:
                raw.append(await raw_call())
                through.append(await server_call())
            else:
                through.append(await server_call())
                raw.append(await raw_call())
        cpu = server.cpu_seconds() - cpu_before
    ms = 1000.0
    raw_median, raw_p99 = statistics.median(raw) * ms, percentile(raw, 0.99) * ms
    median, p99 = statistics.median(through) * ms, percentile(through, 0.99) * ms
    added_median, added_p99 = median - raw_median, p99 - raw_p99
    result.numbers["added_median"] = added_median
    result.numbers["sequential_cpu_ms"] = cpu / samples * ms
    result.add("Sequential: samples (pairs)", f"{samples}")
    result.add("Provider alone (raw call): median / p99", f"{raw_median:.2f} / {raw_p99:.2f} ms")
    result.add("Through the server: median / p99", f"{median:.2f} / {p99:.2f} ms")
    result.add(
        "**Added over the provider's time: median / p99**",
        f"**{added_median:.2f} / {added_p99:.2f} ms**",
    )
    result.add("Server CPU per sequential payment", f"{cpu / samples * ms:.2f} ms")
    result.add("Sequential: failed payments", str(errors))
    if errors:
        result.failures.append(f"sequential: {errors} payments did not complete")


async def phase_burst(
    server: Server, simulator: str, settings: Settings, sampler: Sampler | None, result: Result
) -> None:
    """``concurrency`` customers pay at once while the simulator holds each C2B for the PIN."""
    n, delay = settings.concurrency, settings.pin_delay
    completed_before = (await summary_counts(server))[0] if server.module else 0
    await set_pin_delay(simulator, delay)
    latencies: list[float] = []
    failures: list[str] = []
    walls: list[float] = []
    cpus: list[float] = []
    succeeded = 0

    async def pay(session: aiohttp.ClientSession, gate: asyncio.Event) -> bool:
        body, headers, base = payment_body(), server.initiate_headers(), server.base
        await gate.wait()
        started = time.perf_counter()
        try:
            async with session.post(
                base + "/api/payments/initiate", json=body, headers=headers
            ) as response:
                text = await response.text()
                try:
                    answer = json.loads(text)
                except ValueError:
                    answer = text
                ok = server.paid(response.status, answer)
                if not ok:
                    failures.append(f"{response.status} {str(answer)[:200]}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            ok = False
        latencies.append(time.perf_counter() - started)
        return ok

    cpu_before = 0.0

    def at_start() -> None:
        nonlocal cpu_before
        if sampler is not None and not walls:
            sampler.open_window()  # the peak over every burst
        cpu_before = server.cpu_seconds()

    def at_end() -> None:
        cpus.append(server.cpu_seconds() - cpu_before)

    try:
        for _ in range(settings.bursts):
            wall, paid = await one_burst(n, pay, at_start, at_end)
            walls.append(wall)
            succeeded += paid
        peak_rss_mb = server.peak_rss_mb()
    finally:
        await set_pin_delay(simulator, 0.0)
    payments = n * len(walls)
    lost = payments - succeeded
    unsettled = 0
    if server.module:
        completed_after, unsettled = await summary_counts(server)
        lost += max(0, succeeded - (completed_after - completed_before))
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    cpu_ms = cpu / n * 1000
    result.numbers.update(burst_wall=wall, burst_cpu_ms=cpu_ms, burst_lost=lost, rss=peak_rss_mb)
    result.add("Burst: customers paying at once", f"{n} (PIN delay {delay:g} s)")
    result.add("**Burst wall time**", f"**{wall:.2f} s**{_of_bursts(walls, 's')}")
    result.add(
        "Burst latency per payment: median / p99 / max",
        f"{statistics.median(latencies):.2f} / {percentile(latencies, 0.99):.2f}"
        f" / {max(latencies):.2f} s",
    )
    per_payment = [value / n * 1000 for value in cpus]
    result.add(
        "**Burst: server CPU per payment**",
        f"**{cpu_ms:.2f} ms**{_of_bursts(per_payment, 'ms')}"
        if len(cpus) > 1
        else f"**{cpu_ms:.2f} ms** ({cpu:.2f} s in all)",
    )
    result.add("**Burst: payments lost or failed**", f"**{lost}**")
    if server.module:
        result.add("Burst: rows left unsettled", str(unsettled))
    result.add("**Peak RSS (VmHWM)**", f"**{peak_rss_mb:.0f} MB**")
    if sampler is not None:
        result.add(
            "**Burst: peak DB connections (pool size)**",
            f"**{sampler.window_peak} ({server.pool_size})**",
        )
    if failures:
        log(f"{result.label}: burst failures ({len(failures)}), first: {failures[:3]}")
    if lost:
        result.failures.append(f"burst: {lost} payments lost or failed")
    if unsettled:
        result.failures.append(f"burst: {unsettled} payments left unsettled")
    if peak_rss_mb >= TARGET_PEAK_RSS_MB:
        result.failures.append(f"burst: peak RSS {peak_rss_mb:.0f} MB ≥ {TARGET_PEAK_RSS_MB:g}")


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


async def phase_throughput(
    server: Server, settings: Settings, result: Result, *, c2b_only: bool = False
) -> None:
    paid: list[dict[str, Any]] = []
    async with unlimited_session() as session:

        async def pay() -> str | None:
            async with session.post(
                server.base + "/api/payments/initiate",
                json=payment_body(),
                headers=server.initiate_headers(),
            ) as response:
                answer = await response.json(content_type=None)
                if not server.paid(response.status, answer):
                    return f"{response.status} {str(answer)[:200]}"
                paid.append(answer)
                return None

        async def read() -> str | None:
            transaction_id = random.choice(paid)["transaction_id"]
            async with session.get(
                f"{server.base}/api/payments/status/{transaction_id}", headers=server.headers
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
                server.base + "/api/payments/callback/c2b",
                json=body,
                headers={"X-Callback-Token": CALLBACK_TOKEN},
            ) as response:
                await response.read()
                return None if response.status == 200 else f"{response.status}"

        phases: list[tuple[str, str, float, Callable[[], Awaitable[str | None]]]] = [
            ("c2b", "C2B payments", settings.throughput_seconds, pay)
        ]
        if server.module and not c2b_only:
            phases += [
                ("reads", "Status reads", settings.read_seconds, read),
                ("callbacks", "Callbacks ingested", settings.callback_seconds, callback),
            ]
        for key, name, seconds, request in phases:
            log(f"{result.label}: {name} for {seconds:g} s, {settings.workers} at a time")
            cpu_before = server.cpu_seconds()
            counted = await run_for(seconds, settings.workers, request)
            cpu = server.cpu_seconds() - cpu_before
            result.numbers[f"{key}_rate"] = counted.rate
            per = cpu / counted.ok * 1000 if counted.ok else float("nan")
            result.numbers[f"{key}_cpu_ms"] = per
            result.add(
                f"**{name} per second** ({seconds:g} s, {settings.workers} at a time)",
                f"**{counted.rate:.0f}** (server CPU {cpu / counted.seconds * 100:.0f} %,"
                f" {per:.2f} ms each; errors {counted.errors})",
            )
            if counted.errors:
                log(f"{name}: {counted.errors} errors, first: {counted.first_error}")
                result.failures.append(f"throughput: {counted.errors} {name.lower()} failed")


# -- servers ------------------------------------------------------------------------------------

HOST_MAIN = """\
from fastapi import FastAPI

from app.payments import payment_router

app = FastAPI()
app.include_router(payment_router, prefix="/api")
"""

PASSTHROUGH_APP = '''\
"""The floor: FastAPI plus the module's HTTP client, forwarding one C2B request to M-Pesa.
No database, no validation, no logging."""

import json
import os
import uuid

import httpx
from fastapi import FastAPI, Request, Response

from payments.mpesa.auth import derive_bearer_token
from payments.mpesa.transport import AiohttpTransport
from payments.simulator.keys import SIMULATOR_API_KEY, SIMULATOR_PUBLIC_KEY

URL = httpx.URL(os.environ["PASSTHROUGH_C2B_URL"])
HEADERS = {
    "Content-Type": "application/json",
    "Origin": "developer.mpesa.vm.co.mz",
    "Authorization": "Bearer " + derive_bearer_token(SIMULATOR_API_KEY, SIMULATOR_PUBLIC_KEY),
}
TIMEOUT = httpx.Timeout(120, connect=10).as_dict()
CODE = os.environ["PASSTHROUGH_SHORTCODE"]
transport = AiohttpTransport()
app = FastAPI()


@app.post("/api/payments/initiate")
async def initiate(request: Request) -> Response:
    body = json.loads(await request.body())
    fields = {
        "input_TransactionReference": str(body.get("account_reference") or "REF"),
        "input_CustomerMSISDN": str(body["phone_number"]),
        "input_Amount": str(body["amount"]),
        "input_ThirdPartyReference": uuid.uuid4().hex[:20],
        "input_ServiceProviderCode": CODE,
    }
    answer = await transport.handle_async_request(
        httpx.Request("POST", URL, json=fields, headers=HEADERS, extensions={"timeout": TIMEOUT})
    )
    await answer.aread()
    return Response(answer.content, status_code=answer.status_code, media_type="application/json")
'''


@dataclass
class Context:
    settings: Settings
    processes: Processes
    workdir: Path
    simulator: str
    profile_dir: Path | None


def uvicorn_args(app: str, port: str, extra: Sequence[str] = ()) -> list[str]:
    """``uvicorn APP`` with its defaults (uvloop and httptools when installed, as they are with
    the module; INFO log level, so access lines too), as a host starts it."""
    return [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", port, *extra]


def profiled(context: Context, name: str, args: list[str]) -> list[str]:
    if context.profile_dir is None:
        return args
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    output = context.profile_dir / f"{name}.txt"
    return [py_spy, "record", "--gil", "-r", "250", "-f", "raw", "-o", str(output), "--", *args]


def build_host(context: Context, name: str, database_url: str) -> Path:
    """A host project as the README tells users to build one (see the module docstring)."""
    root = context.workdir / name
    app = root / "app"
    app.mkdir(parents=True)
    shutil.copytree(PACKAGE, app / "payments", ignore=shutil.ignore_patterns("__pycache__"))
    (app / "__init__.py").write_text("")
    (app / "main.py").write_text(HOST_MAIN)
    (root / ".env").write_text(
        "\n".join(
            [
                "MPESA_ENVIRONMENT=simulator",
                f"MPESA_BASE_URL={context.simulator}",
                f"MPESA_CALLBACK_TOKEN={CALLBACK_TOKEN}",
                f"PAYMENT_ADMIN_API_KEY={ADMIN_KEY}",
                f"PAYMENT_DATABASE_URL={database_url}",
                *context.settings.host_settings,
                "",
            ]
        )
    )
    migrate = subprocess.run(
        [
            sys.executable,
            "-m",
            "alembic",
            "-c",
            str(REPO / "alembic.ini"),
            "-x",
            f"url={database_url}",
            "upgrade",
            "heads",
        ],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
    )
    if migrate.returncode != 0:
        raise RuntimeError(f"migration failed: {migrate.stdout}{migrate.stderr}")
    return root


def host_env() -> dict[str, str]:
    """A host's own environment: no PYTHONPATH pointing at the checkout (it imports
    ``app.payments`` from its own folder), no MPESA_/PAYMENT_ variables (its ``.env`` has them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPESA_", "PAYMENT_"))}
    env.pop("PYTHONPATH", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextlib.asynccontextmanager
async def postgres_database(admin_url: str) -> Any:
    """A fresh database on the server (dropped afterwards): (URL, connection counter)."""
    import asyncpg  # dev dependency; only needed for PostgreSQL
    from sqlalchemy.engine import make_url

    url = make_url(admin_url.replace("postgres://", "postgresql://", 1))
    url = url.set(drivername="postgresql")
    name = f"payments_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(url.render_as_string(hide_password=False))
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


@contextlib.asynccontextmanager
async def database_for(context: Context, kind: str, name: str) -> Any:
    """(URL, a connection counter for a server's pids) of a fresh database of ``kind``."""
    if kind == "sqlite":
        path = context.workdir / f"{name}.db"

        def counter(server: Server) -> Callable[[], Awaitable[int]]:
            async def count() -> int:
                return await asyncio.to_thread(sqlite_connections, server.pids(), path)

            return count

        yield f"sqlite:///{path}", counter
        return
    assert context.settings.postgres_url is not None
    async with postgres_database(context.settings.postgres_url) as (url, connections):
        yield url, lambda _server: connections


@contextlib.asynccontextmanager
async def running(
    context: Context,
    label: str,
    commands: list[tuple[list[str], dict[str, str], Path]],
    *,
    module: bool = True,
    ready_path: str = "/api/payments/health",
) -> Any:
    """Start one server (one or several processes, each ``(args, env, cwd)`` with a ``{port}``
    placeholder), wait until each answers, stop them afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    bases: list[str] = []
    try:
        for index, (args, env, cwd) in enumerate(commands):
            port = free_port()
            name = f"{label}-{index}".lower().replace(" ", "-").replace(",", "")
            args = [a.replace("{port}", str(port)) for a in args]
            log(f"{label}: starting {shlex.join(args[args.index('-m') + 1 :][:3])}… on {port}")
            started.append(
                context.processes.start(
                    name, profiled(context, name, args), env, cwd, context.workdir
                )
            )
            bases.append(f"http://127.0.0.1:{port}")
            await wait_ready(bases[-1] + ready_path, started[-1])
        yield Server(label, bases, started, module=module)
        for process in started:
            if process.poll() is not None:
                raise RuntimeError(f"{label}: a server process exited with {process.returncode}")
    finally:
        for process in started:
            context.processes.stop(process)


async def measure(
    server: Server, context: Context, result: Result, *, c2b_only: bool = False
) -> None:
    settings = context.settings
    sampler = Sampler(server.connections) if server.connections is not None else None
    if sampler is not None:
        sampler.start()
    log(f"{result.label}: {settings.overhead_samples} sequential pairs")
    await phase_overhead(server, context.simulator, settings.overhead_samples, result)
    log(f"{result.label}: {settings.bursts} burst(s) of {settings.concurrency}")
    await phase_burst(server, context.simulator, settings, sampler, result)
    await phase_throughput(server, settings, result, c2b_only=c2b_only)
    if sampler is not None:
        await sampler.stop()
        result.add(
            "**Peak DB connections, whole run (pool size)**",
            f"**{sampler.peak} ({server.pool_size})** [{sampler.samples} samples]",
        )
        if server.pool_size is not None and sampler.peak > server.pool_size:
            result.failures.append(
                f"{sampler.peak} DB connections open at once > pool size {server.pool_size}"
            )


async def bench_passthrough(context: Context) -> Result:
    result = Result("Pass-through (FastAPI + HTTP client)")
    directory = context.workdir / "passthrough"
    directory.mkdir()
    (directory / "passthrough_app.py").write_text(PASSTHROUGH_APP)
    env = clean_env() | {
        "PASSTHROUGH_C2B_URL": context.simulator + C2B_PATH,
        "PASSTHROUGH_SHORTCODE": SIMULATOR_SERVICE_PROVIDER_CODE,
    }
    # "No logging": not even uvicorn's access lines.
    quiet = ["--no-access-log", "--log-level", "warning"]
    command = (uvicorn_args("passthrough_app:app", "{port}", quiet), env, directory)
    async with running(
        context, "passthrough", [command], module=False, ready_path="/api/payments/initiate"
    ) as server:
        await measure(server, context, result, c2b_only=True)
    return result


async def bench_host(context: Context, kind: str) -> Result:
    label = "Host app, SQLite" if kind == "sqlite" else "Host app, PostgreSQL"
    result = Result(label)
    async with database_for(context, kind, f"host-{kind}") as (url, counter):
        root = build_host(context, f"host-{kind}", url)
        command = (uvicorn_args("app.main:app", "{port}"), host_env(), root)
        async with running(context, f"host-{kind}", [command]) as server:
            server.connections, server.pool_size = counter(server), POOL_SIZE
            await measure(server, context, result)
    return result


async def bench_demo(context: Context) -> Result:
    result = Result("Demo gateway (serve), SQLite")
    async with database_for(context, "sqlite", "demo") as (url, counter):
        env = clean_env() | {
            "MPESA_BASE_URL": context.simulator,
            "MPESA_CALLBACK_TOKEN": CALLBACK_TOKEN,
            "PAYMENT_DATABASE_URL": url,
            "PAYMENT_ADMIN_API_KEY": ADMIN_KEY,
            "PAYMENT_RECONCILE_IN_APP": "false",
            "PAYMENT_LOG_DIR": str(context.workdir / "demo-logs"),
        }
        # serve answers 503 beyond --limit-concurrency (1000 by default): above the burst.
        limit = str(context.settings.concurrency + 200)
        args = [sys.executable, "-m", "payments", "serve", "--port", "{port}"]
        args += ["--limit-concurrency", limit]
        async with running(context, "demo", [(args, env, context.workdir)]) as server:
            server.connections, server.pool_size = counter(server), POOL_SIZE
            await measure(server, context, result)
    return result


# -- several processes --------------------------------------------------------------------------


async def check_idempotency(server: Server, context: Context, result: Result) -> None:
    """Every key sent ``duplicates`` times at once (spread over the processes) while the PIN
    delay keeps the first call in flight: one provider call and one payment per key."""
    settings = context.settings
    keys = [f"bench-{uuid.uuid4().hex}" for _ in range(settings.idempotency_keys)]
    bodies = {key: payment_body() for key in keys}
    calls_before = (await simulator_calls(context.simulator))["c2b"]
    await set_pin_delay(context.simulator, 0.3)
    answers: dict[str, list[tuple[int, Any]]] = {key: [] for key in keys}
    try:
        async with unlimited_session() as session:

            async def send(key: str, base: str) -> None:
                async with session.post(
                    base + "/api/payments/initiate",
                    json=bodies[key],
                    headers=server.initiate_headers(key),
                ) as response:
                    answers[key].append((response.status, await response.json(content_type=None)))

            requests = [
                send(key, server.bases[copy % len(server.bases)])
                for key in keys
                for copy in range(settings.duplicates)
            ]
            random.shuffle(requests)
            await asyncio.gather(*requests)
    finally:
        await set_pin_delay(context.simulator, 0.0)
    await asyncio.sleep(1.0)  # the first calls of keys answered 202 "processing" settle
    calls = (await simulator_calls(context.simulator))["c2b"] - calls_before
    split = [
        key
        for key, got in answers.items()
        if len({answer.get("transaction_id") for _, answer in got}) != 1
    ]
    refused = sum(1 for got in answers.values() for status, _ in got if status not in (200, 202))
    sent = len(keys) * settings.duplicates
    verdict = "ok" if calls == len(keys) and not split and not refused else "WRONG"
    result.add(
        "**Idempotency** (keys × copies at once → provider calls, payments per key)",
        f"**{verdict}**: {len(keys)} × {settings.duplicates} = {sent} requests → {calls} calls;"
        f" {len(split)} keys with more than one payment; {refused} errors",
    )
    if verdict != "ok":
        result.failures.append(
            f"idempotency: {calls} provider calls for {len(keys)} keys, {len(split)} split,"
            f" {refused} errors"
        )


async def check_reconciler(
    server: Server, context: Context, result: Result, root: Path, reconcilers: int
) -> None:
    """Unknown payments (the simulator drops the connection after recording them) settled by
    ``reconcilers`` ``python -m app.payments reconcile`` processes running at once."""
    n = context.settings.unknown_payments
    async with unlimited_session() as session:

        async def unknown() -> str | None:
            async with session.post(
                server.base + "/api/payments/initiate",
                json=payment_body("258842000001"),
                headers=server.initiate_headers(),
            ) as response:
                answer = await response.json(content_type=None)
                ok = response.status == 202 and answer.get("status") == "unknown"
                return str(answer["transaction_id"]) if ok else None

        ids = await asyncio.gather(*(unknown() for _ in range(n)))
    if None in ids:
        result.failures.append("reconciler: a dropped connection did not leave `unknown`")
        result.add("**Reconciler**", "**WRONG**: setup did not give unknown payments")
        return
    queries_before = (await simulator_calls(context.simulator))["query_status"]
    args = [sys.executable, "-m", "app.payments", "reconcile", "--min-age", "0"]
    runs = [
        await asyncio.create_subprocess_exec(
            *args,
            cwd=root,
            env=host_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,  # its log lines; the report is on stdout
        )
        for _ in range(reconcilers)
    ]
    outputs = await asyncio.gather(*(run.communicate() for run in runs))
    codes = [run.returncode for run in runs]
    queries = (await simulator_calls(context.simulator))["query_status"] - queries_before
    statuses: list[str] = []
    async with unlimited_session() as session:
        for transaction_id in ids:
            async with session.get(
                f"{server.base}/api/payments/status/{transaction_id}", headers=server.headers
            ) as response:
                statuses.append(str((await response.json())["status"]))
    settled = statuses.count("completed")
    reports = "; ".join(
        line
        for out, _ in outputs
        for line in out.decode(errors="replace").splitlines()
        if line.startswith("reconciliation:")
    )
    ok = settled == n and queries == n and codes == [0] * reconcilers
    result.add(
        "**Reconciler** (processes at once → unknown payments settled, status queries)",
        f"**{'ok' if ok else 'WRONG'}**: {reconcilers} at once → {settled}/{n} completed,"
        f" {queries} status queries [{reports}]",
    )
    if not ok:
        result.failures.append(
            f"reconciler: {settled}/{n} settled with {queries} queries, exit codes {codes}"
        )


async def bench_multi(context: Context, kind: str, layout: str) -> Result:
    """``layout``: "workers" (uvicorn --workers 2) or "processes" (two uvicorns, one database)."""
    what = "uvicorn --workers 2" if layout == "workers" else "2 processes"
    label = f"{what}, {'SQLite' if kind == 'sqlite' else 'PostgreSQL'}"
    result = Result(label)
    name = f"multi-{layout}-{kind}"
    async with database_for(context, kind, name) as (url, counter):
        root = build_host(context, name, url)
        if layout == "workers":
            args = uvicorn_args("app.main:app", "{port}", ["--workers", "2"])
            commands = [(args, host_env(), root)]
        else:
            commands = [(uvicorn_args("app.main:app", "{port}"), host_env(), root)] * 2
        async with running(context, name, commands) as server:
            server.connections, server.pool_size = counter(server), POOL_SIZE * 2
            await asyncio.sleep(0.5)  # every worker is up
            await check_idempotency(server, context, result)
            # SQLite: one reconciler (README: "on SQLite run one"); PostgreSQL: two at once.
            await check_reconciler(server, context, result, root, 1 if kind == "sqlite" else 2)
            await phase_throughput(server, context.settings, result, c2b_only=True)
    return result


# -- report -------------------------------------------------------------------------------------


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def table(results: list[Result]) -> list[str]:
    lines = [
        "| | " + " | ".join(r.label for r in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    names: list[str] = []
    for result in results:
        names += [name for name in result.figures if name not in names]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(r.figures.get(name, "—") for r in results) + " |")
    verdicts = ["met" if not r.failures else "MISSED: " + "; ".join(r.failures) for r in results]
    lines.append(
        "| Other targets (none failed or lost, RSS, connections, correctness) | "
        + " | ".join(verdicts)
        + " |"
    )
    return lines


def ratios(results: dict[str, Result]) -> tuple[list[str], list[str]]:
    """The issue's two ratios for each host configuration (and the demo, for comparison)."""
    lines = [
        "| | CPU per payment, burst (ours / pass-through) | Burst wall (ours / bare client) |"
        " CPU per payment, C2B throughput (ours / pass-through) | Added median | Targets |",
        "|---|---|---|---|---|---|",
    ]
    failures: list[str] = []
    floor, bare = results.get("passthrough"), results.get("bare")
    for key in ("host-sqlite", "host-postgres", "demo"):
        ours = results.get(key)
        if ours is None or "burst_cpu_ms" not in ours.numbers:
            continue
        checked = key != "demo"
        missed: list[str] = []
        cell, cpu = _ratio_cell(ours, "burst_cpu_ms", floor, "burst_cpu_ms", "ms")
        cells = [cell]
        if checked and cpu is not None and cpu > TARGET_CPU_RATIO:
            missed.append(f"CPU {cpu:.2f}× the pass-through's")
        cell, wall = _ratio_cell(ours, "burst_wall", bare, "wall", "s")
        cells.append(cell)
        if checked and wall is not None and wall > TARGET_WALL_RATIO:
            missed.append(f"burst wall {wall:.2f}× the bare client's")
        cells.append(_ratio_cell(ours, "c2b_cpu_ms", floor, "c2b_cpu_ms", "ms", bold=False)[0])
        added = ours.numbers.get("added_median")
        cells.append("—" if added is None else f"{added:.2f} ms")
        if checked and added is not None and added > TARGET_OVERHEAD_MEDIAN_MS:
            missed.append(f"added median {added:.2f} ms")
        cells.append(
            "for comparison"
            if not checked
            else ("MISSED: " + "; ".join(missed) if missed else "met")
        )
        failures += [f"{ours.label}: {miss}" for miss in missed]
        lines.append(f"| {ours.label} | " + " | ".join(cells) + " |")
    return lines, failures


def _ratio_cell(
    ours: Result, key: str, floor: Result | None, floor_key: str, unit: str, *, bold: bool = True
) -> tuple[str, float | None]:
    """``ratio× (ours / floor unit)`` and the ratio, or ``—`` when either figure is missing."""
    if key not in ours.numbers or floor is None or floor_key not in floor.numbers:
        return "—", None
    mine, base = ours.numbers[key], floor.numbers[floor_key]
    ratio = mine / base
    shown = f"**{ratio:.2f}×**" if bold else f"{ratio:.2f}×"
    return f"{shown} ({mine:.2f} / {base:.2f} {unit})", ratio


def throughput_beside(results: dict[str, Result], multi: list[Result]) -> list[str]:
    lines = []
    for result in multi:
        single = results.get("host-sqlite" if "SQLite" in result.label else "host-postgres")
        rate = result.numbers.get("c2b_rate")
        if rate is None:
            continue
        beside = ""
        if single is not None and single.numbers.get("c2b_rate"):
            beside = (
                f" beside {single.numbers['c2b_rate']:.0f} in one process"
                f" ({rate / single.numbers['c2b_rate']:.2f}×)"
            )
        lines.append(f"- {result.label}: {rate:.0f} C2B payments per second{beside}")
    return lines


def report(
    results: dict[str, Result],
    multi: list[Result],
    settings: Settings,
    command: str,
    load_at_start: str,
) -> tuple[str, list[str]]:
    ratio_lines, ratio_failures = ratios(results)
    header = [
        f"- Command: `{command}`",
        f"- Load average (1/5/15 min) at start: {load_at_start}; at end: {load_average()}",
        f"- Machine: {os.cpu_count()} cores, Python {platform.python_version()} (servers,"
        " simulator, load generator and PostgreSQL share the cores)",
        f"- Targets: server CPU per payment ≤ {TARGET_CPU_RATIO:g}× the pass-through's; burst"
        f" wall ≤ {TARGET_WALL_RATIO:g}× the bare client's; added median ≤"
        f" {TARGET_OVERHEAD_MEDIAN_MS:g} ms; no payment failed or lost; peak RSS <"
        f" {TARGET_PEAK_RSS_MB:g} MB; DB connections ≤ pool; several processes correct",
        "",
    ]
    body = [*ratio_lines, ""] if len(ratio_lines) > 2 else []
    if results:
        body += table(list(results.values()))
    if multi:
        body += ["", *table(multi), "", *throughput_beside(results, multi)]
    missed = ratio_failures + [
        f"{r.label}: {f}" for r in [*results.values(), *multi] for f in r.failures
    ]
    return "\n".join(header + body), missed


async def run(settings: Settings, context: Context) -> tuple[dict[str, Result], list[Result]]:
    sim_port = free_port()
    context.simulator = f"http://127.0.0.1:{sim_port}"
    log(f"starting simulator on port {sim_port}")
    sim_process = context.processes.start(
        "simulator",
        [sys.executable, "-m", "payments", "simulator", "--port", str(sim_port)],
        clean_env(),
        context.workdir,
        context.workdir,
    )
    await wait_ready(context.simulator + "/simulator/stats", sim_process)
    results: dict[str, Result] = {}
    multi: list[Result] = []
    sections = settings.sections

    async def section(name: str, label: str, measure: Callable[[], Awaitable[Result]]) -> None:
        """One section; a setup error there is reported as a missed target, the rest still run."""
        try:
            result = await measure()
        except Exception as exc:
            log(f"{label} failed: {type(exc).__name__}: {exc}")
            result = Result(label)
            result.failures.append(f"did not run: {type(exc).__name__}: {str(exc)[:200]}")
        if name.startswith("multi"):
            multi.append(result)
        else:
            results[name] = result

    if "bare" in sections:
        log(f"bare client: {settings.bursts} burst(s) of {settings.concurrency}")
        await section("bare", "Bare client", lambda: phase_bare(context.simulator, settings))
    if "passthrough" in sections:
        await section("passthrough", "Pass-through", lambda: bench_passthrough(context))
    if "host-sqlite" in sections:
        await section("host-sqlite", "Host app, SQLite", lambda: bench_host(context, "sqlite"))
    if "host-postgres" in sections and settings.postgres_url:
        await section(
            "host-postgres", "Host app, PostgreSQL", lambda: bench_host(context, "postgres")
        )
    if "demo" in sections:
        await section("demo", "Demo gateway", lambda: bench_demo(context))
    if "multi" in sections:
        runs = [("sqlite", "workers")]
        if settings.postgres_url:
            runs += [("postgres", "workers"), ("postgres", "processes")]
        for kind, layout in runs:
            await section(
                f"multi-{layout}-{kind}",
                f"{layout}, {kind}",
                functools.partial(bench_multi, context, kind, layout),
            )
    return results, multi


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
    profile_dir = Path(args.profile).resolve() if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    with terminate_as_interrupt(), tempfile.TemporaryDirectory(prefix="payments-bench-") as tmp:
        context = Context(settings, processes, Path(tmp), "", profile_dir)
        try:
            results, multi = asyncio.run(run(settings, context))
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        except Exception as exc:
            log(f"benchmark failed: {type(exc).__name__}: {exc}")
            for path in sorted(Path(tmp).glob("*.log")):
                log(f"--- {path.name} (tail) ---\n{path.read_text(errors='replace')[-3000:]}")
            return 2
        finally:
            processes.stop_all()
    text, missed = report(results, multi, settings, command, load_at_start)
    print(text)
    if missed:
        log("targets missed:\n  " + "\n  ".join(missed))
        if settings.check:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
