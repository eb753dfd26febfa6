"""Payment logging: one logger, daily files, and masking that no call site can bypass.

``payment_logger.info("Payment initiated", transaction_id="TXN-1", phone=msisdn)`` writes::

    2025-01-15 12:34:56 - PAYMENT - INFO - Payment initiated | transaction_id=TXN-1 | phone=…

with the phone as ``2588412*****``, to the console and to ``PAYMENT_LOG_DIR/payment_<date>.log``
(``payment_2025-01-15.log``), or one JSON object per line when ``PAYMENT_LOG_FORMAT=json``.

Every line the module's handlers write passes through :func:`sanitize_text` *after* it is
formatted, so a full phone number, a bearer token, an API key or a ``password=...`` pair is masked
even inside an exception traceback or a hand-built message. :func:`sanitize` applies the same rules
to structured data (the audit trail's request/response JSON).

The logger configures itself from the settings on first use; :func:`configure_logging` does it
explicitly (and may be called again: it replaces its own handlers, never duplicates them).

The formatters are in ``log_formats.py`` and the background writer thread in ``log_writer.py``;
the handlers this module installs, and its public names, stay here.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable
from datetime import date, datetime
from pathlib import Path
from typing import Any, TextIO

from .exceptions import PaymentConfigurationError
from .log_formats import (
    COMPOSED,
    JsonLinesFormatter,
    SanitizingFilter,
    SanitizingFormatter,
    formatted_lines,
)
from .log_formats import DATE_FORMAT as DATE_FORMAT
from .log_formats import TEXT_FORMAT as TEXT_FORMAT
from .log_writer import LogWriter
from .redaction import MASK, is_secret_key, register_secret, sanitize, sanitize_text

__all__ = [
    "DailyFileHandler",
    "JsonLinesFormatter",
    "PaymentLogger",
    "SanitizingFormatter",
    "configure_logging",
    "payment_logger",
    "shutdown_logging",
]

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_LOG_DIR = "logs"
DEFAULT_LOG_FORMAT = "text"
DEFAULT_LOG_LEVEL = "INFO"
FILE_PREFIX = "payment_"

#: Set on every handler this module installs, so reconfiguring removes exactly those.
_OWNED = "_payments_owned_handler"

# --------------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------------


class DailyFileHandler(logging.Handler):
    """Appends to ``<directory>/payment_<YYYY-MM-DD>.log``, switching files when the date changes.

    The directory is created when the first record is written. ``clock`` (local ``datetime.now`` by
    default) decides the date; tests inject their own.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        prefix: str = FILE_PREFIX,
        clock: Callable[[], datetime] | None = None,
        encoding: str = "utf-8",
    ) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.prefix = prefix
        self.encoding = encoding
        self._clock: Callable[[], datetime] = clock or datetime.now
        self._stream: TextIO | None = None
        self._stream_date: date | None = None

    def path_for(self, day: date) -> Path:
        return self.directory / f"{self.prefix}{day.isoformat()}.log"

    @property
    def current_path(self) -> Path:
        return self.path_for(self._clock().date())

    def emit(self, record: logging.LogRecord) -> None:
        self.emit_batch([record])

    def emit_batch(self, records: list[logging.LogRecord]) -> None:
        """Write ``records`` with one write and one flush (the writer thread hands over whatever
        queued up meanwhile)."""
        lines = formatted_lines(self, records)
        if not lines:
            return
        try:
            stream = self._stream_for(self._clock().date())
            stream.write("\n".join(lines) + "\n")
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(records[0])

    def _stream_for(self, day: date) -> TextIO:
        if self._stream is None or day != self._stream_date:
            self._close_stream()
            self.directory.mkdir(parents=True, exist_ok=True)
            self._stream = self.path_for(day).open("a", encoding=self.encoding)
            self._stream_date = day
        return self._stream

    def _close_stream(self) -> None:
        stream, self._stream, self._stream_date = self._stream, None, None
        if stream is not None:
            stream.close()

    def close(self) -> None:
        self.acquire()
        try:
            self._close_stream()
        finally:
            self.release()
        super().close()


class _ConsoleHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is at the time (test runners and servers swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)

    def emit_batch(self, records: list[logging.LogRecord]) -> None:
        lines = formatted_lines(self, records)
        if not lines:
            return
        try:
            stream = self.stream = sys.stderr
            stream.write("\n".join(lines) + self.terminator)
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(records[0])


class _BootstrapHandler(logging.Handler):
    """Sits on the logger until it is configured, so a record logged straight through
    ``logging.getLogger("payments.…")`` configures the module and is written sanitised."""

    def emit(self, record: logging.LogRecord) -> None:
        _ensure_configured()
        if record.levelno < _logger.getEffectiveLevel():
            return
        for handler in list(_logger.handlers):
            if not isinstance(handler, _BootstrapHandler) and record.levelno >= handler.level:
                handler.handle(record)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

_logger = logging.getLogger(__package__ or "payments")


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.configured = False
        self.configuring = False


_state = _State()


def _owned(handler: logging.Handler) -> logging.Handler:
    setattr(handler, _OWNED, True)
    return handler


def _install(handlers: list[logging.Handler]) -> None:
    """Swap the module's handlers in one assignment, so no record meets an empty logger."""
    old = [handler for handler in _logger.handlers if getattr(handler, _OWNED, False)]
    _logger.handlers = [h for h in _logger.handlers if h not in old] + handlers
    for handler in old:
        handler.close()


class _BackgroundHandler(logging.Handler):
    """Hands records to a writer thread (``log_writer.LogWriter``), which formats, sanitises and
    writes them with the real handlers: the event loop only builds the record (sanitised, as every
    handler sees it). The writer takes whatever queued up meanwhile as one batch: one write and
    one flush per handler.

    ERROR and CRITICAL records are written before ``emit`` returns (after everything queued
    before them): such a line may be the last place an answer of M-Pesa's survives. Closing
    (``shutdown_logging``, and at interpreter exit) writes everything still queued; a process
    killed outright may lose the last few milliseconds of INFO/WARNING lines (the database, not
    the log, is the record of payments). A forked child starts its own writer."""

    #: Records at or above this level are written before ``emit`` returns.
    SYNC_LEVEL = logging.ERROR

    def __init__(self, handlers: list[logging.Handler]) -> None:
        super().__init__()
        self._writer = LogWriter(handlers)
        atexit.register(self.close)

    def emit(self, record: logging.LogRecord) -> None:
        self._writer.put(record)
        if record.levelno >= self.SYNC_LEVEL:
            self.flush()

    def flush(self) -> None:
        """Wait until every record queued so far is written."""
        self._writer.flush()

    def close(self) -> None:
        self._writer.stop()
        for handler in self._writer.handlers:
            handler.close()
        atexit.unregister(self.close)
        super().close()


def _from_settings() -> tuple[str, str, str, list[str], bool]:
    """(log dir, format, level, secrets, background) from the settings, or the defaults if they
    are invalid."""
    from .config import get_settings

    try:
        settings = get_settings()
    except PaymentConfigurationError:
        # Another variable is wrong; the logging ones may still be right, and must be honoured.
        log_format = os.environ.get("PAYMENT_LOG_FORMAT", DEFAULT_LOG_FORMAT).strip().lower()
        level = os.environ.get("PAYMENT_LOG_LEVEL", DEFAULT_LOG_LEVEL).strip().upper()
        return (
            os.environ.get("PAYMENT_LOG_DIR", "").strip() or DEFAULT_LOG_DIR,
            log_format if log_format in LOG_FORMATS else DEFAULT_LOG_FORMAT,
            level if level in LOG_LEVELS else DEFAULT_LOG_LEVEL,
            [],
            os.environ.get("PAYMENT_LOG_BACKGROUND", "true").strip().lower()
            not in ("0", "false", "no", "off"),
        )
    return (
        settings.payment_log_dir,
        settings.payment_log_format,
        settings.payment_log_level,
        settings.secret_values(),
        settings.payment_log_background,
    )


def configure_logging(
    *,
    log_dir: str | None = None,
    log_format: str | None = None,
    level: str | None = None,
    console: bool = True,
    secrets: Iterable[str] = (),
    clock: Callable[[], datetime] | None = None,
    background: bool | None = None,
) -> None:
    """Install the module's handlers (daily file, and console unless ``console=False``).

    Arguments left as ``None`` come from the settings (``PAYMENT_LOG_DIR``, ``PAYMENT_LOG_FORMAT``,
    ``PAYMENT_LOG_LEVEL``), or the defaults (``logs``, ``text``, ``INFO``) when the settings are
    invalid. The settings' secrets and ``secrets`` are registered for redaction. Calling it again
    replaces the handlers it installed before. ``background`` (``PAYMENT_LOG_BACKGROUND``) moves
    formatting and writing to a writer thread, off the event loop.
    """
    with _state.lock:
        _state.configuring = True
        try:
            (
                settings_dir,
                settings_format,
                settings_level,
                settings_secrets,
                settings_background,
            ) = _from_settings()
            chosen_format = (log_format or settings_format).strip().lower()
            if chosen_format not in LOG_FORMATS:
                raise ValueError(f"log_format must be one of {LOG_FORMATS}, not {log_format!r}")
            chosen_level = (level or settings_level).strip().upper()
            if chosen_level not in LOG_LEVELS:
                raise ValueError(f"level must be one of {LOG_LEVELS}, not {level!r}")
            for secret in [*settings_secrets, *secrets]:
                register_secret(secret)

            formatter: logging.Formatter = (
                JsonLinesFormatter() if chosen_format == "json" else SanitizingFormatter()
            )
            handlers: list[logging.Handler] = [
                DailyFileHandler(log_dir or settings_dir, clock=clock)
            ]
            if console:
                handlers.append(_ConsoleHandler())
            for handler in handlers:
                handler.setFormatter(formatter)
            if settings_background if background is None else background:
                handlers = [_BackgroundHandler(handlers)]
            _install([_owned(handler) for handler in handlers])
            _guard_transport_loggers()
            _logger.setLevel(chosen_level)
            _logger.propagate = False
            _logger.disabled = False  # dictConfig(disable_existing_loggers=True) must not mute us
            _state.configured = True
        finally:
            _state.configuring = False


_TRANSPORT_LOGGERS = ("httpx", "httpcore", "uvicorn.access")


def _guard_transport_loggers() -> None:
    """httpx logs every request URL at INFO, and GET queries carry the customer's MSISDN in the
    query string: mask those records too, whoever's handler writes them."""
    for name in _TRANSPORT_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(f, SanitizingFilter) for f in target.filters):
            target.addFilter(SanitizingFilter())


def shutdown_logging() -> None:
    """Close and remove the module's handlers; the next record configures logging again."""
    with _state.lock:
        _install([_owned(_BootstrapHandler())])
        _logger.setLevel(logging.DEBUG)
        _state.configured = False


def _ensure_configured() -> None:
    if _state.configured:
        return
    with _state.lock:
        if not _state.configured and not _state.configuring:
            configure_logging()


# Until configured, records from ``payments.*`` loggers reach only the bootstrap handler, never the
# root logger's unsanitising handlers.
# The level lets every record reach it; once configured, the configured level applies.
_logger.propagate = False
if not any(getattr(handler, _OWNED, False) for handler in _logger.handlers):
    _logger.addHandler(_owned(_BootstrapHandler()))
    if _logger.level == logging.NOTSET:
        _logger.setLevel(logging.DEBUG)


# --------------------------------------------------------------------------------------------------
# The logger
# --------------------------------------------------------------------------------------------------


def _render(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list | tuple):
        try:
            return json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def _clean_field(key: str, value: object) -> Any:
    if is_secret_key(key):
        return MASK
    try:
        return sanitize(value)
    except Exception:  # a log call must never raise
        return "<unprintable>"


class PaymentLogger:
    """``payment_logger.info("Payment completed", transaction_id=..., phone=...)``.

    Fields are appended as `` | key=value`` (``None`` values are skipped), sanitised, and attached
    to the record as ``payment_fields`` for the JSON format. ``exc_info=`` is passed to logging.
    The leading arguments are positional-only, so any name (``message=``, ``url=``) can be a field.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    @property
    def logger(self) -> logging.Logger:
        return self._logger

    def debug(self, message: str, /, **fields: object) -> None:
        self._log(logging.DEBUG, message, fields)

    def info(self, message: str, /, **fields: object) -> None:
        self._log(logging.INFO, message, fields)

    def warning(self, message: str, /, **fields: object) -> None:
        self._log(logging.WARNING, message, fields)

    def error(self, message: str, /, **fields: object) -> None:
        self._log(logging.ERROR, message, fields)

    def critical(self, message: str, /, **fields: object) -> None:
        self._log(logging.CRITICAL, message, fields)

    def exception(self, message: str, /, **fields: object) -> None:
        """Log at ERROR with the traceback of the exception being handled."""
        fields.setdefault("exc_info", True)
        self._log(logging.ERROR, message, fields)

    def api_request(self, method: str, url: str, /, **fields: object) -> None:
        """``API Request: POST https://…``"""
        verb = method.upper()
        self._log(logging.INFO, f"API Request: {verb} {url}", fields, {"method": verb, "url": url})

    def api_response(self, status: int | str, duration_ms: float, /, **fields: object) -> None:
        """``API Response: 201 (1234ms)``"""
        try:
            elapsed: int | float = round(duration_ms)
        except (TypeError, ValueError, OverflowError):
            elapsed = duration_ms
        self._log(
            logging.INFO,
            f"API Response: {status} ({elapsed}ms)",
            fields,
            {"status": status, "duration_ms": elapsed},
        )

    def _log(
        self,
        level: int,
        message: str,
        fields: dict[str, object],
        structured: dict[str, object] | None = None,
    ) -> None:
        _ensure_configured()
        if not self._logger.isEnabledFor(level):
            return
        exc_info = fields.pop("exc_info", None)
        clean = {
            key: _clean_field(key, value) for key, value in fields.items() if value is not None
        }
        text = sanitize_text(str(message))
        line = text + "".join(f" | {key}={_render(value)}" for key, value in clean.items())
        extra_fields = {key: _clean_field(key, value) for key, value in (structured or {}).items()}
        self._logger.log(
            level,
            line,
            exc_info=exc_info,  # type: ignore[arg-type]
            stacklevel=3,  # the caller of info()/api_request()/..., not this module
            extra={
                "payment_fields": {**extra_fields, **clean},
                "payment_message": text,
                COMPOSED: line,
            },
        )


payment_logger = PaymentLogger(_logger)
