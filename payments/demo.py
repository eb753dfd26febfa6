"""The demo gateway: the router under ``/api`` on a SQLite file, with the built-in simulator as
the provider. ``python -m payments serve`` runs it; nothing here is needed in a host app."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar

from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .config import get_settings
from .database import get_database
from .logger import payment_logger
from .models import Base
from .reconciliation import reconcile_forever
from .router import default_payment_service, payment_router


@asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    # The demo creates its tables itself; a host app runs the Alembic migration instead.
    await get_database().create_all(Base.metadata)
    settings = get_settings()
    payment_logger.info(
        "Payments demo gateway started",
        environment=settings.mpesa_environment,
        database=settings.database_url_for_display,
    )
    stop = asyncio.Event()
    background = None
    if settings.payment_reconcile_in_app:
        background = asyncio.create_task(
            reconcile_forever(default_payment_service(), get_database().session, stop=stop)
        )
    yield
    stop.set()
    if background is not None:
        await background
    await default_payment_service().aclose()
    await get_database().dispose()


def _telemetry_off() -> dict[str, Any]:
    """FastAPI versions with built-in OpenTelemetry trace every request by default, which costs
    the demo about a millisecond per payment; a host app makes its own choice."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {
        "telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
    }


def create_app() -> FastAPI:
    app = FastAPI(
        **_telemetry_off(),
        title="M-Pesa Mozambique payments (demo gateway)",
        description="The `payments` module's router, mounted under `/api`. Send the admin key"
        " printed at start in the `X-API-Key` header.",
        lifespan=_lifespan,
    )
    app.include_router(payment_router, prefix="/api")
    return app


class _HeadersTooLarge(Exception):
    pass


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the two limits it lacks: a deadline for a request's
    headers (from the connection's first byte, or the request's), so slow clients cannot hold
    connections open, and a cap on the request line plus headers (httptools has none)."""

    header_timeout: ClassVar[float] = 10.0
    max_header_bytes: ClassVar[int] = 16 * 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_bytes = 0
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._arm_header_deadline()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        super().on_headers_complete()

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.max_header_bytes:
            raise _HeadersTooLarge  # httptools reports it as a parser error: 400, closed

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm_header_deadline(self) -> None:
        deadline = getattr(self, "_header_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def bounded_protocol(header_timeout: float, max_header_bytes: int) -> type[HttpToolsProtocol]:
    """``BoundedHttpToolsProtocol`` with these limits (uvicorn takes a class)."""
    return type(
        "BoundedHttpToolsProtocol",
        (BoundedHttpToolsProtocol,),
        {"header_timeout": header_timeout, "max_header_bytes": max_header_bytes},
    )
