"""Console pages as HTML responses: the Jinja templates beside this package (so they travel with
the copied folder), the security headers every page carries, and errors shown as pages."""

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.exceptions import HTTPException

from ..database import DATABASE_ERRORS
from ..exceptions import (
    InvalidStateTransitionError,
    PaymentError,
    PaymentNotFoundError,
    PaymentValidationError,
    UnauthorizedError,
)
from ..logger import payment_logger
from ..models import PaymentOperation, PaymentStatus
from ..redaction import sanitize_text
from ..service import PaymentService
from . import security
from .access import ConsoleAccess, ConsoleRedirect, Operator, console_path
from .views import format_age, format_money, format_when

TEMPLATES = Path(__file__).parent / "templates"

_environment = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
_environment.filters.update(
    money=format_money, when=format_when, age=format_age, safe_text=sanitize_text
)

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def render(
    request: Request,
    template: str,
    status_code: int = 200,
    operator: Operator | None = None,
    **context: Any,
) -> HTMLResponse:
    base = console_path(request)
    html = _environment.get_template(template).render(
        base=base,
        operator=operator,
        csrf_field=security.CSRF_FIELD,
        csrf=operator.csrf if operator else context.pop("csrf", ""),
        statuses=[status.value for status in PaymentStatus],
        operations=[operation.value for operation in PaymentOperation],
        **context,
    )
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


def see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def error_page(request: Request, status_code: int, message: str) -> HTMLResponse:
    return render(request, "error.html", status_code, message=message)


def http_error_page(request: Request, error: HTTPException) -> HTMLResponse:
    return error_page(request, error.status_code, str(error.detail))


def error_status(error: PaymentError) -> int:
    for kind, status in (
        (UnauthorizedError, 401),
        (PaymentNotFoundError, 404),
        (PaymentValidationError, 422),
        (InvalidStateTransitionError, 409),
    ):
        if isinstance(error, kind):
            return status
    return 502


async def run_page(
    access: ConsoleAccess,
    request: Request,
    payments: PaymentService,
    build: Callable[[Operator], Awaitable[Any]],
) -> Response:
    """Run one page: the operator first, errors as pages."""
    try:
        operator = await access.operator_of(request, payments)
        if not operator.signed_in and not operator.csrf:
            operator.csrf = security.secrets.token_urlsafe(24)
        response = await build(operator)
        return access.with_csrf_cookie(request, response, operator)
    except ConsoleRedirect as redirect:
        return see_other(redirect.url)
    except PaymentError as error:
        return error_page(request, error_status(error), sanitize_text(error.message))
    except HTTPException as error:
        return http_error_page(request, error)
    except DATABASE_ERRORS as error:
        payment_logger.error(
            "Console: database unavailable", path=request.url.path, error=type(error).__name__
        )
        return error_page(request, 503, "The payments database is unavailable.")
    except Exception:
        payment_logger.exception("Console page failed", path=request.url.path)
        return error_page(request, 500, "Something went wrong; it is logged.")
