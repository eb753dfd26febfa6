"""The repository's Alembic environment (async): ``alembic upgrade head`` from the repo root.

The database URL comes from ``-x url=...``, else ``PAYMENT_DATABASE_URL`` (environment, then
``.env``), else ``sqlite:///./payments.db``; it is normalised to an async driver the same way the
module's own engine does it.
"""

from __future__ import annotations

import asyncio
import os
import threading
from logging.config import fileConfig

from alembic import context
from dotenv import dotenv_values
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from payments.database import normalize_database_url
from payments.models import Base

config = context.config

# Programmatic callers (tests) pass attributes["configure_logger"] = False to keep their logging.
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata

DEFAULT_URL = "sqlite:///./payments.db"


def database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        url = os.environ.get("PAYMENT_DATABASE_URL")
    if not url:
        url = dotenv_values(".env").get("PAYMENT_DATABASE_URL")
    return normalize_database_url(url or DEFAULT_URL)


def configure(dialect_name: str, **options: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=dialect_name == "sqlite",  # SQLite alters tables by copying them
        **options,  # type: ignore[arg-type]
    )


def run_migrations_offline() -> None:
    """``alembic upgrade head --sql``: print the SQL instead of running it."""
    url = database_url()
    dialect_name = url.partition(":")[0].partition("+")[0]
    configure(dialect_name, url=url, literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    configure(connection.dialect.name, connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = create_async_engine(database_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # the usual case: the alembic command line
        asyncio.run(run_async_migrations())
        return
    # Called from async code (an app's startup, an async test): use a loop of our own.
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(run_async_migrations())
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="alembic-migrations")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
