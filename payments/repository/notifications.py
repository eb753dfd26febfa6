"""Inbound notifications (``payment_webhook_logs``): storing one, reading it back, finding the
payment it is about, and the stored list.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..models import PaymentNotification, PaymentTransaction


def add_notification(session: Session, row: PaymentNotification) -> int:
    session.add(row)
    session.flush()
    return row.id


def get_notification(
    session: Session, notification_id: int, *, for_update: bool = False
) -> PaymentNotification | None:
    query = select(PaymentNotification).where(PaymentNotification.id == notification_id)
    if for_update:
        query = query.with_for_update()
    return session.scalars(query.execution_options(populate_existing=True)).one_or_none()


def find_by_provider_reference(
    session: Session, *, third_party_reference: str | None, conversation_id: str | None
) -> PaymentTransaction | None:
    """The payment a notification is about: by our third-party reference, else conversation ID."""
    if third_party_reference:
        row = session.scalars(
            select(PaymentTransaction).where(
                PaymentTransaction.third_party_reference == third_party_reference
            )
        ).one_or_none()
        if row is not None:
            return row
    if conversation_id:
        return session.scalars(
            select(PaymentTransaction)
            .where(PaymentTransaction.conversation_id == conversation_id)
            .limit(1)
        ).one_or_none()
    return None


def list_notifications(
    session: Session, *, is_processed: bool | None, page: int, per_page: int
) -> tuple[list[PaymentNotification], int]:
    query = select(PaymentNotification)
    count = select(func.count(PaymentNotification.id))
    if is_processed is not None:
        query = query.where(PaymentNotification.is_processed.is_(is_processed))
        count = count.where(PaymentNotification.is_processed.is_(is_processed))
    total = session.scalar(count) or 0
    rows = session.scalars(
        query.order_by(PaymentNotification.id.desc()).offset((page - 1) * per_page).limit(per_page)
    )
    return list(rows), total
