"""In-process transport to the simulator: what tests and the demo use instead of a network."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI
from starlette.types import ASGIApp

from .app import MpesaSimulator
from .faults import SimulatedDisconnect


class SimulatorTransport(httpx.AsyncBaseTransport):
    """In-process transport to the simulator (tests and the demo).

    It wraps ``httpx.ASGITransport`` and adds what a network would do: the request's read timeout
    is enforced (``httpx.ReadTimeout``), the simulator's connection drop becomes
    ``httpx.RemoteProtocolError``, and ``refuse_connections`` makes every request fail with
    ``httpx.ConnectError`` before the simulator sees it (an unreachable provider).
    """

    def __init__(
        self,
        app_or_simulator: MpesaSimulator | FastAPI | ASGIApp,
        *,
        refuse_connections: bool = False,
    ) -> None:
        if isinstance(app_or_simulator, MpesaSimulator):
            self.simulator: MpesaSimulator | None = app_or_simulator
            app: ASGIApp = app_or_simulator.app()
        else:
            app = app_or_simulator
            state = getattr(app_or_simulator, "state", None)
            found = getattr(state, "simulator", None) if state is not None else None
            self.simulator = found if isinstance(found, MpesaSimulator) else None
        self.refuse_connections = refuse_connections
        self._transport = httpx.ASGITransport(app=app)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.refuse_connections:
            raise httpx.ConnectError("[Errno 111] Connection refused (simulated)", request=request)
        timeouts = request.extensions.get("timeout") or {}
        read_timeout = timeouts.get("read")
        try:
            async with asyncio.timeout(read_timeout):
                return await self._transport.handle_async_request(request)
        except TimeoutError:
            raise httpx.ReadTimeout(
                f"no response within the read timeout ({read_timeout} s)", request=request
            ) from None
        except SimulatedDisconnect:
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a response.", request=request
            ) from None

    async def aclose(self) -> None:
        await self._transport.aclose()
