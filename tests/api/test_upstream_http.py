"""The proxy's upstream client (api/upstream_http.py) against raw asyncio servers that answer
exactly what each test needs: framing, keep-alive, a stream that waits, broken servers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from lorajobs.api import upstream_http
from lorajobs.api.upstream_http import UpstreamConnectError, UpstreamError, UpstreamPool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
HANG_GUARD_S = 30  # a hang fails the test instead of the suite


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return head, await reader.readexactly(length)


def _answer(body: bytes, *extra: bytes) -> bytes:
    return b"".join((b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n", *extra,
                     b"content-length: %d\r\n\r\n" % len(body), body))


def run(handler: Handler, test: Callable[[str, dict[str, Any]], Awaitable[None]]) -> None:
    """Serve `handler` (called per connection with its number) on a free port; run `test`."""
    async def main() -> None:
        seen: dict[str, Any] = {"connections": 0, "requests": []}

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen["connections"] += 1
            try:
                await handler(reader, writer, seen["connections"])
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            await asyncio.wait_for(test(f"http://127.0.0.1:{port}", seen), HANG_GUARD_S)

    asyncio.run(main())


async def _body(response: upstream_http.UpstreamResponse) -> bytes:
    try:
        return b"".join([chunk async for chunk in response.chunks()])
    finally:
        response.close()


def _pool(read_timeout: float = 10.0) -> UpstreamPool:
    return UpstreamPool(connect_timeout=3.0, read_timeout=read_timeout)


def test_a_kept_alive_connection_carries_the_next_request() -> None:
    requests: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      _: int) -> None:
        while True:
            requests.append(await _read_request(reader))
            writer.write(_answer(b'{"ok": %d}' % len(requests), b"x-request-id: r1\r\n"))

    async def test(url: str, seen: dict[str, Any]) -> None:
        pool = _pool()
        for n in (1, 2):
            resp = await pool.post(url + "/prefix", "/v1/chat/completions", b'{"model": "m"}',
                                   [(b"authorization", b"Bearer s")])
            assert resp.status == 200
            assert (b"x-request-id", b"r1") in resp.headers
            assert await _body(resp) == b'{"ok": %d}' % n
        assert seen["connections"] == 1
        pool.close()

    run(handler, test)
    head, body = requests[0]
    assert head.startswith(b"POST /prefix/v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nauthorization: Bearer s\r\n" in head and b"\r\nhost: 127.0.0.1:" in head
    assert body == b'{"model": "m"}'


def test_a_chunked_stream_is_relayed_as_it_comes() -> None:
    """The second chunk is only sent once the client has the first: a client that waited for
    the whole body would hang (the guard fails the test)."""
    gate: dict[str, asyncio.Event] = {}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      _: int) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n7\r\ndata: 1\r\n")
        await gate["first_read"].wait()
        writer.write(b"7\r\ndata: 2\r\n0\r\n\r\n")
        await reader.read()  # until the client closes

    async def test(url: str, _: dict[str, Any]) -> None:
        gate["first_read"] = asyncio.Event()
        pool = _pool()
        resp = await pool.post(url, "/v1/completions", b"{}", [])
        chunks = resp.chunks()
        assert await chunks.__anext__() == b"data: 1"
        gate["first_read"].set()
        assert [c async for c in chunks] == [b"data: 2"]
        resp.close()
        pool.close()

    run(handler, test)


@pytest.mark.parametrize("when", ["idle", "as_the_request_arrives"])
def test_a_connection_the_server_closed_is_not_reused(when: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      n: int) -> None:
        await _read_request(reader)
        writer.write(_answer(b"%d" % n))
        await writer.drain()
        if n == 1 and when == "as_the_request_arrives":
            await _read_request(reader)  # the second request: closed, never answered
        elif n == 2:
            await reader.read()

    async def test(url: str, seen: dict[str, Any]) -> None:
        pool = _pool()
        assert await _body(await pool.post(url, "/a", b"{}", [])) == b"1"
        if when == "idle":
            await asyncio.sleep(0.1)  # the server's close reaches the pool's connection
        # Idle: the EOF was seen, a new connection is made. As the request arrives: sent on
        # the kept-alive one, which dies before a byte of answer: once more on a new one.
        assert await _body(await pool.post(url, "/a", b"{}", [])) == b"2"
        assert seen["connections"] == 2
        pool.close()

    run(handler, test)


def test_a_body_to_the_end_of_the_connection_and_connection_close() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      _: int) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npart one, ")
        await writer.drain()
        writer.write(b"part two")

    async def test(url: str, seen: dict[str, Any]) -> None:
        pool = _pool()
        for _ in range(2):
            assert await _body(await pool.post(url, "/a", b"{}", [])) == b"part one, part two"
        assert seen["connections"] == 2  # never reused
        pool.close()

    run(handler, test)


def test_a_large_answer_to_a_slow_reader_arrives_whole() -> None:
    """More than BUFFER_HIGH: reading pauses while the consumer lags, and resumes."""
    big = bytes(range(256)) * (4 * upstream_http.BUFFER_HIGH // 256)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      _: int) -> None:
        await _read_request(reader)
        writer.write(_answer(big))
        await writer.drain()
        await reader.read()

    async def test(url: str, _: dict[str, Any]) -> None:
        pool = _pool()
        resp = await pool.post(url, "/a", b"{}", [])
        await asyncio.sleep(0.2)  # let the server fill the buffer past the mark
        assert resp._conn._paused
        assert await _body(resp) == big
        pool.close()

    run(handler, test)


def test_errors_no_server_a_silent_one_and_one_that_is_not_http() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      n: int) -> None:
        await _read_request(reader)
        if n == 2:
            writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await reader.read()  # n == 1: says nothing

    async def test(url: str, _: dict[str, Any]) -> None:
        pool = _pool(read_timeout=0.3)
        with pytest.raises(UpstreamError, match="sent nothing for 0.3 s"):
            await pool.post(url, "/a", b"{}", [])
        with pytest.raises(UpstreamError, match="not HTTP"):
            await pool.post(url, "/a", b"{}", [])
        with pytest.raises(UpstreamConnectError):
            await pool.post("http://127.0.0.1:1", "/a", b"{}", [])
        pool.close()

    run(handler, test)
