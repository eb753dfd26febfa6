"""The payment state machine: the one place that says which status may follow which.

    pending → processing → completed | failed | cancelled | expired | unknown
    unknown → completed | failed | cancelled | expired
    completed → partially_reversed | reversed;  partially_reversed → reversed

Terminal outcomes are never demoted: a late or duplicate answer for a completed payment is a no-op,
and a contradicting one (completed → failed) is refused.
"""

from __future__ import annotations

from .exceptions import InvalidStateTransitionError
from .models import PaymentStatus

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
