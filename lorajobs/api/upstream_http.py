"""The OpenAI proxy's HTTP/1.1 client to the vLLM servers: asyncio + httptools, kept-alive.

    UpstreamPool.post(server_url, path, body, headers) ─▶ UpstreamResponse(status, headers)
        ─▶ async for chunk in response.chunks(): ...   (the body as it arrives; de-chunked,
                                                        never decompressed: relayed as is)
        ─▶ response.close()   (a connection whose answer was read to its end goes back
                               to the pool; any other is closed)

Why not httpx: per proxied completion, httpx + httpcore + h11 + anyio's cancel scopes were
~0.8 ms of the API's CPU, half of what the proxy cost; on 2 loaded cores a request's wall
time grows with its CPU (bench/proxy_bench.py). This client does only what the relay needs:
one POST with a body in memory, the answer's status and headers, its body streamed with flow
control (reading pauses while BUFFER_HIGH bytes wait for a slow client), httptools (the C
parser uvicorn uses) for the framing: Content-Length, chunked, or to the end of the connection.

Errors: `UpstreamConnectError` when no connection could be made (the proxy tries the next
server), `UpstreamError` for a connection that failed, timed out (`read_timeout` without a
byte) or answered what is not HTTP. A kept-alive connection the server closed while idle is
never reused (its EOF has been seen); one that fails before a byte of the answer (the server
closed it as the request went out) is retried once on a new connection.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from functools import lru_cache
from typing import cast
from urllib.parse import urlsplit

import httptools

__all__ = ["UpstreamPool", "UpstreamResponse", "UpstreamError", "UpstreamConnectError"]

# Bytes of an answer read ahead of the client; past it the socket is not read until the
# client takes some (TCP then slows the server down).
BUFFER_HIGH = 256 * 1024
# An idle connection is reused for this long: under the servers' own keep-alive timeout
# (uvicorn's default, vLLM's server: 5 s) so it is not closed under a request being sent.
IDLE_SECONDS = 4.0
MAX_IDLE_PER_SERVER = 64


class UpstreamError(Exception):
    """The server's connection failed, timed out or answered what is not HTTP."""


class UpstreamConnectError(UpstreamError):
    """No connection could be made: the next server may answer."""


@lru_cache(maxsize=1024)
def _origin(server: str, path: str) -> tuple[str, str, int, bytes, bytes]:
    """("http", host, port, Host header, request target) of `server` + `path`."""
    parts = urlsplit(server.rstrip("/") + path)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamConnectError(f"{server!r} is not an http(s) URL")
    port = parts.port or (443 if scheme == "https" else 80)
    host_header = parts.netloc.rpartition("@")[2].encode("ascii")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, parts.hostname, port, host_header, target.encode("ascii")


class _Connection(asyncio.Protocol):
    """One socket, one request at a time; the parser's callbacks fill the response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._headers_done = False
        self._keep_alive = False
        self._complete = False
        self._received = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the server switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"the server's answer is not HTTP/1.1: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self._complete and self._headers_done and exc is None \
                and self._parser.get_status_code() and not self._framed():
            self._complete = True  # a body that runs to the end of the connection
            self._wake()
        else:
            self._fail(UpstreamError(f"the server closed the connection: {exc or 'EOF'}"))

    def pause_writing(self) -> None:  # the request is in memory and small: nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks --
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        # Asked here: once the message is complete the parser has reset and answers False.
        self._keep_alive = self._parser.should_keep_alive()
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > BUFFER_HIGH and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._complete = True
        self._wake()

    # -- the request --
    def send(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        self._parser = httptools.HttpResponseParser(self)
        self._headers, self._body, self._buffered = [], deque(), 0
        self._headers_done = self._keep_alive = self._complete = self._received = False
        self._error = None
        self.transport.write(head + body)

    def _framed(self) -> bool:
        return any(n in (b"content-length", b"transfer-encoding") for n, _ in self._headers)

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self._complete:
            self._error = error
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = loop.call_later(timeout, self._timed_out, timeout)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _timed_out(self, timeout: float) -> None:
        self._fail(UpstreamError(f"the server sent nothing for {timeout:g} s"))

    async def head(self, timeout: float) -> tuple[int, list[tuple[bytes, bytes]]]:
        while not self._headers_done:
            if self._error is not None:
                raise self._error
            await self._wait(timeout)
        return self._parser.get_status_code(), self._headers

    async def chunks(self, timeout: float) -> AsyncIterator[bytes]:
        while True:
            if self._body:
                chunk = self._body.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered <= BUFFER_HIGH // 2 \
                        and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                yield chunk
            elif self._complete:
                return
            elif self._error is not None:
                raise self._error
            else:
                await self._wait(timeout)

    def reusable(self) -> bool:
        return self._complete and self._keep_alive and not self.closed and self._error is None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamResponse:
    """A server's answer: `status`, `headers` ((lowercase name, value) bytes pairs), and its
    body from `chunks()`; `close()` (always: the relay's `finally`) frees the connection."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, str, int], conn: _Connection,
                 status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.headers = headers
        self._pool, self._key, self._conn = pool, key, conn
        self._released = False

    def chunks(self) -> AsyncIterator[bytes]:
        return self._conn.chunks(self._pool.read_timeout)

    def close(self) -> None:
        if not self._released:
            self._released = True
            self._pool._release(self._key, self._conn)


class UpstreamPool:
    """Kept-alive connections per server (scheme, host, port), for one event loop."""

    def __init__(self, *, connect_timeout: float, read_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def post(self, server: str, path: str, body: bytes,
                   headers: list[tuple[bytes, bytes]]) -> UpstreamResponse:
        """POST `body` to `server` + `path`; the answer once its headers arrived."""
        scheme, host, port, host_header, target = _origin(server, path)
        key = (scheme, host, port)
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # connections belong to the loop that made them
            self._idle, self._loop = {}, loop
        head = b"".join((b"POST ", target, b" HTTP/1.1\r\nhost: ", host_header,
                         b"\r\ncontent-length: ", str(len(body)).encode(), b"\r\n",
                         *(n + b": " + v + b"\r\n" for n, v in headers), b"\r\n"))
        for attempt in (1, 2):
            conn, reused = self._idle_connection(key), True
            if conn is None:
                conn, reused = await self._connect(key), False
            conn.send(head, body)
            try:
                status, response_headers = await conn.head(self.read_timeout)
            except UpstreamError:
                conn.close()
                # A kept-alive connection the server closed as the request went out: it
                # read none of it. Once more on a new connection.
                if reused and not conn._received and attempt == 1:
                    continue
                raise
            except BaseException:  # cancelled (the client went away): never reused
                conn.close()
                raise
            return UpstreamResponse(self, key, conn, status, response_headers)
        raise AssertionError("unreachable")

    def _idle_connection(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_SECONDS:
                return conn
            conn.close()
        return None

    async def _connect(self, key: tuple[str, str, int]) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        context = self._ssl_context() if scheme == "https" else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    _Connection, host, port, ssl=context,
                    server_hostname=host if context else None)
        except (OSError, TimeoutError) as exc:
            raise UpstreamConnectError(f"{type(exc).__name__}: {exc}") from exc
        return conn

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _release(self, key: tuple[str, str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if conn.reusable() and len(idle) < MAX_IDLE_PER_SERVER:
            conn.idle_since = time.monotonic()
            idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

