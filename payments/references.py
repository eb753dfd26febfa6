"""Our identifiers and the references we send M-Pesa: ``TXN-…`` ids, third-party and
transaction references, and the fingerprint of a request (what an idempotency key stands for)."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import string
from datetime import datetime
from typing import Any

from .models import utcnow

_REFERENCE_ALPHABET = string.ascii_uppercase + string.digits


_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]")


_SUFFIX_LENGTH = 8
_SUFFIXES = len(_REFERENCE_ALPHABET) ** _SUFFIX_LENGTH


def new_transaction_id(now: datetime | None = None) -> str:
    """``TXN-20250115123456-ABC12345``."""
    stamp = (now or utcnow()).strftime("%Y%m%d%H%M%S")
    # One draw for the whole suffix: a choice per character reads the system's randomness
    # (a system call) eight times per payment.
    number = secrets.randbelow(_SUFFIXES)
    suffix = []
    for _ in range(_SUFFIX_LENGTH):
        number, digit = divmod(number, len(_REFERENCE_ALPHABET))
        suffix.append(_REFERENCE_ALPHABET[digit])
    return f"TXN-{stamp}-{''.join(suffix)}"


def third_party_reference_for(operation: str, idempotency_key: str | None, secret: str) -> str:
    """The ``input_ThirdPartyReference``: derived from the idempotency key (so a retry meets
    M-Pesa's own duplicate check instead of charging twice), random without one. Keyed by a
    per-deployment ``secret``, so another app on the same shortcode using the same key (say
    ``order-1001``) sends a different reference."""
    if idempotency_key is None:
        return secrets.token_hex(10).upper()
    message = f"{operation}:{idempotency_key}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()[:20].upper()


def query_reference() -> str:
    """A fresh third-party reference for a query request."""
    return "Q" + secrets.token_hex(9).upper()


def transaction_reference_for(account_reference: str | None, third_party_reference: str) -> str:
    """The ``input_TransactionReference`` (1–20 letters and digits): the caller's reference, or
    the third-party reference. Both follow from the request and its idempotency key, so a retry
    that slips past the database is the same on the wire, whatever M-Pesa's INS-10 compares."""
    cleaned = _NOT_ALNUM.sub("", account_reference or "")[:20]
    return cleaned or third_party_reference


def fingerprint(operation: str, request_body: dict[str, Any]) -> str:
    """A canonical hash of what was asked, without the idempotency key."""
    body = {key: value for key, value in request_body.items() if key != "idempotency_key"}
    canonical = json.dumps({"operation": operation, **body}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
