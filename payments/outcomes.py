"""Applying an outcome: what one provider interaction established about a payment, how it is
written (status, IDs, the audit trail) in one short transaction, and what a caller is told.

``PaymentService.apply_outcome`` wraps :func:`apply_outcome` with retries and fires the hooks;
``query_outcome`` asks M-Pesa for a payment's status by every key it has.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from operator import attrgetter
from typing import Any

from sqlalchemy.orm import Session

from . import events
from . import exceptions as errors
from . import repository as repo
from .lifecycle import IN_FLIGHT, SUCCEEDED, UNSETTLED, UNSUCCESSFUL, check_transition
from .logger import payment_logger
from .models import (
    ID_LENGTH,
    RESPONSE_CODE_LENGTH,
    AuditAction,
    PaymentOperation,
    PaymentStatus,
    utcnow,
)
from .mpesa.client import MpesaClient, ProviderExchange, ProviderResult
from .mpesa.codes import (
    CANCELLED_BY_CUSTOMER,
    CUSTOMER_REFUSALS,
    INSUFFICIENT_BALANCE,
    KEY_REFUSED_CODES,
)
from .mpesa.values import mask_msisdn
from .references import query_reference
from .repository import PaymentRecord
from .schemas import PaymentResponse

S = PaymentStatus
#: Errors of payments recorded ``failed`` without anything reaching M-Pesa, by ``error_code``.
_NOT_SENT_ERRORS: dict[str, type[errors.PaymentError]] = {
    errors.PaymentValidationError.error_code: errors.PaymentValidationError,
    errors.PaymentConfigurationError.error_code: errors.PaymentConfigurationError,
    errors.ProviderUnavailableError.error_code: errors.ProviderUnavailableError,
}

#: ``output_ResponseTransactionStatus`` → our status. ``N/A`` (or anything else) is no evidence.
_PROVIDER_STATUS = {"completed": S.COMPLETED, "cancelled": S.CANCELLED, "expired": S.EXPIRED}


STATUS_MESSAGES = {
    S.PENDING: "Payment recorded, not sent yet",
    S.PROCESSING: "Waiting for M-Pesa",
    S.COMPLETED: "Payment processed successfully",
    S.FAILED: "Payment failed",
    S.CANCELLED: "Payment cancelled",
    S.EXPIRED: "Payment expired",
    S.UNKNOWN: "Outcome unknown: waiting for confirmation from M-Pesa",
    S.PARTIALLY_REVERSED: "Payment partially reversed",
    S.REVERSED: "Payment reversed",
}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one provider interaction established about a payment."""

    status: PaymentStatus | None  # None: no evidence, the status stays as it is
    status_description: str
    exchanges: tuple[ProviderExchange, ...] = ()
    response_code: str | None = None
    response_description: str | None = None
    provider_transaction_id: str | None = None
    conversation_id: str | None = None
    error: errors.PaymentError | None = None
    action: AuditAction | None = None  # audit action for the status change, if not the default
    attention: str | None = None  # why an operator must look at the payment, if one must
    #: Only an operator may settle the payment from now on (``PaymentService.resolve``).
    hold: bool = False
    #: The answer of the payment's own call (not a status query made by someone else): only it
    #: may settle a payment whose call may still be answered.
    live: bool = False
    #: The ConversationID a status answer carried: evidence for checks (a notice's transaction
    #: ID), never written to the payment, whose own ConversationID it may not be.
    answered_conversation_id: str | None = None


#: The response's fields ``to_response`` computes; every other one is the record's field of
#: that name, as it is.
_COMPUTED_FIELDS = frozenset({"success", "status", "message", "phone_number"})


def _copied_fields() -> tuple[str, ...]:
    names = tuple(name for name in PaymentResponse.model_fields if name not in _COMPUTED_FIELDS)
    if missing := set(names) - {field.name for field in fields(PaymentRecord)}:
        raise TypeError(f"PaymentResponse fields PaymentRecord lacks: {sorted(missing)}")
    return names


_COPIED_FIELDS = _copied_fields()
_copied_values = attrgetter(*_COPIED_FIELDS)  # one call reads them all
#: ``PaymentResponse.model_validate`` without its Python wrapper (every payment's answer).
_validate_response = PaymentResponse.__pydantic_validator__.validate_python


def to_response(record: PaymentRecord) -> PaymentResponse:
    status = PaymentStatus(record.status)
    values = dict(zip(_COPIED_FIELDS, _copied_values(record), strict=True))
    values["success"] = status in SUCCEEDED
    values["status"] = status.value
    values["message"] = record.status_description or STATUS_MESSAGES[status]
    values["phone_number"] = mask_msisdn(record.phone_number) if record.phone_number else None
    response: PaymentResponse = _validate_response(values)
    return response


async def query_outcome(
    client: MpesaClient, record: PaymentRecord, *, by_reference: bool = False
) -> Outcome:
    """Ask M-Pesa for the payment's status by every key it has, in the order TransactionID,
    ConversationID, third-party reference (``by_reference``: that one only), moving to the
    next while M-Pesa cannot find (or will not look up) the one asked for. Each query has
    a fresh ``input_ThirdPartyReference``. A status answer's ConversationID is the query's,
    not the payment's: it stays in the audit exchange only."""
    keys: dict[str | None, str] = {record.third_party_reference: "third-party reference"}
    if not by_reference:
        keys = {
            record.provider_transaction_id: "transaction ID",
            record.conversation_id: "conversation ID",
        } | keys
    exchanges: tuple[ProviderExchange, ...] = ()
    answers: list[str] = []
    for key, kind in keys.items():
        if not key:
            continue
        try:
            result = await client.query_transaction_status(
                query_reference=key, third_party_reference=query_reference()
            )
        except errors.PaymentProviderError as error:
            exchanges += error.exchanges
            answers.append(f"status query failed: {error.message}")
            if error.provider_code in KEY_REFUSED_CODES:
                continue  # M-Pesa will not look this key up; another may do
            break
        exchanges += result.exchanges
        if not result.found:
            answers.append(f"{kind} ({result.transaction_status or result.response_code})")
            continue
        provider_status = (result.transaction_status or "").strip().lower()
        status = _PROVIDER_STATUS.get(provider_status)
        if status is not None and record.operation == PaymentOperation.REVERSAL:
            status = S.COMPLETED if status is S.COMPLETED else S.FAILED
        if status is None:
            return Outcome(
                None,
                f"M-Pesa reports status {result.transaction_status}: no outcome yet",
                exchanges=exchanges,
            )
        return Outcome(
            status,
            f"M-Pesa reports the transaction {provider_status}",
            exchanges=exchanges,
            action=AuditAction.RECONCILED,
            answered_conversation_id=result.conversation_id,
        )
    if answers and answers[-1].startswith("status query failed"):
        return Outcome(None, answers[-1], exchanges=exchanges)
    return Outcome(
        None,
        f"M-Pesa cannot find this payment yet (asked by {', '.join(answers)}): no outcome yet",
        exchanges=exchanges,
    )


#: The message of a completed answer, per operation (a reversal is not a "payment completed").
SUCCESS_MESSAGES = {
    PaymentOperation.C2B: "Payment completed successfully",
    PaymentOperation.B2C: "Payout completed successfully",
    PaymentOperation.B2B: "Transfer completed successfully",
    PaymentOperation.REVERSAL: "Reversal completed successfully",
}


def outcome_of_success(
    result: ProviderResult, operation: PaymentOperation = PaymentOperation.C2B
) -> Outcome:
    return Outcome(
        status=S.COMPLETED,
        status_description=SUCCESS_MESSAGES[operation],
        exchanges=result.exchanges,
        response_code=result.response_code,
        response_description=result.response_description,
        provider_transaction_id=result.provider_transaction_id,
        conversation_id=result.conversation_id,
    )


def outcome_of_error(error: errors.PaymentProviderError) -> Outcome:
    """Only provider evidence fails a payment; everything ambiguous leaves it unknown."""
    status: PaymentStatus
    if (
        isinstance(error, errors.PaymentCancelledError)
        and error.provider_code == CANCELLED_BY_CUSTOMER
    ):
        status = S.CANCELLED
    elif isinstance(error, errors.PaymentInitiationError):
        status = S.FAILED
    elif isinstance(error, errors.ProviderUnavailableError) and error.outcome_known:
        status = S.FAILED  # provably never sent: nothing can have moved
    else:
        status = S.UNKNOWN
    return Outcome(
        status=status,
        status_description=error.message,
        exchanges=error.exchanges,
        response_code=error.provider_code,
        response_description=error.provider_description,
        # Error answers carry IDs too (INS-9 after the PIN wait, INS-1, …): a later status query
        # by them is the way back when M-Pesa will not take a third-party reference.
        provider_transaction_id=error.provider_transaction_id,
        conversation_id=error.conversation_id,
        error=error,
    )


def error_for_record(
    record: PaymentRecord, payment: PaymentResponse | None = None
) -> errors.PaymentError | None:
    """The error a caller gets for a payment in this state (also on an idempotent replay),
    carrying ``payment`` (the answer for the recorded payment) when given."""
    status = PaymentStatus(record.status)
    details = {"transaction_id": record.transaction_id, "status": status.value}
    common: dict[str, Any] = {
        "details": details,
        "provider_code": record.response_code,
        "provider_description": record.response_description,
        "payment": payment,
    }
    message = record.status_description or STATUS_MESSAGES[status]
    if status in UNSETTLED:
        return errors.PaymentOutcomeUnknownError(message, **common)
    if status is S.CANCELLED:
        return errors.PaymentCancelledError(message, **common)
    if status in (S.FAILED, S.EXPIRED):
        not_sent = _NOT_SENT_ERRORS.get(record.error_code or "")
        if not_sent is not None:  # recorded failed, and nothing reached M-Pesa
            error = not_sent(message, **common)
            error.details["sent"] = False
            return error
        if record.response_code == INSUFFICIENT_BALANCE:
            return errors.InsufficientFundsError(message, **common)
        if status is S.EXPIRED or record.response_code in CUSTOMER_REFUSALS:
            return errors.PaymentCancelledError(message, **common)
        if record.response_code:
            return errors.InvalidPaymentRequestError(message, **common)
        # Sent, and M-Pesa reports it did not go through (a status answer carries no code).
        return errors.PaymentInitiationError(message, **common)
    return None


def outcome_of_unexpected(error: Exception) -> Outcome:
    """A bug or crash mid-call: the request may have left, so the outcome is unknown."""
    return Outcome(
        S.UNKNOWN,
        f"unexpected error while calling M-Pesa ({type(error).__name__}); outcome unknown",
        live=True,  # the call itself ended: nothing else will answer it
    )


def apply_outcome(
    session: Session,
    record: PaymentRecord,
    outcome: Outcome,
    actor: str | None,
    known: Mapping[str, Any] | None,
    in_flight_until: datetime | None = None,
    check_ids: bool = False,
    sink: events.EventSink | None = None,
) -> tuple[PaymentRecord, str, PaymentRecord | None, list[events.WrittenEvent]]:
    """(updated record, status before, updated original for a completed reversal, the events
    written with the transition: in this same transaction, so neither commits without the other).

    The hot path of every payment, so plain statements: the payment's ``known`` values (or a
    locked read), one UPDATE guarded by the row's version (a concurrent writer makes it fail,
    and ``apply_outcome`` retries), one batched INSERT of the audit rows.

    Two gates keep answers that are not evidence enough from settling a payment, whoever asks:
    a payment held for an operator changes only through ``PaymentService.resolve``, and a
    ``pending``/``processing`` one whose own call may still be answered (before
    ``in_flight_until``) only through that call's answer (``outcome.live``)."""
    current = known if known is not None else repo.lock_payment(session, record.id)
    audits = [
        entry
        for exchange in outcome.exchanges
        for entry in (
            repo.audit_entry(
                record.id,
                AuditAction.API_REQUEST,
                request_body={
                    "operation": exchange.operation.value,
                    "method": exchange.method,
                    "url": exchange.url,
                    "attempt": exchange.attempt,
                    "fields": exchange.request_fields,
                },
                actor=actor,
            ),
            repo.audit_entry(
                record.id,
                AuditAction.API_RESPONSE,
                response_body=exchange.response_body,
                http_status=exchange.http_status,
                error_message=exchange.error,
                response_time_ms=exchange.elapsed_ms,
                actor=actor,
            ),
        )
    ]
    before = current["status"]
    now = utcnow()
    changes: dict[str, Any] = {"updated_at": now}
    attention = [outcome.attention] if outcome.attention else []
    hold = outcome.hold
    new_id = outcome.provider_transaction_id
    if new_id and not current["provider_transaction_id"]:
        holder = repo.get_by_provider_transaction_id(session, new_id) if check_ids else None
        if len(new_id) > ID_LENGTH:
            attention.append(
                f"M-Pesa's transaction ID is longer than {ID_LENGTH} characters and was not"
                " recorded (the audit trail has the answer)"
            )
        elif holder is not None and holder.id != record.id:
            # One M-Pesa transaction belongs to one payment: never two, never silently.
            attention.append(
                f"M-Pesa transaction ID {new_id} is already recorded on {holder.transaction_id};"
                " it was not recorded here"
            )
        else:
            changes["provider_transaction_id"] = new_id
    if outcome.conversation_id and not current["conversation_id"]:
        if len(outcome.conversation_id) <= ID_LENGTH:
            changes["conversation_id"] = outcome.conversation_id
    status = outcome.status
    withheld: str | None = None  # why the outcome's status is not applied, if it is not
    if status is not None and current["operator_hold"]:
        withheld = "the payment is held for an operator"
    elif (
        status is not None
        and not outcome.live
        and before in IN_FLIGHT
        and in_flight_until is not None
        and now < in_flight_until
    ):
        # E.g. "Expired" from a query while the customer still types the PIN: the call's own
        # answer (or, once it cannot come any more, a later query) settles it.
        withheld = (
            "the payment's own call may still be answered"
            f" (until {in_flight_until.isoformat(timespec='seconds')})"
        )
    if withheld is not None:
        audits.append(
            repo.audit_entry(
                record.id,
                AuditAction.STATUS_CHANGED,
                status_before=before,
                error_message=f"not applied, {withheld}: {outcome.status_description}"[:2000],
                actor=actor,
            )
        )
        status = None
    changed = False
    if status is not None:
        try:
            changed = check_transition(before, status)
        except errors.InvalidStateTransitionError as refused:
            audits.append(
                repo.audit_entry(
                    record.id,
                    AuditAction.STATUS_CHANGED,
                    status_before=before,
                    error_message=f"refused: {refused.message}",
                    actor=actor,
                )
            )
            if status is S.COMPLETED:
                # M-Pesa says the money moved, yet the payment was settled as not paid:
                # never flip it silently, never leave it unseen. An operator decides.
                hold = True
                attention.append(f"M-Pesa reports completed for a {before} payment")
                payment_logger.critical(
                    "M-Pesa reports a settled payment as completed: operator needed",
                    transaction_id=record.transaction_id,
                    status=before,
                    mpesa_receipt=new_id,
                )
    for reason in attention:
        audits.append(
            repo.audit_entry(
                record.id,
                AuditAction.ATTENTION_REQUIRED,
                status_before=before,
                status_after=before,
                error_message=reason,
                actor=actor,
            )
        )
        payment_logger.warning(
            "Payment needs an operator", transaction_id=record.transaction_id, reason=reason
        )
    if attention or hold:
        changes["attention_required"] = True
    if hold:
        changes["operator_hold"] = True
    if changed:
        assert status is not None
        changes["status"] = status.value
        changes["status_description"] = outcome.status_description[:255]
        if outcome.response_code:
            changes["response_code"] = outcome.response_code[:RESPONSE_CODE_LENGTH]
            changes["response_description"] = (outcome.response_description or "")[:255]
        if outcome.error is not None and status in UNSUCCESSFUL:
            changes["error_code"] = outcome.error.error_code[:32]
        if status not in UNSETTLED:
            changes["completed_at"] = now
            changes["next_reconcile_at"] = None
        audits.append(
            repo.audit_entry(
                record.id,
                outcome.action or _audit_action_for(status),
                status_before=before,
                status_after=status.value,
                error_message=outcome.status_description if outcome.error else None,
                actor=actor,
            )
        )
    updated = PaymentRecord.from_columns(
        {**current, **changes, "version": current["version"] + 1},
        record.original_transaction_id,
    )
    types = events.transition_types(
        updated, status_before=before, attention_before=bool(current["attention_required"])
    )
    version = current["version"]
    if changed and updated.operation == PaymentOperation.REVERSAL and updated.status == S.COMPLETED:
        repo.update_payment(session, record.id, version, before, changes, audits)
        original_record = _apply_reversal_to_original(session, updated, actor)
        written = events.add_events(session, updated, types, sink or events.EventSink())
        return updated, before, original_record, written
    # The common case: everything in one write, the unit's last (on PostgreSQL one statement).
    rows = events.event_rows(updated, types, sink or events.EventSink())
    repo.update_payment(
        session, record.id, version, before, changes, audits, then=rows.inserts(), final=True
    )
    return updated, before, None, rows.written


def _apply_reversal_to_original(
    session: Session, reversal: PaymentRecord, actor: str | None
) -> PaymentRecord:
    assert reversal.original_id is not None
    original = repo.get_by_id(session, reversal.original_id, for_update=True)
    before = original.status
    original.reversed_amount = min(original.amount, original.reversed_amount + reversal.amount)
    fully = original.reversed_amount >= original.amount
    new_status = S.REVERSED if fully else S.PARTIALLY_REVERSED
    if check_transition(before, new_status):
        original.status = new_status.value
        original.status_description = (
            "Payment reversed" if fully else f"{original.reversed_amount:.2f} reversed"
        )
    original.updated_at = utcnow()
    repo.add_audit(
        session,
        original.id,
        AuditAction.REVERSED,
        status_before=before,
        status_after=original.status,
        response_body={
            "reversal_transaction_id": reversal.transaction_id,
            "amount": f"{reversal.amount:.2f}",
        },
        actor=actor,
    )
    session.flush()
    return repo.record_of(session, original)


def _audit_action_for(status: PaymentStatus) -> AuditAction:
    if status is S.COMPLETED:
        return AuditAction.COMPLETED
    if status in UNSUCCESSFUL:
        return AuditAction.FAILED
    return AuditAction.STATUS_CHANGED
