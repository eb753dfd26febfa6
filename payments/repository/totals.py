"""The daily totals (``payment_daily_totals``, kept by triggers): the summary's rows, counts
they can answer, and the retention's compaction of old days' shards.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

from sqlalchemy import Select, delete, func, select, text
from sqlalchemy.orm import Session

from ..models import PaymentDailyTotal
from ..schemas import PaymentFilters
from .filtering import where_equal


def totals_can_count(filters: PaymentFilters) -> bool:
    """The daily totals answer a count filtered by status, operation and dates only."""
    return not (
        filters.phone_number is not None
        or filters.entity_type
        or filters.entity_id
        or filters.user_id
        or filters.attention_required is not None
    )


def totals_filtered(query: Select[Any], filters: PaymentFilters) -> Select[Any]:
    totals = PaymentDailyTotal
    query = where_equal(query, totals, filters, ("status", "operation"))
    if filters.from_date:
        query = query.where(totals.day >= filters.from_date)
    if filters.to_date:
        query = query.where(totals.day <= filters.to_date)
    return query


def summary_rows(
    session: Session, filters: PaymentFilters
) -> list[tuple[str, str, int, Decimal, int, Decimal]]:
    """(status, operation, count, amount, flagged count, reversed amount) per status and
    operation, from the daily totals (only ``from_date``/``to_date`` of the filters apply): a
    few rows per day, whatever the number of payments."""
    totals = PaymentDailyTotal
    buckets = session.execute(
        totals_filtered(
            select(
                totals.status,
                totals.operation,
                func.sum(totals.count),
                func.sum(totals.amount_cents),
                func.sum(totals.flagged),
                func.sum(totals.reversed_cents),
            ),
            PaymentFilters(from_date=filters.from_date, to_date=filters.to_date),
        ).group_by(totals.status, totals.operation)
    ).all()
    return [
        (
            status,
            operation,
            int(count),
            Decimal(int(cents or 0)) / 100,
            int(flagged or 0),
            Decimal(int(reversed_cents or 0)) / 100,
        )
        for status, operation, count, cents, flagged, reversed_cents in buckets
        if count  # every payment of the bucket moved on to another status
    ]


_PG_COMPACT = """
WITH moved AS (
    DELETE FROM payment_daily_totals WHERE day < :before AND shard <> 0
    RETURNING day, operation, status, count, amount_cents, flagged, reversed_cents
)
INSERT INTO payment_daily_totals AS t
    (day, operation, status, shard, count, amount_cents, flagged, reversed_cents)
SELECT day, operation, status, 0, sum(count), sum(amount_cents), sum(flagged),
       sum(reversed_cents)
FROM moved
GROUP BY day, operation, status
ON CONFLICT (day, operation, status, shard) DO UPDATE
SET count = t.count + EXCLUDED.count, amount_cents = t.amount_cents + EXCLUDED.amount_cents,
    flagged = t.flagged + EXCLUDED.flagged,
    reversed_cents = t.reversed_cents + EXCLUDED.reversed_cents
"""
_SQLITE_COMPACT = (
    """
INSERT INTO payment_daily_totals
    (day, operation, status, shard, count, amount_cents, flagged, reversed_cents)
SELECT day, operation, status, 0, sum(count), sum(amount_cents), sum(flagged),
       sum(reversed_cents)
FROM payment_daily_totals
WHERE day < :before AND shard <> 0 GROUP BY day, operation, status
ON CONFLICT (day, operation, status, shard) DO UPDATE
SET count = count + excluded.count, amount_cents = amount_cents + excluded.amount_cents,
    flagged = flagged + excluded.flagged, reversed_cents = reversed_cents + excluded.reversed_cents
""",
    "DELETE FROM payment_daily_totals WHERE day < :before AND shard <> 0",
)


def compact_daily_totals(session: Session, before: date) -> int:
    """Fold the shards of the days before ``before`` into shard 0 and drop empty buckets (the
    payments of a day moved on); the number of rows removed. Sums are unchanged."""
    rows_before = session.scalar(select(func.count()).select_from(PaymentDailyTotal)) or 0
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(_PG_COMPACT), {"before": before})
    else:  # one writer at a time on SQLite: two statements are as good as one
        for statement in _SQLITE_COMPACT:
            session.execute(text(statement), {"before": before})
    session.execute(
        delete(PaymentDailyTotal).where(
            PaymentDailyTotal.day < before,
            PaymentDailyTotal.count == 0,
            PaymentDailyTotal.amount_cents == 0,
            PaymentDailyTotal.flagged == 0,
            PaymentDailyTotal.reversed_cents == 0,
        )
    )
    rows_after = session.scalar(select(func.count()).select_from(PaymentDailyTotal)) or 0
    return int(rows_before) - int(rows_after)
