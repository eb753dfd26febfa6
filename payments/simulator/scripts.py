"""The scripted outcomes: what the simulator answers for each test MSISDN.

The table in ``app.py``'s docstring lists every number here (a test keeps the two in step).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "SCRIPTED_OUTCOMES",
    "SERVER_TIMEOUT",
    "SUCCESS",
    "Fault",
    "ScriptedOutcome",
    "TransactionStatus",
]

TransactionStatus = Literal["Completed", "Cancelled", "Expired"]
Fault = Literal["drop", "slow", "html_502", "malformed_json", "html_500"]


@dataclass(frozen=True, slots=True)
class ScriptedOutcome:
    """What the simulator does for one MSISDN (see ``app.py``'s docstring table)."""

    code: str  # the answer's response code ("" for faults that answer with no M-Pesa body)
    recorded_status: TransactionStatus | None  # None: nothing is recorded
    after_pin: bool  # C2B answers only after the PIN delay
    fault: Fault | None = None


#: Any valid number not in the table.
SUCCESS = ScriptedOutcome("INS-0", "Completed", after_pin=True)
#: What a customer slower than ``c2b_server_timeout_seconds`` gets.
SERVER_TIMEOUT = ScriptedOutcome("INS-9", "Expired", after_pin=True)

SCRIPTED_OUTCOMES: Mapping[str, ScriptedOutcome] = {
    "258841000005": ScriptedOutcome("INS-5", "Cancelled", after_pin=True),
    "258841000006": ScriptedOutcome("INS-6", "Cancelled", after_pin=True),
    "258841002006": ScriptedOutcome("INS-2006", "Cancelled", after_pin=True),
    "258841000009": ScriptedOutcome("INS-9", "Expired", after_pin=True),
    "258841000004": ScriptedOutcome("INS-4", None, after_pin=False),
    "258841000996": ScriptedOutcome("INS-996", None, after_pin=False),
    "258841000001": ScriptedOutcome("INS-1", "Completed", after_pin=True),
    "258841000016": ScriptedOutcome("INS-16", None, after_pin=False),
    "258842000001": ScriptedOutcome("", "Completed", after_pin=True, fault="drop"),
    "258842000002": ScriptedOutcome("INS-0", "Completed", after_pin=True, fault="slow"),
    "258842000003": ScriptedOutcome("", "Completed", after_pin=True, fault="html_502"),
    "258842000004": ScriptedOutcome("INS-0", "Completed", after_pin=True, fault="malformed_json"),
    "258842000005": ScriptedOutcome("", None, after_pin=False, fault="html_500"),
}
