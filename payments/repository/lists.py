"""Filtered lists of payments, newest first: the API's list and export (``list_page``, keyset
or OFFSET) and the console's list and CSV export (``console_page``, ``console_batch``), with the
filters they share (each served by an index of ``models.PaymentTransaction``).
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Select, and_, false, func, or_, select, true, tuple_
from sqlalchemy.orm import Session

from ..models import PaymentDailyTotal, PaymentTransaction
from ..paging import PageCursor
from ..schemas import PaymentFilters
from .filtering import where_equal
from .record import PaymentRecord
from .totals import totals_can_count, totals_filtered


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def _filtered(query: Select[Any], filters: PaymentFilters) -> Select[Any]:
    table = PaymentTransaction
    query = where_equal(query, table, filters, ("status", "operation"))
    if filters.phone_number is not None:
        query = query.where(table.phone_number == filters.phone_number.digits)
    query = where_equal(query, table, filters, ("entity_type", "entity_id", "user_id"))
    if filters.attention_required is not None:
        # ``= true`` as a literal: PostgreSQL matches it to the partial index (``IS true`` or a
        # bound parameter would not).
        query = query.where(
            table.attention_required == (true() if filters.attention_required else false())
        )
    if filters.from_date:
        query = query.where(table.created_at >= _day_start(filters.from_date))
    if filters.to_date:
        query = query.where(table.created_at < _day_start(filters.to_date) + timedelta(days=1))
    return query


def count_payments(session: Session, filters: PaymentFilters) -> int:
    """How many payments match: from the daily totals when they can tell (a few hundred rows
    whatever the history), else ``count(*)`` over the index that serves the filter."""
    if totals_can_count(filters):
        query = totals_filtered(
            select(func.coalesce(func.sum(PaymentDailyTotal.count), 0)), filters
        )
    else:
        query = _filtered(select(func.count()).select_from(PaymentTransaction), filters)
    return int(session.scalar(query) or 0)


def list_page(
    session: Session,
    filters: PaymentFilters,
    *,
    page: int,
    per_page: int,
    cursor: PageCursor | None = None,
) -> tuple[list[PaymentRecord], int, int, PageCursor | None]:
    """One page, newest first: (records, total, pages, cursor of the next page or ``None``).

    With a ``cursor`` the page starts after the row it names (keyset: an index range scan,
    however deep); without one, at ``page`` (OFFSET: fine for the first pages)."""
    total = count_payments(session, filters)
    table = PaymentTransaction
    query = (
        _filtered(select(table), filters)
        .order_by(table.created_at.desc(), table.id.desc())
        .limit(per_page + 1)  # one more tells whether there is a next page
    )
    if cursor is not None:
        page = cursor.page
        query = query.where(tuple_(table.created_at, table.id) < (cursor.created_at, cursor.id))
    else:
        query = query.offset((page - 1) * per_page)
    fetched = session.scalars(query).all()
    rows = fetched[:per_page]
    # Reversals name their original: one lookup for the page (a self-join costs every page a
    # plan twice as large, for the few rows that are reversals).
    original_ids = {row.original_id for row in rows if row.original_id is not None}
    originals = (
        dict(
            session.execute(
                select(table.id, table.transaction_id).where(table.id.in_(original_ids))
            ).all()
        )
        if original_ids
        else {}
    )
    records = [PaymentRecord.of(row, originals.get(row.original_id)) for row in rows]
    next_cursor = (
        PageCursor(records[-1].created_at, records[-1].id, page + 1)
        if len(fetched) > per_page
        else None
    )
    return records, total, max(1, math.ceil(total / per_page)), next_cursor


def _searched(query: Select[Any], *, reference: str | None, search: str | None) -> Select[Any]:
    table = PaymentTransaction
    if reference:
        query = query.where(
            or_(table.account_reference == reference, table.transaction_reference == reference)
        )
    if search:
        # Each is a unique, indexed column: three index look-ups, no scan.
        query = query.where(
            or_(
                table.transaction_id == search,
                table.third_party_reference == search,
                table.provider_transaction_id == search,
            )
        )
    return query


def console_page(
    session: Session,
    filters: PaymentFilters,
    *,
    reference: str | None,
    search: str | None,
    page: int,
    per_page: int,
    after: tuple[datetime, int] | None = None,
) -> tuple[list[PaymentRecord], int]:
    """One page of the console's list, newest first: (records, total matching). ``after`` (the
    keyset (created_at, id) of the previous page's last row) reads the page as an index range
    from there, whatever its depth; without it the page is an OFFSET (the first pages only).
    The count is ``count(*)``: no column to read for NULLs, so an index-only count."""
    table = PaymentTransaction
    total = session.scalar(
        _searched(
            _filtered(select(func.count()).select_from(table), filters),
            reference=reference,
            search=search,
        )
    )
    query = _searched(_filtered(select(table), filters), reference=reference, search=search)
    if after is not None:
        created, pk = after
        query = query.where(
            or_(table.created_at < created, and_(table.created_at == created, table.id < pk))
        )
    else:
        query = query.offset((page - 1) * per_page)
    rows = session.scalars(query.order_by(table.created_at.desc(), table.id.desc()).limit(per_page))
    return [PaymentRecord.of(row) for row in rows], int(total or 0)


def console_batch(
    session: Session,
    filters: PaymentFilters,
    *,
    reference: str | None,
    search: str | None,
    after: tuple[datetime, int] | None,
    size: int,
) -> list[PaymentRecord]:
    """The next ``size`` payments of the filter, newest first, after the keyset ``after``
    (created_at, id) of the previous batch: the CSV export, which never offsets."""
    table = PaymentTransaction
    query = _searched(_filtered(select(table), filters), reference=reference, search=search)
    if after is not None:
        created, pk = after
        query = query.where(
            or_(table.created_at < created, and_(table.created_at == created, table.id < pk))
        )
    rows = session.scalars(query.order_by(table.created_at.desc(), table.id.desc()).limit(size))
    return [PaymentRecord.of(row) for row in rows]
