"""Defects a reviewer's read found, each pinned by the behaviour a user depends on."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import select
from uvicorn.logging import AccessFormatter

from payments.logger import configure_logging
from payments.models import PaymentAuditLog, PaymentTransaction
from payments.repository import PaymentRecord
from payments.service import PaymentService

from .conftest import PaymentApi, PaymentApiFactory

CALLBACK = "/api/payments/callback/c2b"


def test_uvicorn_access_lines_keep_working_and_are_masked(tmp_path: object) -> None:
    configure_logging(log_dir=str(tmp_path), console=False)
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/api/payments/?phone_number=258841234567", "1.1", 200),
        None,
    )
    assert logging.getLogger("uvicorn.access").filter(record)
    line = AccessFormatter("%(message)s", use_colors=False).format(record)
    assert "2588412*****" in line and "258841234567" not in line
    assert '"GET /api/payments/' in line


async def test_reversal_without_portal_credentials_records_and_reserves_nothing(
    payment_api_factory: PaymentApiFactory,
) -> None:
    api = await payment_api_factory(settings_overrides={"mpesa_initiator_identifier": ""})
    paid = (await api.http.post("/api/payments/initiate", json=_c2b())).json()
    response = await api.http.post(f"/api/payments/{paid['transaction_id']}/reverse")
    assert response.status_code == 500
    assert response.json()["details"] == {"variable": "MPESA_INITIATOR_IDENTIFIER"}
    assert await api.count() == 1  # no reversal row holding the amount
    assert api.simulator.calls("reversal") == 0


async def test_oversized_callback_is_refused_and_stored_truncated(payment_api: PaymentApi) -> None:
    response = await payment_api.http.post(
        CALLBACK, content=b'{"input_ResultDesc": "' + b"x" * 100_000 + b'"}'
    )
    assert response.status_code == 413
    [stored] = (await payment_api.http.get("/api/payments/webhooks")).json()["items"]
    assert stored["is_valid"] is False and len(stored["raw_body"]) == 64 * 1024


async def test_webhook_list_masks_phone_numbers_in_stored_bodies(payment_api: PaymentApi) -> None:
    await payment_api.http.post(CALLBACK, json={"input_Note": "customer 258841234567"})
    text = (await payment_api.http.get("/api/payments/webhooks")).text
    assert "258841234567" not in text and "2588412*****" in text


class FailingHook(PaymentService):
    async def on_payment_completed(self, transaction: PaymentRecord) -> None:
        raise RuntimeError(f"could not notify {transaction.phone_number}")


async def test_a_failing_hooks_message_is_masked_in_the_audit_trail(
    payment_api_factory: PaymentApiFactory,
) -> None:
    api = await payment_api_factory(service_class=FailingHook)
    paid = (await api.http.post("/api/payments/initiate", json=_c2b())).json()
    async with api.session_factory() as session:
        row = (
            await session.scalars(
                select(PaymentTransaction).where(
                    PaymentTransaction.transaction_id == paid["transaction_id"]
                )
            )
        ).one()
        [message] = (
            await session.scalars(
                select(PaymentAuditLog.error_message).where(
                    PaymentAuditLog.transaction_id == row.id,
                    PaymentAuditLog.action == "hook_failed",
                )
            )
        ).all()
    assert message is not None and "258841234567" not in message and "2588412*****" in message


@pytest.mark.parametrize("notice_code", ["INS-0", "0"])
async def test_a_payment_settled_by_a_confirmed_notice_can_be_reversed(
    payment_api: PaymentApi, notice_code: str
) -> None:
    lost = await payment_api.http.post("/api/payments/initiate", json=_c2b("258842000001"))
    payment = lost.json()
    assert payment["status"] == "unknown"
    recorded = payment_api.simulator.find(payment["third_party_reference"])
    assert recorded is not None
    notice = {
        "input_ThirdPartyReference": payment["third_party_reference"],
        "input_TransactionID": recorded.transaction_id,
        "input_ResultCode": notice_code,
        "input_ResultDesc": "Request processed successfully",
    }
    assert (await payment_api.http.post(CALLBACK, json=notice)).status_code == 200
    status = (
        await payment_api.http.get(f"/api/payments/status/{payment['transaction_id']}")
    ).json()
    assert status["status"] == "completed"
    assert status["provider_transaction_id"] == recorded.transaction_id
    reversal = await payment_api.http.post(f"/api/payments/{payment['transaction_id']}/reverse")
    assert reversal.status_code == 200, reversal.text
    assert reversal.json()["status"] == "completed"


def _c2b(phone: str = "258841234567") -> dict[str, object]:
    return {"phone_number": phone, "amount": 100}
