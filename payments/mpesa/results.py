"""What the client hands back: the audited exchanges and the typed results, each parsing itself.

Every HTTP exchange is described by a ``ProviderExchange`` (sanitised), attached to the result or
the error, so callers can audit it. A result type reads its own ``output_*`` fields from the
answer's body (``from_body``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self, TypeVar

import httpx

from .codes import NOT_FOUND_CODES
from .operations import Operation

__all__ = [
    "CustomerNameResult",
    "ProviderExchange",
    "ProviderResult",
    "R",
    "TransactionStatusResult",
    "parse_body",
]


@dataclass(frozen=True, slots=True)
class ProviderExchange:
    """One HTTP attempt, sanitised, for logs and the audit trail."""

    operation: Operation
    method: str
    url: str
    attempt: int
    request_fields: dict[str, Any]
    http_status: int | None
    response_body: Any
    elapsed_ms: float
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ProviderResult:
    """A successful (INS-0) answer."""

    operation: Operation
    response_code: str
    response_description: str
    http_status: int
    #: M-Pesa's ``output_TransactionID``.
    provider_transaction_id: str | None
    conversation_id: str | None
    third_party_reference: str | None
    raw: dict[str, Any]
    exchanges: tuple[ProviderExchange, ...] = field(default=())

    #: The fields a result type adds to these, each with the body's key it is read from.
    _OWN_FIELDS: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_body(
        cls,
        operation: Operation,
        http_status: int,
        body: dict[str, Any],
        exchanges: Sequence[ProviderExchange],
    ) -> Self:
        """The result an answer's body describes (the caller has decided it is one)."""
        return cls(
            operation=operation,
            response_code=str(body.get("output_ResponseCode")),
            response_description=_text(body, "output_ResponseDesc") or "",
            http_status=http_status,
            provider_transaction_id=_text(body, "output_TransactionID"),
            conversation_id=_text(body, "output_ConversationID"),
            third_party_reference=_text(body, "output_ThirdPartyReference"),
            raw=body,
            exchanges=tuple(exchanges),
            **{name: _text(body, key) for name, key in cls._OWN_FIELDS.items()},
        )


@dataclass(frozen=True, slots=True)
class TransactionStatusResult(ProviderResult):
    """A status answer: INS-0 with a status, or a not-found answer (``NOT_FOUND_CODES``)."""

    #: ``Completed``, ``Cancelled``, ``Expired`` or ``N/A`` (documented values).
    transaction_status: str | None = None

    _OWN_FIELDS: ClassVar[dict[str, str]] = {
        "transaction_status": "output_ResponseTransactionStatus"
    }

    @property
    def found(self) -> bool:
        """False when M-Pesa says it cannot find the transaction asked for: a not-found code,
        or a status of ``N/A`` (or none)."""
        if self.response_code in NOT_FOUND_CODES:
            return False
        return (self.transaction_status or "").strip().upper() not in ("", "N/A")


@dataclass(frozen=True, slots=True)
class CustomerNameResult(ProviderResult):
    #: The masked name as M-Pesa returns it (e.g. ``Jo*o Ma****``).
    customer_name: str | None = None

    _OWN_FIELDS: ClassVar[dict[str, str]] = {"customer_name": "output_CustomerName"}


R = TypeVar("R", bound=ProviderResult)


def parse_body(response: httpx.Response) -> Any:
    """JSON object when the body is one, otherwise the (truncated) text: HTML pages happen."""
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text[:2000]


def _text(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    return str(value) if value not in (None, "") else None
