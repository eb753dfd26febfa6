"""Persistence functions: the only place that builds queries. No business rules, no commits.

Functions take a synchronous ``Session``; ``database.run_db`` runs them for async callers.
They return ``PaymentRecord`` snapshots (plain values) so nothing lazy-loads after a commit.

Callers use this package (``from . import repository as repo``; ``repo.X``); its modules, one
job each, import one another, never this package:

- ``record``: ``PaymentRecord``, checked against the table; a new row's defaults
- ``payments``: a payment by its keys, the money path's writes, the audit trail
- ``lists``: the API's and the console's filtered lists
- ``totals``: the daily totals (summary, counts, compaction)
- ``operator_views``: the console's overview, detail and notifications; the metrics' gauges
- ``notifications``: inbound notifications
- ``reconciliation``: the reconciler's claim
"""

from .lists import _filtered, console_batch, console_page, count_payments, list_page
from .notifications import (
    add_notification,
    find_by_provider_reference,
    get_notification,
    list_notifications,
)
from .operator_views import (
    OPEN_STATUSES,
    activity,
    console_notifications,
    metrics_state,
    payment_detail,
    work_queue,
)
from .payments import (
    add_audit,
    add_audits,
    add_note,
    audit_entry,
    audit_trail,
    get,
    get_by_id,
    get_by_idempotency_key,
    get_by_provider_transaction_id,
    insert_payment,
    lock_payment,
    record_of,
    reversals_in_flight_amount,
    transaction_id_of,
    update_payment,
)
from .reconciliation import RECONCILABLE_STATUSES, claim_due_for_reconciliation, claim_queries
from .record import PaymentRecord
from .totals import compact_daily_totals, summary_rows

__all__ = [
    "OPEN_STATUSES",
    "RECONCILABLE_STATUSES",
    "PaymentRecord",
    "_filtered",
    "activity",
    "add_audit",
    "add_audits",
    "add_note",
    "add_notification",
    "audit_entry",
    "audit_trail",
    "claim_due_for_reconciliation",
    "claim_queries",
    "compact_daily_totals",
    "console_batch",
    "console_page",
    "console_notifications",
    "count_payments",
    "find_by_provider_reference",
    "get",
    "get_by_id",
    "get_by_idempotency_key",
    "get_by_provider_transaction_id",
    "get_notification",
    "insert_payment",
    "list_notifications",
    "list_page",
    "lock_payment",
    "metrics_state",
    "payment_detail",
    "record_of",
    "reversals_in_flight_amount",
    "summary_rows",
    "transaction_id_of",
    "update_payment",
    "work_queue",
]
