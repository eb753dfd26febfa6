"""What the simulator remembers: recorded transactions, claimed references and call counters."""

from __future__ import annotations

import asyncio
import secrets
import string
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from ..mpesa.operations import Operation
from .config import SimulatorConfig
from .scripts import TransactionStatus

__all__ = ["OPERATIONS", "SimulatedTransaction", "SimulatorState", "new_transaction_id"]

#: The provider operations (the SDK's list), in the order ``stats`` reports them.
OPERATIONS: tuple[Operation, ...] = tuple(Operation)

_ID_ALPHABET = string.ascii_lowercase + string.digits


def new_transaction_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))


@dataclass
class SimulatedTransaction:
    operation: Operation
    transaction_id: str
    conversation_id: str
    third_party_reference: str
    msisdn: str | None
    amount: Decimal
    status: TransactionStatus
    reversed_amount: Decimal = Decimal("0.00")
    created: datetime = field(default_factory=lambda: datetime.now(UTC))
    transaction_reference: str | None = None
    response_code: str = "INS-0"
    receiver_party_code: str | None = None
    original_transaction_id: str | None = None  # reversals: the payment they reverse

    @property
    def remaining_amount(self) -> Decimal:
        return self.amount - self.reversed_amount

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["amount"] = f"{self.amount:.2f}"
        data["reversed_amount"] = f"{self.reversed_amount:.2f}"
        data["created"] = self.created.isoformat()
        return data


class SimulatorState:
    """The simulator's memory, and the duplicate rule (INS-10) over it."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self._settlements: set[asyncio.Task[None]] = set()
        self.reset()

    # ----------------------------------------------------------------------------- inspection

    def calls(self, operation: str | None = None) -> int:
        """Provider calls received: all of them, or those of one operation (see OPERATIONS)."""
        if operation is None:
            return sum(self._calls.values())
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}; expected one of {OPERATIONS}")
        return self._calls[operation]

    def calls_for_reference(self, third_party_reference: str) -> int:
        """Money-moving calls (accepted or not) that carried this ``input_ThirdPartyReference``."""
        return self._reference_calls[third_party_reference]

    def transactions(self) -> list[SimulatedTransaction]:
        return list(self._transactions)

    def find(
        self, reference: str, *, by_third_party_reference: bool = True
    ) -> SimulatedTransaction | None:
        """A recorded transaction by TransactionID, ConversationID or ThirdPartyReference."""
        return (
            self._by_transaction_id.get(reference)
            or self._by_conversation_id.get(reference)
            or (self._by_reference.get(reference) if by_third_party_reference else None)
        )

    def find_by_transaction_id(self, transaction_id: str) -> SimulatedTransaction | None:
        return self._by_transaction_id.get(transaction_id)

    def reset(self) -> None:
        """Forget every transaction and counter (pending PINs are abandoned)."""
        for task in self._settlements:
            task.cancel()
        self._settlements = set()
        self._calls: Counter[str] = Counter()
        self._reference_calls: Counter[str] = Counter()
        self._transactions: list[SimulatedTransaction] = []
        self._by_transaction_id: dict[str, SimulatedTransaction] = {}
        self._by_conversation_id: dict[str, SimulatedTransaction] = {}
        self._by_reference: dict[str, SimulatedTransaction] = {}
        self._claims: dict[tuple[str, str | None], SimulatedTransaction] = {}
        self._pending_claims: set[tuple[str, str | None]] = set()

    def stats(self) -> dict[str, Any]:
        return {"calls": {op: self._calls[op] for op in OPERATIONS}, "total": self.calls()}

    # -------------------------------------------------------------------------------- records

    def conversation_id(self) -> str:
        if self.config.portal_conversation_ids:
            return f"AG_{datetime.now(UTC):%Y%m%d}_{secrets.token_hex(10)}"
        return secrets.token_hex(16)

    def is_claimed(self, reference: str, transaction_reference: str | None = None) -> bool:
        """Whether a new request with this reference is a duplicate (INS-10)."""
        key = self._claim_key(reference, transaction_reference)
        if key in self._pending_claims:
            return True
        earlier = self._claims.get(key)
        if earlier is None:
            return False
        window = self.config.duplicate_window_seconds
        return window is None or (datetime.now(UTC) - earlier.created).total_seconds() <= window

    def record(self, transaction: SimulatedTransaction) -> SimulatedTransaction:
        self._transactions.append(transaction)
        self._by_transaction_id[transaction.transaction_id] = transaction
        self._by_conversation_id[transaction.conversation_id] = transaction
        self._by_reference[transaction.third_party_reference] = transaction
        self._claims[self._claim_key_of(transaction)] = transaction
        return transaction

    async def record_after(self, transaction: SimulatedTransaction, delay: float) -> None:
        """Record ``transaction`` once ``delay`` has passed, its reference claimed meanwhile.

        The wait runs on its own: a caller that gives up does not stop the recording.
        """
        self._pending_claims.add(self._claim_key_of(transaction))
        task = asyncio.get_running_loop().create_task(self._settle(transaction, delay))
        self._settlements.add(task)
        task.add_done_callback(self._settlements.discard)
        await asyncio.shield(task)

    async def _settle(self, transaction: SimulatedTransaction, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
            transaction.created = datetime.now(UTC)
            self.record(transaction)
        finally:
            self._pending_claims.discard(self._claim_key_of(transaction))

    def _claim_key_of(self, transaction: SimulatedTransaction) -> tuple[str, str | None]:
        return self._claim_key(transaction.third_party_reference, transaction.transaction_reference)

    def _claim_key(
        self, reference: str, transaction_reference: str | None
    ) -> tuple[str, str | None]:
        """What INS-10 compares: the third-party reference, and with
        ``duplicates_match_transaction_reference`` the transaction reference too."""
        if self.config.duplicates_match_transaction_reference:
            return reference, transaction_reference
        return reference, None
