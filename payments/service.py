"""The use cases: initiate (C2B), payout (B2C), transfer (B2B), reverse, refresh, and the reads.

``PaymentService`` composes the provider client and the repository and owns every commit. Its
money-moving flows keep these rules (comments cite them by number):

1. the intent row is committed (``processing``) before M-Pesa is called;
2. no database connection or transaction is held while waiting on M-Pesa;
3. lost or ambiguous answers leave the payment ``unknown``; only a status query settles it;
4. an idempotency key plus a request fingerprint: one provider call per key, decided by the
   database's unique constraint; the ``input_ThirdPartyReference`` is derived from the key;
5. statuses change only along ``lifecycle.ALLOWED_TRANSITIONS``, under an optimistic lock,
   and hooks fire once, for the writer that made the transition.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from . import events, metrics, outcomes
from . import repository as repo
from .config import PaymentSettings, get_settings
from .database import DATABASE_ERRORS, DbSession, committing, run_db
from .exceptions import (
    DuplicateTransactionError,
    IdempotencyConflictError,
    InvalidStateTransitionError,
    PaymentConfigurationError,
    PaymentError,
    PaymentNotFoundError,
    PaymentOutcomeUnknownError,
    PaymentProviderError,
    PaymentStorageError,
    PaymentValidationError,
)
from .lifecycle import IN_FLIGHT, SUCCEEDED, UNSETTLED, UNSUCCESSFUL
from .logger import payment_logger
from .models import (
    AuditAction,
    PaymentOperation,
    PaymentStatus,
    utcnow,
)
from .mpesa.client import MpesaClient, ProviderResult
from .mpesa.values import Msisdn, money_text, parse_amount, validate_provider_id
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
from .paging import PageCursor
from .redaction import sanitize, sanitize_text
from .references import (
    fingerprint,
    new_transaction_id,
    query_reference,
    third_party_reference_for,
    transaction_reference_for,
)
from .repository import PaymentRecord
from .schemas import (
    AuditLogEntry,
    AuditTrailResponse,
    CustomerNameResponse,
    EventListResponse,
    EventResponse,
    OperationSummary,
    PaymentFilters,
    PaymentInitiateRequest,
    PaymentListResponse,
    PaymentResponse,
    PaymentSummary,
    PayoutRequest,
    ReversalRequest,
    SummaryBucket,
    TransferRequest,
)

S = PaymentStatus


@dataclass(frozen=True, slots=True)
class _NewPayment:
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


#: Which way the money of a completed payment of each operation went.
_DIRECTIONS = {
    PaymentOperation.C2B: "received",
    PaymentOperation.B2C: "paid_out",
    PaymentOperation.B2B: "transferred",
    PaymentOperation.REVERSAL: "reversed",
}


def summarize(
    rows: list[tuple[str, str, int, Decimal, int, Decimal]],
    from_date: date | None,
    to_date: date | None,
) -> PaymentSummary:
    """The summary of ``repository.summary_rows``. Money in and money out are never added
    together: each operation has its own direction, and the success rate is per operation."""
    zero = Decimal("0")
    by_status: dict[str, SummaryBucket] = {}
    by_operation: dict[str, OperationSummary] = {}
    directions = {name: SummaryBucket(count=0, amount=zero) for name in _DIRECTIONS.values()}
    settled: dict[str, int] = {}
    net_received = zero
    for status_text, operation, count, amount, _, reversed_amount in rows:
        status = PaymentStatus(status_text)
        succeeded = status in SUCCEEDED
        bucket = by_status.get(status_text) or SummaryBucket(count=0, amount=zero)
        by_status[status_text] = SummaryBucket(
            count=bucket.count + count, amount=bucket.amount + amount
        )
        entry = by_operation.get(operation) or OperationSummary(count=0, amount=zero)
        entry.count += count
        entry.amount += amount
        if succeeded:
            entry.completed_count += count
            entry.completed_amount += amount
            direction = _DIRECTIONS.get(PaymentOperation(operation))
            if direction is not None:
                moved = directions[direction]
                directions[direction] = SummaryBucket(
                    count=moved.count + count, amount=moved.amount + amount
                )
            if operation == PaymentOperation.C2B:
                # What the shop kept of it: completed reversals refunded the rest.
                net_received += amount - reversed_amount
        if status not in UNSETTLED:
            settled[operation] = settled.get(operation, 0) + count
        by_operation[operation] = entry
    for operation, entry in by_operation.items():
        done = settled.get(operation, 0)
        entry.success_rate = round(entry.completed_count / done, 4) if done else None
    c2b = by_operation.get(PaymentOperation.C2B.value)
    return PaymentSummary(
        from_date=from_date,
        to_date=to_date,
        total_count=sum(row[2] for row in rows),
        total_amount=sum((row[3] for row in rows), zero),
        received=directions["received"],
        paid_out=directions["paid_out"],
        transferred=directions["transferred"],
        reversed=directions["reversed"],
        net_received=net_received,
        success_rate_by_operation={op: entry.success_rate for op, entry in by_operation.items()},
        completed_amount=directions["received"].amount,
        success_rate=c2b.success_rate if c2b is not None else None,
        attention_required=sum(row[4] for row in rows),
        by_status=by_status,
        by_operation=by_operation,
    )


class PaymentService:
    """M-Pesa payments with a durable record of everything. Subclass it to react to outcomes:

    ``on_payment_completed(transaction)``, ``on_payment_failed(transaction, error)``,
    ``on_payment_unknown(transaction)``, ``on_reversal_completed(reversal, original)`` and
    ``on_reversal_failed(reversal, error)``. Hooks run after the outcome is committed, once per
    transition; one that raises is logged and audited and never undoes the payment.

    The service commits the session it is given. It accepts a synchronous ``Session`` or an
    ``AsyncSession``.
    """

    def __init__(
        self,
        settings: PaymentSettings | None = None,
        client: MpesaClient | None = None,
        *,
        db_retry_delays: tuple[float, ...] = (0.05, 0.25, 1.0),
        sessions: Callable[[], Any] | None = None,
    ) -> None:
        self._settings = settings
        self._client = client
        self._db_retry_delays = db_retry_delays
        #: The host's session factory (a ``sessionmaker``, an ``async_sessionmaker``, …) for
        #: work outside a request: ``python -m payments reconcile --service …`` uses it, so the
        #: command works on the host's database. ``None``: ``PAYMENT_DATABASE_URL``.
        self.sessions = sessions

    @property
    def settings(self) -> PaymentSettings:
        if self._settings is None:
            self._settings = get_settings()
        return self._settings

    def reference_for(self, operation: str, idempotency_key: str | None) -> str:
        """The ``input_ThirdPartyReference`` this deployment sends for ``idempotency_key``."""
        settings = self.settings
        secret = f"{settings.mpesa_service_provider_code}:{settings.api_key}"
        return third_party_reference_for(operation, idempotency_key, secret)

    def call_window(self, operation: str) -> timedelta:
        """How long after a payment was recorded its own call may still be answered: the
        read timeout of its operation plus every connect attempt and backoff of the client."""
        settings = self.settings
        read = (
            settings.payment_c2b_timeout
            if operation == PaymentOperation.C2B
            else settings.payment_request_timeout
        )
        attempts = settings.payment_query_max_attempts
        connect = attempts * (settings.payment_connect_timeout + settings.payment_retry_backoff_max)
        return timedelta(seconds=read + connect)

    def in_flight_until(self, record: PaymentRecord) -> datetime:
        """Until then only the payment's own call settles a ``pending``/``processing`` one."""
        return record.created_at + self.call_window(record.operation)

    @property
    def client(self) -> MpesaClient:
        if self._client is None:
            self._client = MpesaClient.from_settings(self.settings)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    # -- hooks ---------------------------------------------------------------------------------

    @property
    def runs_hooks(self) -> bool:
        """Whether this service has hooks of its own (a subclass overrides one): only then does
        it run hook events, right after its own commits and in its dispatcher. A plain
        ``PaymentService`` (the ``reconcile`` CLI without ``--service``) leaves them to the
        host's service, in whichever process runs it."""
        own = getattr(self, "__dict__", {})  # a hook set on the instance counts too
        return any(
            name in own or getattr(type(self), name) is not getattr(PaymentService, name)
            for name in _HOOKS
        )

    @property
    def current_event_id(self) -> str | None:
        """The id of the event whose hook is running (``None`` outside a hook): a hook that
        keeps the old signature reads it to dedupe; one may declare ``event_id`` instead."""
        return events.current_event_id.get()

    def event_sink(self) -> events.EventSink:
        settings = self.settings
        lease = timedelta(seconds=settings.payment_hook_lease_seconds)
        return events.EventSink(
            webhook_urls=tuple(settings.webhook_urls()),
            hook_lease=lease if self.runs_hooks else None,
        )

    async def on_payment_completed(self, transaction: PaymentRecord) -> None:
        """A payment (C2B, B2C or B2B) completed: money moved."""

    async def on_payment_failed(
        self, transaction: PaymentRecord, error: PaymentError | None
    ) -> None:
        """A payment ended failed, cancelled or expired: no money moved."""

    async def on_payment_unknown(self, transaction: PaymentRecord) -> None:
        """The outcome is unknown for now; reconciliation will settle it."""

    async def on_reversal_completed(self, reversal: PaymentRecord, original: PaymentRecord) -> None:
        """A reversal went through; ``original`` shows the new reversed amount."""

    async def on_reversal_failed(self, reversal: PaymentRecord, error: PaymentError | None) -> None:
        """A reversal was refused; the original payment is unchanged."""

    # -- money-moving use cases ----------------------------------------------------------------

    async def initiate_payment(
        self,
        request: PaymentInitiateRequest,
        db: DbSession,
        actor: str | None = None,
        *,
        idempotency_key: str | None = None,
        client_ip: str | None = None,
        user_id: str | None = None,
        owner: str | None = None,
    ) -> PaymentResponse:
        """C2B: push a PIN prompt to the customer and wait for the answer (up to ~90 s).

        Returns the completed payment, or raises: ``PaymentCancelledError``,
        ``InsufficientFundsError``, ``PaymentInitiationError`` (other refusals),
        ``PaymentOutcomeUnknownError`` (recorded as ``unknown``; reconciliation settles it),
        ``IdempotencyConflictError``, ``PaymentValidationError``, ``PaymentStorageError``.
        Every error raised after the payment was recorded carries ``error.payment``.

        ``owner``: the paying customer's identity (the router's customer role). A repeated
        idempotency key then replays only that customer's own payment: another customer's key
        is a conflict that shows nothing of the payment it made.
        """
        new = self._new_payment(PaymentOperation.C2B, request, idempotency_key)

        async def send(record: PaymentRecord) -> ProviderResult:
            return await self.client.c2b_payment(
                msisdn=request.phone_number,
                amount=new.amount,
                transaction_reference=record.transaction_reference or record.transaction_id,
                third_party_reference=record.third_party_reference,
            )

        return await self._move_money(
            db, new, send, actor=_actor(actor, user_id), client_ip=client_ip, owner=owner
        )

    async def payout(
        self,
        request: PayoutRequest,
        db: DbSession,
        actor: str | None = None,
        *,
        idempotency_key: str | None = None,
        client_ip: str | None = None,
        user_id: str | None = None,
    ) -> PaymentResponse:
        """B2C: pay a customer's wallet from the business's shortcode."""
        new = self._new_payment(PaymentOperation.B2C, request, idempotency_key)

        async def send(record: PaymentRecord) -> ProviderResult:
            return await self.client.b2c_payment(
                msisdn=request.phone_number,
                amount=new.amount,
                transaction_reference=record.transaction_reference or record.transaction_id,
                third_party_reference=record.third_party_reference,
            )

        return await self._move_money(
            db, new, send, actor=_actor(actor, user_id), client_ip=client_ip
        )

    async def transfer(
        self,
        request: TransferRequest,
        db: DbSession,
        actor: str | None = None,
        *,
        idempotency_key: str | None = None,
        client_ip: str | None = None,
        user_id: str | None = None,
    ) -> PaymentResponse:
        """B2B: pay another business's shortcode."""
        new = self._new_payment(PaymentOperation.B2B, request, idempotency_key)

        async def send(record: PaymentRecord) -> ProviderResult:
            return await self.client.b2b_payment(
                receiver_party_code=request.receiver_party_code,
                amount=new.amount,
                transaction_reference=record.transaction_reference or record.transaction_id,
                third_party_reference=record.third_party_reference,
            )

        return await self._move_money(
            db, new, send, actor=_actor(actor, user_id), client_ip=client_ip
        )

    def _new_payment(
        self,
        operation: PaymentOperation,
        request: PaymentInitiateRequest | PayoutRequest | TransferRequest,
        header_key: str | None,
    ) -> _NewPayment:
        """What a money-moving request asks for, checked against the amount limits."""
        key = self._key(request.idempotency_key, header_key)
        _warn_without_key(operation, key)
        return _NewPayment(
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
            request_body=_request_body(request),
        )

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
        actor = _actor(actor, user_id)
        key = self._key(request.idempotency_key, idempotency_key)
        _warn_without_key(PaymentOperation.REVERSAL, key)
        body = _request_body(request) | {"original_transaction_id": transaction_id}
        original_provider_id: str | None = None
        self.client.check_reversal_configured()  # before anything is recorded

        def reserve(session: Session) -> tuple[PaymentRecord, bool]:
            nonlocal original_provider_id
            original = repo.get(session, transaction_id, for_update=True)
            # The key is looked up only once the original is locked: a concurrent reversal with
            # the same key has committed by then (PostgreSQL), and its result is the answer.
            if key is not None and (existing := _record_by_key(session, key)) is not None:
                return existing, False
            if original is None:
                raise PaymentNotFoundError(f"payment {transaction_id} not found")
            if original.operation == PaymentOperation.REVERSAL:
                raise PaymentValidationError(
                    "a reversal cannot be reversed", field="transaction_id"
                )
            if PaymentStatus(original.status) not in (S.COMPLETED, S.PARTIALLY_REVERSED):
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
            new = _NewPayment(
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

    # -- operators -----------------------------------------------------------------------------

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

    # -- queries -------------------------------------------------------------------------------

    async def refresh(
        self, transaction_id: str, db: DbSession, *, actor: str | None = None
    ) -> PaymentResponse:
        """Ask M-Pesa for the status now and apply the answer. Never demotes a settled payment."""
        # Rule 2: the read ends its transaction, so no connection is held while M-Pesa answers.
        record = await run_db(db, committing(_record_loader(transaction_id)))
        outcome = await self.query_outcome(record)
        record, _ = await self.apply_outcome(db, record, outcome, actor=actor or "refresh")
        return to_response(record)

    async def query_customer_name(self, phone_number: Msisdn | str) -> CustomerNameResponse:
        """The wallet holder's masked name, to confirm before a payout."""
        msisdn = phone_number if isinstance(phone_number, Msisdn) else Msisdn(phone_number)
        result = await self.client.query_customer_name(
            msisdn=msisdn, third_party_reference=query_reference()
        )
        return CustomerNameResponse(
            phone_number=msisdn.masked,
            customer_name=result.customer_name,
            response_code=result.response_code,
            response_description=result.response_description,
        )

    async def get(
        self, transaction_id: str, db: DbSession, *, owner: str | None = None
    ) -> PaymentResponse:
        """The payment. With ``owner`` (a customer's identity), only a payment that customer
        started (its ``user_id``); anyone else's answers ``PaymentNotFoundError`` exactly like a
        payment that does not exist, so a customer learns nothing about other customers."""
        record = await self._get_record(db, transaction_id)
        if owner is not None and record.user_id != owner:
            raise PaymentNotFoundError(f"payment {transaction_id} not found")
        return to_response(record)

    async def list(
        self,
        db: DbSession,
        filters: PaymentFilters | None = None,
        *,
        page: int = 1,
        per_page: int = 20,
        cursor: str | None = None,
    ) -> PaymentListResponse:
        """One page, newest first. ``cursor`` (a previous page's ``next_cursor``) continues
        after that page, whatever ``page`` says; a cursor no page returned is
        ``InvalidCursorError``."""
        if page < 1 or not 1 <= per_page <= 100:
            raise PaymentValidationError("page must be ≥ 1 and per_page between 1 and 100")
        filters = filters or PaymentFilters()
        position = PageCursor.decode(cursor) if cursor is not None else None
        records, total, pages, next_position = await run_db(
            db,
            lambda session: repo.list_page(
                session, filters, page=page, per_page=per_page, cursor=position
            ),
        )
        return PaymentListResponse(
            items=[to_response(record) for record in records],
            total=total,
            page=position.page if position is not None else page,
            per_page=per_page,
            pages=pages,
            next_cursor=next_position.encode() if next_position is not None else None,
        )

    async def export_csv(
        self, db: DbSession, filters: PaymentFilters | None = None, *, batch_size: int = 500
    ) -> AsyncIterator[str]:
        """The payments matching ``filters`` as CSV text (header first), newest first, read in
        keyset batches: each batch is its own short read, however many rows there are."""
        filters = filters or PaymentFilters()
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(EXPORT_COLUMNS)
        position: PageCursor | None = None
        while True:
            records, _, _, position = await run_db(
                db,
                partial(
                    repo.list_page, filters=filters, page=1, per_page=batch_size, cursor=position
                ),
            )
            for record in records:
                writer.writerow(_export_row(to_response(record)))
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
            if position is None:
                return

    async def summary(
        self,
        db: DbSession,
        from_date: date | None = None,
        to_date: date | None = None,
    ) -> PaymentSummary:
        """Counts and sums per status, per operation and per direction of the money (received,
        paid out, transferred, reversed), over ``created_at`` dates (inclusive)."""
        if from_date and to_date and from_date > to_date:
            raise PaymentValidationError("from_date must not be after to_date", field="from_date")
        filters = PaymentFilters(from_date=from_date, to_date=to_date)
        rows = await run_db(db, lambda session: repo.summary_rows(session, filters))
        return summarize(rows, from_date, to_date)

    # -- events --------------------------------------------------------------------------------

    async def list_events(
        self,
        db: DbSession,
        *,
        after: str | None = None,
        event_type: str | None = None,
        transaction_id: str | None = None,
        limit: int = 50,
    ) -> EventListResponse:
        """Payment events oldest first after the event ``after`` (a cursor)."""
        if not 1 <= limit <= 100:
            raise PaymentValidationError("limit must be between 1 and 100", field="limit")
        return await run_db(
            db,
            lambda s: events.list_events(
                s,
                after=after,
                event_type=event_type,
                transaction_id=transaction_id,
                limit=limit,
            ),
        )

    async def get_event(self, event_id: str, db: DbSession) -> EventResponse:
        """One event with its deliveries (the hooks, each endpoint) and every attempt."""
        found = (
            await run_db(db, lambda s: events.get_event(s, event_id))
            if len(event_id) <= 64
            else None
        )
        if found is None:
            raise PaymentNotFoundError(f"event {event_id} not found")
        return found

    async def redeliver_event(self, event_id: str, db: DbSession) -> EventResponse:
        """Make an event due again at every endpoint configured now; the hooks do not run again."""
        urls = self.settings.webhook_urls()
        found = len(event_id) <= 64 and await run_db(
            db, committing(lambda s: events.redeliver(s, event_id, urls)), write=True
        )
        if not found:
            raise PaymentNotFoundError(f"event {event_id} not found")
        events.notify()
        return await self.get_event(event_id, db)

    async def audit(self, transaction_id: str, db: DbSession) -> AuditTrailResponse:
        def load(session: Session) -> list[AuditLogEntry]:
            row = repo.get(session, transaction_id)
            if row is None:
                raise PaymentNotFoundError(f"payment {transaction_id} not found")
            return [
                AuditLogEntry.model_validate(entry) for entry in repo.audit_trail(session, row.id)
            ]

        return AuditTrailResponse(transaction_id=transaction_id, entries=await run_db(db, load))

    # -- the money-moving flow -----------------------------------------------------------------

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

    def _intent_values(self, new: _NewPayment, actor: str | None) -> dict[str, Any]:
        """Every column of the new payment's row, as it is committed before M-Pesa is called."""
        now = utcnow()
        transaction_id = new_transaction_id(now)
        third_party_reference = self.reference_for(new.operation, new.idempotency_key)
        return {
            "transaction_id": transaction_id,
            "operation": new.operation.value,
            "status": S.PROCESSING.value,
            "amount": new.amount,
            "currency": self.settings.payment_default_currency,
            "reversed_amount": Decimal("0"),
            "phone_number": new.phone.digits if new.phone else None,
            "receiver_party_code": new.receiver_party_code,
            "conversation_id": None,
            "provider_transaction_id": None,
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
            "response_code": None,
            "response_description": None,
            "status_description": STATUS_MESSAGES[S.PROCESSING],
            "error_code": None,
            "original_id": new.original_id,
            "metadata": new.metadata,
            "attention_required": False,
            "operator_hold": False,
            "reconcile_attempts": 0,
            "next_reconcile_at": None,
            "version": 1,
            "created_at": now,
            "updated_at": now,
            "completed_at": None,
        }

    @staticmethod
    def _insert_intent(
        session: Session,
        values: dict[str, Any],
        new: _NewPayment,
        actor: str | None,
        client_ip: str | None,
    ) -> PaymentRecord:
        record = repo.insert_payment(session, values)
        repo.add_audit(
            session,
            record.id,
            AuditAction.INITIATED,
            status_after=record.status,
            request_body=sanitize(new.request_body),
            actor=actor,
            client_ip=client_ip,
        )
        return record

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
                existing = await run_db(db, lambda s: _record_by_key(s, key))
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
        new: _NewPayment,
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
        if changed:  # each committed transition once, whether or not this service has hooks
            metrics.observe_transition(updated.operation, updated.status, updated.amount)
        await self._after_commit(db, written, updated, outcome, original)
        return updated, changed

    async def _after_commit(
        self,
        db: DbSession,
        written: list[events.WrittenEvent],
        record: PaymentRecord,
        outcome: Outcome,
        original: PaymentRecord | None,
    ) -> None:
        """The transition's events are committed: wake this process's dispatchers (webhooks)
        and run the hooks now, if this service has any (otherwise the host's dispatcher will)."""
        if not written:
            return
        events.notify()
        if not self.runs_hooks:
            return
        for event in written:
            if event.has_hook:
                await self._run_hook_now(db, event.id, record, outcome, original)

    def hook_call(
        self,
        record: PaymentRecord,
        original: PaymentRecord | None,
        error: PaymentError | None = None,
    ) -> tuple[str, tuple[Any, ...]] | None:
        """Which hook a payment in ``record``'s state calls, and with what."""
        status = PaymentStatus(record.status)
        is_reversal = record.operation == PaymentOperation.REVERSAL
        if status is S.COMPLETED:
            if is_reversal:
                return ("on_reversal_completed", (record, original)) if original else None
            return "on_payment_completed", (record,)
        if status in UNSUCCESSFUL:
            error = error or error_for_record(record)
            name = "on_reversal_failed" if is_reversal else "on_payment_failed"
            return name, (record, error)
        if status is S.UNKNOWN:
            return "on_payment_unknown", (record,)
        return None

    async def _run_hook_now(
        self,
        db: DbSession,
        event_id: str,
        record: PaymentRecord,
        outcome: Outcome,
        original: PaymentRecord | None,
    ) -> None:
        call = self.hook_call(record, original, outcome.error)
        if call is None:
            return
        try:
            taken = await run_db(
                db, committing(lambda s: events.hook_delivery(s, event_id)), write=True
            )
        except DATABASE_ERRORS:  # the dispatcher runs it once the lease is over
            payment_logger.error("Could not take a hook delivery", event_id=event_id)
            return
        if taken is None:
            return  # a dispatcher ran it already
        from .dispatcher import finish_hook  # the dispatcher imports this module

        await finish_hook(self, db, taken, event_id, record, *call)

    async def audit_hook_failure(
        self, db: DbSession, record: PaymentRecord, exc: BaseException
    ) -> None:
        payment_logger.exception(
            "Payment hook failed", transaction_id=record.transaction_id, status=record.status
        )
        message = sanitize_text(f"{type(exc).__name__} in hook for status {record.status}: {exc}")
        try:
            await run_db(
                db,
                committing(
                    lambda s: repo.add_audit(
                        s, record.id, AuditAction.HOOK_FAILED, error_message=message[:2000]
                    )
                ),
                write=True,
            )
        except DATABASE_ERRORS:
            payment_logger.error(
                "Could not audit the failed hook", transaction_id=record.transaction_id
            )

    async def _get_record(self, db: DbSession, transaction_id: str) -> PaymentRecord:
        return await run_db(db, _record_loader(transaction_id))


#: The hooks a host may override (``runs_hooks``).
_HOOKS = (
    "on_payment_completed",
    "on_payment_failed",
    "on_payment_unknown",
    "on_reversal_completed",
    "on_reversal_failed",
)


def _record_loader(transaction_id: str) -> Callable[[Session], PaymentRecord]:
    def load(session: Session) -> PaymentRecord:
        row = repo.get(session, transaction_id)
        if row is None:
            raise PaymentNotFoundError(f"payment {transaction_id} not found")
        return repo.record_of(session, row)

    return load


def _request_body(request: Any) -> dict[str, Any]:
    """The request as data: phone number as digits (for the fingerprint), amounts as strings."""
    body = request.model_dump(mode="python", exclude_none=True)  # the phone comes out masked
    phone = getattr(request, "phone_number", None)
    if isinstance(phone, Msisdn):
        body["phone_number"] = phone.digits
    if isinstance(body.get("amount"), Decimal):
        body["amount"] = f"{body['amount']:.2f}"
    return body


def _warn_without_key(operation: PaymentOperation, key: str | None) -> None:
    if key is None:
        # Keys stay optional (as in the original API), but a retry without one (a proxy's, a
        # user's double click) makes a second payment.
        payment_logger.warning(
            "Money-moving request without an idempotency key: a retry would move money again",
            operation=operation.value,
        )


def _record_by_key(session: Session, key: str) -> PaymentRecord | None:
    row = repo.get_by_idempotency_key(session, key)
    return repo.record_of(session, row) if row is not None else None


def _actor(actor: str | None, user_id: str | None) -> str | None:
    """Who asks: recorded as the payment's ``user_id`` column and as the audit trail's ``actor``.
    ``user_id=`` is the keyword's earlier name, still accepted from hosts."""
    return actor if actor is not None else user_id


#: The CSV export's columns: the list's fields (phone numbers masked, as in every answer).
EXPORT_COLUMNS = (
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
    "account_reference",
    "entity_type",
    "entity_id",
    "original_transaction_id",
    "response_code",
    "status_description",
    "attention_required",
    "operator_hold",
    "created_at",
    "updated_at",
    "completed_at",
)


def _export_row(payment: PaymentResponse) -> list[str]:
    values = payment.model_dump(mode="json")
    row = []
    for column in EXPORT_COLUMNS:
        value = values.get(column)
        if column in ("amount", "reversed_amount"):
            text = money_text(getattr(payment, column))  # the exact decimal, never a float
        elif value is None:
            text = ""
        else:
            text = str(value)
        # A spreadsheet runs a cell that starts like a formula: a caller's reference must not.
        if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
            text = "'" + text
        row.append(text)
    return row
