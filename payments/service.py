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

The class is assembled by job (a host imports and subclasses only ``PaymentService``):
``service_base.py`` (settings, client, call window), ``hooks.py`` (the hooks and running them),
``money_flow.py`` (intent, send once, apply the answer), ``operators.py`` (``reverse``,
``resolve``) and ``reads.py`` (get, list, export, summary, audit, events).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from .database import DbSession, committing, run_db
from .models import PaymentOperation
from .money_flow import NewPayment, actor_of
from .mpesa.results import ProviderResult
from .operators import OperatorActions
from .outcomes import to_response
from .reads import PaymentReads, record_loader
from .repository import PaymentRecord
from .schemas import PaymentInitiateRequest, PaymentResponse, PayoutRequest, TransferRequest


class PaymentService(OperatorActions, PaymentReads):
    """M-Pesa payments with a durable record of everything. Subclass it to react to outcomes:

    ``on_payment_completed(transaction)``, ``on_payment_failed(transaction, error)``,
    ``on_payment_unknown(transaction)``, ``on_reversal_completed(reversal, original)`` and
    ``on_reversal_failed(reversal, error)``. Hooks run after the outcome is committed, once per
    transition; one that raises is logged and audited and never undoes the payment.

    The service commits the session it is given. It accepts a synchronous ``Session`` or an
    ``AsyncSession``.
    """

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
        send = _sender(self.client.c2b_payment, new, msisdn=request.phone_number)
        return await self._move_money(
            db, new, send, actor=actor_of(actor, user_id), client_ip=client_ip, owner=owner
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
        send = _sender(self.client.b2c_payment, new, msisdn=request.phone_number)
        return await self._move_money(
            db, new, send, actor=actor_of(actor, user_id), client_ip=client_ip
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
        send = _sender(
            self.client.b2b_payment, new, receiver_party_code=request.receiver_party_code
        )
        return await self._move_money(
            db, new, send, actor=actor_of(actor, user_id), client_ip=client_ip
        )

    async def refresh(
        self, transaction_id: str, db: DbSession, *, actor: str | None = None
    ) -> PaymentResponse:
        """Ask M-Pesa for the status now and apply the answer. Never demotes a settled payment."""
        # Rule 2: the read ends its transaction, so no connection is held while M-Pesa answers.
        record = await run_db(db, committing(record_loader(transaction_id)))
        outcome = await self.query_outcome(record)
        record, _ = await self.apply_outcome(db, record, outcome, actor=actor or "refresh")
        return to_response(record)


def _sender(
    call: Callable[..., Awaitable[ProviderResult]], new: NewPayment, **party: str
) -> Callable[[PaymentRecord], Awaitable[ProviderResult]]:
    """The one provider call of a money-moving use case, made once the intent is recorded: the
    party (a wallet or a shortcode), the amount, and the references the record was given."""

    async def send(record: PaymentRecord) -> ProviderResult:
        return await call(
            **party,
            amount=new.amount,
            transaction_reference=record.transaction_reference or record.transaction_id,
            third_party_reference=record.third_party_reference,
        )

    return send
