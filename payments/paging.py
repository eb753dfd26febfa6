"""Keyset paging of the payment list: an opaque cursor for the page after a given row.

A list page is ordered ``created_at DESC, id DESC``; the cursor names the last row shown (its
``created_at`` and ``id``) and the number of the page it leads to, so the next page is an index
range scan from there (as fast at page 50,000 as at page 2) and the response's ``page`` stays
true. Clients treat the cursor as an opaque string: its encoding may change.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from .exceptions import InvalidCursorError

#: Longest cursor accepted (an encoded one is about 60 characters).
MAX_CURSOR_LENGTH = 200
_MAX_ID = 2**63 - 1
_MAX_PAGE = 10**9


@dataclass(frozen=True, slots=True)
class PageCursor:
    """The position after the row (``created_at``, ``id``); ``page`` is the page it starts."""

    created_at: datetime
    id: int
    page: int

    def encode(self) -> str:
        payload = json.dumps(
            [self.created_at.astimezone(UTC).isoformat(), self.id, self.page],
            separators=(",", ":"),
        )
        return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> PageCursor:
        """The cursor a previous page returned; ``InvalidCursorError`` for anything else."""
        if not text or len(text) > MAX_CURSOR_LENGTH:
            raise InvalidCursorError("cursor is not one this API returned")
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            created_at, id_, page = json.loads(raw)
            moment = datetime.fromisoformat(created_at)
        except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
            raise InvalidCursorError("cursor is not one this API returned") from None
        if (
            moment.tzinfo is None
            or type(id_) is not int
            or type(page) is not int
            or not 1 <= id_ <= _MAX_ID
            or not 2 <= page <= _MAX_PAGE
        ):
            raise InvalidCursorError("cursor is not one this API returned")
        return cls(moment.astimezone(UTC), id_, page)
