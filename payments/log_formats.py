"""How the payment logger turns a record into a line: the text and JSON formatters (each line
sanitised after it is formatted, unless the payment logger built it from sanitised parts), and
the filter that masks other libraries' records."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from .redaction import sanitize, sanitize_text

TEXT_FORMAT = "%(asctime)s - PAYMENT - %(levelname)s - %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

_LINE = "_payments_line"
#: Set by ``PaymentLogger``: the line it composed from sanitised parts (see ``composed_clean``).
COMPOSED = "payment_line"


def composed_clean(record: logging.LogRecord) -> bool:
    """Whether ``record`` is still what the payment logger composed from sanitised parts (its
    message and each field masked on their own): no arguments, no traceback or stack, and a
    message nobody replaced since. Sanitising its line again would find nothing to mask."""
    return (
        record.__dict__.get(COMPOSED) is record.msg
        and not record.args
        and not record.exc_info
        and not record.exc_text
        and not record.stack_info
    )


def _formatted_once(
    formatter: logging.Formatter, record: logging.LogRecord, build: Callable[[], str]
) -> str:
    """The file and console handlers share one formatter: format and sanitise a record once."""
    cached = record.__dict__.get(_LINE)
    if cached is not None and cached[0] is formatter:
        return str(cached[1])
    line = build()
    record.__dict__[_LINE] = (formatter, line)
    return line


class SanitizingFormatter(logging.Formatter):
    """The text line format; sanitises the whole formatted record, traceback included."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT, DATE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return _formatted_once(self, record, lambda: self._sanitized(record))

    def _sanitized(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return line if composed_clean(record) else sanitize_text(line)


_JSON_RESERVED = frozenset({"timestamp", "level", "logger", "message", "exception", "stack"})


def _json_default(value: object) -> object:
    if isinstance(value, set | frozenset):
        return list(value)
    return sanitize_text(str(value))


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message, the fields, any exception."""

    def format(self, record: logging.LogRecord) -> str:
        return _formatted_once(self, record, lambda: self._json_line(record))

    def _json_line(self, record: logging.LogRecord) -> str:
        message = getattr(record, "payment_message", None)
        payload: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created)
            .astimezone()
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message if isinstance(message, str) else record.getMessage(),
        }
        fields = getattr(record, "payment_fields", None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                name = str(key)
                payload[f"field_{name}" if name in _JSON_RESERVED else name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            payload["exception"] = record.exc_text
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        clean = payload if composed_clean(record) else sanitize(payload)
        return json.dumps(clean, ensure_ascii=False, default=_json_default)


def formatted_lines(handler: logging.Handler, records: list[logging.LogRecord]) -> list[str]:
    """The lines of the records ``handler`` takes (its level and filters), each formatted (and
    sanitised) on its own, so one record that cannot be formatted costs only its own line."""
    lines = []
    for record in records:
        if record.levelno < handler.level or not handler.filter(record):
            continue
        try:
            lines.append(handler.format(record))
        except RecursionError:
            raise
        except Exception:
            handler.handleError(record)
    return lines


class SanitizingFilter(logging.Filter):
    """Masks records of other libraries' loggers before any handler (the host's) sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = sanitize_text(record.msg)
        # Masked one by one, keeping their shape: formatters (uvicorn's) unpack args themselves.
        if isinstance(record.args, tuple):
            record.args = tuple(
                sanitize_text(arg) if isinstance(arg, str) else arg for arg in record.args
            )
        elif isinstance(record.args, Mapping):
            record.args = {
                key: sanitize_text(arg) if isinstance(arg, str) else arg
                for key, arg in record.args.items()
            }
        return True
