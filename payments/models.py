"""Database records: payments, their append-only audit trail, inbound notifications, and the
outbox of payment events with their delivery state per consumer.

Constraint and index names are explicit (the migration repeats them), so a host's autogenerate
finds no difference between the migrated database and these models.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    DDL,
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    event,
    false,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from .lifecycle import UNSETTLED

# The statuses and kinds live with the state machine; they are re-exported here, where hosts
# and older code import them from.
from .lifecycle import AuditAction as AuditAction
from .lifecycle import ConsumerKind as ConsumerKind
from .lifecycle import DeliveryStatus as DeliveryStatus
from .lifecycle import EventType as EventType
from .lifecycle import PaymentOperation as PaymentOperation
from .lifecycle import PaymentStatus as PaymentStatus

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


#: JSON documents: JSONB on PostgreSQL; an absent value (``None``) is SQL NULL, not JSON ``null``,
#: so ``IS NULL`` finds it.
JsonDocument = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")

#: Server-side "now" for NOT NULL timestamps, so a raw SQL insert gets the database's clock.
NOW = func.now()


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


def _in(values: type[StrEnum]) -> str:
    return _in_values(value.value for value in values)


def _in_values(values: Any) -> str:
    return ", ".join(f"'{value}'" for value in values)


#: Statuses the reconciler works on (the claim's filter and its partial index's predicate).
RECONCILABLE = _in_values(sorted(UNSETTLED))


class PaymentTransaction(Base):
    __tablename__ = "payment_transactions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    transaction_id: Mapped[str] = mapped_column(String(64), unique=True)
    operation: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(
        String(24), default=PaymentStatus.PENDING.value, server_default=PaymentStatus.PENDING.value
    )
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    currency: Mapped[str] = mapped_column(String(3), default="MZN", server_default="MZN")
    reversed_amount: Mapped[Decimal] = mapped_column(
        Numeric(12, 2), default=Decimal("0"), server_default="0"
    )
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
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JsonDocument)

    #: Set when reconciliation could not settle the payment in time: an operator must look.
    attention_required: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    #: Only an operator may settle it (``PaymentService.resolve``): M-Pesa's answers cannot (an
    #: INS-10 with an earlier completed transaction, a success reported for an unpaid payment).
    operator_hold: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    reconcile_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_reconcile_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: Optimistic lock: every update checks it, so two writers never both apply a transition.
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")

    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=NOW
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow, server_default=NOW
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
        # Each index serves a query of repository/ (the list's filters meet its order,
        # ``created_at DESC, id DESC``); an index no query uses only costs writes and disk.
        Index("ix_payment_transactions_status_created_at", "status", "created_at"),
        Index("ix_payment_transactions_created_at_id", "created_at", "id"),
        Index("ix_payment_transactions_phone_number_created_at", "phone_number", "created_at"),
        Index("ix_payment_transactions_user_id_created_at", "user_id", "created_at"),
        Index("ix_payment_transactions_entity", "entity_type", "entity_id"),
        Index("ix_payment_transactions_conversation_id", "conversation_id"),
        Index("ix_payment_transactions_original_id", "original_id"),
        # Only the flagged few: the list's ``attention_required=true`` and the summary's count.
        Index(
            "ix_payment_transactions_attention",
            "created_at",
            "id",
            postgresql_where=text("attention_required = true"),
            sqlite_where=text("attention_required = 1"),
        ),
        # Only open payments: the reconciler's claim walks it in due order (never-polled first).
        Index(
            "ix_payment_transactions_reconcile_due",
            "next_reconcile_at",
            "id",
            postgresql_where=text(f"status IN ({RECONCILABLE}) AND operator_hold = false"),
            sqlite_where=text(f"status IN ({RECONCILABLE}) AND operator_hold = 0"),
        ),
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
    request_body: Mapped[Any | None] = mapped_column(JsonDocument)
    response_body: Mapped[Any | None] = mapped_column(JsonDocument)
    http_status: Mapped[int | None] = mapped_column(Integer)
    error_message: Mapped[str | None] = mapped_column(Text)
    response_time_ms: Mapped[int | None] = mapped_column(Integer)
    actor: Mapped[str | None] = mapped_column(String(100))
    client_ip: Mapped[str | None] = mapped_column(String(45))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=NOW
    )

    __table_args__ = (
        # The trail of one payment (``audit_trail``, retention). No index on ``action``: no
        # query of the module filters by it.
        Index("ix_payment_audit_logs_transaction_id", "transaction_id", "id"),
    )


class PaymentNotification(Base):
    """Every inbound notification, stored raw before it is trusted or processed."""

    __tablename__ = "payment_webhook_logs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(32), default="c2b", server_default="c2b")
    raw_body: Mapped[str] = mapped_column(Text)
    headers: Mapped[dict[str, Any] | None] = mapped_column(JsonDocument)
    remote_ip: Mapped[str | None] = mapped_column(String(45))
    received_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=NOW
    )
    is_valid: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    validation_error: Mapped[str | None] = mapped_column(String(255))
    is_processed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    processing_error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: The payment's row id (``payment_transactions.id``); the column keeps its shipped name.
    payment_id: Mapped[int | None] = mapped_column(
        "transaction_id", ForeignKey("payment_transactions.id", ondelete="SET NULL")
    )

    __table_args__ = (
        Index("ix_payment_webhook_logs_is_processed_received_at", "is_processed", "received_at"),
        Index("ix_payment_webhook_logs_transaction_id", "transaction_id"),
    )


#: The shipped name of ``PaymentNotification`` (its table keeps it: ``payment_webhook_logs``).
PaymentWebhookLog = PaymentNotification


#: ``payment_event_deliveries.consumer`` of the hooks; a webhook's consumer is its URL.
HOOKS_CONSUMER = "hooks"
EVENT_ID_LENGTH = 32
CONSUMER_LENGTH = 1000


class PaymentEvent(Base):
    """One event per transition, written in the transition's own database transaction."""

    __tablename__ = "payment_events"

    #: ``evt_`` + creation time (ms, hex) + a random or monotonic part: unique and sortable.
    id: Mapped[str] = mapped_column(String(EVENT_ID_LENGTH), primary_key=True)
    type: Mapped[str] = mapped_column(String(40))
    #: The payment's public id (``TXN-…``): events outlive nothing, but need no join to list.
    transaction_id: Mapped[str] = mapped_column(String(64))
    #: The payment as the API shows it (phone number masked), at the transition.
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        CheckConstraint(f"type IN ({_in(EventType)})", name="type"),
        Index("ix_payment_events_transaction_id", "transaction_id", "id"),
        Index("ix_payment_events_type", "type", "id"),
        Index("ix_payment_events_created_at", "created_at"),
    )


class PaymentEventDelivery(Base):
    """An event's delivery state for one consumer: the hooks, or one webhook endpoint."""

    __tablename__ = "payment_event_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(
        ForeignKey("payment_events.id", ondelete="CASCADE"), nullable=False
    )
    kind: Mapped[str] = mapped_column(String(16))
    consumer: Mapped[str] = mapped_column(String(CONSUMER_LENGTH))
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: When a dispatcher may take it next; while one delivers it, the end of that one's lease.
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        UniqueConstraint("event_id", "consumer", name="uq_payment_event_deliveries_consumer"),
        CheckConstraint(f"kind IN ({_in(ConsumerKind)})", name="kind"),
        CheckConstraint(f"status IN ({_in(DeliveryStatus)})", name="status"),
        Index("ix_payment_event_deliveries_due", "kind", "status", "next_attempt_at"),
    )


class PaymentEventAttempt(Base):
    """Every delivery attempt: what the endpoint (or hook) answered, and how long it took."""

    __tablename__ = "payment_event_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(
        ForeignKey("payment_event_deliveries.id", ondelete="CASCADE")
    )
    attempted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    #: The endpoint's answer, cut to ``events.RESPONSE_BODY_LIMIT`` characters.
    response_body: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_payment_event_attempts_delivery_id", "delivery_id", "id"),)


@event.listens_for(PaymentAuditLog, "before_update")
@event.listens_for(PaymentAuditLog, "before_delete")
def _audit_rows_are_append_only(*_: object) -> None:
    raise PermissionError("payment_audit_logs is append-only: rows are never updated or deleted")


class PaymentDailyTotal(Base):
    """Counts and amounts of payments per ``created_at`` day (UTC), operation and status.

    The database keeps it: triggers on ``payment_transactions`` (below, and in the migration)
    move a payment between buckets in the same transaction as its insert or status change, so
    the summary reads a few rows per day instead of every payment of the period. ``shard``
    spreads a bucket over several rows (``id % DAILY_TOTAL_SHARDS``), so concurrent payments do
    not queue on one row lock; readers add the shards up, and ``repository.compact_daily_totals``
    (run with the retention, hourly) folds the shards of past days into shard 0, so a year is a
    few thousand rows. Amounts are integer cents (exact on SQLite too).
    """

    __tablename__ = "payment_daily_totals"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    operation: Mapped[str] = mapped_column(String(16), primary_key=True)
    status: Mapped[str] = mapped_column(String(24), primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    amount_cents: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    #: How many of them are flagged (``attention_required``).
    flagged: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    #: Their ``reversed_amount`` in cents.
    reversed_cents: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


#: Rows per (day, operation, status) bucket; a payment's row is ``id % DAILY_TOTAL_SHARDS``.
DAILY_TOTAL_SHARDS = 16

#: The triggers that keep ``payment_daily_totals``, per dialect; the migration repeats them.
_PG_TOTALS_FUNCTION = f"""
CREATE OR REPLACE FUNCTION payment_daily_totals_apply() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO payment_daily_totals AS t
            (day, operation, status, shard, count, amount_cents, flagged, reversed_cents)
        VALUES ((OLD.created_at AT TIME ZONE 'UTC')::date, OLD.operation, OLD.status,
                OLD.id % {DAILY_TOTAL_SHARDS}, -1, -round(OLD.amount * 100)::bigint,
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
                NEW.id % {DAILY_TOTAL_SHARDS}, 1, round(NEW.amount * 100)::bigint,
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
    _PG_TOTALS_FUNCTION,
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
        f" {row}.id % {DAILY_TOTAL_SHARDS}, {sign}1,"
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

# ``Base.metadata.create_all`` (tests, hosts without Alembic) creates the triggers too.
for _statement in PG_TOTALS_DDL:
    event.listen(
        PaymentTransaction.__table__,
        "after_create",
        DDL(_statement.replace("%", "%%")).execute_if(dialect="postgresql"),
    )
for _statement in SQLITE_TOTALS_DDL:
    event.listen(
        PaymentTransaction.__table__,
        "after_create",
        DDL(_statement.replace("%", "%%")).execute_if(dialect="sqlite"),
    )
for _statement in PG_TOTALS_DROP:
    event.listen(
        PaymentTransaction.__table__,
        "before_drop",
        DDL(_statement).execute_if(dialect="postgresql"),
    )
