"""The data layer at a year of payments (issue 16): every read and the reconciler's claim, timed
at 100,000 and at 1,000,000 payments on PostgreSQL.

    python bench/data_layer.py --postgres postgresql://postgres@127.0.0.1:5432/postgres
    python bench/data_layer.py --quick        # 10,000 then 100,000 payments (a smoke run)

The admin URL comes from ``--postgres`` or ``PAYMENT_BENCH_POSTGRES_URL``. The script creates its
own database (``payments_bench_data_layer`` unless ``--database`` says otherwise), migrates it
with the module's revisions, and drops it at the end (``--keep`` keeps it).

Seeding is ``INSERT … SELECT … FROM generate_series`` (minutes, not hours): the newest tenth of
the payments first, spread over the last 36.5 days (the shop after its first five weeks), timed;
then the nine tenths before them, back to a year ago (the same shop a year on: the recent
payments, and so page 1 and today's summary, are the same rows in both rounds; only the history
grows). Each payment gets the audit rows a real C2B payment writes (initiated, api_request,
api_response, completed: the bodies copied from a simulator run), a fifth a stored callback; 1.3 %
are ``unknown`` (flagged when older than an hour, re-polled daily), 0.3 % flagged.

Each read goes through the router mounted in-process (FastAPI + the module's service on asyncpg,
httpx's ASGI transport: no sockets), as a host's request would; the claim runs in a transaction
that is rolled back. It prints the median of ``--repeat`` runs at each size and the ratio, then
EXPLAIN ANALYZE of the claim, the flagged filter and a deep page, the way they were before this
revision and now, and the disk a payment costs (tables and indexes, per payment).

Targets (exit code 1 when one is missed, ``--no-check`` to only print): list pages, the status
read and the claim under 20 ms at the larger size, every ratio under 2, the 90-day summary under
50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from fastapi import FastAPI
from psycopg import sql
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from payments import repository as repo  # noqa: E402
from payments.config import load_settings  # noqa: E402
from payments.database import create_engine_for  # noqa: E402
from payments.migrations.payment_003_data_layer import (  # noqa: E402
    _PG_BACKFILL as DAILY_TOTALS_BACKFILL,  # the migration's own, so the two never differ
)
from payments.mpesa.client import ClientConfig, MpesaClient  # noqa: E402
from payments.router import create_payment_router  # noqa: E402
from payments.service import PaymentService  # noqa: E402
from payments.simulator.app import MpesaSimulator, SimulatorConfig  # noqa: E402
from payments.simulator.transport import SimulatorTransport  # noqa: E402

ADMIN_KEY = "bench-admin-key-0123456789"
TARGET_MS = 20.0
SUMMARY_TARGET_MS = 50.0
MAX_RATIO = 2.0
#: Distinct customers (phone numbers) and users: their lists grow with history, as a shop's do.
PHONES = 50_000
USERS = 20_000

# -- seeding ---------------------------------------------------------------------------------------

_PAYMENTS = """
INSERT INTO payment_transactions (
    id, transaction_id, operation, status, amount, currency, reversed_amount, phone_number,
    conversation_id, provider_transaction_id, third_party_reference, transaction_reference,
    account_reference, user_id, request_fingerprint, response_code, response_description,
    status_description, metadata, attention_required, operator_hold, reconcile_attempts,
    next_reconcile_at, version, created_at, updated_at, completed_at)
SELECT i,
    'TXN-' || lpad(i::text, 10, '0'),
    CASE WHEN i %% 10 < 8 THEN 'c2b' WHEN i %% 10 = 8 THEN 'b2c' ELSE 'b2b' END,
    s.status,
    10 + (i * 31) %% 5000 + 0.50, 'MZN', 0,
    '25884' || lpad((i %% {phones})::text, 7, '0'),
    md5(i::text),
    CASE WHEN s.status IN ('completed', 'reversed') THEN 'P' || i END,
    upper(substr(md5('r' || i), 1, 8)) || lpad(i::text, 12, '0'),
    'ORDER' || i, 'ORDER-' || i,
    'user-' || (i %% {users}),
    md5(i::text) || md5('f' || i::text),
    CASE WHEN s.status = 'unknown' THEN NULL ELSE 'INS-0' END,
    CASE WHEN s.status = 'unknown' THEN NULL ELSE 'Request processed successfully' END,
    'Payment ' || s.status,
    CASE WHEN i %% 5 = 0 THEN NULL
         ELSE jsonb_build_object('order_id', 'ORDER-' || i, 'channel', 'web') END,
    s.status = 'unknown' AND t.at < %(now)s - interval '1 hour' OR i %% 333 = 0,
    false,
    CASE WHEN s.status = 'unknown' THEN 20 ELSE 0 END,
    CASE WHEN s.status <> 'unknown' THEN NULL
         WHEN t.at > %(now)s - interval '1 hour' THEN NULL              -- never polled yet
         WHEN i %% 7 = 0 THEN %(now)s - interval '1 minute'              -- due now
         ELSE %(now)s + (i %% 86400) * interval '1 second' END,          -- daily re-poll
    2, t.at, t.at + interval '120 milliseconds',
    CASE WHEN s.status <> 'unknown' THEN t.at + interval '120 milliseconds' END
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS i
CROSS JOIN LATERAL (SELECT CASE
        WHEN (i * 7919) %% 1000 < 850 THEN 'completed'
        WHEN (i * 7919) %% 1000 < 900 THEN 'failed'
        WHEN (i * 7919) %% 1000 < 913 THEN 'unknown'
        WHEN (i * 7919) %% 1000 < 975 THEN 'cancelled'
        WHEN (i * 7919) %% 1000 < 995 THEN 'expired'
        ELSE 'reversed' END AS status) AS s
CROSS JOIN LATERAL (SELECT %(start)s::timestamptz
        + (i - %(first)s) * (%(end)s::timestamptz - %(start)s::timestamptz)
          / (%(last)s - %(first)s + 1) AS at) AS t
"""
_AUDITS = """
INSERT INTO payment_audit_logs (transaction_id, action, status_before, status_after,
    request_body, response_body, http_status, response_time_ms, actor, created_at)
SELECT p.id, a.action, a.status_before, a.status_after,
    CASE a.action
        WHEN 'initiated' THEN jsonb_build_object(
            'amount', p.amount::text, 'account_reference', p.account_reference,
            'phone_number', '2588412*****')
        WHEN 'api_request' THEN jsonb_build_object(
            'operation', p.operation, 'method', 'POST',
            'url', 'https://api.vm.co.mz:18352/ipg/v1x/c2bPayment/singleStage/', 'attempt', 1,
            'fields', jsonb_build_object(
                'input_TransactionReference', p.transaction_reference,
                'input_CustomerMSISDN', '2588412*****', 'input_Amount', p.amount::text,
                'input_ThirdPartyReference', p.third_party_reference,
                'input_ServiceProviderCode', '171717'))
        END,
    CASE WHEN a.action = 'api_response' THEN jsonb_build_object(
            'output_ResponseCode', 'INS-0',
            'output_ResponseDesc', 'Request processed successfully',
            'output_TransactionID', p.provider_transaction_id,
            'output_ConversationID', p.conversation_id,
            'output_ThirdPartyReference', p.third_party_reference) END,
    CASE WHEN a.action = 'api_response' THEN 201 END,
    CASE WHEN a.action = 'api_response' THEN 100 + p.id %% 400 END,
    NULL,
    p.created_at + a.n * interval '30 milliseconds'
FROM payment_transactions p
CROSS JOIN (VALUES (1, 'initiated', NULL, 'pending'), (2, 'api_request', NULL, NULL),
                   (3, 'api_response', NULL, NULL), (4, 'completed', 'pending', 'completed'))
    AS a (n, action, status_before, status_after)
WHERE p.id BETWEEN %(first)s AND %(last)s
"""
_NOTICES = """
INSERT INTO payment_webhook_logs (source, raw_body, headers, remote_ip, received_at, is_valid,
    is_processed, processed_at, attempts, transaction_id)
SELECT 'c2b',
    json_build_object('input_OriginalConversationID', p.conversation_id,
        'input_TransactionID', p.provider_transaction_id,
        'input_ThirdPartyReference', p.third_party_reference,
        'input_ResultCode', 'INS-0', 'input_ResultDesc', 'Request processed successfully')::text,
    '{"content-type": "application/json", "user-agent": "M-Pesa"}'::jsonb,
    '196.28.242.10', p.created_at + interval '2 seconds', true, true,
    p.created_at + interval '2 seconds', 1, p.id
FROM payment_transactions p
WHERE p.id BETWEEN %(first)s AND %(last)s AND p.id %% 5 = 0
"""


def seed(url: str, first: int, last: int, start: datetime, end: datetime, now: datetime) -> float:
    """Payments ``first``…``last`` spread evenly from ``start`` to ``end``; seconds it took."""
    began = time.perf_counter()
    values = {"first": first, "last": last, "start": start, "end": end, "now": now}
    with psycopg.connect(url, autocommit=False) as connection:
        # Seeding only: no per-row triggers or foreign-key checks; the totals are rebuilt below
        # (from the payments, as the revision fills them).
        connection.execute("SET session_replication_role = replica")
        payments = _PAYMENTS.replace("{phones}", str(PHONES)).replace("{users}", str(USERS))
        connection.execute(payments, values)
        connection.execute(_AUDITS, values)
        connection.execute(_NOTICES, values)
        connection.execute("DELETE FROM payment_daily_totals")
        connection.execute(DAILY_TOTALS_BACKFILL)
        connection.execute(
            "SELECT setval(pg_get_serial_sequence('payment_transactions', 'id'),"
            " (SELECT max(id) FROM payment_transactions))"
        )
        connection.commit()
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("VACUUM (ANALYZE) payment_transactions")
        connection.execute("VACUUM (ANALYZE) payment_audit_logs")
        connection.execute("VACUUM (ANALYZE) payment_webhook_logs")
        connection.execute("VACUUM (ANALYZE) payment_daily_totals")
    return time.perf_counter() - began


# -- measuring -------------------------------------------------------------------------------------


@dataclass
class Probe:
    name: str
    run: Callable[[int], Awaitable[None]]  # the argument varies the row asked for
    target_ms: float | None = TARGET_MS


async def _timed(probe: Probe, repeat: int) -> float:
    for warm in range(3):
        await probe.run(warm)
    samples = []
    for index in range(repeat):
        began = time.perf_counter()
        await probe.run(index + 3)
        samples.append((time.perf_counter() - began) * 1000)
    return statistics.median(samples)


async def measure(url: str, size: int, repeat: int, now: datetime) -> dict[str, float]:
    """Median milliseconds per probe on a database of ``size`` payments (ids up to ``size``
    counted from the top: ``top`` is the newest)."""
    engine = create_engine_for(url, pool_size=4)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    settings = load_settings(
        mpesa_environment="simulator", payment_admin_api_key=ADMIN_KEY, payment_log_dir="/tmp"
    )
    client = MpesaClient(
        ClientConfig.from_settings(settings),
        transport=SimulatorTransport(MpesaSimulator(SimulatorConfig())),
    )
    service = PaymentService(settings, client)

    async def get_session() -> AsyncIterator[AsyncSession]:
        async with sessions() as session:
            yield session

    app = FastAPI()
    app.include_router(
        create_payment_router(get_session=get_session, service=lambda: service), prefix="/api"
    )
    transport = httpx.ASGITransport(app=app)
    sync_engine = create_engine(make_url(url).set(drivername="postgresql+psycopg"), pool_size=2)
    results: dict[str, float] = {}
    top = TOTAL_TOP  # the newest payment's id (the same in both rounds)
    oldest = top - size + 1
    async with httpx.AsyncClient(
        transport=transport, base_url="http://bench", headers={"X-API-Key": ADMIN_KEY}
    ) as http:

        async def get(path: str, **params: Any) -> None:
            response = await http.get(path, params=params)
            if response.status_code != 200:
                raise SystemExit(f"{path} {params}: {response.status_code} {response.text[:300]}")

        # A cursor half-way down the history (page size * …): the row at the middle of the ids.
        middle = oldest + size // 2
        with psycopg.connect(url) as connection:
            created = connection.execute(
                "SELECT created_at FROM payment_transactions WHERE id = %s", (middle,)
            ).fetchone()[0]
        from payments.paging import PageCursor

        deep = PageCursor(created, middle, size // 2 // 20).encode()
        today = now.date()

        def claim(_: int) -> None:
            with Session(sync_engine) as session:
                repo.claim_due_for_reconciliation(
                    session,
                    now=now,
                    created_before=now - timedelta(seconds=60),
                    lease_until=now + timedelta(minutes=15),
                    limit=50,
                    open_calls_created_before={
                        op: now - timedelta(minutes=5) for op in ("c2b", "b2c", "b2b", "reversal")
                    },
                    flagged_next_poll=lambda created: now + timedelta(hours=12),
                )
                session.rollback()

        async def claim_async(index: int) -> None:
            await asyncio.to_thread(claim, index)

        def claim_selects(_: int) -> None:
            """The claim without its lease UPDATE (what the issue's 3 ms measured)."""
            with Session(sync_engine) as session:
                for query in repo.claim_queries(
                    now=now,
                    created_before=now - timedelta(seconds=60),
                    limit=50,
                    open_calls_created_before={
                        op: now - timedelta(minutes=5) for op in ("c2b", "b2c", "b2b", "reversal")
                    },
                ):
                    session.execute(query).all()
                session.rollback()

        async def claim_selects_async(index: int) -> None:
            await asyncio.to_thread(claim_selects, index)

        probes = [
            Probe(
                "status",
                lambda i: get(f"/api/payments/status/TXN-{top - (i * 7919) % 5000:010d}"),
            ),
            Probe("list page 1", lambda i: get("/api/payments/", per_page=20)),
            Probe("deep page (cursor)", lambda i: get("/api/payments/", per_page=20, cursor=deep)),
            Probe(
                "list by phone",
                lambda i: get(
                    "/api/payments/", phone_number=f"25884{(top - i) % PHONES:07d}", per_page=20
                ),
            ),
            Probe(
                "list by user",
                lambda i: get("/api/payments/", user_id=f"user-{(top - i) % USERS}", per_page=20),
            ),
            Probe("list status=unknown", lambda i: get("/api/payments/", status="unknown")),
            Probe(
                "list attention_required",
                lambda i: get("/api/payments/", attention_required="true"),
            ),
            Probe(
                "list one day",
                lambda i: get(
                    "/api/payments/",
                    from_date=(today - timedelta(days=1 + i % 20)).isoformat(),
                    to_date=(today - timedelta(days=1 + i % 20)).isoformat(),
                ),
            ),
            Probe(
                "summary 1 day",
                lambda i: get(
                    "/api/payments/summary", from_date=today.isoformat(), to_date=today.isoformat()
                ),
                target_ms=None,
            ),
            Probe(
                "summary 90 days",
                lambda i: get(
                    "/api/payments/summary",
                    from_date=(today - timedelta(days=89)).isoformat(),
                    to_date=today.isoformat(),
                ),
                target_ms=SUMMARY_TARGET_MS,
            ),
            Probe("reconciler claim", claim_async),
            Probe("claim, SELECTs only (info)", claim_selects_async, target_ms=None),
            Probe("request floor: GET /health (info)", lambda i: get("/api/payments/health")),
        ]
        for probe in probes:
            results[probe.name] = await _timed(probe, repeat)
    await service.aclose()
    await engine.dispose()
    sync_engine.dispose()
    return results


TOTAL_TOP = 1_000_000  # set from the arguments in main()

# -- before and after ------------------------------------------------------------------------------

_BEFORE_AFTER = {
    "claim": (
        # payment_001's claim: ordered by id, over the (status, next_reconcile_at) index.
        "CREATE INDEX ix_bench_old_reconcile ON payment_transactions (status, next_reconcile_at)",
        "SELECT id FROM payment_transactions WHERE status IN ('pending','processing','unknown')"
        " AND operator_hold IS false AND created_at <= %(now)s"
        " AND (next_reconcile_at IS NULL OR next_reconcile_at <= %(now)s)"
        " ORDER BY id LIMIT 50 FOR UPDATE SKIP LOCKED",
        "SELECT id FROM payment_transactions WHERE status IN ('pending','processing','unknown')"
        " AND operator_hold = false AND created_at <= %(now)s AND next_reconcile_at <= %(now)s"
        " ORDER BY next_reconcile_at, id LIMIT 50 FOR UPDATE SKIP LOCKED",
    ),
    "attention_required=true": (
        None,
        "SELECT id FROM payment_transactions WHERE attention_required IS true"
        " ORDER BY created_at DESC, id DESC LIMIT 20",
        "SELECT id FROM payment_transactions WHERE attention_required = true"
        " ORDER BY created_at DESC, id DESC LIMIT 20",
    ),
    "deep page": (
        None,
        "SELECT id FROM payment_transactions ORDER BY created_at DESC, id DESC"
        " OFFSET %(offset)s LIMIT 20",
        "SELECT id FROM payment_transactions WHERE (created_at, id) < (%(at)s, %(id)s)"
        " ORDER BY created_at DESC, id DESC LIMIT 20",
    ),
    "count": (
        None,
        "SELECT count(id) FROM payment_transactions",
        "SELECT coalesce(sum(count), 0) FROM payment_daily_totals",
    ),
}


def explain_before_after(url: str, size: int, now: datetime) -> None:
    with psycopg.connect(url) as connection:
        middle = TOTAL_TOP - size // 2
        at = connection.execute(
            "SELECT created_at FROM payment_transactions WHERE id = %s", (middle,)
        ).fetchone()[0]
        values = {"now": now, "offset": size // 2, "at": at, "id": middle}
        for name, (setup, before, after) in _BEFORE_AFTER.items():
            plans = {}
            # Now first; then the old index back (rolled back after) for the old query's plan.
            for label, statement in (("after", after), ("before", before)):
                if label == "before" and setup:
                    connection.execute(setup)
                plans[label] = connection.execute(
                    "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, values
                ).fetchall()
            connection.rollback()
            for label in ("before", "after"):
                print(f"\n-- {name}, {label}:\n" + "\n".join(row[0] for row in plans[label]))


def disk_per_payment(url: str) -> None:
    with psycopg.connect(url) as connection:
        payments = connection.execute("SELECT count(*) FROM payment_transactions").fetchone()[0]
        total = 0
        print("\nDisk (tables + indexes + TOAST):")
        for table in (
            "payment_transactions",
            "payment_audit_logs",
            "payment_webhook_logs",
            "payment_daily_totals",
        ):
            size, rows = connection.execute(
                sql.SQL("SELECT pg_total_relation_size({t}), (SELECT count(*) FROM {i})").format(
                    t=sql.Literal(table), i=sql.Identifier(table)
                )
            ).fetchone()
            total += size
            print(
                f"  {table:24} {size / 2**20:9.1f} MiB  {rows:>9} rows"
                f"  {size / payments:7.0f} B per payment"
            )
        print(f"  {'all':24} {total / 2**20:9.1f} MiB  {total / payments:7.0f} B per payment")


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    global TOTAL_TOP
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", default=os.environ.get("PAYMENT_BENCH_POSTGRES_URL"))
    parser.add_argument("--database", default="payments_bench_data_layer")
    parser.add_argument("--quick", action="store_true", help="10,000 then 100,000 payments")
    parser.add_argument("--repeat", type=int, default=40, help="runs per probe (median)")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--no-check", action="store_true", help="print only; exit 0")
    args = parser.parse_args(argv)
    if not args.postgres:
        print("needs --postgres URL or PAYMENT_BENCH_POSTGRES_URL (an admin URL)", file=sys.stderr)
        return 2
    small, large = (10_000, 100_000) if args.quick else (100_000, 1_000_000)
    # The router's key check reads the environment's settings.
    os.environ["PAYMENT_ADMIN_API_KEY"] = ADMIN_KEY
    os.environ.setdefault("MPESA_ENVIRONMENT", "simulator")
    os.environ.setdefault("PAYMENT_LOG_DIR", "/tmp/payments-bench-logs")
    TOTAL_TOP = large
    admin = make_url(args.postgres).set(drivername="postgresql")
    admin_url = admin.render_as_string(hide_password=False)
    url = admin.set(database=args.database).render_as_string(hide_password=False)
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(args.database))
        )
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(args.database)))
    try:
        from alembic import command
        from alembic.config import Config

        config = Config(str(ROOT / "alembic.ini"), cmd_opts=argparse.Namespace(x=[f"url={url}"]))
        config.attributes["configure_logger"] = False
        command.upgrade(config, "heads")

        now = datetime.now(UTC).replace(microsecond=0)
        year = timedelta(days=365)
        recent_start = now - year * small / large
        print(f"load before: {os.getloadavg()}")
        took = seed(url, large - small + 1, large, recent_start, now, now)
        print(f"seeded {small:,} payments in {took:.0f} s")
        first = asyncio.run(measure(url, small, args.repeat, now))
        took = seed(url, 1, large - small, now - year, recent_start, now)
        print(f"seeded {large - small:,} more payments in {took:.0f} s")
        second = asyncio.run(measure(url, large, args.repeat, now))
        load = os.getloadavg()

        missed = []
        print(f"\n| read | {small:,} (ms) | {large:,} (ms) | ratio | target |")
        print("|---|---:|---:|---:|---|")
        targets = {
            "summary 1 day": None,
            "summary 90 days": SUMMARY_TARGET_MS,
            "claim, SELECTs only (info)": None,
            "request floor: GET /health (info)": None,
        }
        for name, at_large in second.items():
            at_small = first[name]
            ratio = at_large / at_small if at_small else float("inf")
            target = targets.get(name, TARGET_MS)
            informational = name.endswith("(info)")
            ok = informational or (ratio < MAX_RATIO and (target is None or at_large < target))
            if not ok:
                missed.append(name)
            limit = f"< {target:.0f} ms, " if target else ""
            verdict = "information" if informational else f"{limit}ratio < {MAX_RATIO:.0f}"
            print(
                f"| {name} | {at_small:.2f} | {at_large:.2f} | {ratio:.2f} |"
                f" {verdict}{'' if ok else ' **MISSED**'} |"
            )
        print(f"\nload average (1, 5, 15 min) after the runs: {load}")
        explain_before_after(url, large, now)
        disk_per_payment(url)
        if missed and not args.no_check:
            print(f"\nMISSED: {', '.join(missed)}", file=sys.stderr)
            return 1
        return 0
    finally:
        if not args.keep:
            with psycopg.connect(admin_url, autocommit=True) as connection:
                connection.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(args.database)
                    )
                )


if __name__ == "__main__":
    sys.exit(main())
