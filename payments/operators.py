"""Reversals and operators' resolutions: the use cases that act on a payment already made."""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from . import events, metrics
from . import repository as repo
from .database import DbSession, committing, run_db
from .exceptions import (
    DuplicateTransactionError,
    InvalidStateTransitionError,
    PaymentConfigurationError,
    PaymentNotFoundError,
    PaymentProviderError,
    PaymentValidationError,
)
from .lifecycle import IN_FLIGHT, REVERSIBLE, SUCCEEDED, UNSUCCESSFUL
from .logger import payment_logger
from .models import AuditAction, PaymentOperation, PaymentStatus, utcnow
from .money_flow import (
    MoneyFlow,
    NewPayment,
    actor_of,
    record_by_key,
    request_body,
    warn_without_key,
)
from .mpesa.values import validate_provider_id
from .outcomes import (
    Outcome,
    outcome_of_error,
    outcome_of_success,
    outcome_of_unexpected,
    to_response,
)
from .repository import PaymentRecord
from .schemas import PaymentResponse, ReversalRequest

S = PaymentStatus


class OperatorActions(MoneyFlow):
    """Reversing a completed payment, and an operator's decision on an open one."""

    async def reverse(
        self,
        transaction_id: str,
        request: ReversalRequest,
        db: DbSession,
        actor: str | None = None,
        *,
        idempotency_key: str | None = None,
        client_ip: str | None = None,
        user_id: str | None = None,
    ) -> PaymentResponse:
        """Reverse a completed payment, fully or partially. Returns the reversal transaction.

        A reversal is never sent twice automatically: a lost answer leaves it ``unknown`` and a
        status query (``refresh``/reconciliation) settles it.
        """
        actor = actor_of(actor, user_id)
        key = self._key(request.idempotency_key, idempotency_key)
        warn_without_key(PaymentOperation.REVERSAL, key)
        body = request_body(request) | {"original_transaction_id": transaction_id}
        original_provider_id: str | None = None
        self.client.check_reversal_configured()  # before anything is recorded

        def reserve(session: Session) -> tuple[PaymentRecord, bool]:
            nonlocal original_provider_id
            original = repo.get(session, transaction_id, for_update=True)
            # The key is looked up only once the original is locked: a concurrent reversal with
            # the same key has committed by then (PostgreSQL), and its result is the answer.
            if key is not None and (existing := record_by_key(session, key)) is not None:
                return existing, False
            if original is None:
                raise PaymentNotFoundError(f"payment {transaction_id} not found")
            if original.operation == PaymentOperation.REVERSAL:
                raise PaymentValidationError(
                    "a reversal cannot be reversed", field="transaction_id"
                )
            if PaymentStatus(original.status) not in REVERSIBLE:
                already = original.status == S.REVERSED
                raise InvalidStateTransitionError(
                    f"{transaction_id} is already fully reversed"
                    if already
                    else "only completed or partially reversed payments can be reversed;"
                    f" {transaction_id} is {original.status}",
                    details={"transaction_id": transaction_id, "status": original.status},
                )
            if not original.provider_transaction_id:
                raise InvalidStateTransitionError(
                    f"{transaction_id} has no M-Pesa transaction ID (it was settled by a status"
                    " query, which carries none), and a reversal must send it: record it with"
                    f" POST /payments/{transaction_id}/resolve (PaymentService.resolve) first",
                    details={"transaction_id": transaction_id, "status": original.status},
                    error_code="provider_transaction_id_missing",
                )
            available = (
                original.amount
                - original.reversed_amount
                - repo.reversals_in_flight_amount(session, original.id)
            )
            amount = request.amount if request.amount is not None else available
            if amount <= 0 or amount > available:
                raise PaymentValidationError(
                    f"amount must be more than 0 and at most {available:.2f}, the amount not yet"
                    " reversed or being reversed",
                    field="amount",
                )
            # Bump the original's version so concurrent reservations conflict instead of both
            # passing the check above (SQLite has no FOR UPDATE).
            original.updated_at = utcnow()
            original_provider_id = original.provider_transaction_id
            new = NewPayment(
                operation=PaymentOperation.REVERSAL,
                amount=amount,
                phone=None,
                receiver_party_code=None,
                account_reference=original.account_reference,
                description=request.reason,
                entity_type=original.entity_type,
                entity_id=original.entity_id,
                customer_name=None,
                customer_email=None,
                metadata=None,
                idempotency_key=key,
                request_body=body,
                original_id=original.id,
            )
            values = self._intent_values(new, actor) | {"phone_number": original.phone_number}
            return self._insert_intent(session, values, new, actor, client_ip), True

        record, created = await self._record_intent(db, reserve, key)
        if not created:
            return self._replay(record, PaymentOperation.REVERSAL, body)
        # Rule 2: the original's M-Pesa ID was read in the committed reservation above, so no
        # connection is held while M-Pesa answers.
        try:
            result = await self.client.reversal(
                provider_transaction_id=original_provider_id or "",
                third_party_reference=record.third_party_reference,
                amount=record.amount,
            )
            outcome = outcome_of_success(result, PaymentOperation.REVERSAL)
        except DuplicateTransactionError as error:
            outcome = await self._settle_duplicate(record, error)
        except PaymentProviderError as error:
            outcome = outcome_of_error(error)
        except (PaymentValidationError, PaymentConfigurationError) as error:
            # Refused before sending: nothing was reversed, and nothing stays reserved.
            raise await self._refused_before_sending(db, record, error, actor=actor) from None
        except Exception as error:
            await self.apply_outcome(db, record, outcome_of_unexpected(error), actor=actor)
            raise
        return await self._finish(db, record, outcome, actor=actor)

    async def resolve(
        self,
        transaction_id: str,
        db: DbSession,
        *,
        reason: str,
        status: str | None = None,
        provider_transaction_id: str | None = None,
        actor: str | None = None,
    ) -> PaymentResponse:
        """An operator's decision, for what M-Pesa's answers cannot settle.

        - A payment that is ``unknown``, flagged ``attention_required``, or ``pending``/
          ``processing`` past its call's window: settled to ``status`` (``completed`` needs the
          M-Pesa ``provider_transaction_id``; ``failed`` on a flagged unpaid one keeps its
          status), the flag and the hold cleared, the hooks fired once.
        - A completed payment without M-Pesa's transaction ID: the ID is recorded (``status``
          omitted or ``completed``), so it can be reversed.
        - Anything else: ``InvalidStateTransitionError`` (409), nothing changed.

        Every resolution is audited as ``operator_resolved`` with the actor, the reason, the
        statuses before and after, and the ID."""
        reason = (reason or "").strip()
        if not 1 <= len(reason) <= 500:
            raise PaymentValidationError("reason must be 1-500 characters", field="reason")
        wanted = PaymentStatus(status) if status else None
        if wanted not in (None, S.COMPLETED, S.FAILED):
            raise PaymentValidationError("status must be completed or failed", field="status")
        if provider_transaction_id is not None:
            validate_provider_id(provider_transaction_id, field="provider_transaction_id")
        now = utcnow()

        def refuse(message: str, **details: Any) -> InvalidStateTransitionError:
            return InvalidStateTransitionError(
                message, details={"transaction_id": transaction_id, **details}
            )

        def decide(session: Session) -> tuple[PaymentRecord, str]:
            row = repo.get(session, transaction_id, for_update=True)
            if row is None:
                raise PaymentNotFoundError(f"payment {transaction_id} not found")
            before = PaymentStatus(row.status)
            if row.operation == PaymentOperation.REVERSAL:
                raise refuse(
                    "a reversal is settled by M-Pesa's status query, not resolved",
                    status=before.value,
                )
            record = repo.record_of(session, row)
            stuck = before in IN_FLIGHT and now >= self.in_flight_until(record)
            after = before
            if before in SUCCEEDED and not row.provider_transaction_id:
                if wanted not in (None, S.COMPLETED):
                    raise refuse(
                        f"{transaction_id} is {before.value}: money moved, it cannot become"
                        f" {status}; reverse it instead",
                        status=before.value,
                    )
                if provider_transaction_id is None:
                    raise PaymentValidationError(
                        "provider_transaction_id is required to record M-Pesa's ID",
                        field="provider_transaction_id",
                    )
            elif (
                before is S.UNKNOWN or stuck or (row.attention_required and before in UNSUCCESSFUL)
            ):
                if wanted is None:
                    raise PaymentValidationError(
                        "status is required: completed or failed", field="status"
                    )
                if wanted is S.COMPLETED and provider_transaction_id is None:
                    raise PaymentValidationError(
                        "completed requires M-Pesa's provider_transaction_id",
                        field="provider_transaction_id",
                    )
                if wanted is S.COMPLETED:
                    after = S.COMPLETED  # also over a flagged unpaid status: M-Pesa contradicted it
                elif before not in UNSUCCESSFUL:
                    after = S.FAILED
            else:
                raise refuse(
                    f"{transaction_id} is {before.value}"
                    + (" with an M-Pesa transaction ID" if row.provider_transaction_id else "")
                    + ": there is nothing for an operator to resolve",
                    status=before.value,
                )
            if provider_transaction_id is not None:
                holder = repo.get_by_provider_transaction_id(session, provider_transaction_id)
                if holder is not None and holder.id != row.id:
                    raise InvalidStateTransitionError(
                        f"M-Pesa transaction ID {provider_transaction_id} is already recorded on"
                        f" {holder.transaction_id}",
                        details={"transaction_id": transaction_id},
                        error_code="provider_transaction_id_conflict",
                    )
                row.provider_transaction_id = provider_transaction_id
            if after is not before:
                row.status = after.value
                row.status_description = f"Resolved by an operator: {reason}"[:255]
                row.completed_at = now
                row.next_reconcile_at = None
            row.attention_required = False
            row.operator_hold = False
            repo.add_audit(
                session,
                row.id,
                AuditAction.OPERATOR_RESOLVED,
                status_before=before.value,
                status_after=after.value,
                request_body={
                    "status": wanted.value if wanted else None,
                    "provider_transaction_id": provider_transaction_id,
                    "reason": reason,
                },
                actor=actor,
            )
            session.flush()
            record = repo.record_of(session, row)
            written = events.add_events(
                session,
                record,
                [events.EventType.PAYMENT_RESOLVED],
                self.event_sink(),
                extra={
                    "status_before": before.value,
                    "resolution": {"reason": reason, "actor": actor},
                },
            )
            return record, before.value, written

        try:
            updated, before, written = await run_db(db, committing(decide), write=True)
        except IntegrityError as exc:  # a concurrent resolution recorded the same ID elsewhere
            raise InvalidStateTransitionError(
                f"M-Pesa transaction ID {provider_transaction_id} is already recorded on another"
                " payment",
                details={"transaction_id": transaction_id},
                error_code="provider_transaction_id_conflict",
            ) from exc
        except StaleDataError as exc:
            raise refuse(f"{transaction_id} changed while it was resolved; look again") from exc
        payment_logger.warning(
            "Payment resolved by an operator",
            transaction_id=transaction_id,
            status_before=before,
            status=updated.status,
            mpesa_receipt=updated.provider_transaction_id,
            actor=actor,
        )
        if updated.status != before:
            metrics.observe_transition(updated.operation, updated.status, updated.amount)
        await self._after_commit(
            db, written, updated, Outcome(PaymentStatus(updated.status), reason), None
        )
        return to_response(updated)
