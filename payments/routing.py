"""The router's route class: what must happen before FastAPI reads and parses a body (NUL check,
authentication, body cap), and every error mapped to the module's answers inside the router."""

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import Message

from .auth import AUTH_MARK, AuthRule, authenticator
from .config import get_settings
from .database import DATABASE_ERRORS
from .exceptions import PaymentError, PaymentStorageError
from .http_errors import error_json, error_response, validation_errors_response, validation_response
from .logger import payment_logger
from .notification_limits import read_capped

#: Endpoints that read (and bound) their body themselves: the callback.
_OWN_BODY_MARK = "_payments_reads_own_body"
_BODY_METHODS = {"POST", "PUT", "PATCH"}


class _BodyTooLarge(Exception):
    pass


def reads_own_body(endpoint: Callable[..., Any]) -> None:
    """Marks ``endpoint`` as reading (and bounding) its body itself: ``PaymentRoute`` leaves it
    unread. Seen by the routes made when the router is included in an app."""
    setattr(endpoint, _OWN_BODY_MARK, True)


class PaymentRoute(APIRoute):
    """Maps errors inside the router itself, so hosts need no exception handlers of their own.

    It also runs the checks that must come before FastAPI reads and parses a body: NUL
    characters in the path or query are refused, the caller is authenticated (a request without
    a valid key costs no body read), and the body is capped at ``PAYMENT_MAX_BODY_BYTES``, by
    ``Content-Length`` and while it streams in."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()
        auth_rule: AuthRule | None = next(
            (
                getattr(dependency.call, AUTH_MARK)
                for dependency in self.dependant.dependencies
                if hasattr(dependency.call, AUTH_MARK)
            ),
            None,
        )
        authenticate = (
            authenticator(auth_rule, self.path, list(self.methods or ["GET"]))
            if auth_rule is not None
            else None
        )
        body_read_by_endpoint = getattr(self.endpoint, _OWN_BODY_MARK, False)

        async def route(request: Request) -> Response:
            try:
                refused = _nul_in_request(request)
                if refused is not None:
                    return refused
                if authenticate is not None:
                    await authenticate(request)
                if request.method in _BODY_METHODS and not body_read_by_endpoint:
                    request = await _with_capped_body(request)
                return await handler(request)
            except _BodyTooLarge:
                limit = get_settings().payment_max_body_bytes
                return error_json(
                    413,
                    "payload_too_large",
                    f"the body is larger than {limit} bytes",
                    max_bytes=limit,
                )
            except RequestValidationError as error:
                return validation_response(error)
            except PaymentError as error:
                return error_response(error)
            except HTTPException as error:
                if not _is_body_parse_error(error):
                    # The host's own (its auth answering 401/403, its session dependency): its
                    # status, detail and headers, rendered by the host app's handlers.
                    raise
                return error_json(error.status_code, "bad_request", str(error.detail))
            except DATABASE_ERRORS as error:
                payment_logger.error(
                    "Database unavailable", path=request.url.path, error=type(error).__name__
                )
                return error_response(PaymentStorageError("the payment database is unavailable"))

        return route


def _is_body_parse_error(error: HTTPException) -> bool:
    """FastAPI's own answer to a body it could not read (``fastapi.routing`` raises it from the
    parse error); every other ``HTTPException`` came from the host and passes through."""
    return (
        error.status_code == 400
        and error.detail == "There was an error parsing the body"
        and error.__cause__ is not None
    )


def _nul_in_request(request: Request) -> JSONResponse | None:
    """NUL characters cannot be stored or looked up in PostgreSQL: an input error, found here,
    not a storage alarm later."""
    errors = [
        {"field": name, "reason": "must not contain NUL characters"}
        for name, value in request.path_params.items()
        if "\x00" in str(value)
    ]
    errors += [
        {"field": name, "reason": "must not contain NUL characters"}
        for name, value in request.query_params.multi_items()
        if "\x00" in value or "\x00" in name
    ]
    return validation_errors_response(errors) if errors else None


async def _with_capped_body(request: Request) -> Request:
    """The request with its body read, at most ``PAYMENT_MAX_BODY_BYTES`` of it."""
    limit = get_settings().payment_max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise _BodyTooLarge
    body = await read_capped(request.stream(), limit)
    if body is None:
        raise _BodyTooLarge
    delivered = False
    receive = request.receive

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return Request(request.scope, replay)
