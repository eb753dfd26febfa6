"""The ways the simulator misbehaves on the wire: dropped connections, HTML error pages,
truncated JSON and a header strict parsers reject."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.responses import HTMLResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .scripts import Fault

__all__ = [
    "NON_ASCII_HEADER",
    "DroppedConnectionResponse",
    "NonAsciiHeaderMiddleware",
    "SimulatedDisconnect",
    "fault_response",
]


class SimulatedDisconnect(Exception):
    """Raised by the simulator after starting a response it will never finish.

    A real server (uvicorn) then aborts the connection; :class:`SimulatorTransport` turns it into
    ``httpx.RemoteProtocolError``.
    """


class DroppedConnectionResponse(Response):
    """Starts a response promising a body, then drops the connection without sending it."""

    def __init__(self) -> None:
        super().__init__(status_code=200, media_type="application/json")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"4096"),
                ],
            }
        )
        raise SimulatedDisconnect("simulated connection drop")


_HTML_502 = (
    "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1>"
    "</center><hr><center>nginx</center></body></html>"
)
_HTML_500 = (
    "<html><head><title>500 Internal Server Error</title></head><body><h1>Internal Server Error"
    "</h1><p>The server encountered an internal error.</p></body></html>"
)
_MALFORMED_JSON = '{"output_ResponseCode": "INS-0", '


def fault_response(fault: Fault | None) -> Response | None:
    """The answer that replaces the M-Pesa one; None for no fault and for ``slow`` (a normal
    answer, only late)."""
    if fault == "drop":
        return DroppedConnectionResponse()
    if fault == "html_502":
        return HTMLResponse(_HTML_502, status_code=502)
    if fault == "html_500":
        return HTMLResponse(_HTML_500, status_code=500)
    if fault == "malformed_json":
        return Response(_MALFORMED_JSON, status_code=200, media_type="application/json")
    return None


#: A header value a strict parser rejects: "Transação aceite" in Latin-1 (not ASCII, not UTF-8).
NON_ASCII_HEADER = (b"x-gateway-note", "Transação aceite".encode("latin-1"))


class NonAsciiHeaderMiddleware:
    """Adds ``NON_ASCII_HEADER`` to every answer while ``enabled()`` says so."""

    def __init__(self, app: ASGIApp, enabled: Callable[[], bool]) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.enabled():
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), NON_ASCII_HEADER]}
            await send(message)

        await self.app(scope, receive, send_with_header)
