"""Create the payment events outbox: events, their delivery state per consumer, every attempt.

Copy this file into your ``alembic/versions/`` folder beside ``payment_001_create_tables.py`` and
run ``alembic upgrade heads`` (or ``alembic upgrade payments@head``). It stands alone (it does not
import the ``payments`` models); every constraint and index is named exactly as in
``payments/models.py``, so autogenerate against ``payments.models.Base.metadata`` finds no
difference afterwards.

Revision ID: payment_002
Revises: payment_001
Create Date: 2026-12-02 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "payment_002"
down_revision: str | Sequence[str] | None = "payment_001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_EVENT_TYPES = (
    "payment.completed",
    "payment.failed",
    "payment.cancelled",
    "payment.expired",
    "payment.unknown",
    "payment.attention_required",
    "payment.resolved",
    "reversal.completed",
    "reversal.failed",
)
_KINDS = ("hooks", "webhook")
_DELIVERY_STATUSES = ("pending", "delivered", "failed", "gone")


def _in(values: Sequence[str]) -> str:
    return ", ".join(f"'{value}'" for value in values)


def upgrade() -> None:
    op.create_table(
        "payment_events",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("type", sa.String(length=40), nullable=False),
        sa.Column("transaction_id", sa.String(length=64), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payment_events")),
        sa.CheckConstraint(f"type IN ({_in(_EVENT_TYPES)})", name=op.f("ck_payment_events_type")),
    )
    op.create_index(
        op.f("ix_payment_events_transaction_id"),
        "payment_events",
        ["transaction_id", "id"],
        unique=False,
    )
    op.create_index(op.f("ix_payment_events_type"), "payment_events", ["type", "id"], unique=False)
    op.create_index(
        op.f("ix_payment_events_created_at"), "payment_events", ["created_at"], unique=False
    )

    op.create_table(
        "payment_event_deliveries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("consumer", sa.String(length=1000), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payment_event_deliveries")),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["payment_events.id"],
            name=op.f("fk_payment_event_deliveries_event_id_payment_events"),
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint(
            "event_id", "consumer", name=op.f("uq_payment_event_deliveries_consumer")
        ),
        sa.CheckConstraint(
            f"kind IN ({_in(_KINDS)})", name=op.f("ck_payment_event_deliveries_kind")
        ),
        sa.CheckConstraint(
            f"status IN ({_in(_DELIVERY_STATUSES)})",
            name=op.f("ck_payment_event_deliveries_status"),
        ),
    )
    op.create_index(
        op.f("ix_payment_event_deliveries_due"),
        "payment_event_deliveries",
        ["kind", "status", "next_attempt_at"],
        unique=False,
    )

    op.create_table(
        "payment_event_attempts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.Integer(), nullable=False),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("response_body", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payment_event_attempts")),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["payment_event_deliveries.id"],
            name=op.f("fk_payment_event_attempts_delivery_id_payment_event_deliveries"),
            ondelete="CASCADE",
        ),
    )
    op.create_index(
        op.f("ix_payment_event_attempts_delivery_id"),
        "payment_event_attempts",
        ["delivery_id", "id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(
        op.f("ix_payment_event_attempts_delivery_id"), table_name="payment_event_attempts"
    )
    op.drop_table("payment_event_attempts")
    op.drop_index(op.f("ix_payment_event_deliveries_due"), table_name="payment_event_deliveries")
    op.drop_table("payment_event_deliveries")
    op.drop_index(op.f("ix_payment_events_created_at"), table_name="payment_events")
    op.drop_index(op.f("ix_payment_events_type"), table_name="payment_events")
    op.drop_index(op.f("ix_payment_events_transaction_id"), table_name="payment_events")
    op.drop_table("payment_events")
