"""The host's service and database for work outside a request (the command line).

``python -m payments reconcile`` (and every later command that settles or delivers payments,
such as ``dispatch``) must run the host's ``PaymentService`` subclass, or a payment it settles
never reaches the host's hooks (the customer charged, the order never marked paid), and it must
work on the host's database. ``open_host`` is the one place that decides both:

- the service: ``--service module:attr`` or ``PAYMENT_SERVICE`` names a ``PaymentService``
  instance, a subclass, or a factory (sync or async) returning one; without either, the
  module's own ``PaymentService()``;
- the database: the service's ``sessions`` (``PaymentService(sessions=SessionLocal)``: a
  ``sessionmaker``, an ``async_sessionmaker``, …), else ``PAYMENT_DATABASE_URL`` when it is
  set explicitly (environment or ``.env``). Neither: ``HostSetupError`` (the command exits
  non-zero with the message), never a silent ``./payments.db``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from .database import DATABASE_ERRORS, ModuleDatabase, SessionSource, as_session_source
from .exceptions import PaymentConfigurationError
from .service import PaymentService

#: The setting that names the host's service (the same as ``--service``).
SERVICE_SETTING = "PAYMENT_SERVICE"


class HostSetupError(Exception):
    """The command cannot know the host's service or database: the message says what to do."""


@dataclass
class Host:
    """What a command runs with: the service (with the host's hooks) and where its sessions
    come from (``database`` is set when the module opened its own engine)."""

    service: PaymentService
    sessions: SessionSource
    database_description: str
    database: ModuleDatabase | None = None


def service_spec(cli_value: str | None) -> str | None:
    """``--service`` wins; else ``PAYMENT_SERVICE`` from the environment or ``.env``."""
    if cli_value and cli_value.strip():
        return cli_value.strip()
    value = os.environ.get(SERVICE_SETTING)
    if value is None:
        value = _dotenv_value(SERVICE_SETTING)
    return value.strip() if value and value.strip() else None


def _import_target(spec: str) -> Any:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise HostSetupError(
            f"--service/{SERVICE_SETTING} must look like module:attr"
            f" (e.g. app.payments_hooks:shop_payments), not {spec!r}"
        )
    # ``python -m`` puts the working directory on the path; an installed console script may not.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise HostSetupError(
            f"cannot import {module_name!r} named by --service/{SERVICE_SETTING}: {exc}"
            " (run the command from your project's root, or put it on PYTHONPATH)"
        ) from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HostSetupError(f"{module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(target, PaymentService) and not callable(target):
        raise HostSetupError(
            f"{spec} is a {type(target).__name__}: it must be a PaymentService instance, a"
            " subclass, or a factory returning one"
        )
    return target


def _checked(spec: str, made: Any) -> PaymentService:
    if not isinstance(made, PaymentService):
        raise HostSetupError(
            f"{spec} returned {type(made).__name__}, not a PaymentService (or a subclass)"
        )
    return made


def load_service(spec: str) -> PaymentService:
    """Import ``module:attr`` (``attr`` may be dotted) and make a ``PaymentService`` of it: the
    instance itself, or what the class or factory returns. An async factory needs
    ``load_service_async``."""
    target = _import_target(spec)
    if isinstance(target, PaymentService):
        return target
    made = _call(spec, target)
    if inspect.isawaitable(made):
        if inspect.iscoroutine(made):
            made.close()
        raise HostSetupError(f"{spec} is an async factory: use load_service_async")
    return _checked(spec, made)


async def load_service_async(spec: str) -> PaymentService:
    """``load_service`` that also awaits an async factory."""
    target = _import_target(spec)
    if isinstance(target, PaymentService):
        return target
    made = _call(spec, target)
    if inspect.isawaitable(made):
        try:
            made = await made
        except Exception as exc:
            raise HostSetupError(f"{spec}() failed: {type(exc).__name__}: {exc}") from exc
    return _checked(spec, made)


def _call(spec: str, factory: Any) -> Any:
    try:
        return factory()
    except PaymentConfigurationError:
        raise  # its own message names the variable
    except Exception as exc:
        raise HostSetupError(f"{spec}() failed: {type(exc).__name__}: {exc}") from exc


def sessions_for(service: PaymentService) -> tuple[SessionSource, str, ModuleDatabase | None]:
    """Where the command's sessions come from, or ``HostSetupError`` when it cannot know."""
    if service.sessions is not None:
        return as_session_source(service.sessions), "the service's own sessions", None
    settings = service.settings
    if "payment_database_url" not in settings.model_fields_set:
        raise HostSetupError(
            "refusing to guess the database: neither does the service bring its sessions nor is"
            " PAYMENT_DATABASE_URL set, and the default ./payments.db is probably not where your"
            " payments are. Give your service your session factory"
            " (PaymentService(sessions=SessionLocal), then --service module:attr or"
            f" {SERVICE_SETTING}), or set PAYMENT_DATABASE_URL to your database."
        )
    url = settings.payment_database_url
    _refuse_missing_sqlite_file(url)
    database = ModuleDatabase(url, pool_size=settings.payment_database_pool_size)
    return database.session, settings.database_url_for_display, database


def _refuse_missing_sqlite_file(url: str) -> None:
    """A SQLite URL whose file does not exist would be created empty: a typo, not a database."""
    try:
        parsed = make_url(url)
    except Exception:
        return  # ModuleDatabase refuses it, naming the variable
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return
    if parsed.database == ":memory:" or parsed.database.startswith("file:"):
        return
    if not Path(parsed.database).exists():
        raise HostSetupError(
            f"PAYMENT_DATABASE_URL names the SQLite file {parsed.database}, which does not exist"
            " (run your migrations first, or fix the path)"
        )


@asynccontextmanager
async def open_host(spec: str | None = None) -> AsyncIterator[Host]:
    """The service and sessions for a command; closes what it opened (the service's M-Pesa
    connections, the module's own engine) on the way out. ``spec``: ``--service``'s value."""
    spec = service_spec(spec)
    service = await load_service_async(spec) if spec else PaymentService()
    database: ModuleDatabase | None = None
    try:
        sessions, description, database = sessions_for(service)
        yield Host(service, sessions, description, database)
    finally:
        await service.aclose()
        if database is not None:
            await database.dispose()


def describe_failure(error: BaseException) -> str | None:
    """The one-line message a command prints for an error it expects (no traceback), or
    ``None`` for a real bug."""
    if isinstance(error, HostSetupError):
        return str(error)
    if isinstance(error, PaymentConfigurationError):
        return error.message
    if isinstance(error, DATABASE_ERRORS):
        detail = str(getattr(error, "orig", None) or error).splitlines()[0]
        return f"the payments database is unavailable or not migrated: {detail}"
    return None


def _dotenv_value(name: str) -> str | None:
    path = Path(".env")
    if not path.is_file():
        return None
    try:
        from dotenv import dotenv_values
    except ImportError:  # python-dotenv is a dependency; be safe anyway
        return None
    for key, value in dotenv_values(path).items():
        if key.upper() == name:
            return value
    return None


__all__ = [
    "SERVICE_SETTING",
    "Host",
    "HostSetupError",
    "describe_failure",
    "load_service",
    "load_service_async",
    "open_host",
    "service_spec",
    "sessions_for",
]
