"""Who the caller is: the default key check, the two roles, and authenticating a route's caller
before its body is read (``routing.PaymentRoute`` runs ``authenticator``; endpoints read the
identity through ``actor_dependency``)."""

import hmac
import weakref
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Header, Request, Security
from fastapi.responses import Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from pydantic import TypeAdapter, ValidationError
from starlette.exceptions import HTTPException

from .config import get_settings
from .exceptions import PaymentConfigurationError, UnauthorizedError

CUSTOMER = "customer"
STAFF = "staff"

#: The longest identity that fits ``user_id`` and the audit trail's ``actor``.
IDENTITY_MAX_LENGTH = 100

#: Documents the admin key as what it is; ``require_api_key`` does the checking.
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False)

#: Marks the dependency that makes a route authenticate first (see ``actor_dependency``).
AUTH_MARK = "_payments_auth"
_FLAG = TypeAdapter(bool)


async def require_api_key(x_api_key: Annotated[str | None, Header()] = None) -> str:
    """Default authorization: ``X-API-Key`` must equal ``PAYMENT_ADMIN_API_KEY``.

    A coroutine only so that FastAPI calls it on the event loop, not through its thread pool.

    Without a configured key everything is denied, in every environment (the demo gateway
    generates one). Returns the actor name recorded in the audit trail."""
    expected = get_settings().admin_api_key
    if expected is None:
        raise UnauthorizedError(
            "PAYMENT_ADMIN_API_KEY is not configured: the payments API is closed"
        )
    if x_api_key is None or not hmac.compare_digest(x_api_key.encode(), expected.encode()):
        raise UnauthorizedError("missing or wrong X-API-Key")
    return "admin-api-key"


def identity_of(value: Any) -> str:
    """What an auth dependency returned, as the identity recorded on payments (``user_id``) and
    audit entries (``actor``): a non-empty ``str`` of at most 100 characters (an ``int`` is
    taken as its digits). ``None`` means "not authenticated"; anything else is the host's
    mistake, answered 500 with a message saying so rather than guessed at."""
    if value is None:
        raise UnauthorizedError("not authenticated")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip() or len(value) > IDENTITY_MAX_LENGTH:
        raise PaymentConfigurationError(
            "the payments auth dependency must return the caller's identity as a non-empty str"
            f" of at most {IDENTITY_MAX_LENGTH} characters (e.g. str(user.id)), not"
            f" {type(value).__name__}",
            details={"variable": "customer_auth/staff_auth"},
        )
    return value


class AuthRule:
    """Who may call a route: ``roles`` tried in order (dependency, role name)."""

    __slots__ = ("only_with_flag", "roles")

    def __init__(
        self, roles: list[tuple[Callable[..., Any], str]], only_with_flag: str | None
    ) -> None:
        self.roles = roles
        self.only_with_flag = only_with_flag


def actor_dependency(
    roles: list[tuple[Callable[..., Any], str]], *, only_with_flag: str | None = None
) -> Callable[..., Awaitable[str | None]]:
    """The caller's identity, as ``PaymentRoute`` found it with the first of ``roles`` that
    accepted the caller, before the body was read. Every route that declares this dependency is
    authenticated first; ``only_with_flag``: only when that query flag is true
    (``/health?deep=true``)."""

    async def actor(request: Request) -> str | None:
        found = getattr(request.state, "payments_actor", None)
        if isinstance(found, str):
            return found
        if only_with_flag is not None:
            return None
        raise UnauthorizedError("not authenticated")

    async def actor_with_key(
        request: Request, _: Annotated[str | None, Security(api_key_scheme)] = None
    ) -> str | None:
        return await actor(request)

    # The default key is declared as a security scheme in the OpenAPI document; a host's own
    # auth documents itself.
    uses_key = any(auth is require_api_key for auth, _ in roles)
    dependency = actor_with_key if uses_key else actor
    setattr(dependency, AUTH_MARK, AuthRule(roles, only_with_flag))
    return dependency


def role_of(request: Request) -> str | None:
    """The role ``authenticator`` found the caller in (``CUSTOMER`` or ``STAFF``)."""
    return getattr(request.state, "payments_role", None)


class _NoApp:
    """Stands for "no app" (no dependency overrides) as a weak-referenceable key."""

    dependency_overrides: dict[Any, Any] = {}


_NO_APP = _NoApp()


def authenticator(
    rule: AuthRule, path: str, methods: list[str]
) -> Callable[[Request], Awaitable[None]]:
    """Runs the rule's dependencies (or their overrides) through FastAPI's own dependency
    machinery, on probe routes without a body, and leaves the caller's identity and role in
    ``request.state`` for the real endpoint. The first role whose dependency accepts the
    caller wins; when none does, the last one's error is the answer."""
    # One probe per app and role: its dependency overrides (the app serving the request).
    probes: weakref.WeakKeyDictionary[Any, list[Callable[[Request], Awaitable[Response]]]]
    probes = weakref.WeakKeyDictionary()

    def probe_route(auth: Callable[..., Any], role: str) -> Callable[..., Any]:
        async def probe(request: Request, identity: Annotated[Any, Depends(auth)]) -> Response:
            request.state.payments_actor = identity_of(identity)
            request.state.payments_role = role
            return Response(status_code=204)

        return probe

    def probes_for(app: Any) -> list[Callable[[Request], Awaitable[Response]]]:
        handlers = probes.get(app)
        if handlers is None:
            handlers = probes[app] = [
                APIRoute(
                    path,
                    probe_route(auth, role),
                    methods=methods,
                    dependency_overrides_provider=app,
                ).get_route_handler()
                for auth, role in rule.roles
            ]
        return handlers

    async def authenticate(request: Request) -> None:
        if rule.only_with_flag is not None:
            try:
                flag = request.query_params.get(rule.only_with_flag, "0")
                wanted = _FLAG.validate_python(flag)
            except ValidationError:
                return  # the endpoint's own parameter check answers 422
            if not wanted:
                return
        app = request.scope.get("app") or _NO_APP
        overrides = getattr(app, "dependency_overrides", {})
        handlers: list[Callable[[Request], Awaitable[Response]]] | None = None
        for index, (auth, role) in enumerate(rule.roles):
            try:
                if auth is require_api_key and require_api_key not in overrides:
                    # The default key check, not overridden: called as FastAPI would call it
                    # (the header's first value), without a probe route's dependency solving
                    # on every request.
                    identity = await require_api_key(request.headers.get("x-api-key"))
                    request.state.payments_actor = identity_of(identity)
                    request.state.payments_role = role
                    return
                if handlers is None:
                    handlers = probes_for(app)
                await handlers[index](request)
                return
            except (UnauthorizedError, HTTPException):
                if index == len(rule.roles) - 1:
                    raise

    return authenticate
