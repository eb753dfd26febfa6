"""The module's Alembic revision builds exactly the schema the models declare, on SQLite and
PostgreSQL, through the repository's own environment and through a host's copy of the file."""

from __future__ import annotations

import ast
import shutil
from argparse import Namespace
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from textwrap import dedent

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from payments.models import (
    Base,
    PaymentAuditLog,
    PaymentTransaction,
    PaymentWebhookLog,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MIGRATION_FILE = REPO_ROOT / "payments" / "migrations" / "payment_001_create_tables.py"
#: Every revision file of the module, in order (what a host copies).
MIGRATION_FILES = sorted((REPO_ROOT / "payments" / "migrations").glob("payment_*.py"))
PAYMENT_TABLES = {
    "payment_transactions",
    "payment_audit_logs",
    "payment_webhook_logs",
    "payment_daily_totals",
}
HEAD = "payment_003"


def repo_alembic_config(url: str) -> Config:
    """The repository's ``alembic.ini``, as ``alembic -x url=<url> …`` would use it."""
    config = Config(str(REPO_ROOT / "alembic.ini"), cmd_opts=Namespace(x=[f"url={url}"]))
    config.attributes["configure_logger"] = False  # leave pytest's logging alone
    return config


@contextmanager
def sync_engine(url: str) -> Iterator[Engine]:
    """A synchronous engine: stdlib sqlite3, or psycopg 3 for PostgreSQL."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    engine = create_engine(parsed)
    try:
        yield engine
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    with sync_engine(url) as engine:
        return set(inspect(engine).get_table_names())


def current_revision(url: str) -> str | None:
    with sync_engine(url) as engine, engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


# --- the repository's environment ---------------------------------------------------------------


def test_the_repository_applies_the_module_revision_file() -> None:
    script = ScriptDirectory.from_config(repo_alembic_config("sqlite://"))
    assert script.get_heads() == [HEAD]  # payments/migrations/__init__.py is ignored
    revision = script.get_revision("payment_001")
    assert revision is not None
    assert revision.down_revision is None
    assert revision.branch_labels == {"payments"}
    assert Path(revision.path) == MIGRATION_FILE


def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    config = repo_alembic_config(database_url)

    command.upgrade(config, "head")
    assert PAYMENT_TABLES <= table_names(database_url)
    assert current_revision(database_url) == HEAD

    command.downgrade(config, "base")
    assert table_names(database_url) - {"alembic_version"} == set()
    assert current_revision(database_url) is None

    command.upgrade(config, "heads")
    assert PAYMENT_TABLES <= table_names(database_url)
    assert current_revision(database_url) == HEAD


def test_migrated_schema_matches_the_models(database_url: str) -> None:
    command.upgrade(repo_alembic_config(database_url), "head")

    with sync_engine(database_url) as engine, engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        diff = compare_metadata(context, Base.metadata)

    assert diff == [], "the migration differs from payments/models.py:\n" + "\n".join(
        map(repr, diff)
    )


def _model_names(kind: str) -> dict[str, set[str]]:
    """Constraint names per table as the models declare them (naming convention applied)."""
    names: dict[str, set[str]] = {}
    for table in Base.metadata.sorted_tables:
        if kind == "index":
            found = {str(index.name) for index in table.indexes}
        else:
            found = {
                str(constraint.name)
                for constraint in table.constraints
                if type(constraint).__name__ == kind
            }
        names[table.name] = found
    return names


def test_constraint_and_index_names_match_the_models(database_url: str) -> None:
    command.upgrade(repo_alembic_config(database_url), "head")

    with sync_engine(database_url) as engine:
        inspector = inspect(engine)
        found: dict[str, dict[str, set[str]]] = {
            "PrimaryKeyConstraint": {},
            "UniqueConstraint": {},
            "ForeignKeyConstraint": {},
            "CheckConstraint": {},
            "index": {},
        }
        ondelete: dict[str, str | None] = {}
        for table in PAYMENT_TABLES:
            found["PrimaryKeyConstraint"][table] = {inspector.get_pk_constraint(table)["name"]}
            found["UniqueConstraint"][table] = {
                str(unique["name"]) for unique in inspector.get_unique_constraints(table)
            }
            foreign_keys = inspector.get_foreign_keys(table)
            found["ForeignKeyConstraint"][table] = {str(fk["name"]) for fk in foreign_keys}
            for fk in foreign_keys:
                ondelete[str(fk["name"])] = fk["options"].get("ondelete")
            found["CheckConstraint"][table] = {
                str(check["name"]) for check in inspector.get_check_constraints(table)
            }
            found["index"][table] = {
                str(index["name"])
                for index in inspector.get_indexes(table)
                if not index.get("duplicates_constraint")  # a unique constraint's own index
            }

    for kind, tables in found.items():
        assert tables == _model_names(kind), kind

    assert (
        "uq_payment_transactions_idempotency_key"
        in found["UniqueConstraint"]["payment_transactions"]
    )
    assert "ck_payment_transactions_status" in found["CheckConstraint"]["payment_transactions"]
    assert ondelete == {
        "fk_payment_transactions_original_id_payment_transactions": "RESTRICT",
        "fk_payment_audit_logs_transaction_id_payment_transactions": "RESTRICT",
        "fk_payment_webhook_logs_transaction_id_payment_transactions": "SET NULL",
    }


def test_check_constraints_repeat_the_models_on_sqlite(tmp_path: Path) -> None:
    """Autogenerate ignores CHECK constraints; SQLite keeps their text as written, so a status or
    operation added to the models but not to the migration shows up here."""
    url = f"sqlite:///{tmp_path}/checks.db"
    command.upgrade(repo_alembic_config(url), "head")
    with sync_engine(url) as engine:
        migrated = {
            check["name"]: check["sqltext"]
            for check in inspect(engine).get_check_constraints("payment_transactions")
        }
    declared = {
        str(constraint.name): str(constraint.sqltext)  # type: ignore[attr-defined]
        for constraint in PaymentTransaction.__table__.constraints
        if type(constraint).__name__ == "CheckConstraint"
    }
    assert migrated == declared


@pytest.mark.parametrize("migration", MIGRATION_FILES, ids=lambda path: path.stem)
def test_the_revision_file_stands_alone(migration: Path) -> None:
    """Hosts copy the file without the package: it may import only alembic and SQLAlchemy."""
    tree = ast.parse(migration.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports in a revision file"
            imported.add(str(node.module).split(".")[0])
    assert imported <= {"__future__", "collections", "typing", "alembic", "sqlalchemy"}


# --- a host's environment -----------------------------------------------------------------------

HOST_ENV = """\
from alembic import context
from sqlalchemy import create_engine

engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
"""

HOST_SCRIPT_TEMPLATE = '''\
"""${message}"""
from alembic import op
import sqlalchemy as sa
${imports if imports else ""}
revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade():
    ${upgrades if upgrades else "pass"}


def downgrade():
    ${downgrades if downgrades else "pass"}
'''

HOST_REVISION = '''\
"""The host application's own first revision."""
from alembic import op
import sqlalchemy as sa

revision = "host_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table("users", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade():
    op.drop_table("users")
'''


def test_a_host_copies_the_revision_into_its_own_alembic_versions(tmp_path: Path) -> None:
    """What the README tells a host to do: copy the file, ``alembic upgrade heads``."""
    project = tmp_path / "host"
    versions = project / "alembic" / "versions"
    versions.mkdir(parents=True)
    (project / "alembic" / "env.py").write_text(HOST_ENV)
    (project / "alembic" / "script.py.mako").write_text(HOST_SCRIPT_TEMPLATE)
    (versions / "host_0001_users.py").write_text(HOST_REVISION)
    for migration in MIGRATION_FILES:
        shutil.copy(migration, versions / migration.name)
    url = f"sqlite:///{project}/app.db"
    (project / "alembic.ini").write_text(
        dedent(
            f"""\
            [alembic]
            script_location = %(here)s/alembic
            path_separator = os
            sqlalchemy.url = {url}
            """
        )
    )
    config = Config(str(project / "alembic.ini"))

    command.upgrade(config, "heads")
    assert table_names(url) == PAYMENT_TABLES | {"users", "alembic_version"}

    command.downgrade(config, "payments@base")  # the module's branch only
    assert table_names(url) == {"users", "alembic_version"}

    command.upgrade(config, "payments@head")
    assert table_names(url) == PAYMENT_TABLES | {"users", "alembic_version"}


# --- PostgreSQL only ----------------------------------------------------------------------------

MONITORING_QUERIES = {
    "transactions_by_status": (
        "SELECT status, COUNT(*) as count FROM payment_transactions"
        " WHERE created_at >= NOW() - INTERVAL '24 hours' GROUP BY status;"
    ),
    "average_response_time": (
        "SELECT AVG(response_time_ms) as avg_response_time FROM payment_audit_logs"
        " WHERE action = 'api_response' AND created_at >= NOW() - INTERVAL '1 hour';"
    ),
    "unprocessed_webhooks": (
        "SELECT * FROM payment_webhook_logs"
        " WHERE is_processed = false AND received_at >= NOW() - INTERVAL '1 hour';"
    ),
}


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_readme_monitoring_queries_run_on_the_migrated_schema(database_url: str) -> None:
    command.upgrade(repo_alembic_config(database_url), "head")
    now = datetime.now(UTC)

    with sync_engine(database_url) as engine:
        with Session(engine) as session, session.begin():
            payment = PaymentTransaction(
                transaction_id="T12345",
                operation="c2b",
                amount=Decimal("10.00"),
                phone_number="258841234567",
                third_party_reference="REF1",
                created_at=now,
                updated_at=now,
            )
            session.add(payment)
            session.flush()
            session.add_all(
                [
                    PaymentAuditLog(
                        payment_id=payment.id,
                        action="api_response",
                        response_time_ms=100,
                        created_at=now,
                    ),
                    PaymentAuditLog(
                        payment_id=payment.id,
                        action="api_response",
                        response_time_ms=300,
                        created_at=now,
                    ),
                    PaymentWebhookLog(raw_body="{}", received_at=now, payment_id=payment.id),
                ]
            )

        with engine.connect() as connection:
            by_status = connection.exec_driver_sql(MONITORING_QUERIES["transactions_by_status"])
            assert [tuple(row) for row in by_status] == [("pending", 1)]

            average = connection.exec_driver_sql(MONITORING_QUERIES["average_response_time"])
            assert average.scalar_one() == Decimal("200")

            webhooks = connection.exec_driver_sql(MONITORING_QUERIES["unprocessed_webhooks"])
            rows = webhooks.mappings().all()
            assert len(rows) == 1
            assert rows[0]["raw_body"] == "{}"
            assert rows[0]["is_processed"] is False
