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
    router, so the garbage collector is tuned (``PAYMENT_GC_TUNING``) and the dispatcher
    starts and stops with the host's app."""

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
        if settings.payment_gc_tuning:
            tune_garbage_collector()
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


#: Allocations between two young-generation collections, at least (Python's default: 700).
YOUNG_GC_THRESHOLD = 10_000


def tune_garbage_collector() -> None:
    """Keep full collections rare and short. A payment frees what it allocates by reference
    counting (no cycles), so what a collection walks is mostly alive: the startup heap and the
    payments in flight. Everything alive at startup (modules, the app, routes, models: ~140,000
    objects) is frozen out of the collector's view, as ``gc.freeze`` documents, after startup's
    own garbage is collected; and the young generation is collected every 10,000 allocations,
    not 700, so objects of payments waiting on a PIN are promoted (and walked by full
    collections) a fourteenth as often. A threshold a host set higher is kept."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_GC_THRESHOLD), middle, old)


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
