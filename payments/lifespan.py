"""The router's lifespan: with the host's app that includes it, the startup heap is frozen out
of the garbage collector's way and the event dispatcher runs."""

import asyncio
import gc
import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any

from .logger import payment_logger


def dispatcher_lifespan(
    *, get_session: Callable[..., Any], service: Callable[..., Any]
) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """The router's lifespan: FastAPI merges it into the app's when the app includes the
    router, so the startup heap is frozen (``PAYMENT_GC_FREEZE``) and the dispatcher starts
    and stops with the host's app."""

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        from .dispatcher import dispatch_forever

        overrides = getattr(app, "dependency_overrides", {})
        try:
            payments = overrides.get(service, service)()
            if inspect.isawaitable(payments):
                payments = await payments
            settings = payments.settings
        except Exception as exc:  # misconfigured: requests say so; the app still starts
            payment_logger.error("Event dispatcher not started", error=str(exc))
            yield
            return
        if settings.payment_gc_freeze:
            freeze_startup_heap()
        if not settings.payment_dispatch_in_app:
            yield
            return
        sessions = _session_source(overrides.get(get_session, get_session))
        stop = asyncio.Event()
        task = asyncio.create_task(dispatch_forever(payments, sessions, stop=stop))
        try:
            yield
        finally:
            stop.set()
            try:
                await asyncio.wait_for(task, timeout=15)
            except TimeoutError:
                payment_logger.warning("Event dispatcher stopped mid-delivery")

    return lifespan


def freeze_startup_heap() -> None:
    """Move everything alive at startup (modules, the app, its routes and models: most of the
    heap) out of the collector's view, as ``gc.freeze`` documents. Payments allocate enough
    that full collections run every few hundred; each one otherwise walks the whole heap:
    measured, a quarter of a millisecond of CPU per payment. What startup left as garbage is
    collected first, so nothing is frozen that could be freed."""
    gc.collect()
    gc.freeze()


def _session_source(get_session: Callable[..., Any]) -> Callable[[], Any]:
    """The sessions a dependency gives, as a context manager factory for the dispatcher: an
    async or sync generator without parameters; anything else gets the module's database."""
    from .database import get_database

    required = [
        p
        for p in inspect.signature(get_session).parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    if required:
        payment_logger.warning(
            "The session dependency takes parameters; the dispatcher uses PAYMENT_DATABASE_URL"
        )
        return get_database().session
    if inspect.isasyncgenfunction(get_session):
        return asynccontextmanager(get_session)
    if inspect.isgeneratorfunction(get_session):
        sync = contextmanager(get_session)

        @asynccontextmanager
        async def sessions() -> AsyncIterator[Any]:
            with sync() as session:
                yield session

        return sessions
    return get_database().session
