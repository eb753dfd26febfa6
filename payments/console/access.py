"""Who is using the console and whether a post may act: the operator (the built-in key's signed
session, or the host's own staff auth with a double-submit CSRF cookie), the same-origin and CSRF
checks on every form post, and the capped reading of those forms."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from fastapi import Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from ..service import PaymentService
from . import security

FORM_MAX_BYTES = 16 * 1024


class ConsoleRedirect(Exception):
    """Raised inside a page to send the browser elsewhere (303), e.g. to the sign-in form."""

    def __init__(self, url: str) -> None:
        self.url = url


@dataclass
class Operator:
    actor: str
    csrf: str
    signed_in: bool  # by the built-in key's session (so sign-out applies)


def console_path(request: Request) -> str:
    """The console's root path as this request reached it (whatever the host's prefix)."""
    path = request.url.path
    index = path.find("/console/")
    return path[: index + len("/console/")] if index >= 0 else path.rstrip("/") + "/"


async def read_form(request: Request) -> dict[str, str]:
    """The urlencoded body of a console form, capped (no multipart parser needed)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise HTTPException(415, "console forms are application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_MAX_BYTES:
            raise HTTPException(413, "form too large")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(400, "malformed form") from None
    if any("\x00" in key or "\x00" in value for key, value in pairs):
        raise HTTPException(400, "form fields must not contain NUL characters")
    return dict(pairs)


def same_origin(request: Request) -> bool:
    """A browser's Origin (sent on every cross-site POST) must be this host."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":  # privacy settings send "null": the token decides
        return True
    host = request.headers.get("host", "")
    return urlsplit(origin).netloc == host


@dataclass(frozen=True)
class ConsoleAccess:
    """The console's view of the router's staff dependency. ``auth`` is that dependency; when it
    is ``builtin_auth`` (the admin key) and not overridden in the app, operators sign in with the
    key and keep a signed session cookie instead."""

    auth: Callable[..., Any]
    builtin_auth: Callable[..., Any]

    def uses_key(self, request: Request) -> bool:
        return self.auth is self.builtin_auth and not security.overridden(
            request, self.builtin_auth
        )

    async def operator_of(self, request: Request, payments: PaymentService) -> Operator:
        """The signed-in operator, or a redirect to the sign-in form / an error page."""
        settings = payments.settings
        if self.uses_key(request):
            session = security.read_session(settings, request.cookies.get(security.SESSION_COOKIE))
            if session is None:
                raise ConsoleRedirect(console_path(request) + "login")
            return Operator(actor=session[0], csrf=session[1], signed_in=True)
        actor = await security.run_auth(request, self.auth)
        csrf = request.cookies.get(security.CSRF_COOKIE) or ""
        return Operator(actor=actor, csrf=csrf, signed_in=False)

    async def checked_post(
        self, request: Request, payments: PaymentService
    ) -> tuple[Operator, dict[str, str]]:
        """The operator and form of a post that passed the same-origin and CSRF checks."""
        if not same_origin(request):
            raise HTTPException(403, "cross-site form posts are refused")
        operator = await self.operator_of(request, payments)
        form = await read_form(request)
        if not security.tokens_match(form.get(security.CSRF_FIELD), operator.csrf):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
        return operator, form

    def with_csrf_cookie(
        self, request: Request, response: Response, operator: Operator
    ) -> Response:
        """Host-auth mode: a double-submit CSRF cookie, set once per browser."""
        if not operator.signed_in and not request.cookies.get(security.CSRF_COOKIE):
            security.set_cookie(
                response, request, security.CSRF_COOKIE, operator.csrf, console_path(request)
            )
        return response
