"""Create the payments tables: transactions, their append-only audit log, and inbound webhooks.

Copy this file into your ``alembic/versions/`` folder and run ``alembic upgrade heads``. It stands
alone (it does not import the ``payments`` models) and starts its own ``payments`` branch, so it
sits beside your application's revisions. Every constraint and index is named exactly as in
``payments/models.py``, so autogenerate against ``payments.models.Base.metadata`` finds no
difference afterwards.

Revision ID: payment_001
Revises:
Create Date: 2024-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "payment_001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("payments",)
depends_on: str | Sequence[str] | None = None

_STATUSES = (
    "pending",
    "processing",
    "completed",
    "failed",
    "cancelled",
    "expired",
    "unknown",
    "partially_reversed",
    "reversed",
)
_OPERATIONS = ("c2b", "b2c", "b2b", "reversal")


def _in(values: Sequence[str]) -> str:
    return ", ".join(f"'{value}'" for value in values)


def upgrade() -> None:
    op.create_table(
        "payment_transactions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("transaction_id", sa.String(length=64), nullable=False),
        sa.Column("operation", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=24), nullable=False),
        sa.Column("amount", sa.Numeric(12, 2), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("reversed_amount", sa.Numeric(12, 2), nullable=False),
        sa.Column("phone_number", sa.String(length=20), nullable=True),
        sa.Column("receiver_party_code", sa.String(length=10), nullable=True),
        sa.Column("conversation_id", sa.String(length=100), nullable=True),
        sa.Column("provider_transaction_id", sa.String(length=100), nullable=True),
        sa.Column("third_party_reference", sa.String(length=20), nullable=False),
        sa.Column("transaction_reference", sa.String(length=20), nullable=True),
        sa.Column("account_reference", sa.String(length=100), nullable=True),
        sa.Column("description", sa.String(length=255), nullable=True),
        sa.Column("entity_type", sa.String(length=50), nullable=True),
        sa.Column("entity_id", sa.String(length=50), nullable=True),
        sa.Column("customer_name", sa.String(length=255), nullable=True),
        sa.Column("customer_email", sa.String(length=255), nullable=True),
        sa.Column("user_id", sa.String(length=100), nullable=True),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("request_fingerprint", sa.String(length=64), nullable=True),
        sa.Column("response_code", sa.String(length=64), nullable=True),
        sa.Column("response_description", sa.String(length=255), nullable=True),
        sa.Column("status_description", sa.String(length=255), nullable=True),
        sa.Column("error_code", sa.String(length=32), nullable=True),
        sa.Column("original_id", sa.Integer(), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("attention_required", sa.Boolean(), nullable=False),
        sa.Column("operator_hold", sa.Boolean(), nullable=False),
        sa.Column("reconcile_attempts", sa.Integer(), nullable=False),
        sa.Column("next_reconcile_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payment_transactions")),
        sa.CheckConstraint(
            f"status IN ({_in(_STATUSES)})", name=op.f("ck_payment_transactions_status")
        ),
        sa.CheckConstraint(
            f"operation IN ({_in(_OPERATIONS)})", name=op.f("ck_payment_transactions_operation")
        ),
        sa.CheckConstraint("amount > 0", name=op.f("ck_payment_transactions_amount_positive")),
        sa.CheckConstraint(
            "reversed_amount >= 0 AND reversed_amount <= amount",
            name=op.f("ck_payment_transactions_reversed_amount"),
        ),
        sa.UniqueConstraint("transaction_id", name=op.f("uq_payment_transactions_transaction_id")),
        sa.UniqueConstraint(
            "third_party_reference", name=op.f("uq_payment_transactions_third_party_reference")
        ),
        sa.UniqueConstraint(
            "idempotency_key", name=op.f("uq_payment_transactions_idempotency_key")
        ),
        sa.UniqueConstraint(
            "provider_transaction_id",
            name=op.f("uq_payment_transactions_provider_transaction_id"),
        ),
        sa.ForeignKeyConstraint(
            ["original_id"],
            ["payment_transactions.id"],
            name=op.f("fk_payment_transactions_original_id_payment_transactions"),
            ondelete="RESTRICT",
        ),
    )
    for name, columns in (
        ("ix_payment_transactions_status_created_at", ["status", "created_at"]),
        ("ix_payment_transactions_created_at", ["created_at"]),
        ("ix_payment_transactions_operation", ["operation"]),
        ("ix_payment_transactions_phone_number", ["phone_number"]),
        ("ix_payment_transactions_entity", ["entity_type", "entity_id"]),
        ("ix_payment_transactions_user_id", ["user_id"]),
        ("ix_payment_transactions_conversation_id", ["conversation_id"]),
        ("ix_payment_transactions_original_id", ["original_id"]),
        ("ix_payment_transactions_reconcile", ["status", "next_reconcile_at"]),
    ):
        op.create_index(op.f(name), "payment_transactions", columns, unique=False)

    op.create_table(
        "payment_audit_logs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("transaction_id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("status_before", sa.String(length=24), nullable=True),
        sa.Column("status_after", sa.String(length=24), nullable=True),
        sa.Column("request_body", sa.JSON(), nullable=True),
        sa.Column("response_body", sa.JSON(), nullable=True),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("response_time_ms", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(length=100), nullable=True),
        sa.Column("client_ip", sa.String(length=45), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payment_audit_logs")),
        sa.ForeignKeyConstraint(
            ["transaction_id"],
            ["payment_transactions.id"],
            name=op.f("fk_payment_audit_logs_transaction_id_payment_transactions"),
            ondelete="RESTRICT",
        ),
    )
    op.create_index(
        op.f("ix_payment_audit_logs_transaction_id"),
        "payment_audit_logs",
        ["transaction_id", "id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_payment_audit_logs_action_created_at"),
        "payment_audit_logs",
        ["action", "created_at"],
        unique=False,
    )

    op.create_table(
        "payment_webhook_logs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("raw_body", sa.Text(), nullable=False),
        sa.Column("headers", sa.JSON(), nullable=True),
        sa.Column("remote_ip", sa.String(length=45), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("is_valid", sa.Boolean(), nullable=False),
        sa.Column("validation_error", sa.String(length=255), nullable=True),
        sa.Column("is_processed", sa.Boolean(), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("processing_error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("transaction_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payment_webhook_logs")),
        sa.ForeignKeyConstraint(
            ["transaction_id"],
            ["payment_transactions.id"],
            name=op.f("fk_payment_webhook_logs_transaction_id_payment_transactions"),
            ondelete="SET NULL",
        ),
    )
    op.create_index(
        op.f("ix_payment_webhook_logs_is_processed_received_at"),
        "payment_webhook_logs",
        ["is_processed", "received_at"],
        unique=False,
    )
    op.create_index(
        op.f("ix_payment_webhook_logs_transaction_id"),
        "payment_webhook_logs",
        ["transaction_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_payment_webhook_logs_transaction_id"), table_name="payment_webhook_logs")
    op.drop_index(
        op.f("ix_payment_webhook_logs_is_processed_received_at"), table_name="payment_webhook_logs"
    )
    op.drop_table("payment_webhook_logs")

    op.drop_index(op.f("ix_payment_audit_logs_action_created_at"), table_name="payment_audit_logs")
    op.drop_index(op.f("ix_payment_audit_logs_transaction_id"), table_name="payment_audit_logs")
    op.drop_table("payment_audit_logs")

    for name in (
        "ix_payment_transactions_reconcile",
        "ix_payment_transactions_original_id",
        "ix_payment_transactions_conversation_id",
        "ix_payment_transactions_user_id",
        "ix_payment_transactions_entity",
        "ix_payment_transactions_phone_number",
        "ix_payment_transactions_operation",
        "ix_payment_transactions_created_at",
        "ix_payment_transactions_status_created_at",
    ):
        op.drop_index(op.f(name), table_name="payment_transactions")
    op.drop_table("payment_transactions")
