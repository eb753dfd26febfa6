"""The money-moving flow under every use case: the intent committed before M-Pesa is called,
the call's answer applied in one short transaction, replays of a key, and INS-10.

The rules it keeps are numbered in ``service.py``'s docstring; comments cite them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from functools import partial
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from . import metrics, outcomes
from . import repository as repo
from .database import DATABASE_ERRORS, DbSession, committing, run_db
from .exceptions import (
    DuplicateTransactionError,
    IdempotencyConflictError,
    PaymentError,
    PaymentOutcomeUnknownError,
    PaymentProviderError,
    PaymentStorageError,
    PaymentValidationError,
)
from .hooks import PaymentHooks
from .lifecycle import SUCCEEDED
from .logger import payment_logger
from .models import AuditAction, PaymentOperation, PaymentStatus, utcnow
from .mpesa.client import ProviderResult
from .mpesa.values import Msisdn, parse_amount
from .outcomes import (
    STATUS_MESSAGES,
    Outcome,
    error_for_record,
    outcome_of_error,
    outcome_of_success,
    outcome_of_unexpected,
    query_outcome,
    to_response,
)
from .redaction import sanitize
from .references import fingerprint, new_transaction_id, transaction_reference_for
from .repository import PaymentRecord
from .schemas import PaymentInitiateRequest, PaymentResponse, PayoutRequest, TransferRequest

S = PaymentStatus


@dataclass(frozen=True, slots=True)
class NewPayment:
    operation: PaymentOperation
    amount: Decimal
    phone: Msisdn | None
    receiver_party_code: str | None
    account_reference: str | None
    description: str | None
    entity_type: str | None
    entity_id: str | None
    customer_name: str | None
    customer_email: str | None
    metadata: dict[str, Any] | None
    idempotency_key: str | None
    request_body: dict[str, Any]
    original_id: int | None = None


class MoneyFlow(PaymentHooks):
    """Recording a payment's intent, sending it once, and applying the answer."""

    def _new_payment(
        self,
        operation: PaymentOperation,
        request: PaymentInitiateRequest | PayoutRequest | TransferRequest,
        header_key: str | None,
    ) -> NewPayment:
        """What a money-moving request asks for, checked against the amount limits."""
        key = self._key(request.idempotency_key, header_key)
        warn_without_key(operation, key)
        return NewPayment(
            operation=operation,
            amount=self._checked_amount(request.amount),
            phone=getattr(request, "phone_number", None),
            receiver_party_code=getattr(request, "receiver_party_code", None),
            account_reference=request.account_reference,
            description=request.description,
            entity_type=request.entity_type,
            entity_id=request.entity_id,
            customer_name=getattr(request, "customer_name", None),
            customer_email=getattr(request, "customer_email", None),
            metadata=request.metadata,
            idempotency_key=key,
            request_body=request_body(request),
        )

    def _checked_amount(self, amount: Decimal) -> Decimal:
        return parse_amount(
            amount,
            minimum=self.settings.payment_min_amount,
            maximum=self.settings.payment_max_amount,
        )

    @staticmethod
    def _key(body_key: str | None, header_key: str | None) -> str | None:
        if body_key and header_key and body_key != header_key:
            raise PaymentValidationError(
                "the Idempotency-Key header and the body's idempotency_key differ",
                field="idempotency_key",
            )
        return body_key or header_key

    def _intent_values(self, new: NewPayment, actor: str | None) -> dict[str, Any]:
        """The new payment's row as it is committed before M-Pesa is called: what the request
        and this deployment set; ``repo.insert_payment`` gives every other column the model's
        default (no IDs from M-Pesa yet, not flagged, version 1, …)."""
        now = utcnow()
        transaction_id = new_transaction_id(now)
        third_party_reference = self.reference_for(new.operation, new.idempotency_key)
        return {
            "transaction_id": transaction_id,
            "operation": new.operation.value,
            "status": S.PROCESSING.value,  # sent (or about to be) once this commits
            "amount": new.amount,
            "currency": self.settings.payment_default_currency,
            "phone_number": new.phone.digits if new.phone else None,
            "receiver_party_code": new.receiver_party_code,
            "third_party_reference": third_party_reference,
            "transaction_reference": transaction_reference_for(
                new.account_reference, third_party_reference
            ),
            "account_reference": new.account_reference,
            "description": new.description,
            "entity_type": new.entity_type,
            "entity_id": new.entity_id,
            "customer_name": new.customer_name,
            "customer_email": new.customer_email,
            "user_id": actor,
            "idempotency_key": new.idempotency_key,
            "request_fingerprint": fingerprint(new.operation, new.request_body),
            "status_description": STATUS_MESSAGES[S.PROCESSING],
            "original_id": new.original_id,
            "metadata": new.metadata,
            # One clock reading for both (the model's default would read it twice).
            "created_at": now,
            "updated_at": now,
        }

    @staticmethod
    def _insert_intent(
        session: Session,
        values: dict[str, Any],
        new: NewPayment,
        actor: str | None,
        client_ip: str | None,
    ) -> PaymentRecord:
        initiated = repo.audit_entry(
            None,
            AuditAction.INITIATED,
            status_after=values["status"],
            request_body=sanitize(new.request_body),
            actor=actor,
            client_ip=client_ip,
        )
        return repo.insert_payment(session, values, initiated)

    async def _record_intent(
        self,
        db: DbSession,
        work: Callable[[Session], tuple[PaymentRecord, bool]],
        key: str | None,
    ) -> tuple[PaymentRecord, bool]:
        """Commit the intent (or find the payment this key already made): rules 1 and 4."""
        try:
            return await run_db(db, committing(work), write=True)
        except IntegrityError as exc:
            if key is not None:  # the key was used before, or a concurrent request won the insert
                existing = await run_db(db, lambda s: record_by_key(s, key))
                if existing is not None:
                    return existing, False
            raise PaymentStorageError(
                "the payment could not be recorded; nothing was sent to M-Pesa"
            ) from exc
        except DATABASE_ERRORS as exc:
            payment_logger.error("Database unavailable; payment not sent", error=type(exc).__name__)
            raise PaymentStorageError(
                "the payment database is unavailable; nothing was sent to M-Pesa"
            ) from exc

    async def _move_money(
        self,
        db: DbSession,
        new: NewPayment,
        send: Callable[[PaymentRecord], Awaitable[ProviderResult]],
        *,
        actor: str | None,
        client_ip: str | None,
        owner: str | None = None,
    ) -> PaymentResponse:
        def create(session: Session) -> tuple[PaymentRecord, bool]:
            # A key seen before fails the insert on its unique constraint; _record_intent then
            # returns the payment that key made. No lookup first: a new key is the common case.
            values = self._intent_values(new, actor)
            return self._insert_intent(session, values, new, actor, client_ip), True

        record, created = await self._record_intent(db, create, new.idempotency_key)
        if not created:
            if owner is not None and record.user_id != owner:
                raise IdempotencyConflictError(
                    "this idempotency key was already used by another caller; use a key of"
                    " your own (for example one that contains your order number)"
                )
            return self._replay(record, new.operation, new.request_body)
        payment_logger.info(
            "Payment initiated",
            transaction_id=record.transaction_id,
            operation=record.operation,
            phone=new.phone,
            amount=f"{record.amount:.2f}",
            third_party_reference=record.third_party_reference,
        )
        # Rule 2: no session work happens between here and the answer.
        try:
            outcome = outcome_of_success(await send(record), new.operation)
        except DuplicateTransactionError as error:
            outcome = await self._settle_duplicate(record, error)
        except PaymentProviderError as error:
            outcome = outcome_of_error(error)
        except PaymentValidationError as error:  # refused before sending: nothing moved
            raise await self._refused_before_sending(db, record, error, actor=actor) from None
        except Exception as error:
            await self.apply_outcome(db, record, outcome_of_unexpected(error), actor=actor)
            raise
        return await self._finish(db, record, outcome, actor=actor)

    async def _refused_before_sending(
        self, db: DbSession, record: PaymentRecord, error: PaymentError, *, actor: str | None
    ) -> PaymentError:
        """The client refused the request before sending it: the payment is recorded
        ``failed``, and the error says so (it was written, nothing was sent)."""
        message = (
            f"{error.message}; payment {record.transaction_id} was recorded as failed and"
            " nothing was sent to M-Pesa"
        )
        outcome = Outcome(S.FAILED, message, error=error, live=True)
        record, _ = await self.apply_outcome(db, record, outcome, actor=actor)
        error.message = message
        error.args = (message,)
        error.details.update(transaction_id=record.transaction_id, sent=False)
        error.payment = to_response(record)  # the client's error, now about a recorded payment
        return error

    def _replay(
        self, record: PaymentRecord, operation: str, request_body: dict[str, Any]
    ) -> PaymentResponse:
        """Same key: the original payment, if the request is the same one."""
        if record.request_fingerprint != fingerprint(operation, request_body):
            raise IdempotencyConflictError(
                "this idempotency key was already used for a different request",
                details={"transaction_id": record.transaction_id},
            )
        response = to_response(record)
        # Also for one still in flight: its outcome is open.
        error = error_for_record(record, payment=response)
        if error is not None:
            raise error
        return response

    async def _finish(
        self, db: DbSession, record: PaymentRecord, outcome: Outcome, *, actor: str | None
    ) -> PaymentResponse:
        outcome = replace(outcome, live=True)  # the answer of the payment's own call
        record, changed = await self.apply_outcome(db, record, outcome, actor=actor)
        response = to_response(record)
        status = PaymentStatus(record.status)
        if status in SUCCEEDED:
            payment_logger.info(
                "Payment completed",
                transaction_id=record.transaction_id,
                mpesa_receipt=record.provider_transaction_id,
            )
            return response
        if outcome.status is S.COMPLETED:
            # M-Pesa says this call took the money, but the payment was settled otherwise before
            # (it is flagged and held): never answered as a failure; an operator decides.
            contradiction = PaymentOutcomeUnknownError(
                f"M-Pesa reports this payment completed, but it was recorded as {status.value}"
                " before; it is held for an operator to confirm",
                details={"transaction_id": record.transaction_id, "status": status.value},
                payment=response,
            )
            raise contradiction
        error = outcome.error or error_for_record(record)
        if error is None:
            return response
        error.details.setdefault("transaction_id", record.transaction_id)
        error.payment = response  # the client's error (or the record's), now with the payment
        log = payment_logger.warning if status is S.UNKNOWN else payment_logger.info
        log(
            "Payment not completed",
            transaction_id=record.transaction_id,
            status=status.value,
            code=record.response_code,
        )
        raise error

    async def _settle_duplicate(
        self, record: PaymentRecord, error: DuplicateTransactionError
    ) -> Outcome:
        """INS-10: M-Pesa refused this request because it has seen the reference before. Ask what
        happened to that earlier request instead of failing. If it completed, it may have been
        this payment (sent before a database restore) or not: an operator decides."""
        queried = await self.query_outcome(record, by_reference=True)
        exchanges = error.exchanges + queried.exchanges
        unknown = PaymentOutcomeUnknownError(
            "M-Pesa reports this payment's reference as already used (INS-10); the outcome is"
            " unknown until it is confirmed",
            provider_code=error.provider_code,
            provider_description=error.provider_description,
            http_status=error.http_status,
        )
        still_unknown = replace(
            outcome_of_error(unknown), status=S.UNKNOWN, exchanges=exchanges, error=unknown
        )
        if queried.status is None:
            return still_unknown
        if queried.status is S.COMPLETED:
            return replace(
                still_unknown,
                attention="M-Pesa reports an earlier, completed transaction with this payment's"
                " reference (INS-10): confirm it is this payment before delivering",
                hold=True,
            )
        return replace(queried, exchanges=exchanges)

    async def query_outcome(self, record: PaymentRecord, *, by_reference: bool = False) -> Outcome:
        """Ask M-Pesa for the payment's status (``outcomes.query_outcome``)."""
        return await query_outcome(self.client, record, by_reference=by_reference)

    async def apply_outcome(
        self, db: DbSession, record: PaymentRecord, outcome: Outcome, *, actor: str | None
    ) -> tuple[PaymentRecord, bool]:
        """Record the exchanges and apply the outcome in one short transaction, retrying on
        conflicts and database errors. Fires the hooks for a transition this call made."""
        attempt = 0
        # First try on the values we hold (no read); if anyone changed the payment since, the
        # version-guarded UPDATE fails and the retry works on a fresh, locked read.
        known: Mapping[str, Any] | None = record.columns()
        check_ids = False
        while True:
            try:
                result = await run_db(
                    db,
                    committing(
                        partial(
                            outcomes.apply_outcome,
                            record=record,
                            outcome=outcome,
                            actor=actor,
                            known=known,
                            in_flight_until=self.in_flight_until(record),
                            check_ids=check_ids,
                            sink=self.event_sink(),
                        )
                    ),
                    write=True,
                )
                break
            except (*DATABASE_ERRORS, StaleDataError) as exc:
                known = None
                # A unique violation: M-Pesa's transaction ID may be another payment's already.
                # The retry looks before it writes (not on the hot path: it is one more read).
                check_ids = check_ids or isinstance(exc, IntegrityError)
                if attempt >= len(self._db_retry_delays):
                    # The log line is the last place M-Pesa's answer survives: every ID in it.
                    payment_logger.critical(
                        "Payment outcome NOT recorded; reconciliation will settle it from M-Pesa",
                        transaction_id=record.transaction_id,
                        outcome=outcome.status.value if outcome.status else None,
                        mpesa_receipt=outcome.provider_transaction_id,
                        conversation_id=outcome.conversation_id,
                        third_party_reference=record.third_party_reference,
                        code=outcome.response_code,
                        error=type(exc).__name__,
                    )
                    lost = PaymentStorageError(
                        "M-Pesa answered but the outcome could not be recorded; the payment stays"
                        f" {record.status} until reconciliation settles it",
                        details={
                            "transaction_id": record.transaction_id,
                            "outcome": outcome.status.value if outcome.status else None,
                            "provider_transaction_id": outcome.provider_transaction_id,
                            "conversation_id": outcome.conversation_id,
                            "third_party_reference": record.third_party_reference,
                        },
                        outcome_known=False,
                        payment=to_response(record),
                    )
                    raise lost from exc
                await asyncio.sleep(self._db_retry_delays[attempt])
                attempt += 1
        updated, before, original, written = result
        changed = before != updated.status
        if changed:  # counted by the writer of the transition, whoever runs its hooks
            metrics.observe_transition(updated.operation, updated.status, updated.amount)
        await self._after_commit(db, written, updated, outcome, original)
        return updated, changed


def request_body(request: Any) -> dict[str, Any]:
    """The request as data: phone number as digits (for the fingerprint), amounts as strings."""
    body = request.model_dump(mode="python", exclude_none=True)  # the phone comes out masked
    phone = getattr(request, "phone_number", None)
    if isinstance(phone, Msisdn):
        body["phone_number"] = phone.digits
    if isinstance(body.get("amount"), Decimal):
        body["amount"] = f"{body['amount']:.2f}"
    return body


def warn_without_key(operation: PaymentOperation, key: str | None) -> None:
    if key is None:
        # Keys stay optional (as in the original API), but a retry without one (a proxy's, a
        # user's double click) makes a second payment.
        payment_logger.warning(
            "Money-moving request without an idempotency key: a retry would move money again",
            operation=operation.value,
        )


def record_by_key(session: Session, key: str) -> PaymentRecord | None:
    row = repo.get_by_idempotency_key(session, key)
    return repo.record_of(session, row) if row is not None else None


def actor_of(actor: str | None, user_id: str | None) -> str | None:
    """Who asks: recorded as the payment's ``user_id`` column and as the audit trail's ``actor``.
    ``user_id=`` is the keyword's earlier name, still accepted from hosts."""
    return actor if actor is not None else user_id
