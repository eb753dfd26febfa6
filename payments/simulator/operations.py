"""The provider operations' behaviour: what each one checks, records and answers.

Each handler gets a request's fields once authentication and the route's required fields have
passed (``app.py`` does both), and raises :class:`~.wire.ProviderError` to refuse.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal

from fastapi.responses import JSONResponse, Response

from ..mpesa.operations import Operation
from .faults import fault_response
from .scripts import SCRIPTED_OUTCOMES, SERVER_TIMEOUT, SUCCESS, ScriptedOutcome
from .state import SimulatedTransaction, SimulatorState, new_transaction_id
from .wire import (
    MSISDN,
    PARTY_CODE,
    REFERENCE,
    ProviderError,
    answer_body,
    check,
    money_answer,
    parse_amount,
    text,
)

__all__ = [
    "Handler",
    "business_payment",
    "customer_payment",
    "masked_customer_name",
    "query_customer_name",
    "query_status",
    "reverse",
]

logger = logging.getLogger(__name__)

#: A handler: the simulator's state, the operation called and the request's fields.
Handler = Callable[[SimulatorState, Operation, Mapping[str, object]], Awaitable[Response]]

_INVALID_RECEIVER = "999999"


def _reference_to_us(
    state: SimulatorState,
    fields: Mapping[str, object],
    shortcode: str = "input_ServiceProviderCode",
) -> str:
    """The request's third-party reference (INS-19 if malformed); then its shortcode must be
    the simulator's (else INS-13)."""
    reference = check(REFERENCE, text(fields["input_ThirdPartyReference"]), "INS-19")
    if text(fields[shortcode]) != state.config.service_provider_code:
        raise ProviderError("INS-13")
    return reference


def _transaction_reference(fields: Mapping[str, object]) -> str:
    return check(REFERENCE, text(fields["input_TransactionReference"]), "INS-17")


def _check_secret(value: object, expected: str, code: str) -> None:
    if not hmac.compare_digest(text(value).encode(), expected.encode()):
        raise ProviderError(code)


def _claim(state: SimulatorState, reference: str, transaction_reference: str | None) -> None:
    if state.is_claimed(reference, transaction_reference):
        raise ProviderError("INS-10")


def _record_completed(
    state: SimulatorState,
    operation: Operation,
    reference: str,
    amount: Decimal,
    *,
    msisdn: str | None = None,
    transaction_reference: str | None = None,
    receiver_party_code: str | None = None,
    original_transaction_id: str | None = None,
) -> SimulatedTransaction:
    """Records what B2B and reversals record: a Completed transaction, at once."""
    return state.record(
        SimulatedTransaction(
            operation=operation,
            transaction_id=new_transaction_id(),
            conversation_id=state.conversation_id(),
            third_party_reference=reference,
            msisdn=msisdn,
            amount=amount,
            status="Completed",
            transaction_reference=transaction_reference,
            receiver_party_code=receiver_party_code,
            original_transaction_id=original_transaction_id,
        )
    )


def _accepted(transaction: SimulatedTransaction, *, status: int) -> JSONResponse:
    return money_answer(
        "INS-0",
        conversation_id=transaction.conversation_id,
        reference=transaction.third_party_reference,
        transaction_id=transaction.transaction_id,
        success_status=status,
    )


# ------------------------------------------------------------------------ money-moving calls


async def customer_payment(
    state: SimulatorState, operation: Operation, fields: Mapping[str, object]
) -> Response:
    """C2B and B2C: the outcome is the MSISDN's script; C2B waits for the customer's PIN."""
    config = state.config
    msisdn = check(MSISDN, text(fields["input_CustomerMSISDN"]), "INS-2051")
    amount = parse_amount(fields["input_Amount"])
    transaction_reference = _transaction_reference(fields)
    reference = _reference_to_us(state, fields)
    _claim(state, reference, transaction_reference)

    script = SCRIPTED_OUTCOMES.get(msisdn, SUCCESS)
    delay = config.pin_delay_seconds if operation is Operation.C2B else 0.0
    server_timeout = config.c2b_server_timeout_seconds
    if operation is Operation.C2B and server_timeout is not None and script.after_pin:
        if script.code == "INS-9" or delay > server_timeout:
            # The customer did not answer in time: the gateway gives up and says so.
            script, delay = SERVER_TIMEOUT, server_timeout
    conversation_id = state.conversation_id()
    if script.recorded_status is None:  # refused up front
        return fault_response(script.fault) or money_answer(
            script.code, conversation_id=conversation_id, reference=reference
        )

    transaction = SimulatedTransaction(
        operation=operation,
        transaction_id=new_transaction_id(),
        conversation_id=conversation_id,
        third_party_reference=reference,
        msisdn=msisdn,
        amount=amount,
        status=script.recorded_status,
        transaction_reference=transaction_reference,
        response_code=script.code or "INS-0",
    )
    if delay > 0:
        await state.record_after(transaction, delay)
    else:
        state.record(transaction)
    return await _scripted_answer(state, script, transaction)


async def _scripted_answer(
    state: SimulatorState, script: ScriptedOutcome, transaction: SimulatedTransaction
) -> Response:
    if script.fault == "drop":
        logger.info("simulator: dropping the connection of %s", transaction.transaction_id)
    faulty = fault_response(script.fault)
    if faulty is not None:
        return faulty
    if script.fault == "slow":
        await asyncio.sleep(state.config.slow_response_seconds)
    if script.code == "INS-0":
        return _accepted(transaction, status=201)
    return money_answer(
        script.code,
        conversation_id=transaction.conversation_id,
        reference=transaction.third_party_reference,
    )


async def business_payment(
    state: SimulatorState, operation: Operation, fields: Mapping[str, object]
) -> Response:
    """B2B: always accepted once valid; receiver ``999999`` is the invalid one (INS-2002)."""
    amount = parse_amount(fields["input_Amount"])
    transaction_reference = _transaction_reference(fields)
    reference = _reference_to_us(state, fields, shortcode="input_PrimaryPartyCode")
    receiver = text(fields["input_ReceiverPartyCode"])
    if not PARTY_CODE.fullmatch(receiver) or receiver == _INVALID_RECEIVER:
        raise ProviderError("INS-2002")
    _claim(state, reference, transaction_reference)
    transaction = _record_completed(
        state,
        operation,
        reference,
        amount,
        transaction_reference=transaction_reference,
        receiver_party_code=receiver,
    )
    return _accepted(transaction, status=201)


async def reverse(
    state: SimulatorState, operation: Operation, fields: Mapping[str, object]
) -> Response:
    """A reversal of (part of) what remains of a Completed C2B/B2C/B2B payment."""
    reference = _reference_to_us(state, fields)
    config = state.config
    _check_secret(fields["input_InitiatorIdentifier"], config.initiator_identifier, "INS-24")
    _check_secret(fields["input_SecurityCredential"], config.security_credential, "INS-25")
    raw_amount = fields.get("input_ReversalAmount")
    requested = None if raw_amount in (None, "") else parse_amount(raw_amount)
    _claim(state, reference, None)
    original = state.find_by_transaction_id(text(fields["input_TransactionID"]))
    if (
        original is None
        or original.operation == Operation.REVERSAL
        or original.status != "Completed"
    ):
        raise ProviderError("INS-18")
    amount = original.remaining_amount if requested is None else requested
    if amount <= 0 or amount > original.remaining_amount:
        raise ProviderError("INS-15")
    original.reversed_amount += amount
    reversal = _record_completed(
        state,
        operation,
        reference,
        amount,
        msisdn=original.msisdn,
        original_transaction_id=original.transaction_id,
    )
    return _accepted(reversal, status=200)


# ---------------------------------------------------------------------------------- queries


def _answered(**outputs: str) -> JSONResponse:
    body, _ = answer_body("INS-0", **outputs)
    return JSONResponse(body, status_code=200)


async def query_status(
    state: SimulatorState, operation: Operation, fields: Mapping[str, object]
) -> Response:
    """The status of a recorded transaction; ``N/A`` when there is none."""
    config = state.config
    echo = _reference_to_us(state, fields)
    found = state.find(
        text(fields["input_QueryReference"]),
        by_third_party_reference=config.query_by_third_party_reference,
    )
    if found is None and config.not_found_as_ins_23:
        raise ProviderError("INS-23")
    conversation_id = (
        found.conversation_id
        if found is not None and not config.status_answer_own_conversation_id
        else state.conversation_id()
    )
    return _answered(
        ResponseTransactionStatus=found.status if found else "N/A",
        ConversationID=conversation_id,
        ThirdPartyReference=echo,
    )


async def query_customer_name(
    state: SimulatorState, operation: Operation, fields: Mapping[str, object]
) -> Response:
    """A made-up, masked name for any valid number."""
    msisdn = check(MSISDN, text(fields["input_CustomerMSISDN"]), "INS-2051")
    echo = _reference_to_us(state, fields)
    if state.config.customer_name_not_authorized:
        raise ProviderError("INS-26")
    return _answered(
        ConversationID=state.conversation_id(),
        ThirdPartyReference=echo,
        CustomerName=masked_customer_name(msisdn),
    )


_FIRST_NAMES = ("Joao", "Maria", "Carlos", "Ana", "Jose", "Fatima", "Antonio", "Lurdes", "Paulo")
_SURNAMES = ("Macamo", "Sitoe", "Mondlane", "Cossa", "Tembe", "Chissano", "Nhantumbo", "Langa")


def _mask_word(word: str, *, keep_last: bool) -> str:
    if keep_last and len(word) >= 4:
        return word[:2] + "*" * (len(word) - 3) + word[-1]
    return word[:2] + "*" * max(len(word) - 2, 1)


def masked_customer_name(msisdn: str) -> str:
    """A deterministic, obfuscated name for a number, e.g. ``Jo*o Ma****``."""
    digest = hashlib.sha256(msisdn.encode()).digest()
    first = _FIRST_NAMES[digest[0] % len(_FIRST_NAMES)]
    last = _SURNAMES[digest[1] % len(_SURNAMES)]
    return f"{_mask_word(first, keep_last=True)} {_mask_word(last, keep_last=False)}"
