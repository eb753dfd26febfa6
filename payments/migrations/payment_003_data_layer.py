"""The data layer at a year of payments: indexes the module's queries use, server defaults,
JSONB and SQL NULL, and the daily totals the summary reads.

- Indexes: composite ones where the list's filters meet its order (``(created_at, id)``,
  ``(phone_number, created_at)``, ``(user_id, created_at)``), partial ones for the flagged few
  and for the reconciler's claim (open payments only, in due order); the indexes no query of the
  module uses are dropped (``operation``, the single-column ``created_at``/``phone_number``/
  ``user_id`` ones the composites replace, the old reconcile index, the audit
  ``(action, created_at)`` index).
- Server defaults for every NOT NULL column that has a Python default (``now()`` for times).
- JSON columns become JSONB on PostgreSQL; JSON ``null`` stored for an absent value becomes
  SQL NULL.
- ``payment_daily_totals``, kept by triggers in the same transaction as each payment's insert
  and status change, filled here from the existing payments.

Copy it beside ``payment_001`` (and ``payment_002``) into your ``alembic/versions/`` and run
``alembic upgrade heads``. It stands alone (no import of the ``payments`` package). On a large
PostgreSQL table the index builds lock writes for a while: run it in a quiet moment.

Revision ID: payment_003
Revises: payment_002
Create Date: 2026-12-02 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "payment_003"
# MERGE NOTE (issue 16): "payment_002" (events, issue 14) once it is on main; "payment_001" until.
down_revision: str | Sequence[str] | None = "payment_001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_RECONCILABLE = "'pending', 'processing', 'unknown'"
_SHARDS = 16

#: (table, column, server default) for every NOT NULL column with a Python default.
_DEFAULTS: tuple[tuple[str, str, sa.types.TypeEngine[object], object], ...] = (
    ("payment_transactions", "status", sa.String(24), "pending"),
    ("payment_transactions", "currency", sa.String(3), "MZN"),
    ("payment_transactions", "reversed_amount", sa.Numeric(12, 2), "0"),
    ("payment_transactions", "attention_required", sa.Boolean(), sa.false()),
    ("payment_transactions", "operator_hold", sa.Boolean(), sa.false()),
    ("payment_transactions", "reconcile_attempts", sa.Integer(), "0"),
    ("payment_transactions", "version", sa.Integer(), "1"),
    ("payment_transactions", "created_at", sa.DateTime(timezone=True), sa.func.now()),
    ("payment_transactions", "updated_at", sa.DateTime(timezone=True), sa.func.now()),
    ("payment_audit_logs", "created_at", sa.DateTime(timezone=True), sa.func.now()),
    ("payment_webhook_logs", "source", sa.String(32), "c2b"),
    ("payment_webhook_logs", "received_at", sa.DateTime(timezone=True), sa.func.now()),
    ("payment_webhook_logs", "is_valid", sa.Boolean(), sa.false()),
    ("payment_webhook_logs", "is_processed", sa.Boolean(), sa.false()),
    ("payment_webhook_logs", "attempts", sa.Integer(), "0"),
)
_JSON_COLUMNS = (
    ("payment_transactions", "metadata"),
    ("payment_audit_logs", "request_body"),
    ("payment_audit_logs", "response_body"),
    ("payment_webhook_logs", "headers"),
)
_DROPPED_INDEXES = (
    ("payment_transactions", "ix_payment_transactions_created_at", ["created_at"]),
    ("payment_transactions", "ix_payment_transactions_operation", ["operation"]),
    ("payment_transactions", "ix_payment_transactions_phone_number", ["phone_number"]),
    ("payment_transactions", "ix_payment_transactions_user_id", ["user_id"]),
    ("payment_transactions", "ix_payment_transactions_reconcile", ["status", "next_reconcile_at"]),
    ("payment_audit_logs", "ix_payment_audit_logs_action_created_at", ["action", "created_at"]),
)
_NEW_INDEXES = (
    ("ix_payment_transactions_created_at_id", ["created_at", "id"]),
    ("ix_payment_transactions_phone_number_created_at", ["phone_number", "created_at"]),
    ("ix_payment_transactions_user_id_created_at", ["user_id", "created_at"]),
)

# -- the triggers that keep payment_daily_totals (the same text as payments/models.py) ----------

PG_TOTALS_FUNCTION = f"""
CREATE OR REPLACE FUNCTION payment_daily_totals_apply() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO payment_daily_totals AS t
            (day, operation, status, shard, count, amount_cents, flagged, reversed_cents)
        VALUES ((OLD.created_at AT TIME ZONE 'UTC')::date, OLD.operation, OLD.status,
                OLD.id % {_SHARDS}, -1, -round(OLD.amount * 100)::bigint,
                -OLD.attention_required::int, -round(OLD.reversed_amount * 100)::bigint)
        ON CONFLICT (day, operation, status, shard) DO UPDATE
        SET count = t.count + EXCLUDED.count, amount_cents = t.amount_cents + EXCLUDED.amount_cents,
            flagged = t.flagged + EXCLUDED.flagged,
            reversed_cents = t.reversed_cents + EXCLUDED.reversed_cents;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO payment_daily_totals AS t
            (day, operation, status, shard, count, amount_cents, flagged, reversed_cents)
        VALUES ((NEW.created_at AT TIME ZONE 'UTC')::date, NEW.operation, NEW.status,
                NEW.id % {_SHARDS}, 1, round(NEW.amount * 100)::bigint,
                NEW.attention_required::int, round(NEW.reversed_amount * 100)::bigint)
        ON CONFLICT (day, operation, status, shard) DO UPDATE
        SET count = t.count + EXCLUDED.count, amount_cents = t.amount_cents + EXCLUDED.amount_cents,
            flagged = t.flagged + EXCLUDED.flagged,
            reversed_cents = t.reversed_cents + EXCLUDED.reversed_cents;
    END IF;
    RETURN NULL;
END
$$
"""
_TOTALS_CHANGED = (
    "OLD.status IS DISTINCT FROM NEW.status OR OLD.operation IS DISTINCT FROM NEW.operation"
    " OR OLD.amount IS DISTINCT FROM NEW.amount OR OLD.created_at IS DISTINCT FROM NEW.created_at"
    " OR OLD.attention_required IS DISTINCT FROM NEW.attention_required"
    " OR OLD.reversed_amount IS DISTINCT FROM NEW.reversed_amount"
)
PG_TOTALS_DDL = (
    PG_TOTALS_FUNCTION,
    "CREATE TRIGGER payment_daily_totals_insert_delete AFTER INSERT OR DELETE"
    " ON payment_transactions FOR EACH ROW EXECUTE FUNCTION payment_daily_totals_apply()",
    "CREATE TRIGGER payment_daily_totals_update"
    " AFTER UPDATE OF status, operation, amount, created_at, attention_required, reversed_amount"
    " ON payment_transactions"
    f" FOR EACH ROW WHEN ({_TOTALS_CHANGED}) EXECUTE FUNCTION payment_daily_totals_apply()",
)
PG_TOTALS_DROP = (
    "DROP TRIGGER IF EXISTS payment_daily_totals_update ON payment_transactions",
    "DROP TRIGGER IF EXISTS payment_daily_totals_insert_delete ON payment_transactions",
    "DROP FUNCTION IF EXISTS payment_daily_totals_apply()",
)


def _sqlite_bucket(row: str, sign: str) -> str:
    return (
        "INSERT INTO payment_daily_totals"
        " (day, operation, status, shard, count, amount_cents, flagged, reversed_cents)"
        f" VALUES (date({row}.created_at), {row}.operation, {row}.status,"
        f" {row}.id % {_SHARDS}, {sign}1,"
        f" {sign}CAST(round({row}.amount * 100) AS INTEGER), {sign}{row}.attention_required,"
        f" {sign}CAST(round({row}.reversed_amount * 100) AS INTEGER))"
        " ON CONFLICT (day, operation, status, shard) DO UPDATE"
        " SET count = count + excluded.count, amount_cents = amount_cents + excluded.amount_cents,"
        " flagged = flagged + excluded.flagged,"
        " reversed_cents = reversed_cents + excluded.reversed_cents;"
    )


SQLITE_TOTALS_DDL = (
    "CREATE TRIGGER payment_daily_totals_insert AFTER INSERT ON payment_transactions"
    f" BEGIN {_sqlite_bucket('NEW', '')} END",
    "CREATE TRIGGER payment_daily_totals_delete AFTER DELETE ON payment_transactions"
    f" BEGIN {_sqlite_bucket('OLD', '-')} END",
    "CREATE TRIGGER payment_daily_totals_update"
    " AFTER UPDATE OF status, operation, amount, created_at, attention_required, reversed_amount"
    " ON payment_transactions"
    f" WHEN {_TOTALS_CHANGED.replace('IS DISTINCT FROM', 'IS NOT')}"
    f" BEGIN {_sqlite_bucket('OLD', '-')} {_sqlite_bucket('NEW', '')} END",
)
SQLITE_TOTALS_DROP = (
    "DROP TRIGGER IF EXISTS payment_daily_totals_update",
    "DROP TRIGGER IF EXISTS payment_daily_totals_delete",
    "DROP TRIGGER IF EXISTS payment_daily_totals_insert",
)

_PG_BACKFILL = """
INSERT INTO payment_daily_totals
    (day, operation, status, shard, count, amount_cents, flagged, reversed_cents)
SELECT (created_at AT TIME ZONE 'UTC')::date, operation, status, 0,
       count(*), sum(round(amount * 100)::bigint), count(*) FILTER (WHERE attention_required),
       sum(round(reversed_amount * 100)::bigint)
FROM payment_transactions GROUP BY 1, 2, 3, 4
"""
_SQLITE_BACKFILL = """
INSERT INTO payment_daily_totals
    (day, operation, status, shard, count, amount_cents, flagged, reversed_cents)
SELECT date(created_at), operation, status, 0,
       count(*), sum(CAST(round(amount * 100) AS INTEGER)), sum(attention_required),
       sum(CAST(round(reversed_amount * 100) AS INTEGER))
FROM payment_transactions GROUP BY 1, 2, 3, 4
"""


def _is_postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    postgres = _is_postgresql()
    for table, name, _ in _DROPPED_INDEXES:
        op.drop_index(name, table_name=table)

    # SQLite cannot change a column's default in place: batch mode copies the table.
    for table in ("payment_transactions", "payment_audit_logs", "payment_webhook_logs"):
        with op.batch_alter_table(table) as batch:
            for default_table, column, type_, default in _DEFAULTS:
                if default_table == table:
                    batch.alter_column(
                        column, existing_type=type_, existing_nullable=False, server_default=default
                    )

    for table, column in _JSON_COLUMNS:
        if postgres:
            op.alter_column(
                table,
                column,
                type_=postgresql.JSONB(),
                existing_type=sa.JSON(),
                existing_nullable=True,
                postgresql_using=f"{column}::jsonb",
            )
            op.execute(f"UPDATE {table} SET {column} = NULL WHERE {column} = 'null'::jsonb")
        else:
            op.execute(f"UPDATE {table} SET {column} = NULL WHERE {column} = 'null'")

    for name, columns in _NEW_INDEXES:
        op.create_index(name, "payment_transactions", columns, unique=False)
    op.create_index(
        "ix_payment_transactions_attention",
        "payment_transactions",
        ["created_at", "id"],
        unique=False,
        postgresql_where=sa.text("attention_required = true"),
        sqlite_where=sa.text("attention_required = 1"),
    )
    op.create_index(
        "ix_payment_transactions_reconcile_due",
        "payment_transactions",
        ["next_reconcile_at", "id"],
        unique=False,
        postgresql_where=sa.text(f"status IN ({_RECONCILABLE}) AND operator_hold = false"),
        sqlite_where=sa.text(f"status IN ({_RECONCILABLE}) AND operator_hold = 0"),
    )

    op.create_table(
        "payment_daily_totals",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("operation", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=24), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("count", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("flagged", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("reversed_cents", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint(
            "day", "operation", "status", "shard", name=op.f("pk_payment_daily_totals")
        ),
    )
    op.execute(_PG_BACKFILL if postgres else _SQLITE_BACKFILL)
    for statement in PG_TOTALS_DDL if postgres else SQLITE_TOTALS_DDL:
        op.execute(statement)


def downgrade() -> None:
    postgres = _is_postgresql()
    for statement in PG_TOTALS_DROP if postgres else SQLITE_TOTALS_DROP:
        op.execute(statement)
    op.drop_table("payment_daily_totals")

    op.drop_index("ix_payment_transactions_reconcile_due", table_name="payment_transactions")
    op.drop_index("ix_payment_transactions_attention", table_name="payment_transactions")
    for name, _ in _NEW_INDEXES:
        op.drop_index(name, table_name="payment_transactions")

    if postgres:  # SQL NULL stays SQL NULL: both mean "absent" to the module
        for table, column in _JSON_COLUMNS:
            op.alter_column(
                table,
                column,
                type_=sa.JSON(),
                existing_type=postgresql.JSONB(),
                existing_nullable=True,
                postgresql_using=f"{column}::json",
            )

    for table in ("payment_transactions", "payment_audit_logs", "payment_webhook_logs"):
        with op.batch_alter_table(table) as batch:
            for default_table, column, type_, _default in _DEFAULTS:
                if default_table == table:
                    batch.alter_column(
                        column, existing_type=type_, existing_nullable=False, server_default=None
                    )

    for table, name, columns in _DROPPED_INDEXES:
        op.create_index(name, table, columns, unique=False)
