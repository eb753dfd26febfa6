"""Settings, read from the environment and ``.env`` when first asked for (never at import time)."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
from decimal import Decimal
from functools import lru_cache
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

from .exceptions import PaymentConfigurationError
from .mpesa.auth import load_public_key
from .mpesa.codes import ResponseCodeTable

Environment = Literal["sandbox", "production", "simulator"]

#: The real gateways. Each operation listens on its own port (see ``client.OPERATIONS``).
PROVIDER_HOSTS: dict[str, str] = {
    "sandbox": "api.sandbox.vm.co.mz",
    "production": "api.vm.co.mz",
}


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PaymentSettings(BaseSettings):
    """Every variable the module reads; `.env.example` documents each one."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # Provider
    mpesa_environment: Environment = "sandbox"
    mpesa_api_key: SecretStr | None = None
    mpesa_public_key: str | None = None
    mpesa_service_provider_code: str = "171717"
    mpesa_initiator_identifier: str | None = None
    mpesa_security_credential: SecretStr | None = None
    mpesa_callback_url: str | None = None
    mpesa_base_url: str | None = None
    mpesa_origin: str = "developer.mpesa.vm.co.mz"
    mpesa_response_code_overrides: str | None = None

    # Inbound notifications and the HTTP API
    mpesa_callback_token: SecretStr | None = None
    mpesa_callback_allowed_ips: str | None = None
    payment_trusted_proxies: str | None = None
    payment_admin_api_key: SecretStr | None = None
    payment_metrics_token: SecretStr | None = None

    # Limits: what any caller, authenticated or not, can make the process hold or store
    payment_max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    payment_rejected_notices_per_minute: float = Field(default=10, gt=0)
    payment_rejected_notices_per_minute_total: float = Field(default=30, gt=0)
    payment_rejected_notice_retention: float = Field(default=86400, ge=60)

    # Retention (payments/retention.py; applied by `python -m payments prune` and the reconciler)
    payment_processed_notice_retention_days: int = Field(default=90, ge=0)
    payment_audit_retention_days: int = Field(default=0, ge=0)  # 0: as long as their payment

    # Payments
    payment_default_currency: Literal["MZN"] = "MZN"
    payment_min_amount: Decimal = Decimal("1")
    payment_max_amount: Decimal = Decimal("150000")
    payment_request_timeout: float = Field(default=30.0, gt=0)
    payment_c2b_timeout: float = Field(default=120.0, gt=0)
    payment_connect_timeout: float = Field(default=10.0, gt=0)
    payment_query_max_attempts: int = Field(default=3, ge=1, le=10)
    payment_retry_backoff_base: float = Field(default=0.5, ge=0)
    payment_retry_backoff_max: float = Field(default=5.0, ge=0)
    payment_max_connections: int = Field(default=1000, ge=1)

    # Database (the module's own engine; hosts may pass their own sessions instead)
    payment_database_url: str = "sqlite:///./payments.db"
    payment_database_pool_size: int = Field(default=10, ge=1, le=1000)
    # PostgreSQL: test each pooled connection with a round trip before use (see README
    # Performance: about 0.3-0.5 ms of CPU per payment, against errors after a server restart).
    payment_database_pre_ping: bool = True

    # When the app starts: freeze the startup heap out of the garbage collector's scans, and
    # collect the young generation less often (see README Performance).
    payment_gc_tuning: bool = True

    # The host's PaymentService for the command line (``module:attr``, like ``--service``)
    payment_service: str | None = None

    # Reconciliation of payments whose outcome is still open
    payment_reconcile_min_age: float = Field(default=60.0, ge=0)
    payment_reconcile_attention_after: float = Field(default=3600.0, gt=0)
    payment_reconcile_batch_size: int = Field(default=50, ge=1, le=1000)
    payment_reconcile_interval: float = Field(default=60.0, gt=0)
    payment_reconcile_in_app: bool = False

    # Events: webhooks to the host and the dispatcher that delivers them (and runs the hooks)
    payment_webhook_urls: str | None = None
    payment_webhook_secret: SecretStr | None = None
    payment_webhook_timeout: float = Field(default=10.0, gt=0, le=60)
    payment_webhook_retry_base_seconds: float = Field(default=5.0, gt=0)
    payment_webhook_retry_window_seconds: float = Field(default=3 * 86400, gt=0)
    payment_hook_lease_seconds: float = Field(default=60.0, gt=0)
    payment_dispatch_in_app: bool = True
    payment_dispatch_interval: float = Field(default=1.0, gt=0)
    payment_dispatch_batch_size: int = Field(default=100, ge=1, le=1000)
    payment_event_retention_days: int = Field(default=30, ge=30)

    # Logging
    payment_log_dir: str = "logs"
    payment_log_format: Literal["text", "json"] = "text"
    payment_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    # Lines are formatted and written by a writer thread, off the event loop (see logger.py).
    payment_log_background: bool = True

    @field_validator("mpesa_environment", mode="before")
    @classmethod
    def _known_environment(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            if value not in ("sandbox", "production", "simulator"):
                raise ValueError(
                    f"MPESA_ENVIRONMENT must be sandbox, production or simulator, not {value!r}"
                )
        return value

    @field_validator(
        "mpesa_base_url", "mpesa_api_key", "mpesa_public_key", "payment_service", mode="before"
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _check_consistency(self) -> PaymentSettings:
        if self.mpesa_environment == "simulator":
            # The development tool's demo credentials, read only when it is asked for: a host
            # that deleted ``simulator/`` never imports it.
            try:
                from .simulator.keys import (
                    SIMULATOR_API_KEY,
                    SIMULATOR_INITIATOR_IDENTIFIER,
                    SIMULATOR_PUBLIC_KEY,
                    SIMULATOR_SECURITY_CREDENTIAL,
                )
            except ImportError:
                raise ValueError(
                    "MPESA_ENVIRONMENT=simulator needs the module's simulator/ folder"
                ) from None
            if self.mpesa_api_key is None:
                self.mpesa_api_key = SecretStr(SIMULATOR_API_KEY)
            if self.mpesa_public_key is None:
                self.mpesa_public_key = SIMULATOR_PUBLIC_KEY
            if self.mpesa_initiator_identifier is None:
                self.mpesa_initiator_identifier = SIMULATOR_INITIATOR_IDENTIFIER
            if self.mpesa_security_credential is None:
                self.mpesa_security_credential = SecretStr(SIMULATOR_SECURITY_CREDENTIAL)
        if self.mpesa_api_key is None:
            raise ValueError(
                f"MPESA_API_KEY is required when MPESA_ENVIRONMENT={self.mpesa_environment}"
            )
        if self.mpesa_public_key is None:
            raise ValueError(
                f"MPESA_PUBLIC_KEY is required when MPESA_ENVIRONMENT={self.mpesa_environment}"
            )
        try:
            load_public_key(self.mpesa_public_key)
        except PaymentConfigurationError as exc:
            raise ValueError(exc.message) from None
        code = self.mpesa_service_provider_code.strip()
        if not (code.isdigit() and code.isascii() and 5 <= len(code) <= 6):
            raise ValueError("MPESA_SERVICE_PROVIDER_CODE must be 5 or 6 digits")
        self.mpesa_service_provider_code = code
        if self.payment_min_amount <= 0:
            raise ValueError("PAYMENT_MIN_AMOUNT must be greater than zero")
        if self.payment_min_amount > self.payment_max_amount:
            raise ValueError("PAYMENT_MIN_AMOUNT must not be greater than PAYMENT_MAX_AMOUNT")
        if self.mpesa_base_url is not None:
            self.mpesa_base_url = _checked_base_url(self.mpesa_base_url)
        for variable, raw in (
            ("MPESA_CALLBACK_ALLOWED_IPS", self.mpesa_callback_allowed_ips),
            ("PAYMENT_TRUSTED_PROXIES", self.payment_trusted_proxies),
        ):
            try:
                _networks(raw)
            except ValueError:
                raise ValueError(
                    f"{variable} must be a comma-separated list of IP addresses or networks"
                ) from None
        try:
            self.webhook_urls()
        except ValueError as exc:
            raise ValueError(f"PAYMENT_WEBHOOK_URLS is invalid: {exc}") from None
        if self.webhook_urls() and self.webhook_secret is None:
            raise ValueError("PAYMENT_WEBHOOK_SECRET is required when PAYMENT_WEBHOOK_URLS is set")
        if self.payment_webhook_secret is not None and self.webhook_secret is not None:
            _check_webhook_secret(self.webhook_secret)
        if not self.mpesa_origin.strip():
            raise ValueError("MPESA_ORIGIN must not be empty")
        try:
            self.response_codes()
        except (ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f"MPESA_RESPONSE_CODE_OVERRIDES is invalid: {exc}") from None
        return self

    def response_codes(self) -> ResponseCodeTable:
        return ResponseCodeTable.from_json_overrides(self.mpesa_response_code_overrides)

    @property
    def database_url_for_display(self) -> str:
        """``PAYMENT_DATABASE_URL`` with any password hidden (for logs and the console)."""
        try:
            return make_url(self.payment_database_url).render_as_string(hide_password=True)
        except Exception:  # an unparsable URL fails later, naming the variable
            return "<invalid PAYMENT_DATABASE_URL>"

    @property
    def api_key(self) -> str:
        assert self.mpesa_api_key is not None  # guaranteed by the validator
        return self.mpesa_api_key.get_secret_value()

    @property
    def public_key(self) -> str:
        assert self.mpesa_public_key is not None
        return self.mpesa_public_key

    @property
    def security_credential(self) -> str | None:
        credential = self.mpesa_security_credential
        return credential.get_secret_value() if credential is not None else None

    def secret_values(self) -> list[str]:
        """Values that must never appear in a log line, audit row or error message."""
        values = [self.api_key, self.security_credential]
        for secret in (
            self.mpesa_callback_token,
            self.payment_admin_api_key,
            self.payment_metrics_token,
            self.payment_webhook_secret,
        ):
            if secret is not None:
                values.append(secret.get_secret_value())
        return [value for value in values if value]

    @property
    def webhook_secret(self) -> str | None:
        secret = self.payment_webhook_secret
        value = secret.get_secret_value().strip() if secret is not None else ""
        return value or None

    def webhook_urls(self) -> list[str]:
        """The endpoints every event is POSTed to (``PAYMENT_WEBHOOK_URLS``, comma-separated)."""
        urls = [url.strip() for url in (self.payment_webhook_urls or "").split(",") if url.strip()]
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{url!r} is not an http(s) URL")
            if len(url) > 1000:
                raise ValueError("a URL is longer than 1000 characters")
        return list(dict.fromkeys(urls))

    @property
    def callback_token(self) -> str | None:
        token = self.mpesa_callback_token
        return token.get_secret_value() if token is not None and token.get_secret_value() else None

    @property
    def admin_api_key(self) -> str | None:
        key = self.payment_admin_api_key
        return key.get_secret_value() if key is not None and key.get_secret_value() else None

    @property
    def callback_allowed_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return _networks(self.mpesa_callback_allowed_ips)

    @property
    def trusted_proxy_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return _networks(self.payment_trusted_proxies)


def _check_webhook_secret(secret: str) -> None:
    """``whsec_`` + base64 of the key, as the Standard Webhooks specification defines it."""
    if not secret.startswith("whsec_"):
        raise ValueError("PAYMENT_WEBHOOK_SECRET must start with whsec_ (whsec_ + base64)")
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("PAYMENT_WEBHOOK_SECRET must be whsec_ followed by base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError("PAYMENT_WEBHOOK_SECRET's key must be 24 to 64 bytes")


def _networks(raw: str | None) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """``"196.1.2.3, 10.0.0.0/8"`` → networks (validated when settings load)."""
    return [
        ipaddress.ip_network(part.strip(), strict=False)
        for part in (raw or "").split(",")
        if part.strip()
    ]


def _checked_base_url(raw: str) -> str:
    url = raw.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("MPESA_BASE_URL must be an http(s) URL such as https://proxy.example.com")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError(
            "MPESA_BASE_URL may use plain http:// only for a loopback host (127.0.0.1, localhost);"
            " use https:// for anything else"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("MPESA_BASE_URL must be an origin only (scheme, host and port, no path)")
    return url


def load_settings(**overrides: object) -> PaymentSettings:
    """Build settings, turning validation errors into one message that names the variable."""
    try:
        return PaymentSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            location = ".".join(str(part) for part in error["loc"]).upper()
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{location}: {message}" if location else message)
        raise PaymentConfigurationError(
            "invalid payments configuration: " + "; ".join(problems),
            details={"problems": problems},
        ) from None


@lru_cache(maxsize=1)
def get_settings() -> PaymentSettings:
    return load_settings()
