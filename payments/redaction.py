"""Masking of phone numbers and secrets, in log lines and in stored data.

:func:`sanitize_text` masks a full phone number, a bearer token, an API key or a ``password=...``
pair anywhere in a text; :func:`sanitize` applies the same rules to structured data (the audit
trail's request/response JSON). :func:`register_secret` adds a configured secret's exact value.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from datetime import date, datetime, time
from decimal import Decimal
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from .mpesa.values import Msisdn, mask_msisdn

__all__ = ["MASK", "is_secret_key", "register_secret", "sanitize", "sanitize_text"]

MASK = "***"
MIN_SECRET_LENGTH = 4


#: A Mozambican mobile number: 2588XXXXXXXX with an optional + or 00, or a bare 8[2-7]XXXXXXX,
#: never a piece of a longer run of digits.
#: Digits may be spaced or dashed (``+258 84 333 0999``, ``84-333-0999``), as ``Msisdn`` accepts.
_SEP = r"[\s\-().]*+"
#: Not inside a word: the digits of an ID (a hex ConversationID such as ``…baf879820204bb4f``)
#: are no phone number, and masking them would corrupt the provider's evidence.
_MSISDN = re.compile(
    rf"(?<![0-9A-Za-z_])(?:(?:(?:\+|00){_SEP})?2{_SEP}5{_SEP}8{_SEP}(?P<full>8(?:{_SEP}[0-9]){{8}})"
    rf"|(?P<local>8{_SEP}[2-7](?:{_SEP}[0-9]){{7}}))(?![0-9A-Za-z_])"
)
_NOT_DIGIT = re.compile(r"[^0-9]")
_BEARER = re.compile(r"\b(?P<scheme>bearer)\s+[A-Za-z0-9\-._~+/]+=*", re.IGNORECASE)
#: Words that make a key secret: api_key, apikey, x-api-key, password, passwd, secret, token,
#: x-callback-token, authorization, security_credential, input_SecurityCredential, ...
_SECRET_KEY_WORD = re.compile(
    r"api[_-]?key|passw(?:or)?d|secret|token|authori[sz]ation|credential", re.IGNORECASE
)
#: ``key=``, ``key:``, ``"key":``, ``'key':``, ``\"key\":``. The key is a whole word (possessive, so
#: a failed match never backtracks into it), which keeps the scan linear.
_KEY_SEPARATOR = re.compile(r"""(?<![\w-])(?P<key>[\w-]++)(?:\\?["'])?\s*+[=:]\s*+""")
#: The value after a secret key; the named group is the part replaced by ``***``.
_SECRET_VALUE = re.compile(
    r'"(?P<dq>(?:[^"\\\n]|\\.)*+)"'
    r"|'(?P<sq>(?:[^'\\\n]|\\.)*+)'"
    r'|\\"(?P<eq>(?:[^"\\\n]|\\[^"\n])*+)\\"'
    r"""|\\?["']?(?P<bare>(?:(?:bearer|basic|digest|token)\s++)?[^\s,;&|"'\\<>(){}\[\]]++)""",
    re.IGNORECASE,
)
_VALUE_GROUPS = ("dq", "sq", "eq", "bare")
_UNMASKED_VALUES = frozenset({"", "null", "None", MASK})


class _SecretRegistry:
    """Literal secret values, matched by one compiled alternation (longest first)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        #: Length of the shortest registered form: shorter text cannot hold a secret.
        self.shortest = 1 << 30
        #: Texts found to hold nothing to mask: the same messages, URLs, codes and statuses come
        #: by on every payment. A new dict when a secret is registered, so a text checked
        #: against the old secrets is never taken as clean of the new one.
        self.clean_texts: dict[str, None] = {}

    def add(self, value: str) -> None:
        if not isinstance(value, str):
            return
        value = value.strip()
        if len(value) < MIN_SECRET_LENGTH:
            return
        # The forms a secret takes when it is URL-encoded or embedded in a JSON string.
        variants = {value, quote(value, safe=""), json.dumps(value)[1:-1]}
        with self._lock:
            if variants <= self._values:
                return
            self._values |= variants
            self.shortest = min(len(item) for item in self._values)
            ordered = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(item) for item in ordered))
            self.clean_texts = {}
        _clean_key.cache_clear()  # a key cleaned before may hold the new secret

    def redact(self, text: str) -> str:
        pattern = self._pattern  # one read: a concurrent add() swaps in a new pattern whole
        return pattern.sub(MASK, text) if pattern is not None else text


_secrets = _SecretRegistry()
#: The shortest text a phone number takes (a bare ``84XXXXXXX``).
_SHORTEST_NUMBER = 9
#: ``_SecretRegistry.clean_texts``: at most this many texts (then it starts again), of at most
#: this many characters each.
_CLEAN_TEXTS = 4096
_CLEAN_TEXT_LENGTH = 256


def register_secret(value: str) -> None:
    """Redact ``value`` wherever it appears from now on (values under 4 characters are ignored)."""
    _secrets.add(value)


@lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    """Whether a field or header name looks secret (``api_key``, ``Authorization``, …)."""
    return _SECRET_KEY_WORD.search(key) is not None


@lru_cache(maxsize=4096)
def _clean_key(key: str) -> tuple[str, bool]:
    """A mapping's key, sanitised, and whether its value is secret. Cached: the same few field
    names come by on every payment (and the cache is cleared when a secret is registered)."""
    return sanitize_text(key), is_secret_key(key)


def _masked_msisdn(match: re.Match[str]) -> str:
    return mask_msisdn("258" + _NOT_DIGIT.sub("", match.group("full") or match.group("local")))


def _bearer(match: re.Match[str]) -> str:
    return f"{match.group('scheme')} {MASK}"


def _mask_secret_pairs(text: str) -> str:
    parts: list[str] = []
    copied = 0
    position = 0
    while (pair := _KEY_SEPARATOR.search(text, position)) is not None:
        position = pair.end()
        if not is_secret_key(pair.group("key")):
            continue
        value = _SECRET_VALUE.match(text, position)
        if value is None:
            continue
        group = next(name for name in _VALUE_GROUPS if value.group(name) is not None)
        if value.group(group) not in _UNMASKED_VALUES:
            parts.append(text[copied : value.start(group)])
            parts.append(MASK)
            copied = value.end(group)
        position = max(value.end(), position + 1)
    if not parts:
        return text
    parts.append(text[copied:])
    return "".join(parts)


def sanitize_text(text: str) -> str:
    """Mask phone numbers, bearer tokens, registered secrets and ``secret_key=value`` pairs.

    The order matters: literal secrets first (before phone masking could alter the digits in one),
    then bearer tokens and secret key/value pairs, then phone numbers. Each step is one linear scan.
    A short text found to hold nothing to mask is remembered, and returned at once next time.
    """
    if not text or (
        # Most field values (codes, amounts, operation names) are short: too short for a phone
        # number or a registered secret, and with no key=value pair in them.
        len(text) < _SHORTEST_NUMBER
        and len(text) < _secrets.shortest
        and "=" not in text
        and ":" not in text
    ):
        return text
    known_clean = _secrets.clean_texts  # read once: add() may swap in a new one meanwhile
    if text in known_clean:
        return text
    clean = _secrets.redact(text)
    clean = _BEARER.sub(_bearer, clean)
    if _SECRET_KEY_WORD.search(clean) is not None:
        clean = _mask_secret_pairs(clean)
    clean = _MSISDN.sub(_masked_msisdn, clean)
    # Only texts with nothing masked are remembered: no phone number or secret is kept in memory.
    if clean == text and len(text) <= _CLEAN_TEXT_LENGTH:
        if len(known_clean) >= _CLEAN_TEXTS:
            known_clean.clear()
        known_clean[text] = None
    return clean


def sanitize(value: Any) -> Any:
    """A log- and audit-safe copy of ``value``; the input is never modified.

    Dicts, lists, tuples and sets are rebuilt recursively; a dict entry whose key looks secret
    gets ``"***"`` (``None`` stays ``None``). Strings go through :func:`sanitize_text`, ``Msisdn``
    becomes its masked form, ``Decimal`` a string, dates and times ISO 8601 strings, an ``int``
    that is a phone number its masked string. Other values are returned unchanged.
    """
    if isinstance(value, str):
        clean = sanitize_text(value)
        return value if clean == value else clean
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, Msisdn):
        return value.masked
    if isinstance(value, int):
        digits = str(value)
        return _masked_msisdn(match) if (match := _MSISDN.fullmatch(digits)) else value
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, Mapping):
        clean: dict[Any, Any] = {}
        for key, item in value.items():
            if isinstance(key, str):
                name, secret = _clean_key(key)
                clean[name] = MASK if secret and item is not None else sanitize(item)
            else:
                clean[sanitize(key)] = sanitize(item)
        return clean
    if isinstance(value, list):
        return [sanitize(item) for item in value]
    if isinstance(value, tuple):
        return tuple(sanitize(item) for item in value)
    if isinstance(value, set | frozenset):
        return type(value)(sanitize(item) for item in value)
    if isinstance(value, bytes | bytearray):
        return sanitize_text(bytes(value).decode("utf-8", errors="replace"))
    return value
