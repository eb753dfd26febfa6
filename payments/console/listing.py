"""The payments list's query string, read once: its filters (the phone number only ever as a
token), the page by number or by cursor, what the form shows again and what links carry."""

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import Request
from pydantic import ValidationError

from ..exceptions import InvalidCursorError, PaymentValidationError
from ..mpesa.values import Msisdn, mask_msisdn
from ..paging import PageCursor
from ..redaction import sanitize_text
from ..schemas import PaymentFilters
from ..service import PaymentService
from . import security


def parse_flag(value: str | None) -> bool | None:
    """``true``/``false`` (any case) as a filter; anything else is no filter."""
    return {"true": True, "false": False}.get((value or "").lower())


def parse_page(value: str | None) -> int:
    """A page number from a link, kept within 1..100000 (1 when it is not a number)."""
    try:
        return min(max(int(value or "1"), 1), 100_000)
    except ValueError:
        return 1


@dataclass
class ListQuery:
    """The list's query string, read; ``redirect`` when a typed phone number must leave the URL."""

    filters: PaymentFilters
    reference: str | None
    search: str | None
    page: int
    values: dict[str, str]  # what the form shows again (never a phone number)
    phone_masked: str | None
    params: dict[str, str]  # what links carry (the phone as a token)
    error: str | None = None
    redirect: str | None = None
    after: tuple[datetime, int] | None = None

    def link(self, **changes: Any) -> str:
        merged = {k: v for k, v in (self.params | changes).items() if v not in (None, "")}
        return "?" + urlencode(merged)

    @classmethod
    def parse(cls, request: Request, payments: PaymentService, *, offset_pages: int) -> "ListQuery":
        """``offset_pages``: pages reached by number; deeper ones only by a cursor."""
        params = request.query_params
        names = ("status", "operation", "entity_type", "entity_id", "from_date", "to_date")
        raw = {name: (params.get(name) or "").strip()[:100] for name in names}
        reference = (params.get("reference") or "").strip()[:100] or None
        search = (params.get("q") or "").strip()[:100] or None
        carried = {k: v for k, v in raw.items() if v}
        if reference:
            carried["reference"] = reference
        if search:
            carried["q"] = search
        phone_digits: str | None = None
        error: str | None = None
        typed_phone = (params.get("phone") or "").strip()
        if typed_phone:
            # A typed number never stays in a URL or on the page: it becomes a token.
            try:
                digits = Msisdn(typed_phone[:30]).digits
            except (ValueError, PaymentValidationError):
                error = "phone number: not a Mozambican M-Pesa number (84/85 …)"
            else:
                token = security.phone_token(payments.settings, digits)
                query = urlencode(carried | {"phone_token": token})
                return cls(PaymentFilters(), None, None, 1, {}, None, {}, redirect="?" + query)
        token = params.get("phone_token")
        if token:
            phone_digits = security.phone_from_token(payments.settings, token[:500])
            if phone_digits is None:
                error = "the phone filter has expired: type the number again"
            else:
                carried["phone_token"] = token
        try:
            filters = PaymentFilters(
                status=raw["status"] or None,
                operation=raw["operation"] or None,
                entity_type=raw["entity_type"] or None,
                entity_id=raw["entity_id"] or None,
                from_date=raw["from_date"] or None,
                to_date=raw["to_date"] or None,
                phone_number=phone_digits,
            )
        except ValidationError as exc:
            error = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}".removeprefix(": ")
                for e in exc.errors()
            )
            filters = PaymentFilters()
        page_no, after = parse_page(params.get("page")), None
        if page_no > offset_pages:
            page_no = offset_pages
            error = error or (
                f"pages beyond {offset_pages} are reached with Older →, or narrow the filter"
            )
        if params.get("cursor"):
            try:
                cursor = PageCursor.decode((params.get("cursor") or "")[:300])
            except InvalidCursorError:
                error = error or "that page link is not valid any more: start from the first page"
            else:
                page_no, after = cursor.page, (cursor.created_at, cursor.id)
        return cls(
            filters,
            reference,
            search,
            page_no,
            {k: sanitize_text(v) for k, v in carried.items() if k != "phone_token"},
            mask_msisdn(phone_digits) if phone_digits else None,
            carried,
            error=error,
            after=after,
        )
