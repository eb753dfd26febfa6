"""Prometheus metrics: ``GET /api/payments/metrics`` in the text exposition format.

Two kinds of numbers, each from where it is true across worker processes:

- **Counters of things a process did** (``payments_total``, ``payment_amount_mzn_total``,
  ``mpesa_requests_total``, ``mpesa_request_duration_seconds``, ``reconcile_runs_total``,
  ``reconcile_settled_total``, ``callbacks_total``, ``event_deliveries_total``) are
  prometheus-client metrics, counted where it happens. With several worker processes set
  ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory shared by the workers and the reconciler on one
  host, emptied at deploy) before they start: prometheus-client then keeps each process's values in
  that directory and every scrape adds them up, whichever worker answers it.
- **Gauges of the current state** (``payments_in_flight``, ``payments_open``,
  ``payments_open_oldest_age_seconds``, ``payments_attention_required``, ``events_pending``) are
  read from the database at each scrape (indexed counts), so they are right with any number of
  processes and after restarts, and no process has to keep them up to date.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

#: The module's own registry: a host's default registry (and its other metrics) stays the host's.
REGISTRY = CollectorRegistry(auto_describe=True)

PAYMENTS = Counter(
    "payments_total",
    "Payments that reached a status (each transition counted once, when it is committed)",
    ["operation", "status"],
    registry=REGISTRY,
)
PAYMENT_AMOUNT = Counter(
    "payment_amount_mzn_total",
    "Amount in MZN of the payments counted in payments_total",
    ["operation", "status"],
    registry=REGISTRY,
)
MPESA_REQUESTS = Counter(
    "mpesa_requests_total",
    "HTTP exchanges with M-Pesa by operation and output_ResponseCode"
    " (transport_error: no answer; none: an answer without a code)",
    ["operation", "code"],
    registry=REGISTRY,
)
#: C2B calls block on the customer's PIN for up to ~90 s, so the buckets reach 120 s.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120)
MPESA_DURATION = Histogram(
    "mpesa_request_duration_seconds",
    "Duration of HTTP exchanges with M-Pesa",
    ["operation"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
RECONCILE_RUNS = Counter(
    "reconcile_runs_total",
    "Reconciliation passes (ok, errors: some payments could not be settled, failed: the pass"
    " itself failed)",
    ["result"],
    registry=REGISTRY,
)
RECONCILE_SETTLED = Counter(
    "reconcile_settled_total",
    "Payments settled by reconciliation, by the status they reached",
    ["status"],
    registry=REGISTRY,
)
CALLBACKS = Counter(
    "callbacks_total",
    "Inbound notifications received (valid: authenticated and well-formed; processed: applied)",
    ["valid", "processed"],
    registry=REGISTRY,
)
EVENT_DELIVERIES = Counter(
    "event_deliveries_total",
    "Event delivery attempts recorded by the dispatcher (webhook endpoints and the host's hooks),"
    " by what the attempt decided: delivered (2xx, or the hook returned), retry (will be tried"
    " again), failed (the retry window is over: no more attempts), gone (the endpoint answered"
    " 410)",
    ["result"],
    registry=REGISTRY,
)
#: The values of ``event_deliveries_total{result}``.
DELIVERY_RESULTS = ("delivered", "retry", "failed", "gone")
#: Response codes become label values only in M-Pesa's own shape, so a strange answer cannot
#: create unbounded series.
_CODE = re.compile(r"(?:INS-[0-9]{1,4}|[0-9]{1,4})", re.ASCII)


def _code_label(code: object) -> str:
    if code is None or code == "":
        return "none"
    if isinstance(code, str) and _CODE.fullmatch(code.strip()):
        return code.strip()
    return "other"


# -- counting (called where it happens) -----------------------------------------------------------


def observe_mpesa_request(operation: str, code: object, seconds: float) -> None:
    MPESA_REQUESTS.labels(operation, _code_label(code)).inc()
    MPESA_DURATION.labels(operation).observe(seconds)


def observe_mpesa_transport_error(operation: str, seconds: float) -> None:
    MPESA_REQUESTS.labels(operation, "transport_error").inc()
    MPESA_DURATION.labels(operation).observe(seconds)


def observe_transition(operation: str, status: str, amount: Decimal) -> None:
    PAYMENTS.labels(operation, status).inc()
    PAYMENT_AMOUNT.labels(operation, status).inc(float(amount))


def observe_reconcile_run(result: str) -> None:
    RECONCILE_RUNS.labels(result).inc()


def observe_reconcile_settled(status: str) -> None:
    RECONCILE_SETTLED.labels(status).inc()


def observe_callback(*, valid: bool, processed: bool) -> None:
    CALLBACKS.labels(str(valid).lower(), str(processed).lower()).inc()


def observe_event_delivery(result: str) -> None:
    EVENT_DELIVERIES.labels(result).inc()


# -- exposition ------------------------------------------------------------------------------------


class _Snapshot:
    """A registry-shaped holder for the families read from the database at one scrape."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def database_families(state: dict[str, Any]) -> list[Metric]:
    """The gauges of ``repository.metrics_state(...)`` as metric families."""
    return [
        _gauge_by(
            "payments_in_flight",
            "Payments sent (or about to be) whose answer has not arrived: pending or processing",
            "operation",
            state["in_flight"],
        ),
        _gauge_by(
            "payments_open",
            "Payments whose outcome is still open, by status",
            "status",
            state["open"],
        ),
        GaugeMetricFamily(
            "payments_open_oldest_age_seconds",
            "Age of the oldest open payment (0 when none is open)",
            value=state["oldest_open_age_seconds"],
        ),
        GaugeMetricFamily(
            "payments_attention_required",
            "Payments flagged for an operator",
            value=state["attention_required"],
        ),
        GaugeMetricFamily(
            "events_pending",
            "Payment events with a delivery still to make: to a webhook endpoint, or to the host's"
            " hooks when its service has hooks",
            value=state["events_pending"],
        ),
    ]


def _gauge_by(name: str, documentation: str, label: str, counts: dict[str, int]) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([value], count)
    return family


def exposition(state: dict[str, Any]) -> bytes:
    """The text format of every metric: this process's counters (or, in multiprocess mode, every
    process's, added up) and the database's gauges."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        counters = CollectorRegistry()
        MultiProcessCollector(counters, path)
        text = generate_latest(counters)
    else:
        text = generate_latest(REGISTRY)
    return text + generate_latest(_Snapshot(database_families(state)))  # type: ignore[arg-type]


CONTENT_TYPE = CONTENT_TYPE_LATEST


# -- the endpoint's two halves (the router stays thin) --------------------------------------------


async def check_access(request: Any, auth: Any, settings: Any) -> None:
    """``Authorization: Bearer <PAYMENT_METRICS_TOKEN>`` when that is set (what Prometheus'
    ``authorization`` scrape setting sends); otherwise, or with another header, the staff auth."""
    import hmac

    from .console.security import run_auth
    from .exceptions import UnauthorizedError

    token = settings.payment_metrics_token
    expected = token.get_secret_value() if token is not None else ""
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if expected and scheme.lower() == "bearer":
        if hmac.compare_digest(given.strip().encode(), expected.encode()):
            return
        raise UnauthorizedError("wrong metrics token")
    await run_auth(request, auth)


async def scrape(db: Any, *, hooks: bool = False) -> bytes:
    """The exposition, with the database's gauges read now (a few indexed aggregates).
    ``hooks``: the host's service runs hooks, so its pending hook deliveries count in
    ``events_pending`` (a service without hooks never consumes them)."""
    from . import repository as repo
    from .database import run_db
    from .models import utcnow

    state = await run_db(db, lambda session: repo.metrics_state(session, now=utcnow(), hooks=hooks))
    return exposition(state)
