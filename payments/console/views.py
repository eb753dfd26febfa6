"""What the console's templates show, from stored rows: money, times and ages as text, a payment's
list row and detail fields, audit entries, stored notifications and outgoing events.

Everything that reaches a page passes through here or the templates' filters: phone numbers are
masked, free text and bodies are sanitised (no key or token is ever shown).
"""

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from .. import repository as repo
from ..lifecycle import IN_FLIGHT
from ..models import utcnow
from ..mpesa.values import mask_msisdn
from ..redaction import sanitize, sanitize_text
from ..schemas import EventResponse


def format_money(value: Decimal | int | float | None) -> str:
    if value is None:
        return ""
    return f"{Decimal(value).quantize(Decimal('0.01')):,.2f}"


def format_when(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_age(value: datetime | None, now: datetime | None = None) -> str:
    if value is None:
        return ""
    seconds = int(((now or utcnow()) - value).total_seconds())
    if seconds < 90:
        return f"{max(seconds, 0)} s"
    minutes = seconds // 60
    if minutes < 90:
        return f"{minutes} min"
    hours = minutes // 60
    if hours < 48:
        return f"{hours} h {minutes % 60} min"
    return f"{hours // 24} d {hours % 24} h"


def payment_row(record: repo.PaymentRecord, now: datetime) -> dict[str, Any]:
    """A payment as one row of a list (the payments page, the work queue, reversals)."""
    return {
        "transaction_id": record.transaction_id,
        "operation": record.operation,
        "status": record.status,
        "amount": record.amount,
        "reversed_amount": record.reversed_amount,
        "currency": record.currency,
        "phone": mask_msisdn(record.phone_number) if record.phone_number else "",
        "receiver": record.receiver_party_code or "",
        "reference": sanitize_text(record.account_reference) if record.account_reference else "",
        "provider_transaction_id": record.provider_transaction_id or "",
        "attention_required": record.attention_required,
        "operator_hold": record.operator_hold,
        "created_at": record.created_at,
        "age": format_age(record.created_at, now),
        "reason": _queue_reason(record),
    }


def _queue_reason(record: repo.PaymentRecord) -> str:
    """Why a payment is in the work queue ("" when it needs no one)."""
    if record.operator_hold:
        return "held for an operator"
    if record.attention_required:
        return "attention required"
    if record.status == "unknown":
        return "outcome unknown"
    if record.status in IN_FLIGHT:
        return "stuck in " + record.status
    return ""


#: What the detail page lists, in order. The phone number is shown masked; keys never.
_DETAIL_FIELDS = (
    "transaction_id",
    "operation",
    "status",
    "amount",
    "reversed_amount",
    "currency",
    "phone_number",
    "receiver_party_code",
    "provider_transaction_id",
    "conversation_id",
    "third_party_reference",
    "transaction_reference",
    "account_reference",
    "description",
    "entity_type",
    "entity_id",
    "customer_name",
    "customer_email",
    "user_id",
    "response_code",
    "response_description",
    "status_description",
    "error_code",
    "original_transaction_id",
    "metadata",
    "attention_required",
    "operator_hold",
    "reconcile_attempts",
    "version",
    "created_at",
    "updated_at",
    "completed_at",
)


def detail_fields(record: repo.PaymentRecord) -> list[tuple[str, str]]:
    """The detail page's (name, text) pairs, in ``_DETAIL_FIELDS`` order."""
    shown = []
    for name in _DETAIL_FIELDS:
        value = getattr(record, name)
        if name == "phone_number":
            text = mask_msisdn(value) if value else ""
        elif isinstance(value, datetime):
            text = format_when(value)
        elif isinstance(value, Decimal):
            text = f"{value:.2f}"
        elif isinstance(value, dict):
            text = str(sanitize(value))
        elif value is None:
            text = ""
        else:
            text = sanitize_text(str(value))
        shown.append((name, text))
    return shown


def audit_view(entry: Any) -> dict[str, Any]:
    """One entry of a payment's audit timeline."""
    return {
        "id": entry.id,
        "action": entry.action,
        "status_before": entry.status_before,
        "status_after": entry.status_after,
        "request_body": _pretty_json(entry.request_body),
        "response_body": _pretty_json(entry.response_body),
        "http_status": entry.http_status,
        "error_message": sanitize_text(entry.error_message) if entry.error_message else None,
        "response_time_ms": entry.response_time_ms,
        "actor": sanitize_text(entry.actor) if entry.actor else None,
        "created_at": entry.created_at,
    }


def _pretty_json(body: Any) -> str | None:
    """A stored body, sanitised and indented, cut short for the page."""
    if body is None:
        return None
    return json.dumps(sanitize(body), indent=1, ensure_ascii=False, default=str)[:4000]


def notification_view(notice: Any, transaction_id: str | None) -> dict[str, Any]:
    """A stored M-Pesa notification, with the payment it matched (if any)."""
    return {
        "id": notice.id,
        "source": notice.source,
        "received_at": notice.received_at,
        "remote_ip": notice.remote_ip,
        "is_valid": notice.is_valid,
        "validation_error": notice.validation_error,
        "is_processed": notice.is_processed,
        "processed_at": notice.processed_at,
        "processing_error": sanitize_text(notice.processing_error)
        if notice.processing_error
        else None,
        "attempts": notice.attempts,
        "transaction_id": transaction_id,
        "body": sanitize_text(notice.raw_body)[:2000],
    }


def event_view(event: EventResponse) -> dict[str, Any]:
    """An event for a page: its deliveries per consumer, each with its attempts (newest last)."""
    return {
        "id": event.id,
        "type": event.type,
        "transaction_id": event.transaction_id,
        "created_at": event.created_at,
        "data": _pretty_json(event.data),
        "deliveries": [
            {
                "kind": d.kind,
                "consumer": "host's hooks" if d.kind == "hooks" else sanitize_text(d.consumer),
                "status": d.status,
                "attempts": d.attempts,
                "next_attempt_at": d.next_attempt_at if d.status == "pending" else None,
                "delivered_at": d.delivered_at,
                "attempt_log": [
                    {
                        "attempted_at": a.attempted_at,
                        "status_code": a.status_code,
                        "duration_ms": a.duration_ms,
                        "error": sanitize_text(a.error) if a.error else None,
                        "response_body": sanitize_text(a.response_body)[:500]
                        if a.response_body
                        else None,
                    }
                    for a in d.attempt_log
                ],
            }
            for d in event.deliveries or []
        ],
        "has_webhooks": any(d.kind == "webhook" for d in event.deliveries or []),
    }
