"""The router's own dependencies besides auth and the session: the service (each replaceable
with ``app.dependency_overrides``) and what a money-moving request records from its headers."""

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from pydantic import AfterValidator

from .notification_limits import client_ip
from .service import PaymentService


@lru_cache(maxsize=1)
def default_payment_service() -> PaymentService:
    """The process's service (and so its one provider connection pool)."""
    return PaymentService()


async def get_payment_service() -> PaymentService:
    """FastAPI dependency giving the service; override it to use a subclass with hooks.
    (Async, so FastAPI calls it without a thread-pool hop per request.)"""
    return default_payment_service()


def as_async_dependency(factory: Callable[[], Any]) -> Callable[[], Any]:
    """A plain factory (``lambda: my_service``) as an async dependency: FastAPI runs sync
    dependencies in a thread pool, a hop per request for a value that is already there."""
    if inspect.iscoroutinefunction(factory):
        return factory

    async def provide() -> Any:
        return factory()

    return provide


@dataclass(frozen=True, slots=True)
class RequestOrigin:
    """What a money-moving request records besides its body: its ``Idempotency-Key`` and the
    caller's valid address (through trusted proxies), each ``None`` when absent."""

    idempotency_key: str | None
    client_ip: str | None


def _not_blank(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("must not be empty or whitespace")
    return value.strip() if value is not None else None


IdempotencyHeader = Annotated[
    str | None, Header(alias="Idempotency-Key", max_length=255), AfterValidator(_not_blank)
]


def request_origin_dependency(
    service: Callable[[], Any],
) -> Callable[..., Awaitable[RequestOrigin]]:
    """The ``RequestOrigin`` dependency, on the service the endpoints get from ``service`` (the
    same dependency, so FastAPI calls it once per request)."""

    async def request_origin(
        request: Request,
        payments: Annotated[PaymentService, Depends(service)],
        idempotency_key: IdempotencyHeader = None,
    ) -> RequestOrigin:
        peer = request.client.host if request.client else None
        return RequestOrigin(idempotency_key, client_ip(peer, request.headers, payments.settings))

    return request_origin
