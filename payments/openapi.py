"""The answers the OpenAPI document lists for each operation, besides its success."""

from typing import Any

from .notifications import ProviderAnswer
from .schemas import ErrorResponse, PaymentResponse


def error_responses(*codes: int, base: dict[int | str, Any] | None = None) -> dict[int | str, Any]:
    """The error answers an authenticated operation can give: 401, 422, 500 and 503, and
    ``codes``; added to ``base``."""
    described = {
        400: "Refused by M-Pesa as invalid",
        401: "Missing or wrong X-API-Key",
        402: "Refused by M-Pesa or the customer: no money moved",
        404: "Not found",
        409: "Conflict with the payment's state or an earlier request",
        413: "Body larger than PAYMENT_MAX_BODY_BYTES",
        422: "Invalid input",
        500: "The module is misconfigured (names the variable)",
        502: "M-Pesa answered something unexpected",
        503: "Database or M-Pesa unavailable; nothing was sent",
        504: "M-Pesa did not answer in time",
    }
    responses = dict(base or {})
    for code in (401, 422, 500, 503, *codes):
        responses[code] = {"model": ErrorResponse, "description": described[code]}
    return responses


#: The operations that move money (initiate, payout, transfer; reverse adds 404).
MONEY_RESPONSES = error_responses(
    400,
    402,
    409,
    413,
    502,
    504,
    base={
        202: {
            "model": PaymentResponse,
            "description": "Recorded, outcome not known yet (status unknown): never retry with"
            " a new key; reconciliation settles it",
        }
    },
)
#: The result-notification callback answers M-Pesa, in M-Pesa's shape.
CALLBACK_RESPONSES: dict[int | str, Any] = {
    code: {"model": ProviderAnswer, "description": description}
    for code, description in {
        400: "Not a JSON notification (stored)",
        401: "Not authenticated (stored, small)",
        413: "Body larger than PAYMENT_MAX_BODY_BYTES (stored truncated)",
        429: "Too many rejected notifications from this source (not stored)",
        500: "Stored, could not be applied yet: deliver again",
        503: "Could not be stored or processed now: deliver again",
    }.items()
} | {422: {"model": ErrorResponse, "description": "Invalid token parameter"}}
