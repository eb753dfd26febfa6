"""The module's own database: URLs people paste, and sessions that never hold the loop."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from payments.config import load_settings
from payments.database import ModuleDatabase, normalize_database_url, run_db
from payments.exceptions import PaymentConfigurationError
from payments.models import Base, PaymentTransaction
from payments.schemas import PaymentInitiateRequest
from payments.service import PaymentService


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///./payments.db", "sqlite+aiosqlite:///./payments.db"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("postgresql://u:p@db/pay", "postgresql+asyncpg://u:p@db/pay"),
        ("postgres://u:p@db/pay", "postgresql+asyncpg://u:p@db/pay"),
        ("postgresql+psycopg://u:p@db/pay", "postgresql+psycopg://u:p@db/pay"),
        ("postgresql+asyncpg://u:p@db:5433/pay", "postgresql+asyncpg://u:p@db:5433/pay"),
    ],
)
def test_pasted_urls_become_async_ones(url: str, expected: str) -> None:
    assert normalize_database_url(url) == expected


@pytest.mark.parametrize("url", ["mysql://u@h/db", "not a url at all", "oracle://x"])
def test_unsupported_urls_name_the_variable(url: str) -> None:
    with pytest.raises(PaymentConfigurationError, match="PAYMENT_DATABASE_URL"):
        normalize_database_url(url)


async def test_module_database_runs_a_payment_and_gives_every_connection_back(
    database_url: str,
) -> None:
    database = ModuleDatabase(database_url, pool_size=3)
    await database.create_all(Base.metadata)
    service = PaymentService(load_settings(mpesa_environment="simulator"))
    try:
        async with database.session() as db:
            # SQLite: a plain Session worked in threads; PostgreSQL: an AsyncSession.
            expected = Session if database_url.startswith("sqlite") else AsyncSession
            assert isinstance(db, expected)
            payment = await service.initiate_payment(
                request=PaymentInitiateRequest(phone_number="841234567", amount="10"), db=db
            )
            assert database.connections_in_use() == 0  # committed: nothing held
            status = await run_db(
                db,
                lambda s: s.scalar(
                    select(PaymentTransaction.status).where(
                        PaymentTransaction.transaction_id == payment.transaction_id
                    )
                ),
            )
        assert status == "completed"
        assert database.connections_in_use() == 0
    finally:
        await service.aclose()
        await database.dispose()


def test_explicit_aiosqlite_keeps_aiosqlite(tmp_path: object) -> None:
    database = ModuleDatabase(f"sqlite+aiosqlite:///{tmp_path}/x.db")
    assert database.async_engine is not None and database.sync_engine is None
