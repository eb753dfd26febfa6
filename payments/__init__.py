"""M-Pesa Mozambique (Vodacom) payments for FastAPI + SQLAlchemy.

Copy this folder into your app (``app/payments/``) or install it as a package; see README.md.
"""

from .config import PaymentSettings, get_settings
from .database import get_db
from .exceptions import (
    DuplicateTransactionError,
    IdempotencyConflictError,
    InsufficientFundsError,
    InvalidPaymentRequestError,
    InvalidStateTransitionError,
    PaymentCancelledError,
    PaymentConfigurationError,
    PaymentError,
    PaymentInitiationError,
    PaymentNotFoundError,
    PaymentOutcomeUnknownError,
    PaymentProviderError,
    PaymentStorageError,
    PaymentValidationError,
    ProviderUnavailableError,
)
from .logger import payment_logger
from .models import (
    Base,
    PaymentAuditLog,
    PaymentNotification,
    PaymentOperation,
    PaymentStatus,
    PaymentTransaction,
    PaymentWebhookLog,
)
from .mpesa.client import ClientConfig, MpesaClient
from .mpesa.values import Msisdn
from .repository import PaymentRecord
from .router import (
    create_payment_router,
    default_payment_service,
    get_payment_service,
    payment_router,
    require_api_key,
)
from .schemas import (
    PaymentInitiateRequest,
    PaymentResponse,
    PayoutRequest,
    ReversalRequest,
    TransferRequest,
)
from .service import PaymentService

__all__ = [
    "Base",
    "ClientConfig",
    "DuplicateTransactionError",
    "IdempotencyConflictError",
    "InsufficientFundsError",
    "InvalidPaymentRequestError",
    "InvalidStateTransitionError",
    "MpesaClient",
    "Msisdn",
    "PaymentAuditLog",
    "PaymentCancelledError",
    "PaymentConfigurationError",
    "PaymentError",
    "PaymentInitiateRequest",
    "PaymentInitiationError",
    "PaymentNotFoundError",
    "PaymentOperation",
    "PaymentOutcomeUnknownError",
    "PaymentProviderError",
    "PaymentRecord",
    "PaymentResponse",
    "PaymentService",
    "PaymentSettings",
    "PaymentStatus",
    "PaymentStorageError",
    "PaymentTransaction",
    "PaymentValidationError",
    "PaymentNotification",
    "PaymentWebhookLog",
    "PayoutRequest",
    "ProviderUnavailableError",
    "ReversalRequest",
    "TransferRequest",
    "create_payment_router",
    "default_payment_service",
    "get_db",
    "get_payment_service",
    "get_settings",
    "payment_logger",
    "payment_router",
    "require_api_key",
]
