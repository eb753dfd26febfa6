"""The payments list as a CSV download: the filter's rows in keyset batches, streamed, capped, in
text a spreadsheet will not run as a formula (phone numbers masked as on the pages)."""

import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import partial
from typing import Any

from fastapi.responses import StreamingResponse

from .. import repository as repo
from ..database import DbSession, run_db
from ..models import utcnow
from ..mpesa.values import mask_msisdn, money_text
from ..redaction import sanitize_text
from .listing import ListQuery

CSV_BATCH = 1000
CSV_MAX_ROWS = 100_000
CSV_COLUMNS = (
    "transaction_id",
    "created_at",
    "operation",
    "status",
    "amount",
    "reversed_amount",
    "currency",
    "phone_number",
    "provider_transaction_id",
    "third_party_reference",
    "account_reference",
    "entity_type",
    "entity_id",
    "response_code",
    "attention_required",
    "original_transaction_id",
    "completed_at",
)


def csv_response(db: DbSession, query: ListQuery) -> StreamingResponse:
    """The download of every payment the query's filter matches (up to ``CSV_MAX_ROWS``)."""

    async def lines() -> AsyncIterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(CSV_COLUMNS)
        after: tuple[datetime, int] | None = None
        sent = 0
        while sent < CSV_MAX_ROWS:
            batch = await run_db(db, partial(_csv_batch, query, after))
            for record in batch:
                writer.writerow(_csv_row(record))
            sent += len(batch)
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
            if len(batch) < CSV_BATCH:
                break
            after = (batch[-1].created_at, batch[-1].id)

    stamp = utcnow().strftime("%Y%m%d-%H%M%S")
    return StreamingResponse(
        lines(),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="payments-{stamp}.csv"',
            "Cache-Control": "no-store",
        },
    )


def _csv_batch(
    query: ListQuery, after: tuple[datetime, int] | None, session: Any
) -> list[repo.PaymentRecord]:
    return repo.console_batch(
        session,
        query.filters,
        reference=query.reference,
        search=query.search,
        after=after,
        size=CSV_BATCH,
    )


def _spreadsheet_cell(value: Any) -> str:
    """Text a spreadsheet will not run as a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _csv_row(record: repo.PaymentRecord) -> list[str]:
    """One payment as CSV cells, in ``CSV_COLUMNS`` order."""
    return [
        _spreadsheet_cell(value)
        for value in (
            record.transaction_id,
            record.created_at.astimezone(UTC).isoformat(),
            record.operation,
            record.status,
            money_text(record.amount),
            money_text(record.reversed_amount),
            record.currency,
            mask_msisdn(record.phone_number) if record.phone_number else "",
            record.provider_transaction_id,
            record.third_party_reference,
            sanitize_text(record.account_reference) if record.account_reference else "",
            record.entity_type,
            record.entity_id,
            record.response_code,
            "true" if record.attention_required else "false",
            record.original_transaction_id,
            record.completed_at.astimezone(UTC).isoformat() if record.completed_at else "",
        )
    ]
