"""The demo gateway: the router under ``/api`` on a SQLite file, with the built-in simulator as
the provider. ``python -m payments serve`` runs it; nothing here is needed in a host app."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

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
