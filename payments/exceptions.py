"""One error tree for the whole module.

    PaymentError                         root: message, error_code, details, provider fields
    ├── PaymentValidationError           bad input (field and reason in details)
    ├── InvalidCursorError               a list cursor no page returned (400)
    ├── PaymentConfigurationError        a setting is missing or wrong (names the variable)
    ├── PaymentNotFoundError
    ├── IdempotencyConflictError         same idempotency key, different request
    ├── InvalidStateTransitionError
    ├── PaymentStorageError              the database could not record the payment
    ├── UnauthorizedError                the caller is not allowed (HTTP API)
    └── PaymentProviderError             anything M-Pesa answered or failed to answer
        ├── PaymentInitiationError       the provider refused: outcome known, no money moved
        │   ├── PaymentCancelledError    the customer cancelled or failed (INS-4/5/6, …)
        │   ├── InsufficientFundsError   INS-2006
        │   └── InvalidPaymentRequestError  input or configuration rejected (INS-13…26, …)
        ├── DuplicateTransactionError    INS-10: the reference was used; query the status
        ├── ProviderUnavailableError     the request provably never reached M-Pesa
        └── PaymentOutcomeUnknownError   sent, but the answer was lost or ambiguous

Every error carries ``provider_code``, ``provider_description``, ``http_status`` (the provider's,
when there was one) and ``outcome_known``: False means money may or may not have moved.
Messages never hold secrets or full phone numbers.
"""

from __future__ import annotations

from typing import Any


class PaymentError(Exception):
    error_code = "payment_error"
    outcome_known = True
    #: The recorded payment (a ``schemas.PaymentResponse``) when the error concerns one.
    payment: Any = None

    def __init__(
        self,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        provider_code: str | None = None,
        provider_description: str | None = None,
        http_status: int | None = None,
        outcome_known: bool | None = None,
        error_code: str | None = None,
        payment: Any = None,
    ) -> None:
        super().__init__(message)
        if payment is not None:
            self.payment = payment
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        self.provider_code = provider_code
        self.provider_description = provider_description
        self.http_status = http_status
        if outcome_known is not None:
            self.outcome_known = outcome_known
        if error_code is not None:
            self.error_code = error_code
        if provider_code is not None:
            self.details.setdefault("provider_code", provider_code)
        if provider_description is not None:
            self.details.setdefault("provider_description", provider_description)

    def to_dict(self) -> dict[str, Any]:
        return {"error_code": self.error_code, "message": self.message, "details": self.details}


class PaymentValidationError(PaymentError, ValueError):
    error_code = "validation_error"

    def __init__(self, message: str, *, field: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.field = field
        if field is not None:
            self.details.setdefault("field", field)


class InvalidCursorError(PaymentError):
    """A list ``cursor`` that no page returned (tampered, truncated, from another API): 400."""

    error_code = "invalid_cursor"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.details.setdefault("field", "cursor")


class PaymentConfigurationError(PaymentError):
    error_code = "configuration_error"


class PaymentNotFoundError(PaymentError):
    error_code = "payment_not_found"


class IdempotencyConflictError(PaymentError):
    error_code = "idempotency_conflict"


class InvalidStateTransitionError(PaymentError):
    error_code = "invalid_state_transition"


class PaymentStorageError(PaymentError):
    error_code = "storage_unavailable"


class UnauthorizedError(PaymentError):
    error_code = "unauthorized"


class PaymentProviderError(PaymentError):
    error_code = "provider_error"
    #: The sanitised HTTP exchanges that led here (``client.ProviderExchange``), for auditing.
    exchanges: tuple[Any, ...] = ()
    #: IDs M-Pesa's answer carried, error answers included (a later status query can use them).
    provider_transaction_id: str | None = None
    conversation_id: str | None = None

    def __init__(
        self,
        message: str,
        *,
        exchanges: tuple[Any, ...] = (),
        provider_transaction_id: str | None = None,
        conversation_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
        if exchanges:
            self.exchanges = tuple(exchanges)
        if provider_transaction_id is not None:
            self.provider_transaction_id = provider_transaction_id
        if conversation_id is not None:
            self.conversation_id = conversation_id


class PaymentInitiationError(PaymentProviderError):
    error_code = "payment_rejected"


class PaymentCancelledError(PaymentInitiationError):
    error_code = "payment_cancelled"


class InsufficientFundsError(PaymentInitiationError):
    error_code = "insufficient_funds"


class InvalidPaymentRequestError(PaymentInitiationError):
    error_code = "invalid_payment_request"


class DuplicateTransactionError(PaymentProviderError):
    error_code = "duplicate_transaction"
    outcome_known = False


class ProviderUnavailableError(PaymentProviderError):
    """The request never reached M-Pesa (connection refused, overloaded before acceptance)."""

    error_code = "provider_unavailable"


class PaymentOutcomeUnknownError(PaymentProviderError):
    """The request may have moved money; only a status query can tell."""

    error_code = "outcome_unknown"
    outcome_known = False
