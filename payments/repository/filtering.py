"""What the list filters have in common: a column equal to the filter of the same name."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Select


def where_equal(
    query: Select[Any], table: Any, filters: BaseModel, names: Iterable[str]
) -> Select[Any]:
    """``column = value`` for each of ``names`` that ``filters`` sets (a blank one sets none)."""
    for name in names:
        value = getattr(filters, name)
        if value:
            query = query.where(getattr(table, name) == value)
    return query
