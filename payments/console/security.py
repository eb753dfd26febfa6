"""Who is asking, for the console and the metrics: the host's auth dependency run as FastAPI runs
it (with the app's dependency overrides), or, for the built-in admin key, a signed session cookie.

The cookie holds the operator's name, a random CSRF nonce and an expiry, signed with HMAC-SHA256
under a secret derived from the admin key (and the M-Pesa API key): never the key itself. A new
admin key ends every session. Phone-number filters travel in links as Fernet tokens under a key
derived the same way, so no page, link or log of the console carries a full number.
"""

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from cryptography.fernet import Fernet, InvalidToken
from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute

from ..config import PaymentSettings

SESSION_COOKIE = "payments_console"
CSRF_COOKIE = "payments_console_csrf"
CSRF_FIELD = "csrf_token"
SESSION_SECONDS = 8 * 3600
_OPERATOR_NAME = re.compile(r"[A-Za-z0-9 ._@-]{1,40}", re.ASCII)


def _secret(settings: PaymentSettings, purpose: str) -> bytes:
    admin = settings.admin_api_key or ""
    material = f"payments-console-v1\0{purpose}\0{settings.api_key}\0{admin}".encode()
    return hashlib.sha256(material).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def operator_name(raw: str | None) -> str | None:
    """The name an operator gives at sign-in, if it is a plain short name."""
    name = (raw or "").strip()
    return name if name and _OPERATOR_NAME.fullmatch(name) else None


def issue_session(settings: PaymentSettings, actor: str) -> tuple[str, str]:
    """(cookie value, CSRF nonce) of a new session for ``actor``."""
    nonce = secrets.token_urlsafe(24)
    payload = _b64(
        json.dumps(
            {"a": actor, "n": nonce, "e": int(time.time()) + SESSION_SECONDS},
            separators=(",", ":"),
        ).encode()
    )
    signature = hmac.new(_secret(settings, "session"), payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{_b64(signature)}", nonce


def read_session(settings: PaymentSettings, cookie: str | None) -> tuple[str, str] | None:
    """(actor, CSRF nonce) of a valid, unexpired session cookie; else ``None``."""
    if not cookie or len(cookie) > 1024 or "." not in cookie or settings.admin_api_key is None:
        return None
    payload, _, signature = cookie.partition(".")
    expected = hmac.new(_secret(settings, "session"), payload.encode(), hashlib.sha256).digest()
    try:
        if not hmac.compare_digest(_unb64(signature), expected):
            return None
        values = json.loads(_unb64(payload))
    except (ValueError, TypeError):
        return None
    if not isinstance(values, dict) or int(values.get("e", 0)) < time.time():
        return None
    actor, nonce = values.get("a"), values.get("n")
    if not isinstance(actor, str) or not isinstance(nonce, str):
        return None
    return actor, nonce


def tokens_match(given: str | None, expected: str | None) -> bool:
    return bool(given and expected) and hmac.compare_digest(
        str(given).encode(), str(expected).encode()
    )


def set_cookie(response: Response, request: Request, name: str, value: str, path: str) -> None:
    response.set_cookie(
        name,
        value,
        max_age=SESSION_SECONDS,
        path=path,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def phone_token(settings: PaymentSettings, digits: str) -> str:
    key = base64.urlsafe_b64encode(_secret(settings, "phone"))
    return Fernet(key).encrypt(digits.encode()).decode()


def phone_from_token(settings: PaymentSettings, token: str) -> str | None:
    key = base64.urlsafe_b64encode(_secret(settings, "phone"))
    try:
        return Fernet(key).decrypt(token.encode(), ttl=SESSION_SECONDS).decode()
    except (InvalidToken, ValueError):
        return None


# -- running a host's auth dependency ------------------------------------------------------------

_probes: weakref.WeakKeyDictionary[Any, dict[Any, Callable[[Request], Awaitable[Response]]]] = (
    weakref.WeakKeyDictionary()
)


class _NoApp:
    dependency_overrides: dict[Any, Any] = {}


_NO_APP = _NoApp()


async def run_auth(request: Request, auth: Callable[..., Any]) -> str:
    """Run ``auth`` (or the app's override of it) through FastAPI's own dependency machinery and
    return the caller's name. Raises whatever the dependency raises (a 401/403 of the host)."""
    app = request.scope.get("app") or _NO_APP
    per_app = _probes.setdefault(app, {})
    handler = per_app.get(auth)
    if handler is None:

        async def probe(request: Request, actor: Annotated[Any, Depends(auth)]) -> Response:
            request.state.payments_console_actor = actor
            return Response(status_code=204)

        route = APIRoute(
            request.url.path,
            probe,
            methods=[request.method],
            dependency_overrides_provider=app,
        )
        handler = per_app[auth] = route.get_route_handler()
    await handler(request)
    actor = getattr(request.state, "payments_console_actor", None)
    return str(actor) if actor is not None else "staff"


def overridden(request: Request, auth: Callable[..., Any]) -> bool:
    app = request.scope.get("app")
    return bool(app is not None and auth in getattr(app, "dependency_overrides", {}))
