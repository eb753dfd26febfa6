"""The Standard Webhooks wire format of a payment event: the body POSTed to each endpoint, and
the headers that sign it (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import datetime
from typing import Any

from .models import as_utc


def iso(value: datetime) -> str:
    stamp = as_utc(value)
    assert stamp is not None
    return stamp.isoformat().replace("+00:00", "Z")


def payload(event_id: str, event_type: str, created_at: datetime, data: Any) -> bytes:
    """The body POSTed to each endpoint: ``{"id", "type", "created_at", "data": {payment}}``."""
    body = {"id": event_id, "type": event_type, "created_at": iso(created_at), "data": data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def signing_key(secret: str) -> bytes:
    """The key of a ``whsec_``-prefixed, base64-encoded secret."""
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` + base64(HMAC-SHA256(key, id.timestamp.body))."""
    signed = b"%s.%d.%s" % (message_id.encode(), timestamp, body)
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def webhook_headers(key: bytes, message_id: str, body: bytes, timestamp: int) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "user-agent": "payments-webhooks/1",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(key, message_id, timestamp, body),
    }
