"""A live app for the browser tests: the payments router (console included) on a loopback port,
served by uvicorn in its own thread and event loop, over a real SQLite file or PostgreSQL
database, with the in-process simulator as M-Pesa."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import async_sessionmaker

from payments.config import load_settings
from payments.database import create_engine_for
from payments.mpesa.client import ClientConfig, MpesaClient
from payments.router import create_payment_router
from payments.service import PaymentService
from payments.simulator.app import MpesaSimulator, SimulatorConfig
from payments.simulator.transport import SimulatorTransport


@dataclass
class LiveConsole:
    base_url: str  # http://127.0.0.1:PORT
    service: PaymentService
    simulator: MpesaSimulator

    @property
    def console(self) -> str:
        return f"{self.base_url}/api/payments/console/"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def live_console(
    database_url: str,
    simulator: MpesaSimulator | None = None,
    settings_overrides: dict[str, Any] | None = None,
    **router_options: Any,
) -> Iterator[LiveConsole]:
    settings = load_settings(
        **(
            {"mpesa_environment": "simulator", "payment_c2b_timeout": 5}
            | (settings_overrides or {})
        )
    )
    simulator = simulator or MpesaSimulator(SimulatorConfig())

    async def no_sleep(_: float) -> None:
        return None

    client = MpesaClient(
        ClientConfig.from_settings(settings),
        transport=SimulatorTransport(simulator),
        sleep=no_sleep,
    )
    service = PaymentService(settings, client, db_retry_delays=(0.01,))
    engine = create_engine_for(database_url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def get_session() -> Any:
        async with sessions() as session:
            yield session

    app = FastAPI()
    app.include_router(
        create_payment_router(get_session=get_session, service=lambda: service, **router_options),
        prefix="/api",
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )

    def run() -> None:
        async def serve() -> None:
            try:
                await server.serve()
            finally:
                await engine.dispose()

        asyncio.run(serve())

    thread = threading.Thread(target=run, name="console-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the console test server did not start")
        time.sleep(0.05)
    try:
        yield LiveConsole(f"http://127.0.0.1:{port}", service, simulator)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
