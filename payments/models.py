"""Database records: payments, their append-only audit trail, and inbound notifications.

Constraint and index names are explicit (the migration repeats them), so a host's autogenerate
finds no difference between the migrated database and these models.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


#: Length of ``response_code``; ``ID_LENGTH`` of the provider's IDs.
RESPONSE_CODE_LENGTH = 64
#: Row ids are 32-bit integers on every database.
MAX_ROW_ID = 2**31 - 1
ID_LENGTH = 100


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes for timezone-aware columns; they were stored in UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class Base(DeclarativeBase):
    """The module's own declarative base; hosts add ``Base.metadata`` to their Alembic target."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class PaymentStatus(StrEnum):
    PENDING = "pending"  # recorded, not yet sent
    PROCESSING = "processing"  # sent (or about to be): the provider has not answered yet
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    UNKNOWN = "unknown"  # the answer was lost or ambiguous: only a status query settles it
    PARTIALLY_REVERSED = "partially_reversed"
    REVERSED = "reversed"


class PaymentOperation(StrEnum):
    C2B = "c2b"
    B2C = "b2c"
    B2B = "b2b"
    REVERSAL = "reversal"


class AuditAction(StrEnum):
    INITIATED = "initiated"
    API_REQUEST = "api_request"
    API_RESPONSE = "api_response"
    STATUS_CHANGED = "status_changed"
    COMPLETED = "completed"
    FAILED = "failed"
    REVERSED = "reversed"
    CALLBACK_RECEIVED = "callback_received"
    RECONCILED = "reconciled"
    ATTENTION_REQUIRED = "attention_required"
    HOOK_FAILED = "hook_failed"
    OPERATOR_RESOLVED = "operator_resolved"


def _in(values: type[StrEnum]) -> str:
    return ", ".join(f"'{value.value}'" for value in values)


class PaymentTransaction(Base):
    __tablename__ = "payment_transactions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    transaction_id: Mapped[str] = mapped_column(String(64), unique=True)
    operation: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(24), default=PaymentStatus.PENDING.value)
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    currency: Mapped[str] = mapped_column(String(3), default="MZN")
    reversed_amount: Mapped[Decimal] = mapped_column(Numeric(12, 2), default=Decimal("0"))
    phone_number: Mapped[str | None] = mapped_column(String(20))
    receiver_party_code: Mapped[str | None] = mapped_column(String(10))

    conversation_id: Mapped[str | None] = mapped_column(String(100))
    #: M-Pesa's transaction ID: one belongs to at most one payment (reversals send it).
    provider_transaction_id: Mapped[str | None] = mapped_column(String(100), unique=True)
    #: The exact ``input_ThirdPartyReference`` sent to M-Pesa.
    third_party_reference: Mapped[str] = mapped_column(String(20), unique=True)
    #: The exact ``input_TransactionReference`` sent to M-Pesa.
    transaction_reference: Mapped[str | None] = mapped_column(String(20))
    #: The caller's own reference (an order number, …), echoed back.
    account_reference: Mapped[str | None] = mapped_column(String(100))
    description: Mapped[str | None] = mapped_column(String(255))

    entity_type: Mapped[str | None] = mapped_column(String(50))
    entity_id: Mapped[str | None] = mapped_column(String(50))
    customer_name: Mapped[str | None] = mapped_column(String(255))
    customer_email: Mapped[str | None] = mapped_column(String(255))
    user_id: Mapped[str | None] = mapped_column(String(100))

    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))

    #: Wide enough for any code M-Pesa sends (longer ones are cut, never refused).
    response_code: Mapped[str | None] = mapped_column(String(RESPONSE_CODE_LENGTH))
    response_description: Mapped[str | None] = mapped_column(String(255))
    status_description: Mapped[str | None] = mapped_column(String(255))
    #: The module's ``error_code`` of the answer that settled it unsuccessfully, so a replay
    #: tells the same truth (e.g. ``provider_unavailable``: never sent).
    error_code: Mapped[str | None] = mapped_column(String(32))

    original_id: Mapped[int | None] = mapped_column(
        ForeignKey("payment_transactions.id", ondelete="RESTRICT")
    )
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)

    #: Set when reconciliation could not settle the payment in time: an operator must look.
    attention_required: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Only an operator may settle it (``PaymentService.resolve``): M-Pesa's answers cannot (an
    #: INS-10 with an earlier completed transaction, a success reported for an unpaid payment).
    operator_hold: Mapped[bool] = mapped_column(Boolean, default=False)
    reconcile_attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_reconcile_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: Optimistic lock: every update checks it, so two writers never both apply a transition.
    version: Mapped[int] = mapped_column(Integer, default=1)

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    original: Mapped[PaymentTransaction | None] = relationship(
        remote_side=[id], lazy="raise", foreign_keys=[original_id]
    )

    __mapper_args__ = {"version_id_col": version}

    __table_args__ = (
        CheckConstraint(f"status IN ({_in(PaymentStatus)})", name="status"),
        CheckConstraint(f"operation IN ({_in(PaymentOperation)})", name="operation"),
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint(
            "reversed_amount >= 0 AND reversed_amount <= amount", name="reversed_amount"
        ),
        Index("ix_payment_transactions_status_created_at", "status", "created_at"),
        Index("ix_payment_transactions_created_at", "created_at"),
        Index("ix_payment_transactions_operation", "operation"),
        Index("ix_payment_transactions_phone_number", "phone_number"),
        Index("ix_payment_transactions_entity", "entity_type", "entity_id"),
        Index("ix_payment_transactions_user_id", "user_id"),
        Index("ix_payment_transactions_conversation_id", "conversation_id"),
        Index("ix_payment_transactions_original_id", "original_id"),
        Index("ix_payment_transactions_reconcile", "status", "next_reconcile_at"),
    )


class PaymentAuditLog(Base):
    """Append-only: rows are inserted, never updated or deleted (enforced below)."""

    __tablename__ = "payment_audit_logs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    #: The payment's row id (``payment_transactions.id``); the column keeps its shipped name.
    payment_id: Mapped[int] = mapped_column(
        "transaction_id", ForeignKey("payment_transactions.id", ondelete="RESTRICT")
    )
    action: Mapped[str] = mapped_column(String(32))
    status_before: Mapped[str | None] = mapped_column(String(24))
    status_after: Mapped[str | None] = mapped_column(String(24))
    request_body: Mapped[Any | None] = mapped_column(JSON)
    response_body: Mapped[Any | None] = mapped_column(JSON)
    http_status: Mapped[int | None] = mapped_column(Integer)
    error_message: Mapped[str | None] = mapped_column(Text)
    response_time_ms: Mapped[int | None] = mapped_column(Integer)
    actor: Mapped[str | None] = mapped_column(String(100))
    client_ip: Mapped[str | None] = mapped_column(String(45))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        Index("ix_payment_audit_logs_transaction_id", "transaction_id", "id"),
        Index("ix_payment_audit_logs_action_created_at", "action", "created_at"),
    )


class PaymentWebhookLog(Base):
    """Every inbound notification, stored raw before it is trusted or processed."""

    __tablename__ = "payment_webhook_logs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(32), default="c2b")
    raw_body: Mapped[str] = mapped_column(Text)
    headers: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    remote_ip: Mapped[str | None] = mapped_column(String(45))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    is_valid: Mapped[bool] = mapped_column(Boolean, default=False)
    validation_error: Mapped[str | None] = mapped_column(String(255))
    is_processed: Mapped[bool] = mapped_column(Boolean, default=False)
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    processing_error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: The payment's row id (``payment_transactions.id``); the column keeps its shipped name.
    payment_id: Mapped[int | None] = mapped_column(
        "transaction_id", ForeignKey("payment_transactions.id", ondelete="SET NULL")
    )

    __table_args__ = (
        Index("ix_payment_webhook_logs_is_processed_received_at", "is_processed", "received_at"),
        Index("ix_payment_webhook_logs_transaction_id", "transaction_id"),
    )


@event.listens_for(PaymentAuditLog, "before_update")
@event.listens_for(PaymentAuditLog, "before_delete")
def _audit_rows_are_append_only(*_: object) -> None:
    raise PermissionError("payment_audit_logs is append-only: rows are never updated or deleted")
