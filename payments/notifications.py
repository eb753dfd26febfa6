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
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel
from sqlalchemy.orm import Session

from . import metrics
from . import repository as repo
from .config import PaymentSettings
from .database import DATABASE_ERRORS, DbSession, committing, run_db
from .exceptions import PaymentError, PaymentNotFoundError, PaymentStorageError
from .lifecycle import SUCCEEDED, UNSETTLED, UNSUCCESSFUL
from .logger import payment_logger
from .models import MAX_ROW_ID, AuditAction, PaymentNotification, PaymentStatus, utcnow
from .mpesa.client import ProviderExchange
from .mpesa.codes import (
    CANCELLED_BY_CUSTOMER,
    REPLY_ACCEPTED,
    REPLY_INTERNAL_ERROR,
    REPLY_INVALID_BODY,
    REPLY_UNAUTHORIZED,
    SUCCESS_CODES,
)
from .mpesa.values import PROVIDER_ID
from .notification_limits import MAX_NOTIFICATION_BYTES as MAX_NOTIFICATION_BYTES
from .notification_limits import (
    REJECTED_BODY_BYTES,
    REJECTED_HEADER_BYTES,
    STORED_HEADER_BYTES,
    client_ip,
    guard_for,
    in_networks,
    parse_notice,
    read_prefix,
    storable_text,
    stored_headers,
)
from .notification_limits import TRUNCATED_MARK as TRUNCATED_MARK
from .notification_limits import parse_address as parse_address
from .notification_limits import read_capped as read_capped
from .outcomes import Outcome
from .redaction import sanitize, sanitize_text
from .references import query_reference
from .schemas import ReplayResult, WebhookEntry, WebhookListResponse
from .service import PaymentService

NO_MATCHING_PAYMENT = "no payment matches this notification"


class ProviderAnswer(BaseModel):
    """The callback's answer, in M-Pesa's ``output_*`` shape."""

    output_OriginalConversationID: str
    output_ResponseCode: str
    output_ResponseDesc: str
    output_ThirdPartyConversationID: str


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
    notification_id: int
    processed: bool
    transaction_id: str | None
    status: str | None
    error: str | None


def authenticate(
    notification: InboundNotification, caller_ip: str | None, settings: PaymentSettings
) -> str | None:
    """``None`` if the notification is authentic, else the reason it is not. Needs no body:
    the token travels in a header or the query."""
    expected = settings.callback_token
    if expected is None:
        return "MPESA_CALLBACK_TOKEN is not configured: callbacks are refused"
    given = notification.headers.get("x-callback-token") or notification.query_token or ""
    if not hmac.compare_digest(given.encode(errors="replace"), expected.encode()):
        return "missing or wrong callback token"
    allowed = settings.callback_allowed_networks
    if allowed and (caller_ip is None or not in_networks(caller_ip, allowed)):
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


class NotificationProcessor:
    def __init__(self, service: PaymentService) -> None:
        self.service = service

    async def receive(
        self, db: DbSession, notification: InboundNotification
    ) -> tuple[int, dict[str, str]]:
        """Store, authenticate, process a notification whose body is already in memory."""

        async def chunks() -> AsyncIterator[bytes]:
            yield notification.body

        return await self.receive_stream(
            db,
            headers=list(notification.headers.items()),
            peer_ip=notification.peer_ip,
            query_token=notification.query_token,
            body=chunks(),
            source=notification.source,
        )

    async def receive_stream(
        self,
        db: DbSession,
        *,
        headers: Iterable[tuple[str, str]],
        peer_ip: str | None,
        query_token: str | None,
        body: AsyncIterable[bytes],
        source: str = "c2b",
    ) -> tuple[int, dict[str, str]]:
        """Authenticate (before reading the body), store a bounded copy, process. Returns the
        HTTP status and the answer body.

        An authentic notice is read up to ``PAYMENT_MAX_BODY_BYTES`` (a larger one is stored cut
        and answered 413); a rejected one is stored small (its first ``REJECTED_BODY_BYTES``),
        at a rate bounded per source and in total, and pruned after
        ``PAYMENT_REJECTED_NOTICE_RETENTION``."""
        settings = self.service.settings
        header_map = {key.lower(): value for key, value in headers}
        caller_ip = client_ip(peer_ip, header_map, settings)
        probe = InboundNotification(b"", header_map, caller_ip, query_token, source)
        rejection = authenticate(probe, caller_ip, settings)
        guard = guard_for(self.service)
        if rejection is not None and not guard.admit(caller_ip, settings):
            return 429, provider_answer({}, REPLY_INTERNAL_ERROR, "Too many rejected notifications")
        limit = REJECTED_BODY_BYTES if rejection is not None else settings.payment_max_body_bytes
        raw, complete = await read_prefix(body, limit)
        received = raw.decode("utf-8", errors="replace")
        text = storable_text(received)
        oversized = rejection is None and not complete
        parsed = parse_notice(received) if complete else None
        if oversized:
            rejection = f"body larger than {limit} bytes (stored cut at {limit})"
        malformed = rejection is None and parsed is None
        if malformed:
            rejection = "body is not a JSON object"
        elif rejection is not None and not complete:
            rejection = f"{rejection} (stored cut at {limit} bytes)"
        notification = PaymentNotification(
            source=source,
            raw_body=text,
            headers=stored_headers(
                header_map.items(),
                STORED_HEADER_BYTES if rejection is None else REJECTED_HEADER_BYTES,
            ),
            remote_ip=caller_ip,
            received_at=utcnow(),
            is_valid=rejection is None,
            validation_error=rejection[:255] if rejection is not None else None,
            is_processed=False,
            attempts=0,
        )
        try:
            notification_id = await run_db(
                db, committing(lambda s: repo.add_notification(s, notification)), write=True
            )
        except DATABASE_ERRORS as exc:
            payment_logger.error("Callback could not be stored", error=type(exc).__name__)
            return 503, provider_answer(
                parsed or {}, REPLY_INTERNAL_ERROR, "Could not store the notification"
            )
        payment_logger.info(
            "Callback received", webhook_id=notification_id, valid=rejection is None, ip=caller_ip
        )
        if rejection is not None:
            metrics.observe_callback(valid=False, processed=False)
            await guard.prune(db, settings)
        if oversized:
            return 413, provider_answer({}, REPLY_INVALID_BODY, "The body is too large")
        if malformed:
            return 400, provider_answer({}, REPLY_INVALID_BODY, "The body must be a JSON object")
        if rejection is not None:
            return 401, provider_answer(parsed or {}, REPLY_UNAUTHORIZED, "Not authorized")
        assert parsed is not None
        try:
            result = await self.process(db, notification_id)
        except PaymentStorageError:
            metrics.observe_callback(valid=True, processed=False)
            return 503, provider_answer(
                parsed, REPLY_INTERNAL_ERROR, "Stored, but could not be processed yet"
            )
        metrics.observe_callback(valid=True, processed=result.processed)
        if result.error == NO_MATCHING_PAYMENT:
            # Delivering it again cannot make it match: accepted (so the sender stops), kept
            # unprocessed with its error for an operator (GET /webhooks?is_processed=false).
            payment_logger.warning(
                "Callback matches no payment; kept for an operator", webhook_id=notification_id
            )
            return 200, provider_answer(
                parsed, REPLY_ACCEPTED, "Accepted; no payment matches it, kept for an operator"
            )
        if result.error is not None:
            # Non-2xx so the sender delivers again; the stored copy can also be replayed.
            return 500, provider_answer(parsed, REPLY_INTERNAL_ERROR, result.error)
        return 200, provider_answer(parsed, REPLY_ACCEPTED, "Successfully Accepted Result")

    async def process(
        self, db: DbSession, notification_id: int, *, replay: bool = False
    ) -> ProcessingResult:
        """Apply a stored notification. Safe to repeat: settled payments are never changed.
        ``replay`` processes it again even if it was processed before; a notification that
        failed authentication is never applied."""
        try:
            return await self._process(db, notification_id, replay)
        except DATABASE_ERRORS as exc:
            raise PaymentStorageError(
                "the notification could not be processed: database unavailable"
            ) from exc

    async def replay(self, db: DbSession, notification_id: int) -> ReplayResult:
        """Process a stored notification again (after fixing whatever made it fail)."""
        if not 1 <= notification_id <= MAX_ROW_ID:  # no such row can exist
            raise PaymentNotFoundError(f"notification {notification_id} not found")
        result = await self.process(db, notification_id, replay=True)
        return ReplayResult(
            webhook_id=result.notification_id,
            processed=result.processed,
            transaction_id=result.transaction_id,
            status=result.status,
            error=result.error,
        )

    async def listing(
        self, db: DbSession, *, is_processed: bool | None, page: int, per_page: int
    ) -> WebhookListResponse:
        """Stored notifications, newest first, their bodies masked."""
        rows, total = await run_db(
            db,
            lambda s: repo.list_notifications(
                s, is_processed=is_processed, page=page, per_page=per_page
            ),
        )
        return WebhookListResponse(
            items=[
                # Forwarders may put phone numbers in the body: masked like every other answer.
                WebhookEntry.model_validate(row).model_copy(
                    update={"raw_body": sanitize_text(row.raw_body)}
                )
                for row in rows
            ],
            total=total,
            page=page,
            per_page=per_page,
        )

    async def _process(self, db: DbSession, notification_id: int, replay: bool) -> ProcessingResult:

        def load(session: Session) -> tuple[_Stored, repo.PaymentRecord | None]:
            """The notification and its payment; the payment's audit trail notes the callback.
            One unit that ends its transaction, so no connection is held after it."""
            notification = repo.get_notification(session, notification_id)
            if notification is None:
                raise PaymentNotFoundError(f"notification {notification_id} not found")
            stored = _Stored(
                notification.is_processed,
                notification.is_valid,
                notification.validation_error,
                parse_notice(notification.raw_body) or {},
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
            return ProcessingResult(notification_id, True, None, None, None)
        if not stored.is_valid:
            return ProcessingResult(notification_id, False, None, None, stored.validation_error)
        if record is None:
            return await self._finish(db, notification_id, None, NO_MATCHING_PAYMENT)

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
        return await self._finish(db, notification_id, record, error)

    @staticmethod
    def _needs_query(record: repo.PaymentRecord, code: str, body: Mapping[str, Any]) -> bool:
        """An open payment; a success notice for one recorded as not paid (a contradiction an
        operator must see); a success notice that may carry the M-Pesa transaction ID a
        completed payment lacks (settled by a status answer, which carries none)."""
        status = PaymentStatus(record.status)
        if status in UNSETTLED:
            return True
        if code not in SUCCESS_CODES:
            return False
        if status in UNSUCCESSFUL:
            return True
        claimed_provider_id = _reference(body.get("input_TransactionID"))
        return (
            status in SUCCEEDED
            and not record.provider_transaction_id
            and claimed_provider_id is not None
        )

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
        success = code in SUCCESS_CODES
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
            claimed_provider_id, exchanges, attention = await self._proven_transaction_id(
                record, body, confirmed
            )
            return replace(
                confirmed,
                action=None,
                provider_transaction_id=claimed_provider_id,
                exchanges=confirmed.exchanges + exchanges,
                attention=attention,
            )
        if agreed and not success:
            status_after = confirmed.status
            if status_after is PaymentStatus.CANCELLED and code != CANCELLED_BY_CUSTOMER:
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
        claimed_provider_id = _reference(body.get("input_TransactionID"))
        if claimed_provider_id is None or record.provider_transaction_id:
            return None, (), None
        ours = record.conversation_id or confirmed.answered_conversation_id
        try:
            result = await self.service.client.query_transaction_status(
                query_reference=claimed_provider_id, third_party_reference=query_reference()
            )
        except PaymentError as exc:
            return (
                None,
                tuple(getattr(exc, "exchanges", ())),
                f"the notice's M-Pesa transaction ID {claimed_provider_id} could not be checked"
                f" ({exc.message}); it was not recorded",
            )
        completed = (result.transaction_status or "").strip().lower() == "completed"
        if ours is not None and completed and result.conversation_id == ours:
            return claimed_provider_id, result.exchanges, None
        return (
            None,
            result.exchanges,
            f"M-Pesa does not confirm the notice's transaction ID {claimed_provider_id} as this"
            " payment's; it was not recorded",
        )

    async def _finish(
        self,
        db: DbSession,
        notification_id: int,
        record: repo.PaymentRecord | None,
        error: str | None,
    ) -> ProcessingResult:
        def mark(session: Session) -> None:
            notification = repo.get_notification(session, notification_id, for_update=True)
            assert notification is not None
            notification.attempts += 1
            notification.payment_id = record.id if record is not None else notification.payment_id
            notification.processing_error = error
            if error is None:
                notification.is_processed = True
                notification.processed_at = utcnow()

        await run_db(db, committing(mark), write=True)
        return ProcessingResult(
            notification_id,
            error is None,
            record.transaction_id if record is not None else None,
            record.status if record is not None else None,
            error,
        )


def _reference(value: Any) -> str | None:
    """A provider reference fit to look up; anything else (NUL bytes, prose) matches nothing."""
    text = str(value).strip() if value not in (None, "") else ""
    return text if PROVIDER_ID.fullmatch(text) else None
