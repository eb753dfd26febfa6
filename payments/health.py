"""Health: is the database reachable, the provider configured, each provider port open?"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from sqlalchemy import text

from .config import PROVIDER_HOSTS
from .database import DbSession, run_db
from .exceptions import PaymentConfigurationError
from .logger import payment_logger
from .mpesa.operations import OPERATIONS
from .service import PaymentService


async def health_report(db: DbSession, payments: PaymentService, *, deep: bool) -> JSONResponse:
    """Database reachable, provider configuration valid; ``deep`` also probes each provider port
    and sends one status query (see the ``/health`` route)."""
    report: dict[str, Any] = {}
    healthy = True
    try:
        await run_db(db, lambda s: s.execute(text("SELECT 1")))
        report["database"] = "ok"
    except Exception as exc:  # any driver error means "unreachable" here
        report["database"] = f"unreachable ({type(exc).__name__})"
        healthy = False
    try:
        settings = payments.settings
        report["provider_configuration"] = "ok"
        report["environment"] = settings.mpesa_environment
    except PaymentConfigurationError as exc:
        report["provider_configuration"] = exc.message
        healthy = False
    if deep and report.get("provider_configuration") == "ok":
        report["provider_ports"] = ports = await probe_ports(payments)
        healthy = healthy and all(result == "ok" for result in ports.values())
        # One status query for a made-up reference: does M-Pesa accept the key and Origin?
        refused = await payments.client.check_access()
        report["provider_access"] = refused or "ok"
        healthy = healthy and refused is None
    report["status"] = "ok" if healthy else "degraded"
    return JSONResponse(report, status_code=200 if healthy else 503)


async def probe_ports(payments: PaymentService) -> dict[str, str]:
    config = payments.client.config
    if config.environment == "simulator" and not config.base_url:
        return {"simulator": "ok"}  # in-process: nothing to connect to
    targets: dict[str, tuple[str, int]] = {}
    for operation in OPERATIONS:
        url = urlsplit(config.url_for(operation))
        host = url.hostname or PROVIDER_HOSTS.get(config.environment, "")
        port = url.port or (443 if url.scheme == "https" else 80)
        targets[f"{operation.value}:{port}"] = (host, port)

    async def probe(host: str, port: int) -> str:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=3)
        except (OSError, TimeoutError) as exc:
            return f"unreachable ({type(exc).__name__})"
        writer.close()
        return "ok"

    results = await asyncio.gather(*(probe(*target) for target in targets.values()))
    for name, result in zip(targets, results, strict=True):
        if result != "ok":
            payment_logger.warning("Provider port unreachable", target=name, result=result)
    return dict(zip(targets, results, strict=True))
