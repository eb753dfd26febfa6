"""Inbound result notifications: store first, authenticate, then process idempotently.

Every request is written to ``payment_webhook_logs`` raw (rejected ones too, marked invalid)
before anything else; if it cannot be stored the provider gets a non-2xx answer and redelivers.
Processing dedupes on *processed*, not on *seen*: a redelivered notification for a payment that is
already settled changes nothing and fires no hook. A notification claiming success is confirmed
with a status query before the payment is marked completed; every stored notification can be
replayed.

Accepted body (the result shape some setups forward)::

    {"input_OriginalConversationID": "...", "input_ThirdPartyReference": "...",
     "input_TransactionID": "...", "input_ResultCode": "INS-0" | "0" | "INS-5" | ...,
     "input_ResultDesc": "..."}
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy.orm import Session

from . import repository as repo
from .client import ProviderExchange
from .config import PaymentSettings
from .database import DATABASE_ERRORS, DbSession, run_db
from .exceptions import PaymentError, PaymentNotFoundError, PaymentStorageError
from .lifecycle import SUCCEEDED, UNSETTLED, UNSUCCESSFUL
from .logger import payment_logger, sanitize
from .models import AuditAction, PaymentStatus, PaymentWebhookLog, utcnow
from .service import Outcome, PaymentService, committing, query_reference

_SUCCESS_CODES = {"0", "INS-0"}
#: A result notification is a few hundred bytes; anything far larger is not one.
MAX_NOTIFICATION_BYTES = 64 * 1024
_REFERENCE = re.compile(r"[A-Za-z0-9_-]{1,100}")
_SECRET_HEADERS = {"x-callback-token", "authorization", "cookie", "x-api-key"}


@dataclass(frozen=True, slots=True)
class InboundNotification:
    body: bytes
    headers: Mapping[str, str]
    peer_ip: str | None
    query_token: str | None = None
    source: str = "c2b"


@dataclass(frozen=True, slots=True)
class _Stored:
    """What processing needs of a stored notification (plain values, usable after the commit)."""

    is_processed: bool
    is_valid: bool
    validation_error: str | None
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ProcessingResult:
    webhook_id: int
    processed: bool
    transaction_id: str | None
    status: str | None
    error: str | None


def client_ip(
    peer_ip: str | None, headers: Mapping[str, str], settings: PaymentSettings
) -> str | None:
    """The caller's address: the peer, or, when the peer is a trusted proxy, the right-most
    untrusted hop of ``X-Forwarded-For`` (never the spoofable left-most one)."""
    trusted = settings.trusted_proxy_networks
    if peer_ip is None or not _in_networks(peer_ip, trusted):
        return peer_ip
    hops = [
        hop.strip()
        for hop in headers.get("x-forwarded-for", "").split(",")
        if _is_address(hop.strip())  # anything else is noise a client made up
    ]
    for hop in reversed(hops):
        if not _in_networks(hop, trusted):
            return hop
    return hops[0] if hops else peer_ip


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _in_networks(
    address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def authenticate(
    notification: InboundNotification, caller_ip: str | None, settings: PaymentSettings
) -> str | None:
    """``None`` if the notification is authentic, else the reason it is not."""
    expected = settings.callback_token
    if expected is None:
        if settings.mpesa_environment != "simulator":
            return "MPESA_CALLBACK_TOKEN is not configured: callbacks are refused"
    else:
        given = notification.headers.get("x-callback-token") or notification.query_token or ""
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return "missing or wrong callback token"
    allowed = settings.callback_allowed_networks
    if allowed and (caller_ip is None or not _in_networks(caller_ip, allowed)):
        return "caller address is not in MPESA_CALLBACK_ALLOWED_IPS"
    return None


def provider_answer(body: Mapping[str, Any], code: str, description: str) -> dict[str, str]:
    """Our reply in the provider's ``output_*`` shape."""
    return {
        "output_OriginalConversationID": str(body.get("input_OriginalConversationID") or ""),
        "output_ResponseCode": code,
        "output_ResponseDesc": description,
        "output_ThirdPartyConversationID": str(body.get("input_ThirdPartyReference") or ""),
    }


class CallbackProcessor:
    def __init__(self, service: PaymentService) -> None:
        self.service = service

    async def receive(
        self, db: DbSession, notification: InboundNotification
    ) -> tuple[int, dict[str, str]]:
        """Store, authenticate, process. Returns the HTTP status and the answer body."""
        settings = self.service.settings
        caller_ip = client_ip(notification.peer_ip, notification.headers, settings)
        rejection = authenticate(notification, caller_ip, settings)
        oversized = len(notification.body) > MAX_NOTIFICATION_BYTES
        # Stored before anything else, but never unbounded: an oversized body keeps its start.
        text = notification.body[:MAX_NOTIFICATION_BYTES].decode("utf-8", errors="replace")
        body = None if oversized else _parse(text)
        if oversized and rejection is None:
            rejection = f"body larger than {MAX_NOTIFICATION_BYTES} bytes"
        malformed = rejection is None and body is None
        if malformed:
            rejection = "body is not a JSON object"
        webhook = PaymentWebhookLog(
            source=notification.source,
            raw_body=text,
            headers=sanitize(
                {
                    k: ("***" if k.lower() in _SECRET_HEADERS else v)
                    for k, v in notification.headers.items()
                }
            ),
            remote_ip=caller_ip,
            received_at=utcnow(),
            is_valid=rejection is None,
            validation_error=rejection,
            is_processed=False,
            attempts=0,
        )
        try:
            webhook_id = await run_db(
                db, committing(lambda s: repo.add_webhook(s, webhook)), write=True
            )
        except DATABASE_ERRORS as exc:
            payment_logger.error("Callback could not be stored", error=type(exc).__name__)
            return 503, provider_answer(body or {}, "INS-1", "Could not store the notification")
        payment_logger.info(
            "Callback received", webhook_id=webhook_id, valid=rejection is None, ip=caller_ip
        )
        if oversized:
            return 413, provider_answer({}, "INS-21", "The body is too large")
        if malformed:
            return 400, provider_answer({}, "INS-21", "The body must be a JSON object")
        if rejection is not None:
            return 401, provider_answer(body or {}, "INS-2", "Not authorized")
        assert body is not None
        try:
            result = await self.process(db, webhook_id)
        except PaymentStorageError:
            return 503, provider_answer(body, "INS-1", "Stored, but could not be processed yet")
        if result.error is not None:
            # Non-2xx so the sender delivers again; the stored copy can also be replayed.
            return 500, provider_answer(body, "INS-1", result.error)
        return 200, provider_answer(body, "0", "Successfully Accepted Result")

    async def process(
        self, db: DbSession, webhook_id: int, *, replay: bool = False
    ) -> ProcessingResult:
        """Apply a stored notification. Safe to repeat: settled payments are never changed.
        ``replay`` processes it again even if it was processed before; a notification that
        failed authentication is never applied."""
        try:
            return await self._process(db, webhook_id, replay)
        except DATABASE_ERRORS as exc:
            raise PaymentStorageError(
                "the notification could not be processed: database unavailable"
            ) from exc

    async def _process(self, db: DbSession, webhook_id: int, replay: bool) -> ProcessingResult:

        def load(session: Session) -> tuple[_Stored, repo.PaymentRecord | None]:
            """The notification and its payment; the payment's audit trail notes the callback.
            One unit that ends its transaction, so no connection is held after it."""
            webhook = repo.get_webhook(session, webhook_id)
            if webhook is None:
                raise PaymentNotFoundError(f"notification {webhook_id} not found")
            stored = _Stored(
                webhook.is_processed,
                webhook.is_valid,
                webhook.validation_error,
                _parse(webhook.raw_body) or {},
            )
            if (stored.is_processed and not replay) or not stored.is_valid:
                return stored, None
            row = repo.find_by_provider_reference(
                session,
                third_party_reference=_reference(stored.body.get("input_ThirdPartyReference")),
                conversation_id=_reference(stored.body.get("input_OriginalConversationID")),
            )
            if row is None:
                return stored, None
            repo.add_audit(
                session,
                row.id,
                AuditAction.CALLBACK_RECEIVED,
                response_body=sanitize(stored.body),
                actor="callback",
            )
            return stored, repo.record_of(session, row)

        stored, record = await run_db(db, committing(load), write=True)
        if stored.is_processed and not replay:
            return ProcessingResult(webhook_id, True, None, None, None)
        if not stored.is_valid:
            return ProcessingResult(webhook_id, False, None, None, stored.validation_error)
        if record is None:
            return await self._finish(db, webhook_id, None, "no payment matches this notification")

        code = str(stored.body.get("input_ResultCode") or "").strip().upper()
        error: str | None = None
        if self._needs_query(record, code, stored.body):
            outcome = await self._outcome(record, code, stored.body)
            if outcome is None:
                error = "not confirmed by an M-Pesa status query yet"
            else:
                record, _ = await self.service.apply_outcome(db, record, outcome, actor="callback")
                if PaymentStatus(record.status) in UNSETTLED and not record.operator_hold:
                    # E.g. the payment's own call may still be answered: the sender delivers
                    # again (or the stored copy is replayed) once M-Pesa's answer can settle it.
                    error = "not settled by M-Pesa's status answer yet"
        return await self._finish(db, webhook_id, record, error)

    @staticmethod
    def _needs_query(record: repo.PaymentRecord, code: str, body: Mapping[str, Any]) -> bool:
        """An open payment; a success notice for one recorded as not paid (a contradiction an
        operator must see); a success notice that may carry the M-Pesa transaction ID a
        completed payment lacks (settled by a status answer, which carries none)."""
        status = PaymentStatus(record.status)
        if status in UNSETTLED:
            return True
        if code not in _SUCCESS_CODES:
            return False
        if status in UNSUCCESSFUL:
            return True
        notice_id = _reference(body.get("input_TransactionID"))
        return status in SUCCEEDED and not record.provider_transaction_id and notice_id is not None

    async def _outcome(
        self, record: repo.PaymentRecord, code: str, body: Mapping[str, Any]
    ) -> Outcome | None:
        """Trust, but verify: a notification only prompts a status query, and M-Pesa's own
        answer settles the payment. A notification never settles it on its word alone (a
        "cancelled" notice overtaken by the real success must not cancel a charged payment),
        whatever its code (an ambiguous, unknown or empty one too).
        ``None``: M-Pesa did not confirm an outcome yet."""
        confirmed = await self.service.query_outcome(record)
        if confirmed.status is None:
            return None
        success = code in _SUCCESS_CODES
        status = PaymentStatus(record.status)
        if status in UNSUCCESSFUL:
            if confirmed.status is PaymentStatus.COMPLETED:
                # Applying it is refused by the state machine, which flags and holds it.
                return replace(confirmed, action=None)
            return replace(
                confirmed,
                status=None,
                attention=f"a success notice arrived for this {status.value} payment, but M-Pesa"
                f" reports it {confirmed.status.value}: check who sent the notice",
            )
        entry = self.service.client.config.codes.lookup(code)
        definite = success or (bool(code) and entry.outcome_known)
        # Audited as what it is (completed/failed), and, where M-Pesa agrees with a notice whose
        # code is definite, with the notice's code, which a status answer does not carry.
        agreed = definite and (confirmed.status is PaymentStatus.COMPLETED) == success
        if agreed and confirmed.status is PaymentStatus.COMPLETED:
            notice_id, exchanges, attention = await self._proven_transaction_id(
                record, body, confirmed
            )
            return replace(
                confirmed,
                action=None,
                provider_transaction_id=notice_id,
                exchanges=confirmed.exchanges + exchanges,
                attention=attention,
            )
        if agreed and not success:
            status_after = confirmed.status
            if status_after is PaymentStatus.CANCELLED and code != "INS-5":
                status_after = PaymentStatus.FAILED  # "not completed" per M-Pesa; notice says why
            return replace(
                confirmed,
                status=status_after,
                action=None,
                response_code=code,
                response_description=entry.description,
            )
        return replace(confirmed, action=None)

    async def _proven_transaction_id(
        self, record: repo.PaymentRecord, body: Mapping[str, Any], confirmed: Outcome
    ) -> tuple[str | None, tuple[ProviderExchange, ...], str | None]:
        """The notice's ``input_TransactionID``, if M-Pesa proves it is this payment's:
        (ID or None, the exchanges, why an operator must look, if one must).

        A reversal sends this ID, so a notice naming another payment's transaction must never
        supply it. The proof: a status query *by that ID* answers with this payment's
        ConversationID (the one M-Pesa gave our own call, or the one the query by our own
        third-party reference just returned) and reports it completed."""
        notice_id = _reference(body.get("input_TransactionID"))
        if notice_id is None or record.provider_transaction_id:
            return None, (), None
        ours = record.conversation_id or confirmed.conversation_id
        try:
            result = await self.service.client.query_transaction_status(
                query_reference=notice_id, third_party_reference=query_reference()
            )
        except PaymentError as exc:
            return (
                None,
                tuple(getattr(exc, "exchanges", ())),
                f"the notice's M-Pesa transaction ID {notice_id} could not be checked"
                f" ({exc.message}); it was not recorded",
            )
        completed = (result.transaction_status or "").strip().lower() == "completed"
        if ours is not None and completed and result.conversation_id == ours:
            return notice_id, result.exchanges, None
        return (
            None,
            result.exchanges,
            f"M-Pesa does not confirm the notice's transaction ID {notice_id} as this payment's;"
            " it was not recorded",
        )

    async def _finish(
        self,
        db: DbSession,
        webhook_id: int,
        record: repo.PaymentRecord | None,
        error: str | None,
    ) -> ProcessingResult:
        def mark(session: Session) -> None:
            webhook = repo.get_webhook(session, webhook_id, for_update=True)
            assert webhook is not None
            webhook.attempts += 1
            webhook.transaction_id = record.id if record is not None else webhook.transaction_id
            webhook.processing_error = error
            if error is None:
                webhook.is_processed = True
                webhook.processed_at = utcnow()

        await run_db(db, committing(mark), write=True)
        return ProcessingResult(
            webhook_id,
            error is None,
            record.transaction_id if record is not None else None,
            record.status if record is not None else None,
            error,
        )


def _parse(text: str) -> dict[str, Any] | None:
    try:
        parsed = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None
    return parsed if isinstance(parsed, dict) else None


def _reference(value: Any) -> str | None:
    """A provider reference fit to look up; anything else (NUL bytes, prose) matches nothing."""
    text = str(value).strip() if value not in (None, "") else ""
    return text if _REFERENCE.fullmatch(text) else None
