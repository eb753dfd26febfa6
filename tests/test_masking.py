"""Masking where it is easy to miss: uvicorn's access lines, a failing hook's message in the
audit trail, spaced phone numbers in audit rows, answers and notices."""

from __future__ import annotations

import logging

from sqlalchemy import select
from uvicorn.logging import AccessFormatter

from payments.logger import configure_logging
from payments.models import PaymentAuditLog, PaymentTransaction
from payments.repository import PaymentRecord
from payments.service import PaymentService
from tests.support import CALLBACK, INITIATE, PaymentApi, PaymentApiFactory
from tests.support import c2b_body as _c2b


class FailingHook(PaymentService):
    async def on_payment_completed(self, transaction: PaymentRecord) -> None:
        raise RuntimeError(f"could not notify {transaction.phone_number}")


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
                    PaymentAuditLog.payment_id == row.id,
                    PaymentAuditLog.action == "hook_failed",
                )
            )
        ).all()
    assert message is not None and "258841234567" not in message and "2588412*****" in message


async def test_spaced_numbers_are_masked_in_audit_rows_answers_and_notices(
    payment_api: PaymentApi,
) -> None:
    spaced = "+258 84 333 0999"
    paid = await payment_api.http.post(
        INITIATE,
        json={
            "phone_number": "258841234567",
            "amount": 100,
            "account_reference": "258843330999",
            "description": f"call {spaced}",
            "metadata": {"contact": "84-333-0999"},
        },
    )
    assert paid.status_code == 200, paid.text
    assert paid.json()["account_reference"] == "2588433*****"
    status = await payment_api.http.get(f"/api/payments/status/{paid.json()['transaction_id']}")
    trail = await payment_api.http.get(f"/api/payments/audit/{paid.json()['transaction_id']}")
    await payment_api.http.post(CALLBACK, json={"input_Note": f"from {spaced} / 84 333 0999"})
    notices = await payment_api.http.get("/api/payments/webhooks")
    for response in (paid, status, trail, notices):
        text = response.text
        assert "333 0999" not in text and "333-0999" not in text and "3330999" not in text, text
