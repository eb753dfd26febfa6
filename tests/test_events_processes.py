"""Events across real processes: a process killed (SIGKILL) right after a transition commits,
before its hook and its webhook ran, and several dispatcher processes on one PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from textwrap import dedent

import pytest
from sqlalchemy import create_engine, insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from payments.models import (
    Base,
    PaymentEvent,
    PaymentEventDelivery,
    PaymentTransaction,
    utcnow,
)

from .test_events import SECRET, Receiver, serving

REPO_ROOT = Path(__file__).resolve().parents[1]

SHOP_HOOKS = '''
"""A host's hooks module, as `python -m payments dispatch --service shop_hooks:shop_payments`
loads it."""
import asyncio
import os
import time
from pathlib import Path

from payments.service import PaymentService


class ShopPayments(PaymentService):
    async def on_payment_completed(self, transaction):
        stall = os.environ.get("STALL_IN_HOOK")
        if stall:  # the process is killed here, after the commit, before the hook did anything
            Path(stall).write_text(self.current_event_id or "")
            time.sleep(3600)
        with Path(os.environ["HOOK_LOG"]).open("a") as log:
            line = f"{self.current_event_id} {transaction.transaction_id} {transaction.status}"
            log.write(line + "\\n")


shop_payments = ShopPayments()


if __name__ == "__main__":  # make one payment, against an in-process simulator
    from payments.config import get_settings
    from payments.database import get_database
    from payments.mpesa.client import ClientConfig, MpesaClient
    from payments.schemas import PaymentInitiateRequest
    from payments.simulator.app import MpesaSimulator, SimulatorConfig
    from payments.simulator.transport import SimulatorTransport

    async def pay():
        client = MpesaClient(
            ClientConfig.from_settings(get_settings()),
            transport=SimulatorTransport(MpesaSimulator(SimulatorConfig())),
        )
        service = ShopPayments(client=client)
        async with get_database().session() as db:
            await service.initiate_payment(
                PaymentInitiateRequest(phone_number="258841234567", amount="100.00"), db
            )

    asyncio.run(pay())
'''


def _environment(tmp_path: Path, database_url: str, receiver_url: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MPESA_", "PAYMENT_"))
    }
    return env | {
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)]),
        "MPESA_ENVIRONMENT": "simulator",
        "PAYMENT_DATABASE_URL": database_url,
        "PAYMENT_LOG_DIR": str(tmp_path / "logs"),
        "PAYMENT_WEBHOOK_URLS": receiver_url,
        "PAYMENT_WEBHOOK_SECRET": SECRET,
        "PAYMENT_HOOK_LEASE_SECONDS": "1",
        "HOOK_LOG": str(tmp_path / "hooks.log"),
    }


async def _run(env: dict[str, str], cwd: Path, *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode or 0, output.decode()


async def test_a_process_killed_after_the_commit_gets_its_hook_and_webhook_after_a_restart(
    tmp_path: Path,
) -> None:
    database = tmp_path / "shop.db"
    engine = create_engine(f"sqlite:///{database}")
    Base.metadata.create_all(engine)
    (tmp_path / "shop_hooks.py").write_text(dedent(SHOP_HOOKS))
    marker = tmp_path / "hook-started"

    async with serving(Receiver()) as receiver:
        env = _environment(tmp_path, f"sqlite:///{database}", receiver.url)
        payer = await asyncio.create_subprocess_exec(
            sys.executable,
            "shop_hooks.py",
            env=env | {"STALL_IN_HOOK": str(marker)},
            cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert marker.exists(), "the payment never reached its hook"
        os.kill(payer.pid, signal.SIGKILL)
        assert await payer.wait() == -signal.SIGKILL

        with engine.connect() as connection:
            status = connection.scalar(select(PaymentTransaction.status))
            event_id, event_type = connection.execute(
                select(PaymentEvent.id, PaymentEvent.type)
            ).one()
            pending = connection.execute(
                select(PaymentEventDelivery.kind, PaymentEventDelivery.status)
            ).all()
        assert status == "completed"  # committed, with its event
        assert (event_id, event_type) == (marker.read_text(), "payment.completed")
        assert sorted(pending) == [("hooks", "pending"), ("webhook", "pending")]
        assert receiver.requests == []  # nothing was delivered before the kill
        assert not (tmp_path / "hooks.log").exists()

        await asyncio.sleep(1.2)  # the dead process's hook lease runs out
        command = ("-m", "payments", "dispatch", "--service", "shop_hooks:shop_payments")
        code, output = await _run(env, tmp_path, *command)
        assert code == 0, output
        assert "delivered=2" in output and "hooks=1" in output, output
        # Once each: another restart delivers nothing more.
        code, output = await _run(env, tmp_path, *command)
        assert code == 0 and "delivered=0" in output, output

    (line,) = (tmp_path / "hooks.log").read_text().splitlines()
    with engine.connect() as connection:
        transaction_id = connection.scalar(select(PaymentTransaction.transaction_id))
    assert line == f"{event_id} {transaction_id} completed"
    assert receiver.event_ids() == [event_id]
    (body,) = receiver.verified()
    assert (body["id"], body["type"]) == (event_id, "payment.completed")
    engine.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_two_dispatchers_on_postgresql_deliver_each_of_500_events_exactly_once(
    tmp_path: Path,
    database_url: str,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    async with serving(Receiver(delay=0.02)) as receiver:
        env = _environment(tmp_path, database_url, receiver.url) | {
            "PAYMENT_DISPATCH_BATCH_SIZE": "25",
            "PAYMENT_DISPATCH_IN_APP": "false",
        }
        dispatchers = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "payments",
                "dispatch",
                "--loop",
                "0.05",
                env=env | {"PAYMENT_LOG_DIR": str(tmp_path / f"logs-{number}")},
                cwd=tmp_path,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            for number in range(2)
        ]
        try:
            await asyncio.sleep(3)  # both are up and polling
            now = utcnow()
            ids = [f"evt_{index:028d}" for index in range(500)]
            async with session_factory() as session:
                await session.execute(
                    insert(PaymentEvent),
                    [
                        {
                            "id": event_id,
                            "type": "payment.completed",
                            "transaction_id": f"TXN-{index}",
                            "data": {"n": index},
                            "created_at": now,
                        }
                        for index, event_id in enumerate(ids)
                    ],
                )
                await session.execute(
                    insert(PaymentEventDelivery),
                    [
                        {
                            "event_id": event_id,
                            "kind": "webhook",
                            "consumer": receiver.url,
                            "status": "pending",
                            "attempts": 0,
                            "next_attempt_at": now,
                            "created_at": now,
                        }
                        for event_id in ids
                    ],
                )
                await session.commit()
            deadline = time.monotonic() + 90
            while len(receiver.requests) < 500 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await asyncio.sleep(1)  # a duplicate would arrive now
        finally:
            for process in dispatchers:
                process.terminate()
                await process.wait()

    counts = Counter(receiver.event_ids())
    assert len(counts) == 500 and set(counts) == set(ids)
    assert max(counts.values()) == 1, [key for key, count in counts.items() if count > 1][:5]
    verified = receiver.verified()
    assert sorted(body["data"]["n"] for body in verified) == list(range(500))
    async with session_factory() as session:
        rows = (await session.execute(select(PaymentEventDelivery.status))).scalars().all()
    assert Counter(rows) == {"delivered": 500}
    assert make_url(database_url).get_backend_name() == "postgresql"
    # Both took part: each process's own log counts what it delivered.
    delivered = [
        sum(
            int(match)
            for log in (tmp_path / f"logs-{number}").glob("*.log")
            for match in re.findall(r"report=delivered=(\d+)", log.read_text())
        )
        for number in range(2)
    ]
    assert sum(delivered) == 500 and min(delivered) > 0, delivered


async def test_the_dispatch_command_explains_itself_and_refuses_a_bad_service(
    tmp_path: Path,
) -> None:
    env = _environment(tmp_path, f"sqlite:///{tmp_path}/none.db", "http://127.0.0.1:9/hook")
    code, output = await _run(env, tmp_path, "-m", "payments", "dispatch", "--help")
    assert code == 0 and "--loop SECONDS" in output and "--service" in output, output
    code, output = await _run(env, tmp_path, "-m", "payments", "dispatch", "--service", "nope")
    assert code == 2 and "module:attr" in output, output
    code, output = await _run(
        env, tmp_path, "-m", "payments", "dispatch", "--service", "json:dumps"
    )
    assert code == 2 and "Traceback" not in output, output
