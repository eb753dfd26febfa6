"""Signing in to the console with the admin key (a signed session cookie named for the operator)
and signing out. With a host's own staff auth there is no form: both routes go to the overview."""

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from ..service import PaymentService
from . import security
from .access import ConsoleAccess, ConsoleRedirect, console_path, read_form, same_origin
from .rendering import http_error_page, render, see_other


def add_sign_in_routes(
    router: APIRouter, access: ConsoleAccess, provide_service: Callable[..., Any]
) -> None:
    Service = Annotated[PaymentService, Depends(provide_service)]

    @router.get("/login", name="payments_console_login")
    async def login_form(request: Request, payments: Service) -> Response:
        if not access.uses_key(request):
            return see_other(console_path(request))
        csrf = request.cookies.get(security.CSRF_COOKIE) or security.secrets.token_urlsafe(24)
        response = render(request, "login.html", csrf=csrf)
        security.set_cookie(response, request, security.CSRF_COOKIE, csrf, console_path(request))
        return response

    @router.post("/login")
    async def login(request: Request, payments: Service) -> Response:
        if not access.uses_key(request):
            return see_other(console_path(request))
        try:
            if not same_origin(request):
                raise HTTPException(403, "cross-site form posts are refused")
            form = await read_form(request)
        except HTTPException as error:
            return http_error_page(request, error)
        csrf = request.cookies.get(security.CSRF_COOKIE)
        if not security.tokens_match(form.get(security.CSRF_FIELD), csrf):
            return render(
                request, "login.html", 403, csrf=csrf or "", error="Reload the page and sign in."
            )
        expected = payments.settings.admin_api_key
        if expected is None or not security.tokens_match(form.get("api_key"), expected):
            return render(
                request, "login.html", 401, csrf=csrf or "", error="Wrong key: not signed in."
            )
        name = security.operator_name(form.get("operator"))
        actor = f"{name} (admin key)" if name else "admin-api-key"
        cookie, _ = security.issue_session(payments.settings, actor)
        response = see_other(console_path(request))
        security.set_cookie(
            response, request, security.SESSION_COOKIE, cookie, console_path(request)
        )
        return response

    @router.post("/logout")
    async def logout(request: Request, payments: Service) -> Response:
        try:
            await access.checked_post(request, payments)
        except ConsoleRedirect as redirect:
            return see_other(redirect.url)
        except HTTPException as error:
            return http_error_page(request, error)
        response = see_other(console_path(request) + "login")
        response.delete_cookie(
            security.SESSION_COOKIE,
            path=console_path(request),
            httponly=True,
            samesite="strict",
        )
        return response
