"""``GET /api/payments/metrics``: exact values after a known sequence of payments, access control,
and prometheus-client's multiprocess mode adding up several worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from payments.models import PaymentEvent, PaymentEventDelivery, PaymentTransaction, utcnow
from payments.reconciliation import reconcile_once

from .support import TEST_ADMIN_KEY, PaymentApi, PaymentApiFactory

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def scrape(api: PaymentApi, **headers: str) -> Samples:
    answer = await api.http.get("/api/payments/metrics", headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return parse(answer.text)


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (name, tuple(sorted(labels.items())))


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    k = key(name, **labels)
    return after.get(k, 0.0) - before.get(k, 0.0)


async def _pay(api: PaymentApi, phone: str, amount: str, path: str = "initiate") -> int:
    answer = await api.http.post(
        f"/api/payments/{path}", json={"phone_number": phone, "amount": amount}
    )
    return answer.status_code


async def test_metrics_after_a_known_sequence_of_payments(
    payment_api_factory: PaymentApiFactory,
) -> None:
    api = await payment_api_factory()
    before = await scrape(api)

    assert await _pay(api, "258841230001", "100.00") == 200
    assert await _pay(api, "258841230002", "250.50") == 200
    assert await _pay(api, "258841000005", "30") == 402  # cancelled by the customer (INS-5)
    assert await _pay(api, "258841230003", "40", path="payouts") == 200
    assert await _pay(api, "258842000001", "500") == 202  # the answer is lost: unknown
    refused = await api.http.post(
        "/api/payments/callback/c2b", json={"x": 1}, headers={"X-Callback-Token": "wrong"}
    )
    assert refused.status_code == 401
    async with api.session_factory() as db:  # make the open payment ten minutes old
        await db.execute(
            update(PaymentTransaction)
            .where(PaymentTransaction.status == "unknown")
            .values(
                created_at=utcnow().replace(microsecond=0)
                - __import__("datetime").timedelta(minutes=10)
            )
        )
        await db.commit()

    middle = await scrape(api)
    # From the database: right in every process.
    assert middle[key("payments_open", status="unknown")] == 1
    assert middle[key("payments_open", status="processing")] == 0
    assert middle[key("payments_open", status="pending")] == 0
    assert 600 <= middle[key("payments_open_oldest_age_seconds")] < 660
    assert middle[key("payments_attention_required")] == 0
    assert key("payments_in_flight", operation="c2b") not in middle  # none in flight

    report = await reconcile_once(api.service, api.session_factory, min_age=0)
    assert report.settled == 1
    after = await scrape(api)

    expected_counts = {
        ("c2b", "completed"): 3,  # two paid at once, one settled by reconciliation
        ("c2b", "cancelled"): 1,
        ("c2b", "unknown"): 1,
        ("b2c", "completed"): 1,
        ("c2b", "failed"): 0,
    }
    for (operation, status), count in expected_counts.items():
        assert delta(before, after, "payments_total", operation=operation, status=status) == count
    expected_amounts = {
        ("c2b", "completed"): 850.50,
        ("c2b", "cancelled"): 30.0,
        ("c2b", "unknown"): 500.0,
        ("b2c", "completed"): 40.0,
    }
    for (operation, status), amount in expected_amounts.items():
        assert delta(
            before, after, "payment_amount_mzn_total", operation=operation, status=status
        ) == pytest.approx(amount)
    expected_requests = {
        ("c2b", "INS-0"): 2,
        ("c2b", "INS-5"): 1,
        ("c2b", "transport_error"): 1,
        ("b2c", "INS-0"): 1,
        ("query_status", "INS-0"): 1,  # reconciliation's status query
    }
    for (operation, code), count in expected_requests.items():
        assert delta(before, after, "mpesa_requests_total", operation=operation, code=code) == count
    assert delta(before, after, "mpesa_request_duration_seconds_count", operation="c2b") == 4
    assert (
        delta(before, after, "mpesa_request_duration_seconds_bucket", operation="c2b", le="120.0")
        == 4
    )
    assert delta(before, after, "reconcile_runs_total", result="ok") == 1
    assert delta(before, after, "reconcile_settled_total", status="completed") == 1
    assert delta(before, after, "callbacks_total", valid="false", processed="false") == 1
    assert after[key("payments_open", status="unknown")] == 0
    assert after[key("payments_open_oldest_age_seconds")] == 0


async def test_metrics_need_staff_auth_or_the_metrics_token(
    payment_api_factory: PaymentApiFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = await payment_api_factory()
    anonymous = await api.http.get("/api/payments/metrics", headers={"X-API-Key": ""})
    assert anonymous.status_code == 401
    bearer = await api.http.get(
        "/api/payments/metrics", headers={"X-API-Key": "", "Authorization": "Bearer anything"}
    )
    assert bearer.status_code == 401  # no token configured: only staff

    token = "prometheus-scrape-token-0123456789"
    api = await payment_api_factory(settings_overrides={"payment_metrics_token": token})
    ok = await api.http.get(
        "/api/payments/metrics", headers={"X-API-Key": "", "Authorization": f"Bearer {token}"}
    )
    assert ok.status_code == 200 and "payments_open" in ok.text
    assert token not in ok.text
    wrong = await api.http.get(
        "/api/payments/metrics", headers={"X-API-Key": "", "Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 401
    staff = await api.http.get("/api/payments/metrics", headers={"X-API-Key": TEST_ADMIN_KEY})
    assert staff.status_code == 200


async def test_metrics_use_the_hosts_own_auth(payment_api_factory: PaymentApiFactory) -> None:
    from fastapi import Header, HTTPException

    async def host_staff(x_staff: str | None = Header(default=None)) -> str:
        if x_staff != "ops":
            raise HTTPException(status_code=403, detail="staff only")
        return "ops"

    api = await payment_api_factory(router_options={"auth": host_staff})
    assert (await api.http.get("/api/payments/metrics")).status_code == 403
    assert (
        await api.http.get("/api/payments/metrics", headers={"X-Staff": "ops"})
    ).status_code == 200


_WORKER = textwrap.dedent(
    """
    import sys
    from decimal import Decimal
    from payments import metrics
    for _ in range(int(sys.argv[1])):
        metrics.observe_transition("c2b", "completed", Decimal("10.50"))
    metrics.observe_mpesa_request("c2b", "INS-0", 0.2)
    metrics.observe_event_delivery("delivered")
    """
)
_SCRAPER = textwrap.dedent(
    """
    from payments import metrics
    state = {
        "open": {},
        "in_flight": {},
        "oldest_open_age_seconds": 0,
        "attention_required": 0,
        "events_pending": 0,
    }
    print(metrics.exposition(state).decode())
    """
)


def test_multiprocess_mode_adds_up_every_worker(tmp_path: Path) -> None:
    """Two worker processes count; a third (the one a scrape reached) reports the sum."""
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(root)}

    def run(code: str, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    run(_WORKER, "3")
    run(_WORKER, "4")
    samples = parse(run(_SCRAPER))
    assert samples[key("payments_total", operation="c2b", status="completed")] == 7
    assert samples[key("payment_amount_mzn_total", operation="c2b", status="completed")] == 73.5
    assert samples[key("mpesa_requests_total", operation="c2b", code="INS-0")] == 2
    assert samples[key("mpesa_request_duration_seconds_count", operation="c2b")] == 2
    assert samples[key("event_deliveries_total", result="delivered")] == 2
    assert samples[key("payments_attention_required")] == 0


async def test_event_metrics_after_deliveries_answering_200_then_500(
    payment_api_factory: PaymentApiFactory,
) -> None:
    """``events_pending`` from the database and ``event_deliveries_total{result}`` counted where
    the dispatcher records an attempt, against a real loopback receiver answering 200, 500 (a
    retry), 410 (gone), then 500 for an event past its retry window (failed)."""
    from payments.dispatcher import dispatch_once

    from .test_events import Receiver, serving, webhook_settings

    async with serving(Receiver(answers=[200, 500, 410, 500])) as receiver:
        api = await payment_api_factory(
            settings_overrides=webhook_settings(
                receiver.url, payment_dispatch_in_app=False, payment_webhook_retry_base_seconds=60
            )
        )
        before = await scrape(api)
        assert before[key("events_pending")] == 0

        assert await _pay(api, "258841230001", "100.00") == 200  # payment.completed
        assert await _pay(api, "258841002006", "10.00") == 402  # payment.failed (INS-2006)
        middle = await scrape(api)
        assert middle[key("events_pending")] == 2  # hooks not counted: no hooks in this service

        first = await dispatch_once(api.service, api.session_factory, prune=False)
        assert (first.delivered, first.retried) == (1, 1)  # 200 for one, 500 for the other
        after_first = await scrape(api)
        assert after_first[key("events_pending")] == 1  # the 500 is due again in ~60 s
        assert delta(before, after_first, "event_deliveries_total", result="delivered") == 1
        assert delta(before, after_first, "event_deliveries_total", result="retry") == 1

        async with api.session_factory() as db:  # the retry is due now
            await db.execute(
                update(PaymentEventDelivery)
                .where(PaymentEventDelivery.status == "pending")
                .values(next_attempt_at=utcnow())
            )
            await db.commit()
        second = await dispatch_once(api.service, api.session_factory, prune=False)
        assert second.gone == 1  # 410
        after = await scrape(api)
        assert after[key("events_pending")] == 0
        assert delta(before, after, "event_deliveries_total", result="delivered") == 1
        assert delta(before, after, "event_deliveries_total", result="retry") == 1
        assert delta(before, after, "event_deliveries_total", result="gone") == 1
        assert delta(before, after, "event_deliveries_total", result="failed") == 0

        assert await _pay(api, "258841230002", "20.00") == 200
        async with api.session_factory() as db:  # its retry window (3 days) is over
            await db.execute(
                update(PaymentEvent)
                .where(PaymentEvent.created_at > utcnow() - timedelta(minutes=5))
                .values(created_at=utcnow() - timedelta(days=4))
            )
            await db.commit()
        assert (await scrape(api))[key("events_pending")] == 1
        third = await dispatch_once(api.service, api.session_factory, prune=False)
        assert third.failed == 1
        last = await scrape(api)
        assert last[key("events_pending")] == 0
        for result, count in (("delivered", 1), ("retry", 1), ("gone", 1), ("failed", 1)):
            assert delta(before, last, "event_deliveries_total", result=result) == count
        assert [headers["webhook-id"] for headers, _ in receiver.requests].count(
            receiver.event_ids()[1]
        ) == 2  # the 500 was retried, and its retry answered 410
        assert len(receiver.requests) == 4
