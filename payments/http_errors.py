"""Errors as HTTP answers: the one table from domain errors to statuses, and the 422 shape that
FastAPI's validation errors and the module's own share."""

from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from . import exceptions
from .exceptions import PaymentError
from .schemas import PaymentResponse

#: Exception type → HTTP status; the most specific class listed first wins.
ERROR_STATUS: tuple[tuple[type[PaymentError], int], ...] = (
    (exceptions.UnauthorizedError, 401),
    (exceptions.PaymentValidationError, 422),
    (exceptions.InvalidCursorError, 400),
    (exceptions.PaymentNotFoundError, 404),
    (exceptions.IdempotencyConflictError, 409),
    (exceptions.InvalidStateTransitionError, 409),
    (exceptions.DuplicateTransactionError, 409),
    (exceptions.PaymentCancelledError, 402),
    (exceptions.InsufficientFundsError, 402),
    (exceptions.InvalidPaymentRequestError, 400),
    (exceptions.PaymentInitiationError, 402),
    (exceptions.PaymentOutcomeUnknownError, 504),
    (exceptions.ProviderUnavailableError, 503),
    (exceptions.PaymentStorageError, 503),
    (exceptions.PaymentConfigurationError, 500),
    (PaymentError, 502),
)


def error_response(error: PaymentError) -> JSONResponse:
    """The one mapping from domain errors to HTTP. An unknown outcome of a recorded payment is
    202 with the payment itself (status ``unknown``): the request was accepted, not failed."""
    payment: PaymentResponse | None = getattr(error, "payment", None)
    if payment is not None and not error.outcome_known:
        # Recorded, and M-Pesa may have moved the money: accepted, not failed (never retry it
        # with a new idempotency key); reconciliation settles it.
        return JSONResponse(payment.model_dump(mode="json"), status_code=202)
    status = next(code for kind, code in ERROR_STATUS if isinstance(error, kind))
    body = error.to_dict()
    if isinstance(error, exceptions.PaymentConfigurationError):
        body["details"] = {"variable": error.details.get("variable")}
    if isinstance(error, exceptions.PaymentValidationError):
        # One shape for every 422, whether FastAPI or the module found the problem.
        details = {key: value for key, value in body["details"].items() if key != "field"}
        details["errors"] = [{"field": error.field or "", "reason": error.message}]
        body["details"] = details
    if payment is not None:
        body["details"]["payment"] = payment.model_dump(mode="json")
    return JSONResponse(body, status_code=status)


def validation_response(error: RequestValidationError) -> JSONResponse:
    errors = [
        {
            "field": ".".join(str(part) for part in item.get("loc", ()) if part != "body"),
            "reason": str(item.get("msg", "invalid")).removeprefix("Value error, "),
        }
        for item in error.errors()
    ]
    return validation_errors_response(errors)


def validation_errors_response(errors: list[dict[str, str]]) -> JSONResponse:
    """The 422 for ``errors`` (each a ``field`` and a ``reason``)."""
    message = "; ".join(f"{e['field'] or 'body'}: {e['reason']}" for e in errors) or "invalid"
    return JSONResponse(
        {"error_code": "validation_error", "message": message, "details": {"errors": errors}},
        status_code=422,
    )


def error_json(status_code: int, error_code: str, message: str, **details: Any) -> JSONResponse:
    """An error answer in the module's shape, for what is not a ``PaymentError``."""
    return JSONResponse(
        {"error_code": error_code, "message": message, "details": details},
        status_code=status_code,
    )
