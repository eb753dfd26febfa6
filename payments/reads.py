"""The reads: one payment, lists and CSV export, the summary, the audit trail, the events
API, and the wallet holder's name. None of them moves money."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Callable
from datetime import date
from decimal import Decimal
from functools import partial

from sqlalchemy.orm import Session

from . import deliveries, event_reads, events
from . import repository as repo
from .database import DbSession, committing, run_db
from .exceptions import PaymentNotFoundError, PaymentValidationError
from .lifecycle import SUCCEEDED, UNSETTLED
from .models import PaymentOperation, PaymentStatus
from .mpesa.values import Msisdn, money_text
from .outcomes import to_response
from .paging import PageCursor
from .references import query_reference
from .repository import PaymentRecord
from .schemas import (
    AuditLogEntry,
    AuditTrailResponse,
    CustomerNameResponse,
    EventListResponse,
    EventResponse,
    OperationSummary,
    PaymentFilters,
    PaymentListResponse,
    PaymentResponse,
    PaymentSummary,
    SummaryBucket,
)
from .service_base import ServiceBase

#: Which way the money of a completed payment of each operation went.
_DIRECTIONS = {
    PaymentOperation.C2B: "received",
    PaymentOperation.B2C: "paid_out",
    PaymentOperation.B2B: "transferred",
    PaymentOperation.REVERSAL: "reversed",
}


def summarize(
    rows: list[tuple[str, str, int, Decimal, int, Decimal]],
    from_date: date | None,
    to_date: date | None,
) -> PaymentSummary:
    """The summary of ``repository.summary_rows``. Money in and money out are never added
    together: each operation has its own direction, and the success rate is per operation."""
    zero = Decimal("0")
    by_status: dict[str, SummaryBucket] = {}
    by_operation: dict[str, OperationSummary] = {}
    directions = {name: SummaryBucket(count=0, amount=zero) for name in _DIRECTIONS.values()}
    settled: dict[str, int] = {}
    net_received = zero
    for status_text, operation, count, amount, _, reversed_amount in rows:
        status = PaymentStatus(status_text)
        succeeded = status in SUCCEEDED
        bucket = by_status.get(status_text) or SummaryBucket(count=0, amount=zero)
        by_status[status_text] = SummaryBucket(
            count=bucket.count + count, amount=bucket.amount + amount
        )
        entry = by_operation.get(operation) or OperationSummary(count=0, amount=zero)
        entry.count += count
        entry.amount += amount
        if succeeded:
            entry.completed_count += count
            entry.completed_amount += amount
            direction = _DIRECTIONS.get(PaymentOperation(operation))
            if direction is not None:
                moved = directions[direction]
                directions[direction] = SummaryBucket(
                    count=moved.count + count, amount=moved.amount + amount
                )
            if operation == PaymentOperation.C2B:
                # What the shop kept of it: completed reversals refunded the rest.
                net_received += amount - reversed_amount
        if status not in UNSETTLED:
            settled[operation] = settled.get(operation, 0) + count
        by_operation[operation] = entry
    for operation, entry in by_operation.items():
        done = settled.get(operation, 0)
        entry.success_rate = round(entry.completed_count / done, 4) if done else None
    c2b = by_operation.get(PaymentOperation.C2B.value)
    return PaymentSummary(
        from_date=from_date,
        to_date=to_date,
        total_count=sum(row[2] for row in rows),
        total_amount=sum((row[3] for row in rows), zero),
        received=directions["received"],
        paid_out=directions["paid_out"],
        transferred=directions["transferred"],
        reversed=directions["reversed"],
        net_received=net_received,
        success_rate_by_operation={op: entry.success_rate for op, entry in by_operation.items()},
        completed_amount=directions["received"].amount,
        success_rate=c2b.success_rate if c2b is not None else None,
        attention_required=sum(row[4] for row in rows),
        by_status=by_status,
        by_operation=by_operation,
    )


class PaymentReads(ServiceBase):
    """Everything a ``PaymentService`` answers without moving money."""

    async def query_customer_name(self, phone_number: Msisdn | str) -> CustomerNameResponse:
        """The wallet holder's masked name, to confirm before a payout."""
        msisdn = phone_number if isinstance(phone_number, Msisdn) else Msisdn(phone_number)
        result = await self.client.query_customer_name(
            msisdn=msisdn, third_party_reference=query_reference()
        )
        return CustomerNameResponse(
            phone_number=msisdn.masked,
            customer_name=result.customer_name,
            response_code=result.response_code,
            response_description=result.response_description,
        )

    async def get(
        self, transaction_id: str, db: DbSession, *, owner: str | None = None
    ) -> PaymentResponse:
        """The payment. With ``owner`` (a customer's identity), only a payment that customer
        started (its ``user_id``); anyone else's answers ``PaymentNotFoundError`` exactly like a
        payment that does not exist, so a customer learns nothing about other customers."""
        record = await self._get_record(db, transaction_id)
        if owner is not None and record.user_id != owner:
            raise PaymentNotFoundError(f"payment {transaction_id} not found")
        return to_response(record)

    async def list(
        self,
        db: DbSession,
        filters: PaymentFilters | None = None,
        *,
        page: int = 1,
        per_page: int = 20,
        cursor: str | None = None,
    ) -> PaymentListResponse:
        """One page, newest first. ``cursor`` (a previous page's ``next_cursor``) continues
        after that page, whatever ``page`` says; a cursor no page returned is
        ``InvalidCursorError``."""
        if page < 1 or not 1 <= per_page <= 100:
            raise PaymentValidationError("page must be ≥ 1 and per_page between 1 and 100")
        filters = filters or PaymentFilters()
        position = PageCursor.decode(cursor) if cursor is not None else None
        records, total, pages, next_position = await run_db(
            db,
            lambda session: repo.list_page(
                session, filters, page=page, per_page=per_page, cursor=position
            ),
        )
        return PaymentListResponse(
            items=[to_response(record) for record in records],
            total=total,
            page=position.page if position is not None else page,
            per_page=per_page,
            pages=pages,
            next_cursor=next_position.encode() if next_position is not None else None,
        )

    async def export_csv(
        self, db: DbSession, filters: PaymentFilters | None = None, *, batch_size: int = 500
    ) -> AsyncIterator[str]:
        """The payments matching ``filters`` as CSV text (header first), newest first, read in
        keyset batches: each batch is its own short read, however many rows there are."""
        filters = filters or PaymentFilters()
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(EXPORT_COLUMNS)
        position: PageCursor | None = None
        while True:
            records, _, _, position = await run_db(
                db,
                partial(
                    repo.list_page, filters=filters, page=1, per_page=batch_size, cursor=position
                ),
            )
            for record in records:
                writer.writerow(_export_row(to_response(record)))
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
            if position is None:
                return

    async def summary(
        self,
        db: DbSession,
        from_date: date | None = None,
        to_date: date | None = None,
    ) -> PaymentSummary:
        """Counts and sums per status, per operation and per direction of the money (received,
        paid out, transferred, reversed), over ``created_at`` dates (inclusive)."""
        if from_date and to_date and from_date > to_date:
            raise PaymentValidationError("from_date must not be after to_date", field="from_date")
        filters = PaymentFilters(from_date=from_date, to_date=to_date)
        rows = await run_db(db, lambda session: repo.summary_rows(session, filters))
        return summarize(rows, from_date, to_date)

    # -- events --------------------------------------------------------------------------------

    async def list_events(
        self,
        db: DbSession,
        *,
        after: str | None = None,
        event_type: str | None = None,
        transaction_id: str | None = None,
        limit: int = 50,
    ) -> EventListResponse:
        """Payment events oldest first after the event ``after`` (a cursor)."""
        if not 1 <= limit <= 100:
            raise PaymentValidationError("limit must be between 1 and 100", field="limit")
        return await run_db(
            db,
            lambda s: event_reads.list_events(
                s,
                after=after,
                event_type=event_type,
                transaction_id=transaction_id,
                limit=limit,
            ),
        )

    async def get_event(self, event_id: str, db: DbSession) -> EventResponse:
        """One event with its deliveries (the hooks, each endpoint) and every attempt."""
        found = (
            await run_db(db, lambda s: event_reads.get_event(s, event_id))
            if len(event_id) <= 64
            else None
        )
        if found is None:
            raise PaymentNotFoundError(f"event {event_id} not found")
        return found

    async def redeliver_event(self, event_id: str, db: DbSession) -> EventResponse:
        """Make an event due again at every endpoint configured now; the hooks do not run again."""
        urls = self.settings.webhook_urls()
        found = len(event_id) <= 64 and await run_db(
            db, committing(lambda s: deliveries.redeliver(s, event_id, urls)), write=True
        )
        if not found:
            raise PaymentNotFoundError(f"event {event_id} not found")
        events.notify()
        return await self.get_event(event_id, db)

    async def audit(self, transaction_id: str, db: DbSession) -> AuditTrailResponse:
        def load(session: Session) -> list[AuditLogEntry]:
            row = repo.get(session, transaction_id)
            if row is None:
                raise PaymentNotFoundError(f"payment {transaction_id} not found")
            return [
                AuditLogEntry.model_validate(entry) for entry in repo.audit_trail(session, row.id)
            ]

        return AuditTrailResponse(transaction_id=transaction_id, entries=await run_db(db, load))

    async def _get_record(self, db: DbSession, transaction_id: str) -> PaymentRecord:
        return await run_db(db, record_loader(transaction_id))


def record_loader(transaction_id: str) -> Callable[[Session], PaymentRecord]:
    def load(session: Session) -> PaymentRecord:
        row = repo.get(session, transaction_id)
        if row is None:
            raise PaymentNotFoundError(f"payment {transaction_id} not found")
        return repo.record_of(session, row)

    return load


#: The CSV export's columns: the list's fields (phone numbers masked, as in every answer).
EXPORT_COLUMNS = (
    "transaction_id",
    "operation",
    "status",
    "amount",
    "reversed_amount",
    "currency",
    "phone_number",
    "receiver_party_code",
    "provider_transaction_id",
    "conversation_id",
    "third_party_reference",
    "account_reference",
    "entity_type",
    "entity_id",
    "original_transaction_id",
    "response_code",
    "status_description",
    "attention_required",
    "operator_hold",
    "created_at",
    "updated_at",
    "completed_at",
)


def _export_row(payment: PaymentResponse) -> list[str]:
    values = payment.model_dump(mode="json")
    row = []
    for column in EXPORT_COLUMNS:
        value = values.get(column)
        if column in ("amount", "reversed_amount"):
            text = money_text(getattr(payment, column))  # the exact decimal, never a float
        elif value is None:
            text = ""
        else:
            text = str(value)
        # A spreadsheet runs a cell that starts like a formula: a caller's reference must not.
        if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
            text = "'" + text
        row.append(text)
    return row
