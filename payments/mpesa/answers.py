"""What an answer from M-Pesa means: a result, or the error it is and whether repeating may help.

A timeout or dropped connection on a money-moving call is ``PaymentOutcomeUnknownError``; so is an
overloaded or ambiguous answer to one. Response codes are read through the ``ResponseCodeTable``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from ..exceptions import (
    DuplicateTransactionError,
    InsufficientFundsError,
    InvalidPaymentRequestError,
    PaymentCancelledError,
    PaymentOutcomeUnknownError,
    PaymentProviderError,
    ProviderUnavailableError,
)
from .codes import NOT_FOUND_CODES, Disposition, ResponseCode, ResponseCodeTable
from .operations import OPERATIONS, Operation
from .results import ProviderExchange, R
from .values import PROVIDER_ID

__all__ = ["Undecided", "classify", "error_for_answer", "refusal_error", "transport_error"]

#: What to check when the gateway refuses a request in its own words (``output_error``, no code).
_REFUSAL_ACTION = (
    "Check MPESA_API_KEY, MPESA_PUBLIC_KEY and MPESA_ORIGIN (the portal app's settings):"
    " the gateway refused the request before processing it"
)

_ERROR_BY_DISPOSITION: dict[Disposition, type[PaymentProviderError]] = {
    Disposition.CUSTOMER_DECLINED: PaymentCancelledError,
    Disposition.INSUFFICIENT_FUNDS: InsufficientFundsError,
    Disposition.INVALID_REQUEST: InvalidPaymentRequestError,
    Disposition.DUPLICATE: DuplicateTransactionError,
}


@dataclass(frozen=True, slots=True)
class Undecided:
    """An answer that is not a result: the error it is, and whether repeating may help."""

    error: PaymentProviderError
    retryable: bool


def classify(
    operation: Operation,
    response: httpx.Response,
    body: Any,
    result_type: type[R],
    exchanges: Sequence[ProviderExchange],
    codes: ResponseCodeTable,
) -> R | Undecided:
    """What an answer means: the result, or the error it is and whether a retry may help."""
    code = body.get("output_ResponseCode") if isinstance(body, dict) else None
    description = (body.get("output_ResponseDesc") if isinstance(body, dict) else None) or ""
    entry = codes.lookup(code if isinstance(code, str) else None, response.status_code)
    refusal = _refusal_text(body)
    if refusal is not None:
        description = refusal  # the provider's own words, whatever is decided below
        if 400 <= response.status_code < 500:
            refused = refusal_error(
                response.status_code, refusal, body=body, exchanges=tuple(exchanges)
            )
            return Undecided(refused, retryable=False)
    if not isinstance(body, dict):
        entry = codes.lookup(None, response.status_code)
        description = "The response was not a JSON object"
    elif response.status_code >= 500 and entry.disposition is not Disposition.OVERLOADED:
        entry = _as_ambiguous(entry)
    if entry.disposition is Disposition.SUCCESS and response.is_success:
        return result_type.from_body(operation, response.status_code, body, exchanges)
    if (
        operation is Operation.QUERY_STATUS
        and entry.code in NOT_FOUND_CODES
        and response.status_code < 500
    ):  # a definite answer about what was asked for: no retry, the caller decides
        return result_type.from_body(operation, response.status_code, body, exchanges)
    if entry.disposition is Disposition.SUCCESS:  # INS-0 with an error status: untrusted
        entry = _as_ambiguous(entry)
    error = error_for_answer(
        operation,
        entry,
        response.status_code,
        description or entry.description,
        body=body,
        exchanges=tuple(exchanges),
    )
    retryable = entry.disposition in (Disposition.OVERLOADED, Disposition.AMBIGUOUS)
    return Undecided(error, retryable=retryable)


def error_for_answer(
    operation: Operation,
    entry: ResponseCode,
    http_status: int,
    description: str,
    *,
    body: Any = None,
    exchanges: tuple[ProviderExchange, ...] = (),
) -> PaymentProviderError:
    """The one place that turns a non-success provider answer into an exception (with every ID
    the answer carried and the exchanges that led to it)."""
    error_type = _ERROR_BY_DISPOSITION.get(entry.disposition)
    if error_type is None:  # overloaded or ambiguous
        error_type = (
            PaymentOutcomeUnknownError
            if OPERATIONS[operation].moves_money
            else ProviderUnavailableError
        )
    code = entry.code or None
    message = f"M-Pesa answered {code or 'without a response code'}: {description}"
    if error_type is PaymentOutcomeUnknownError:
        message += " (the outcome is unknown until a status query settles it)"
    return error_type(
        message,
        provider_code=code,
        provider_description=description,
        http_status=http_status,
        details={"action": entry.action, "disposition": entry.disposition.value},
        exchanges=exchanges,
        **_ids_in(body),
    )


def refusal_error(
    http_status: int,
    text: str,
    *,
    body: Any = None,
    exchanges: tuple[ProviderExchange, ...] = (),
) -> InvalidPaymentRequestError:
    """The gateway refused the request in its own words (``output_error``, no response code, a
    4xx status: "Origin not allowed", a wrong API key on some gateways). Nothing was processed,
    so the payment fails; the cause is this deployment's configuration, not the caller's input."""
    return InvalidPaymentRequestError(
        f"M-Pesa refused the request: {text}. {_REFUSAL_ACTION}",
        provider_description=text,
        http_status=http_status,
        error_code="configuration_refused",
        details={"action": _REFUSAL_ACTION, "disposition": Disposition.INVALID_REQUEST.value},
        exchanges=exchanges,
        **_ids_in(body),
    )


def transport_error(
    operation: Operation,
    exc: httpx.TransportError,
    never_sent: bool,
    exchanges: Sequence[ProviderExchange],
) -> PaymentProviderError:
    """The error for an exchange that ended without an answer. ``never_sent``: provably not
    delivered, so nothing can have happened; otherwise a money-moving call's outcome is unknown."""
    reason = type(exc).__name__
    error_type: type[PaymentProviderError]
    if never_sent:
        error_type = ProviderUnavailableError
        message = (
            f"could not reach M-Pesa ({reason}); the request was not sent."
            f" If this persists, check that outbound port {OPERATIONS[operation].port} is open"
        )
    elif OPERATIONS[operation].moves_money:
        error_type = PaymentOutcomeUnknownError
        message = (
            f"no answer from M-Pesa ({reason}) after the request was sent;"
            " the outcome is unknown until a status query settles it"
        )
    else:
        error_type = ProviderUnavailableError
        message = f"M-Pesa did not answer the {operation.value} request ({reason})"
    return error_type(message, details={"reason": reason}, exchanges=tuple(exchanges))


def _refusal_text(body: Any) -> str | None:
    """The text of an ``output_error`` answer that carries no response code."""
    if not isinstance(body, dict) or body.get("output_ResponseCode") not in (None, ""):
        return None
    text = body.get("output_error")
    if not isinstance(text, str) or not text.strip():
        return None
    return text.strip()[:255]


def _ids_in(body: Any) -> dict[str, str | None]:
    """Every ID an answer carried (error answers count too), for the error built from it."""
    if not isinstance(body, dict):
        return {}
    return {
        "provider_transaction_id": _id_in(body, "output_TransactionID"),
        "conversation_id": _id_in(body, "output_ConversationID"),
    }


def _id_in(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    text = value.strip() if isinstance(value, str) else ""
    return text if PROVIDER_ID.fullmatch(text) else None


def _as_ambiguous(entry: ResponseCode) -> ResponseCode:
    return ResponseCode(
        entry.code,
        entry.http_status,
        entry.description,
        "Query the status; the outcome is unknown",
        Disposition.AMBIGUOUS,
    )
