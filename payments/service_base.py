"""What every part of ``PaymentService`` stands on: its settings, its M-Pesa client, the
references it sends, and how long a payment's own call may still be answered."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from .config import PaymentSettings, get_settings
from .models import PaymentOperation
from .mpesa.client import MpesaClient
from .references import third_party_reference_for
from .repository import PaymentRecord


class ServiceBase:
    """The settings, the client and the call-window policy of a ``PaymentService``."""

    def __init__(
        self,
        settings: PaymentSettings | None = None,
        client: MpesaClient | None = None,
        *,
        db_retry_delays: tuple[float, ...] = (0.05, 0.25, 1.0),
        sessions: Callable[[], Any] | None = None,
    ) -> None:
        self._settings = settings
        self._client = client
        self._db_retry_delays = db_retry_delays
        #: The host's session factory (a ``sessionmaker``, an ``async_sessionmaker``, …) for
        #: work outside a request: ``python -m payments reconcile --service …`` uses it, so the
        #: command works on the host's database. ``None``: ``PAYMENT_DATABASE_URL``.
        self.sessions = sessions

    @property
    def settings(self) -> PaymentSettings:
        if self._settings is None:
            self._settings = get_settings()
        return self._settings

    def reference_for(self, operation: str, idempotency_key: str | None) -> str:
        """The ``input_ThirdPartyReference`` this deployment sends for ``idempotency_key``."""
        settings = self.settings
        secret = f"{settings.mpesa_service_provider_code}:{settings.api_key}"
        return third_party_reference_for(operation, idempotency_key, secret)

    def call_window(self, operation: str) -> timedelta:
        """How long after a payment was recorded its own call may still be answered: the
        read timeout of its operation plus every connect attempt and backoff of the client."""
        settings = self.settings
        read = (
            settings.payment_c2b_timeout
            if operation == PaymentOperation.C2B
            else settings.payment_request_timeout
        )
        attempts = settings.payment_query_max_attempts
        connect = attempts * (settings.payment_connect_timeout + settings.payment_retry_backoff_max)
        return timedelta(seconds=read + connect)

    def in_flight_until(self, record: PaymentRecord) -> datetime:
        """Until then only the payment's own call settles a ``pending``/``processing`` one."""
        return record.created_at + self.call_window(record.operation)

    @property
    def client(self) -> MpesaClient:
        if self._client is None:
            self._client = MpesaClient.from_settings(self.settings)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
