"""The aiohttp-backed transport: what reaches the server, and errors mapped by what they prove."""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from payments.mpesa.operations import NEVER_SENT
from payments.mpesa.transport import AiohttpTransport, RequestNotWritten

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + (await reader.readexactly(length) if length else b"")


async def serve(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


@pytest.fixture
async def transport() -> AsyncIterator[AiohttpTransport]:
    transport = AiohttpTransport(max_connections=10)
    yield transport
    await transport.aclose()


async def test_sends_method_headers_body_and_decodes_the_answer(
    transport: AiohttpTransport,
) -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        body = gzip.compress(b'{"output_ResponseCode": "INS-0"}')
        writer.write(
            b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    async for base in serve(handler):
        async with httpx.AsyncClient(transport=transport) as client:
            response = await client.put(
                f"{base}/ipg/v1x/reversal/?a=1",
                json={"input_Amount": "10.00"},
                headers={"Origin": "developer.mpesa.vm.co.mz", "Authorization": "Bearer t"},
            )
    assert response.status_code == 201
    assert response.json() == {"output_ResponseCode": "INS-0"}
    request = seen[0]
    assert request.startswith(b"PUT /ipg/v1x/reversal/?a=1 HTTP/1.1\r\n")
    assert b"origin: developer.mpesa.vm.co.mz" in request.lower()
    assert b"authorization: bearer t" in request.lower()
    assert request.lower().count(b"host:") == 1
    assert request.endswith(b'{"input_Amount":"10.00"}')


async def test_refused_connection_is_connect_error(transport: AiohttpTransport) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.ConnectError):
            await client.post(f"http://127.0.0.1:{port}/", json={})


async def test_disconnect_after_the_request_is_not_a_connect_error(
    transport: AiohttpTransport,
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.close()  # the request arrived; the answer never comes

    async for base in serve(handler):
        async with httpx.AsyncClient(transport=transport) as client:
            with pytest.raises(httpx.TransportError) as info:
                await client.post(f"{base}/", json={})
    assert not isinstance(info.value, httpx.ConnectError | httpx.ConnectTimeout)
    assert isinstance(info.value, httpx.RemoteProtocolError | httpx.ReadError)


async def test_truncated_body_is_a_read_side_error(transport: AiohttpTransport) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"output_')
        await writer.drain()
        writer.close()

    async for base in serve(handler):
        async with httpx.AsyncClient(transport=transport) as client:
            with pytest.raises(httpx.TransportError) as info:
                await client.post(f"{base}/", json={})
    assert not isinstance(info.value, httpx.ConnectError | httpx.ConnectTimeout)


async def test_read_timeout(transport: AiohttpTransport) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(2)
        writer.close()

    async for base in serve(handler):
        async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(0.3)) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(f"{base}/", json={})


@pytest.mark.parametrize("method", ["POST", "PUT", "GET"])
async def test_a_request_whose_connection_drops_leaves_once(
    transport: AiohttpTransport, method: str
) -> None:
    """aiohttp re-sends "idempotent" methods (PUT: a reversal) once on a dropped connection;
    through this transport nothing is re-sent, whatever the method (issue 9.3)."""
    received: list[bytes] = []

    async def commit_then_drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await read_request(reader))  # the server has it, and commits it
        writer.close()  # ... and the answer never comes

    async for base in serve(commit_then_drop):
        with pytest.raises(httpx.TransportError):
            await transport.handle_async_request(
                httpx.Request(method, f"{base}/ipg/v1x/reversal/", json={"input_Amount": "1"})
            )
    assert len(received) == 1


async def test_a_non_ascii_header_byte_never_loses_the_answer(transport: AiohttpTransport) -> None:
    """The gateway sends header bytes a strict parser rejects (wire reference §1): the answer
    that arrived is kept, the header's bytes as they came."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        body = b'{"output_ResponseCode": "INS-0"}'
        writer.write(
            b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
            b"X-Gateway-Note: Transa\xe7\xe3o aceite\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    async for base in serve(handler):
        response = await transport.handle_async_request(httpx.Request("POST", f"{base}/", json={}))
        await response.aread()
    assert response.status_code == 201
    assert response.json() == {"output_ResponseCode": "INS-0"}
    assert (b"X-Gateway-Note", b"Transa\xe7\xe3o aceite") in response.headers.raw


async def test_a_pooled_connection_found_closing_sends_nothing_and_says_so(
    transport: AiohttpTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server closes an idle keep-alive connection just after the pool handed it out (a busy
    event loop between the hand-out and the write): aiohttp refuses to write to the closing
    connection, nothing reaches the server, and the error says the request never left
    (``RequestNotWritten``, which a payment may send again on another connection)."""
    received: list[bytes] = []
    asked: list[int] = []

    def closing_once_handed_out() -> bool:
        asked.append(1)
        return len(asked) > 1  # open when the pool checks it; closing at the write

    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                received.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                break
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
        writer.close()

    async for base in serve(keep_alive):
        request = httpx.Request("POST", f"{base}/ipg/v1x/c2bPayment/singleStage/", json={"a": 1})
        first = await transport.handle_async_request(request)
        assert first.status_code == 200
        connector = transport._client_session().connector
        assert connector is not None
        (pooled,) = [protocol for idle in connector._conns.values() for protocol, _ in idle]
        socket_transport = pooled.transport
        assert socket_transport is not None
        monkeypatch.setattr(socket_transport, "is_closing", closing_once_handed_out)
        with pytest.raises(RequestNotWritten) as info:
            await transport.handle_async_request(
                httpx.Request("POST", f"{base}/ipg/v1x/c2bPayment/singleStage/", json={"a": 2})
            )
        assert isinstance(info.value, NEVER_SENT)
        monkeypatch.undo()
    assert len(received) == 1
