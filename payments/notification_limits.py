"""What an inbound notification may be, before it is processed: where it comes from (the
caller's address behind trusted proxies), how much of it is read and stored (body, headers,
nesting), and how many rejected ones a source may leave per minute (a token bucket per source).
"""

from __future__ import annotations

import ipaddress
import json
import time
import weakref
from collections.abc import AsyncIterable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete
from sqlalchemy.orm import Session

from .config import PaymentSettings
from .database import DATABASE_ERRORS, DbSession, committing, run_db
from .logger import payment_logger
from .models import PaymentNotification, utcnow
from .redaction import sanitize

if TYPE_CHECKING:
    from .service import PaymentService

#: A result notification is a few hundred bytes; anything far larger is not one. (The cap is
#: ``PAYMENT_MAX_BODY_BYTES``; this is its default.)
MAX_NOTIFICATION_BYTES = 64 * 1024
#: What is stored of a notice, at most: authenticated ones keep their headers up to this many
#: bytes; rejected ones keep this much of their headers and of their body.
STORED_HEADER_BYTES = 4096
REJECTED_HEADER_BYTES = 1024
REJECTED_BODY_BYTES = 1024
#: A header value longer than this is stored cut, and marked.
STORED_HEADER_VALUE_CHARS = 512
TRUNCATED_MARK = "x-payments-truncated"
#: A notice is a flat object; anything nested deeper is not one.
MAX_NOTIFICATION_DEPTH = 4
#: How often (seconds) storing a rejected notice also deletes the expired ones.
PRUNE_INTERVAL = 60.0
#: Sources the rejected-notice limiter remembers at once (the oldest are forgotten first).
MAX_TRACKED_SOURCES = 10_000
_SECRET_HEADERS = {"x-callback-token", "authorization", "cookie", "x-api-key"}


def client_ip(
    peer_ip: str | None, headers: Mapping[str, str], settings: PaymentSettings
) -> str | None:
    """The caller's address, normalised (no port, no IPv6 scope), or ``None`` when it cannot be
    known: the peer, or, when the peer is a trusted proxy, the right-most untrusted hop of
    ``X-Forwarded-For`` (never the spoofable left-most one). Only valid addresses come out."""
    peer = parse_address(peer_ip)
    trusted = settings.trusted_proxy_networks
    if peer is None or not in_networks(peer, trusted):
        return peer
    forwarded = headers.get("x-forwarded-for")
    if forwarded is None:
        return peer
    hops = [hop.strip() for hop in forwarded.split(",")]
    for hop in reversed(hops):
        address = parse_address(hop)
        if address is None:
            # Our trusted proxies write valid addresses: whatever this is, the client wrote
            # it, and the client's own address is not known.
            return None
        if not in_networks(address, trusted):
            return address
    return parse_address(hops[0])


def parse_address(text: str | None) -> str | None:
    """``1.2.3.4``, ``1.2.3.4:80``, ``[2001:db8::1]:443``, ``fe80::1%eth0`` → the address alone,
    normalised; anything else → ``None``."""
    if text is None:
        return None
    return _parsed_address(text)


@lru_cache(maxsize=4096)
def _parsed_address(text: str) -> str | None:
    """Cached: the same few peers (a proxy, the shop's own servers) send most requests."""
    text = text.strip().strip('"')
    if text.startswith("["):
        closing = text.find("]")
        if closing < 0 or (closing + 1 < len(text) and not _is_port(text[closing + 1 :])):
            return None
        text = text[1:closing]
    elif text.count(":") == 1:
        text, _, port = text.partition(":")
        if not _is_port(":" + port):
            return None
    text = text.split("%", 1)[0]  # an IPv6 zone is local to the proxy's host
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _is_port(text: str) -> bool:
    return text.startswith(":") and text[1:].isdigit() and text[1:].isascii() and len(text) <= 6


def in_networks(
    address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def parse_notice(text: str) -> dict[str, Any] | None:
    """The notice as a flat JSON object, or ``None``: not JSON, not an object, nested deeper
    than a notice is, or holding what no database stores (NaN, NUL, lone surrogates)."""
    try:
        parsed = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(parsed, dict) or _nesting(parsed) > MAX_NOTIFICATION_DEPTH:
        return None
    try:
        dumped = json.dumps(parsed, ensure_ascii=False)
        dumped.encode("utf-8")
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        return None
    return None if "\\u0000" in dumped else parsed  # json.dumps writes NUL escaped


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _nesting(value: Any) -> int:
    """Nesting depth of a JSON value, without recursion (stops past the limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if level > MAX_NOTIFICATION_DEPTH:
                break
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def storable_text(text: str) -> str:
    """Text every database stores: NUL (refused by PostgreSQL) becomes U+FFFD."""
    return text.replace("\x00", "\ufffd")


async def read_capped(chunks: AsyncIterable[bytes], limit: int) -> bytes | None:
    """The whole body, or ``None`` as soon as it passes ``limit`` bytes (the rest is not read)."""
    data, complete = await read_prefix(chunks, limit)
    return data if complete else None


async def read_prefix(chunks: AsyncIterable[bytes], limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of the body, and whether that is all of it. Stops reading at the
    first chunk past the limit, so memory stays bounded whatever the client sends."""
    buffer = bytearray()
    async for chunk in chunks:
        if not chunk:
            continue
        room = limit - len(buffer)
        if len(chunk) > room:
            buffer += chunk[:room]
            return bytes(buffer), False
        buffer += chunk
    return bytes(buffer), True


def stored_headers(items: Iterable[tuple[str, str]], budget: int) -> dict[str, str]:
    """The headers worth keeping, masked, in at most ``budget`` characters: secrets as ``***``,
    long values cut, headers past the budget dropped; what was cut is counted under
    ``x-payments-truncated``. Cut before masking, so masking costs are bounded too."""
    kept: dict[str, str] = {}
    used = cut = 0
    for key, value in items:
        key = storable_text(key[:64])
        value = "***" if key in _SECRET_HEADERS else storable_text(value)
        if len(value) > STORED_HEADER_VALUE_CHARS:
            value, cut = value[:STORED_HEADER_VALUE_CHARS], cut + 1
        if used + len(key) + len(value) > budget:
            cut += 1
            continue
        used += len(key) + len(value)
        kept[key] = value
    clean: dict[str, str] = sanitize(kept)
    if cut:
        clean[TRUNCATED_MARK] = f"{cut} header(s) cut or dropped"
    return clean


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class NotificationGuard:
    """Per-process bounds on rejected notices: a token bucket per source and one in total (each
    refilled at its per-minute rate, holding at most one minute's worth), and the time of the
    last prune."""

    sources: dict[str | None, _Bucket] = field(default_factory=dict)
    total: _Bucket | None = None
    last_prune: float | None = None
    clock: Any = time.monotonic

    def admit(self, source: str | None, settings: PaymentSettings) -> bool:
        now = self.clock()
        per_source = settings.payment_rejected_notices_per_minute
        overall = settings.payment_rejected_notices_per_minute_total
        if self.total is None:
            self.total = _Bucket(overall, now)
        bucket = self.sources.pop(source, None) or _Bucket(per_source, now)
        self.sources[source] = bucket  # most recently seen last
        while len(self.sources) > MAX_TRACKED_SOURCES:
            del self.sources[next(iter(self.sources))]
        _refill(bucket, per_source, now)
        _refill(self.total, overall, now)
        if bucket.tokens < 1 or self.total.tokens < 1:
            return False
        bucket.tokens -= 1
        self.total.tokens -= 1
        return True

    async def prune(self, db: DbSession, settings: PaymentSettings) -> None:
        now = self.clock()
        if self.last_prune is not None and now - self.last_prune < PRUNE_INTERVAL:
            return
        self.last_prune = now
        cutoff = utcnow() - timedelta(seconds=settings.payment_rejected_notice_retention)
        try:
            removed = await run_db(
                db, committing(lambda s: prune_rejected_notifications(s, cutoff)), write=True
            )
        except DATABASE_ERRORS as exc:
            payment_logger.warning("Rejected callbacks not pruned", error=type(exc).__name__)
            return
        if removed:
            payment_logger.info("Pruned rejected callbacks", removed=removed)


def prune_rejected_notifications(session: Session, older_than: Any) -> int:
    """Delete rejected notices received before ``older_than``; the number deleted."""
    result = session.execute(
        delete(PaymentNotification).where(
            PaymentNotification.is_valid.is_(False), PaymentNotification.received_at < older_than
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)


def _refill(bucket: _Bucket, per_minute: float, now: float) -> None:
    bucket.tokens = min(per_minute, bucket.tokens + (now - bucket.updated) * per_minute / 60)
    bucket.updated = now


_guards: weakref.WeakKeyDictionary[PaymentService, NotificationGuard] = weakref.WeakKeyDictionary()


def guard_for(service: PaymentService) -> NotificationGuard:
    """One guard per service (so per process in an app; per app in tests)."""
    guard = _guards.get(service)
    if guard is None:
        guard = _guards[service] = NotificationGuard()
    return guard
