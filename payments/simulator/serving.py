"""Serving the simulator with uvicorn, quietly."""

from __future__ import annotations

import logging

import uvicorn
from fastapi import FastAPI

from .faults import SimulatedDisconnect

__all__ = ["install_quiet_disconnect_filter", "serve"]


class _QuietDisconnectFilter(logging.Filter):
    """Keeps uvicorn from logging a traceback for every deliberate connection drop."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, SimulatedDisconnect)


def install_quiet_disconnect_filter() -> None:
    uvicorn_logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietDisconnectFilter) for f in uvicorn_logger.filters):
        uvicorn_logger.addFilter(_QuietDisconnectFilter())


def serve(app: FastAPI, host: str, port: int) -> None:
    """Serve ``app`` with uvicorn (blocks until stopped)."""
    install_quiet_disconnect_filter()
    # No access log: GET query strings carry full MSISDNs.
    uvicorn.run(app, host=host, port=port, access_log=False)
