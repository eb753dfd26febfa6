"""The one list of M-Pesa operations: each one's method, port, path and retry policy.

Retries follow business semantics: queries retry with capped, jittered backoff;
C2B/B2C/B2B retry only when the request provably never left (connect failure); a reversal never
retries.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import httpx

from .transport import RequestNotWritten

__all__ = [
    "NEVER_SENT",
    "OPERATIONS",
    "Operation",
    "OperationSpec",
    "RetryPolicy",
    "backoff_delay",
    "should_retry",
]


class Operation(StrEnum):
    C2B = "c2b"
    B2C = "b2c"
    B2B = "b2b"
    REVERSAL = "reversal"
    QUERY_STATUS = "query_status"
    QUERY_CUSTOMER_NAME = "query_customer_name"


class RetryPolicy(StrEnum):
    QUERY = "query"  # safe to repeat: retry transport errors, 5xx and overload
    PRE_SEND_ONLY = "pre_send_only"  # money moves: retry only if the request never left
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class OperationSpec:
    method: str
    port: int
    path: str
    retry: RetryPolicy

    @property
    def moves_money(self) -> bool:
        return self.retry is not RetryPolicy.QUERY


OPERATIONS: dict[Operation, OperationSpec] = {
    Operation.C2B: OperationSpec(
        "POST", 18352, "/ipg/v1x/c2bPayment/singleStage/", RetryPolicy.PRE_SEND_ONLY
    ),
    Operation.B2C: OperationSpec("POST", 18345, "/ipg/v1x/b2cPayment/", RetryPolicy.PRE_SEND_ONLY),
    Operation.B2B: OperationSpec("POST", 18349, "/ipg/v1x/b2bPayment/", RetryPolicy.PRE_SEND_ONLY),
    Operation.REVERSAL: OperationSpec("PUT", 18354, "/ipg/v1x/reversal/", RetryPolicy.NEVER),
    Operation.QUERY_STATUS: OperationSpec(
        "GET", 18353, "/ipg/v1x/queryTransactionStatus/", RetryPolicy.QUERY
    ),
    Operation.QUERY_CUSTOMER_NAME: OperationSpec(
        "GET", 19323, "/ipg/v1x/queryCustomerName/", RetryPolicy.QUERY
    ),
}

#: Errors raised before a single byte of the request could reach the provider.
NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, RequestNotWritten)


def backoff_delay(attempt: int, base: float, cap: float, jitter: float) -> float:
    """Capped exponential backoff; ``jitter`` in [0, 1) scales it into [50 %, 100 %)."""
    return min(cap, base * 2 ** (attempt - 1)) * (0.5 + jitter / 2)


def should_retry(policy: RetryPolicy, *, attempt: int, max_attempts: int, never_sent: bool) -> bool:
    """Whether a failed attempt may be repeated. ``never_sent``: provably not delivered."""
    if attempt >= max_attempts or policy is RetryPolicy.NEVER:
        return False
    return policy is RetryPolicy.QUERY or never_sent
