"""The overview's numbers, from the database's activity rows: one period's totals table (per
status and operation, with the success rate) and the chart's series per hour or day."""

from datetime import datetime
from decimal import Decimal
from typing import Any

from ..lifecycle import SUCCEEDED, UNSETTLED


def chart_series(
    rows: list[tuple[datetime, str, str, int, Decimal]],
) -> list[tuple[datetime, int, int, int]]:
    """Per bucket: (start, payments, succeeded, settled), reversals left out."""
    buckets: dict[datetime, list[int]] = {}
    for start, status, operation, count, _ in rows:
        if operation == "reversal":
            continue
        bucket = buckets.setdefault(start, [0, 0, 0])
        bucket[0] += count
        bucket[1] += count if status in SUCCEEDED else 0
        bucket[2] += count if status not in UNSETTLED else 0
    return [(start, *values) for start, values in sorted(buckets.items())]  # type: ignore[misc]


def period_totals(rows: list[tuple[str, str, int, Decimal]]) -> dict[str, Any]:
    """One period's table: per status and operation, with totals and the success rate."""
    cells: dict[Any, tuple[int, Decimal]] = {}
    statuses: dict[Any, tuple[int, Decimal]] = {}
    operations: dict[Any, tuple[int, Decimal]] = {}
    for status, operation, count, amount in rows:
        for bucket, key in (
            (cells, (status, operation)),
            (statuses, status),
            (operations, operation),
        ):
            c, a = bucket.get(key, (0, Decimal("0")))
            bucket[key] = (c + count, a + amount)
    payments = [row for row in rows if row[1] != "reversal"]
    succeeded = sum(r[2] for r in payments if r[0] in SUCCEEDED)
    settled = sum(r[2] for r in payments if r[0] not in UNSETTLED)
    return {
        "cells": cells,
        "statuses": statuses,
        "operations": operations,
        # Payments (C2B, B2C, B2B); reversals are shown apart, as money going back.
        "count": sum(r[2] for r in payments),
        "amount": sum((r[3] for r in payments), Decimal("0")),
        "completed_amount": sum(
            (r[3] for r in payments if r[0] in SUCCEEDED),
            Decimal("0"),
        ),
        "reversals": sum(r[2] for r in rows if r[1] == "reversal"),
        "reversed_amount": sum(
            (r[3] for r in rows if r[1] == "reversal" and r[0] == "completed"), Decimal("0")
        ),
        "success_rate": (succeeded / settled) if settled else None,
        "settled": settled,
    }
