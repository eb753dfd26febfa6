"""Statuses, operations and the other kinds a row can be; the state machine: the one place that
says which status may follow which.

    pending → processing → completed | failed | cancelled | expired | unknown
    unknown → completed | failed | cancelled | expired
    completed → partially_reversed | reversed;  partially_reversed → reversed

Terminal outcomes are never demoted: a late or duplicate answer for a completed payment is a no-op,
and a contradicting one (completed → failed) is refused.
"""

from __future__ import annotations

from enum import StrEnum

from .exceptions import InvalidStateTransitionError


class PaymentStatus(StrEnum):
    PENDING = "pending"  # recorded, not yet sent
    PROCESSING = "processing"  # sent (or about to be): the provider has not answered yet
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    UNKNOWN = "unknown"  # the answer was lost or ambiguous: only a status query settles it
    PARTIALLY_REVERSED = "partially_reversed"
    REVERSED = "reversed"


class PaymentOperation(StrEnum):
    C2B = "c2b"
    B2C = "b2c"
    B2B = "b2b"
    REVERSAL = "reversal"


class AuditAction(StrEnum):
    INITIATED = "initiated"
    API_REQUEST = "api_request"
    API_RESPONSE = "api_response"
    STATUS_CHANGED = "status_changed"
    COMPLETED = "completed"
    FAILED = "failed"
    REVERSED = "reversed"
    CALLBACK_RECEIVED = "callback_received"
    RECONCILED = "reconciled"
    ATTENTION_REQUIRED = "attention_required"
    HOOK_FAILED = "hook_failed"
    OPERATOR_RESOLVED = "operator_resolved"
    #: An operator started an action from the console (refresh, reverse, replay, redeliver).
    OPERATOR_ACTION = "operator_action"


class EventType(StrEnum):
    """What a payment event says happened (``payment_events.type``)."""

    PAYMENT_COMPLETED = "payment.completed"
    PAYMENT_FAILED = "payment.failed"
    PAYMENT_CANCELLED = "payment.cancelled"
    PAYMENT_EXPIRED = "payment.expired"
    PAYMENT_UNKNOWN = "payment.unknown"
    PAYMENT_ATTENTION_REQUIRED = "payment.attention_required"
    PAYMENT_RESOLVED = "payment.resolved"
    REVERSAL_COMPLETED = "reversal.completed"
    REVERSAL_FAILED = "reversal.failed"


class ConsumerKind(StrEnum):
    HOOKS = "hooks"  # the host's in-process hooks (PaymentService.on_payment_completed, …)
    WEBHOOK = "webhook"  # one PAYMENT_WEBHOOK_URLS endpoint


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # due at next_attempt_at (or being delivered under a lease until then)
    DELIVERED = "delivered"
    FAILED = "failed"  # retried for the whole retry window without success: flagged
    GONE = "gone"  # the endpoint answered 410 Gone: no more attempts for this event


S = PaymentStatus

ALLOWED_TRANSITIONS: dict[PaymentStatus, frozenset[PaymentStatus]] = {
    S.PENDING: frozenset({S.PROCESSING, S.COMPLETED, S.FAILED, S.CANCELLED, S.EXPIRED, S.UNKNOWN}),
    S.PROCESSING: frozenset({S.COMPLETED, S.FAILED, S.CANCELLED, S.EXPIRED, S.UNKNOWN}),
    S.UNKNOWN: frozenset({S.COMPLETED, S.FAILED, S.CANCELLED, S.EXPIRED}),
    S.COMPLETED: frozenset({S.PARTIALLY_REVERSED, S.REVERSED}),
    S.PARTIALLY_REVERSED: frozenset({S.PARTIALLY_REVERSED, S.REVERSED}),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
    S.EXPIRED: frozenset(),
    S.REVERSED: frozenset(),
}

#: Sent (or about to be) and not answered yet: the payment's own call may still settle it.
IN_FLIGHT = frozenset({S.PENDING, S.PROCESSING})
#: Statuses whose outcome is still open: the reconciler looks at these.
UNSETTLED = IN_FLIGHT | {S.UNKNOWN}
#: Money moved to the business (reversals may follow).
SUCCEEDED = frozenset({S.COMPLETED, S.PARTIALLY_REVERSED, S.REVERSED})
#: Settled without money moving.
UNSUCCESSFUL = frozenset({S.FAILED, S.CANCELLED, S.EXPIRED})
#: A payment that can (still) be reversed, in part or in full.
REVERSIBLE = frozenset({S.COMPLETED, S.PARTIALLY_REVERSED})


def can_transition(current: PaymentStatus, new: PaymentStatus) -> bool:
    return new in ALLOWED_TRANSITIONS[current]


def check_transition(current: PaymentStatus | str, new: PaymentStatus | str) -> bool:
    """True if the status must change, False for a harmless repeat; raises if not allowed.

    A repeat of the current status (a duplicate answer) and a stale intermediate status arriving
    after a final one (``unknown`` after ``completed``) are harmless: nothing changes.
    """
    current, new = PaymentStatus(current), PaymentStatus(new)
    if current == new and new is not S.PARTIALLY_REVERSED:
        return False
    if can_transition(current, new):
        return True
    if new in UNSETTLED and current not in UNSETTLED:
        return False  # late "still unknown" news about a settled payment
    if current in SUCCEEDED and new is S.COMPLETED:
        return False  # a late "completed" for a payment reversed since
    raise InvalidStateTransitionError(
        f"a {current.value} payment cannot become {new.value}",
        details={"from": current.value, "to": new.value},
    )
