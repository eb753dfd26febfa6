"""Benchmark of payment events over real HTTP: commit → webhook received, and what delivery costs.

It starts the M-Pesa simulator (``python -m payments simulator``) and the demo gateway
(``python -m payments serve``, whose in-app dispatcher delivers the webhooks) as subprocesses on
free loopback ports, runs a webhook receiver (aiohttp) in this process, pays through the gateway,
and prints a Markdown table::

    python bench/events.py                 # 1,000 payments, SQLite
    python bench/events.py --postgres postgresql://postgres@127.0.0.1:5432/postgres
    python bench/events.py --payments 100  # a smoke run

Two gateways are measured one after the other, on fresh databases and the same load
(``--concurrency`` payments in flight, no PIN delay): one without webhook endpoints (events are
still written: they are part of the transition) and one delivering every event to the receiver.
For the second, "commit → received" is the time from the event's ``created_at`` (taken in the
transition's transaction, just before its commit) to the receiver reading the request; every
delivery is verified with ``standardwebhooks`` and counted (each event exactly once).

Exit code 1 when a target is missed (``--no-check`` turns the checks off), 2 on a setup error.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import aiohttp
from aiohttp import web
from standardwebhooks import Webhook

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchmark import (  # noqa: E402  (the shared process and port helpers)
    ADMIN_KEY,
    CALLBACK_TOKEN,
    Processes,
    base_env,
    free_port,
    next_phone,
    percentile,
    postgres_database,
    proc_cpu_seconds,
    wait_ready,
)

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
#: Targets on a 2-core machine shared by the load generator, simulator, gateway and receiver.
TARGET_MEDIAN_MS = 500.0
TARGET_P99_MS = 2000.0
#: Payments per second with delivery, as a share of those without (delivery shares the CPU).
TARGET_THROUGHPUT_RATIO = 0.7


@dataclass
class Receiver:
    arrivals: list[tuple[str, float, bytes, dict[str, str]]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.arrivals.append(
            (request.headers["webhook-id"], time.time(), body, dict(request.headers))
        )
        return web.Response(status=204)


@dataclass
class Run:
    label: str
    payments: int
    seconds: float
    latencies_ms: list[float]
    failures: int
    cpu_seconds: float = 0.0  # the gateway's, for the payments and their deliveries

    @property
    def rate(self) -> float:
        return self.payments / self.seconds


async def start_gateway(
    processes: Processes, workdir: Path, name: str, env: dict[str, str]
) -> tuple[str, object]:
    port = free_port()
    args = [sys.executable, "-m", "payments", "serve", "--port", str(port)]
    process = processes.start(name, args, env, workdir)
    base = f"http://127.0.0.1:{port}"
    await wait_ready(base + "/api/payments/health", process)
    return base, process


async def pay_all(base: str, count: int, concurrency: int, label: str) -> Run:
    latencies: list[float] = []
    failures = 0
    queue = iter(range(count))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal failures
            for _ in queue:
                started = time.perf_counter()
                async with session.post(
                    base + "/api/payments/initiate",
                    json={"phone_number": next_phone(), "amount": "10.00"},
                    headers={"X-API-Key": ADMIN_KEY, "Idempotency-Key": uuid.uuid4().hex},
                ) as response:
                    answer = await response.json()
                    if response.status != 200 or answer.get("status") != "completed":
                        failures += 1
                latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return Run(label, count, seconds, latencies, failures)


async def measure(args: argparse.Namespace, workdir: Path, processes: Processes) -> int:
    simulator_port = free_port()
    simulator = processes.start(
        "simulator",
        [sys.executable, "-m", "payments", "simulator", "--port", str(simulator_port)],
        base_env(workdir),
        workdir,
    )
    simulator_url = f"http://127.0.0.1:{simulator_port}"
    await wait_ready(simulator_url + "/simulator/stats", simulator)

    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hook_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"  # type: ignore[union-attr]

    async def database(name: str) -> tuple[str, object | None]:
        if args.postgres:
            context = postgres_database(args.postgres)
            url, _ = await context.__aenter__()
            return url, context
        return f"sqlite:///{workdir}/{name}.db", None

    def gateway_env(url: str, **extra: str) -> dict[str, str]:
        return (
            base_env(workdir)
            | {
                "MPESA_ENVIRONMENT": "simulator",
                "MPESA_BASE_URL": simulator_url,
                "MPESA_CALLBACK_TOKEN": CALLBACK_TOKEN,
                "PAYMENT_DATABASE_URL": url,
                "PAYMENT_ADMIN_API_KEY": ADMIN_KEY,
                "PAYMENT_RECONCILE_IN_APP": "false",
            }
            | extra
        )

    runs: list[Run] = []
    contexts = []
    for label, extra in (
        ("events written, no webhook endpoint", {}),
        (
            "events delivered to one endpoint",
            {"PAYMENT_WEBHOOK_URLS": hook_url, "PAYMENT_WEBHOOK_SECRET": SECRET},
        ),
    ):
        url, context = await database(f"bench-{len(runs)}")
        contexts.append(context)
        base, process = await start_gateway(
            processes, workdir, f"gateway-{len(runs)}", gateway_env(url, **extra)
        )
        await pay_all(base, min(50, args.payments), args.concurrency, "warm-up")
        pid = process.pid  # type: ignore[attr-defined]
        cpu_before = proc_cpu_seconds(pid)
        run = await pay_all(base, args.payments, args.concurrency, label)
        if extra:
            expected = args.payments + min(50, args.payments)
            deadline = time.monotonic() + 60
            while len(receiver.arrivals) < expected and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        run.cpu_seconds = proc_cpu_seconds(pid) - cpu_before
        runs.append(run)
        if extra:
            await asyncio.sleep(1)  # duplicates would arrive now
        processes.stop(process)  # type: ignore[arg-type]

    await runner.cleanup()
    for context in contexts:
        if context is not None:
            await context.__aexit__(None, None, None)  # type: ignore[attr-defined]

    verifier = Webhook(SECRET)
    delays: list[float] = []
    for _, arrived, body, headers in receiver.arrivals:
        event = verifier.verify(body, headers)
        created = datetime.fromisoformat(event["created_at"].replace("Z", "+00:00"))
        delays.append((arrived - created.timestamp()) * 1000)
    counts = Counter(event_id for event_id, *_ in receiver.arrivals)
    plain, delivered = runs

    rows = [
        ("Payments per run (concurrency)", f"{args.payments} ({args.concurrency})"),
        ("Database", "PostgreSQL" if args.postgres else "SQLite"),
    ]
    for run in runs:
        rows += [
            (f"{run.label}: payments/s", f"{run.rate:.1f}"),
            (
                f"{run.label}: payment latency median / p99",
                f"{statistics.median(run.latencies_ms):.1f} / "
                f"{percentile(run.latencies_ms, 0.99):.1f} ms",
            ),
            (f"{run.label}: failed payments", str(run.failures)),
            (
                f"{run.label}: gateway CPU per payment",
                f"{run.cpu_seconds / run.payments * 1000:.2f} ms",
            ),
        ]
    ratio = delivered.rate / plain.rate
    added = statistics.median(delivered.latencies_ms) - statistics.median(plain.latencies_ms)
    rows += [
        ("Throughput with delivery / without", f"{ratio:.2f}"),
        ("Median latency added by delivery", f"{added:+.1f} ms"),
        ("Webhooks received (distinct events)", f"{sum(counts.values())} ({len(counts)})"),
        (
            "**Commit → webhook received, median / p99**",
            f"**{statistics.median(delays):.1f} / {percentile(delays, 0.99):.1f} ms**"
            if delays
            else "none",
        ),
        ("Commit → webhook received, max", f"{max(delays):.1f} ms" if delays else "none"),
    ]
    print("| Figure | Value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")

    missed: list[str] = []
    expected = args.payments + min(50, args.payments)  # with the warm-up's
    if len(counts) != expected or max(counts.values(), default=0) != 1:
        missed.append(f"{expected} events should arrive once each: got {len(counts)} distinct")
    if any(run.failures for run in runs):
        missed.append("some payments did not complete")
    if delays and statistics.median(delays) > TARGET_MEDIAN_MS:
        missed.append(f"median commit → received {statistics.median(delays):.0f} ms")
    if delays and percentile(delays, 0.99) > TARGET_P99_MS:
        missed.append(f"p99 commit → received {percentile(delays, 0.99):.0f} ms")
    if ratio < TARGET_THROUGHPUT_RATIO:
        missed.append(f"throughput with delivery is {ratio:.2f} of without")
    for line in missed:
        print(f"MISSED: {line}")
    return 1 if missed and args.check else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--payments", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--postgres", default=os.environ.get("PAYMENT_BENCH_POSTGRES_URL"))
    parser.add_argument("--no-check", dest="check", action="store_false")
    parser.add_argument("--workdir", help="keep the databases and logs in this folder")
    args = parser.parse_args(argv)
    processes = Processes()
    with tempfile.TemporaryDirectory(prefix="payments-bench-events-") as folder:
        try:
            return asyncio.run(measure(args, Path(args.workdir or folder), processes))
        except RuntimeError as exc:
            print(f"setup error: {exc}", file=sys.stderr)
            return 2
        finally:
            processes.stop_all()


if __name__ == "__main__":
    sys.exit(main())
