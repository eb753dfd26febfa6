"""Console speed with 100,000 payments on PostgreSQL: seeds a throw-away database (one
``INSERT … SELECT generate_series``, all of it within the last 7 days, the overview's worst case),
then times the overview, the list (first page, a filter, a search, a deep page) and the metrics
scrape through the real router, signed in like a browser. Prints the figures; exits 1 when the
overview or the list's first page misses 300 ms (median).

    python bench/console.py [--rows 100000] [--runs 15]

Needs ``PAYMENT_TEST_POSTGRES_URL`` (an admin URL, e.g. postgresql://postgres@127.0.0.1:54329/postgres).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import psycopg  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from psycopg import sql  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker  # noqa: E402

TARGET_MS = 300.0
ADMIN_KEY = "bench-console-admin-key-0123456789"

SEED = """
INSERT INTO payment_transactions (
    transaction_id, operation, status, amount, currency, reversed_amount, phone_number,
    third_party_reference, account_reference, entity_type, entity_id, provider_transaction_id,
    conversation_id, attention_required, operator_hold, reconcile_attempts, version,
    created_at, updated_at, completed_at)
SELECT
    'TXN-BENCH-' || lpad(i::text, 8, '0'),
    (ARRAY['c2b','c2b','c2b','b2c','b2b'])[1 + i %% 5],
    CASE WHEN i %% 100 = 0 THEN 'unknown' WHEN i %% 97 = 0 THEN 'processing'
         WHEN i %% 10 = 1 THEN 'failed' WHEN i %% 10 = 2 THEN 'cancelled' ELSE 'completed' END,
    (10 + (i * 37) %% 5000)::numeric(12, 2), 'MZN', 0,
    '2588' || (4 + i %% 2)::text || lpad((i %% 10000000)::text, 7, '0'),
    'R' || lpad(i::text, 19, '0'),
    'ORDER-' || (i %% 20000)::text, 'order', (i %% 20000)::text,
    CASE WHEN i %% 10 > 2 THEN 'MP' || lpad(i::text, 10, '0') END,
    'AG_' || i::text,
    i %% 250 = 0, false, 0, 1,
    now() - (i * interval '6 seconds'), now() - (i * interval '6 seconds'),
    CASE WHEN i %% 10 > 0 THEN now() - (i * interval '6 seconds') END
FROM generate_series(1, %(rows)s) AS i
"""


def _admin_url() -> str:
    url = os.environ.get("PAYMENT_TEST_POSTGRES_URL", "").strip()
    if not url:
        sys.exit("set PAYMENT_TEST_POSTGRES_URL to a PostgreSQL admin URL")
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()

    os.environ.setdefault("MPESA_ENVIRONMENT", "simulator")
    os.environ["PAYMENT_ADMIN_API_KEY"] = ADMIN_KEY
    os.environ.setdefault("PAYMENT_LOG_DIR", "/tmp/payments-bench-console-logs")

    from payments.config import load_settings
    from payments.database import create_engine_for
    from payments.models import Base
    from payments.router import create_payment_router
    from payments.service import PaymentService

    admin = _admin_url()
    name = f"payments_bench_console_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_url(admin).set(database=name).render_as_string(hide_password=False)
    engine = create_engine_for(url, pool_size=5)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        started = time.perf_counter()
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(SEED, {"rows": args.rows})  # type: ignore[arg-type]
            connection.execute("ANALYZE payment_transactions")
        print(f"seeded {args.rows:,} payments in {time.perf_counter() - started:.1f} s")

        sessions = async_sessionmaker(engine, expire_on_commit=False)

        async def get_session() -> AsyncIterator[AsyncSession]:
            async with sessions() as session:
                yield session

        service = PaymentService(load_settings())
        app = FastAPI()
        app.include_router(
            create_payment_router(get_session=get_session, service=lambda: service), prefix="/api"
        )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            console = "/api/payments/console/"
            form = await http.get(console + "login")
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
            assert csrf is not None
            signed = await http.post(
                console + "login", data={"csrf_token": csrf.group(1), "api_key": ADMIN_KEY}
            )
            assert signed.status_code == 303, signed.text
            cases = [
                ("overview", console, True),
                ("list, first page", console + "payments", True),
                ("list, status=unknown", console + "payments?status=unknown", False),
                ("list, c2b completed today", console + "payments?operation=c2b&status=completed",
                 False),
                ("list, search M-Pesa ID", console + "payments?q=MP0000054321", False),
                ("list, reference", console + "payments?reference=ORDER-77", False),
                ("list, page 100", console + "payments?page=100", False),
                ("metrics", "/api/payments/metrics", False),
            ]
            missed = []
            print(f"{'page':32} {'median ms':>10} {'p90 ms':>8}  (runs: {args.runs})")
            for label, path, gated in cases:
                headers = {"X-API-Key": ADMIN_KEY} if "metrics" in path else {}
                first = await http.get(path, headers=headers)
                assert first.status_code == 200, (label, first.status_code, first.text[:300])
                timings = []
                for _ in range(args.runs):
                    t0 = time.perf_counter()
                    answer = await http.get(path, headers=headers)
                    timings.append((time.perf_counter() - t0) * 1000)
                    assert answer.status_code == 200
                timings.sort()
                median = statistics.median(timings)
                p90 = timings[max(0, int(len(timings) * 0.9) - 1)]
                mark = ""
                if gated and median > TARGET_MS:
                    missed.append(label)
                    mark = f"  MISSED (target < {TARGET_MS:.0f} ms)"
                print(f"{label:32} {median:10.1f} {p90:8.1f}{mark}")
        await service.aclose()
    finally:
        await engine.dispose()
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    if missed:
        print("missed:", ", ".join(missed))
        return 1
    print(f"overview and list under {TARGET_MS:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
