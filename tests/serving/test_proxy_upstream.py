"""What the OpenAI proxy does with what a server answers, whichever HTTP client relays it.

A real uvicorn serves the app (in a thread) with a target whose "vLLM server" is a raw socket
server answering exactly what each test needs: framing (Content-Length, chunked, to the end of
the connection, compressed bytes), keep-alive, connections the server closes, silence, an
answer that is not HTTP, a refused connection, a redirect, a large answer to a slow reader.
The unbuffered stream and its release when the client leaves: test_proxy_relay.py.
"""

from __future__ import annotations

import gzip
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import httpx

from lorajobs.core.settings import Settings
from lorajobs.localserver import free_port
from tests.servicefixtures import api_in_thread, migrated_tenant_key

HANG_GUARD_S = 30.0  # a hang fails the test instead of the suite
SERVER_KEY = "server-secret"
CHAT = b'{"model": "tiny",  "messages": [{"role": "user", "content": "hi"}]}'  # sent as is


class RawServer(threading.Thread):
    """Calls `handler(server, rfile, conn, n)` for each accepted connection (n from 1), on a
    thread of its own; `requests` holds every (head, body) read by `read_request`."""

    def __init__(self, handler: Callable[[RawServer, BinaryIO, socket.socket, int], None]):
        super().__init__(daemon=True)
        self.handler = handler
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed: the test is over
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, self.connections),
                             daemon=True).start()

    def _serve(self, conn: socket.socket, n: int) -> None:
        conn.settimeout(HANG_GUARD_S)
        with conn, conn.makefile("rb") as rfile:
            try:
                self.handler(self, rfile, conn, n)
            except (EOFError, OSError):
                pass

    def read_request(self, rfile: BinaryIO) -> bytes:
        """The next request's body (EOFError when the client closed the connection)."""
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = rfile.readline()
            if not line:
                raise EOFError
            head += line
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        body = rfile.read(length)
        self.requests.append((head, body))
        return body


def answer(body: bytes, *extra: bytes) -> bytes:
    return b"".join((b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n", *extra,
                     b"content-length: %d\r\n\r\n" % len(body), body))


@contextmanager
def proxy_to(tmp_path: Path, *urls: str, read_timeout: float = 600) -> Iterator[httpx.Client]:
    """An httpx client (the tenant's key set) to a live lorajobs whose target `t` serves
    model `tiny` at `urls`."""
    home = Path(tempfile.mkdtemp(dir=tmp_path))  # a test may start several
    settings = Settings(data_dir=home / "data", serving_read_timeout_seconds=read_timeout,
                        serving_targets=[{"name": "t", "urls": list(urls), "api_key": SERVER_KEY,
                                          "base_models": ["tiny"],
                                          "adapter_dir": str(home / "adapters")}])
    key = migrated_tenant_key(settings)
    with api_in_thread(settings, timeout=HANG_GUARD_S) as base_url, \
            httpx.Client(base_url=f"{base_url}/openai/v1", timeout=HANG_GUARD_S,
                         headers={"Authorization": f"Bearer {key}"}) as client:
        yield client


@contextmanager
def raw_server(handler: Callable[[RawServer, BinaryIO, socket.socket, int], None]
               ) -> Iterator[RawServer]:
    server = RawServer(handler)
    server.start()
    try:
        yield server
    finally:
        server.sock.close()


def _raw(client: httpx.Client, path: str = "/chat/completions",
         body: bytes = CHAT) -> tuple[httpx.Response, bytes]:
    """The answer and its body's bytes exactly as relayed (no decompression)."""
    with client.stream("POST", path, content=body,
                       headers={"content-type": "application/json"}) as resp:
        return resp, b"".join(resp.iter_raw())


def test_each_framing_is_relayed_byte_for_byte_on_one_kept_alive_connection(
        tmp_path: Path) -> None:
    sse = b"data: {\"n\": 1}\n\n"
    compressed = gzip.compress(b'{"ok": "gzip"}')

    def handler(server: RawServer, rfile: BinaryIO, conn: socket.socket, _: int) -> None:
        server.read_request(rfile)
        conn.sendall(answer(b'{"ok": 1}', b"x-request-id: r1\r\nx-other: dropped\r\n"))
        server.read_request(rfile)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n"
                     + b"%x\r\n%s\r\n" % (len(sse), sse) + b"c\r\ndata: [DONE]\r\n0\r\n\r\n")
        server.read_request(rfile)
        conn.sendall(answer(compressed, b"content-encoding: gzip\r\n"))
        server.read_request(rfile)

    with raw_server(handler) as upstream, proxy_to(tmp_path, upstream.url) as client:
        resp, body = _raw(client)
        assert (resp.status_code, body) == (200, b'{"ok": 1}')
        assert resp.headers["x-request-id"] == "r1" and "x-other" not in resp.headers
        resp, body = _raw(client, "/completions")
        assert resp.headers["content-type"] == "text/event-stream"
        assert body == sse + b"data: [DONE]"
        resp, body = _raw(client)  # relayed as sent: still compressed
        assert resp.headers["content-encoding"] == "gzip" and body == compressed
        assert upstream.connections == 1
    head, sent = upstream.requests[0]
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"\r\nauthorization: bearer {SERVER_KEY}\r\n".encode() in head.lower()
    assert sent == CHAT
    assert upstream.requests[1][0].startswith(b"POST /v1/completions HTTP/1.1\r\n")


def test_a_body_to_the_end_of_the_connection_arrives_whole_and_is_not_reused(
        tmp_path: Path) -> None:
    def handler(server: RawServer, rfile: BinaryIO, conn: socket.socket, _: int) -> None:
        server.read_request(rfile)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"connection: close\r\n\r\npart one, ")
        time.sleep(0.05)
        conn.sendall(b"part two")

    with raw_server(handler) as upstream, proxy_to(tmp_path, upstream.url) as client:
        for _ in range(2):
            resp, body = _raw(client)
            assert (resp.status_code, body) == (200, b"part one, part two")
        assert upstream.connections == 2


def test_a_connection_the_server_closed_idle_is_not_reused(tmp_path: Path) -> None:
    def handler(server: RawServer, rfile: BinaryIO, conn: socket.socket, n: int) -> None:
        server.read_request(rfile)
        conn.sendall(answer(b"%d" % n))
        if n > 1:
            server.read_request(rfile)

    with raw_server(handler) as upstream, proxy_to(tmp_path, upstream.url) as client:
        assert _raw(client)[1] == b"1"
        time.sleep(0.3)  # the server's close reaches the proxy's idle connection
        assert _raw(client)[1] == b"2"
        assert upstream.connections == 2


def test_a_kept_alive_connection_closed_as_the_request_arrives_is_retried_once(
        tmp_path: Path) -> None:
    """The server reads the second request on the kept-alive connection and closes it without
    a byte of answer (its keep-alive timeout racing the request): sent again on a new one."""
    def handler(server: RawServer, rfile: BinaryIO, conn: socket.socket, n: int) -> None:
        server.read_request(rfile)
        conn.sendall(answer(b"%d" % n))
        server.read_request(rfile)  # n == 1: closed unanswered; n == 2: the client leaves

    with raw_server(handler) as upstream, proxy_to(tmp_path, upstream.url) as client:
        assert _raw(client)[1] == b"1"
        resp, body = _raw(client)
        assert (resp.status_code, body) == (200, b"2")
        assert upstream.connections == 2
        assert [b for _, b in upstream.requests] == [CHAT] * 3


def test_a_silent_server_times_out_as_a_504(tmp_path: Path) -> None:
    """serving_read_timeout_seconds without a byte of answer: a gateway timeout naming the
    server, as a proxy answers it (it was a bare 500 internal_error before)."""
    def handler(server: RawServer, rfile: BinaryIO, conn: socket.socket, _: int) -> None:
        server.read_request(rfile)
        rfile.read()  # says nothing until the proxy gives up and closes

    with raw_server(handler) as upstream, \
            proxy_to(tmp_path, upstream.url, read_timeout=0.5) as client:
        start = time.monotonic()
        resp = client.post("/chat/completions", content=CHAT)
        assert 0.5 <= time.monotonic() - start < HANG_GUARD_S
        assert resp.status_code == 504, resp.text
        error = resp.json()["error"]
        assert error["code"] == "serving_timeout" and upstream.url in error["message"], error


def test_an_answer_that_is_not_http_or_none_at_all_is_a_clear_502(tmp_path: Path) -> None:
    def not_http(server: RawServer, rfile: BinaryIO, conn: socket.socket, _: int) -> None:
        server.read_request(rfile)
        conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        rfile.read()

    def closes(server: RawServer, rfile: BinaryIO, conn: socket.socket, _: int) -> None:
        server.read_request(rfile)  # then closes without a byte

    for handler, said in ((not_http, "not HTTP"), (closes, "closed the connection")):
        with raw_server(handler) as server, proxy_to(tmp_path, server.url) as client:
            resp = client.post("/chat/completions", content=CHAT)
            assert resp.status_code == 502, resp.text
            error = resp.json()["error"]
            assert error["code"] == "serving_unavailable"
            assert said in error["message"] and server.url in error["message"]


def test_a_refused_connection_goes_to_the_next_server_then_is_a_502(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    def handler(server: RawServer, rfile: BinaryIO, conn: socket.socket, _: int) -> None:
        server.read_request(rfile)
        conn.sendall(answer(b'{"ok": true}'))
        server.read_request(rfile)

    with raw_server(handler) as upstream, proxy_to(tmp_path, dead, upstream.url) as client:
        resp, body = _raw(client)
        assert (resp.status_code, body) == (200, b'{"ok": true}')
    with proxy_to(tmp_path, dead) as client:
        resp = client.post("/chat/completions", content=CHAT)
        assert resp.status_code == 502, resp.text
        error = resp.json()["error"]
        assert error["code"] == "serving_unavailable" and error["param"] == "model"
        assert dead in error["message"] and "'tiny'" in error["message"]


def test_a_redirect_is_relayed_not_followed(tmp_path: Path) -> None:
    def handler(server: RawServer, rfile: BinaryIO, conn: socket.socket, _: int) -> None:
        server.read_request(rfile)
        conn.sendall(b"HTTP/1.1 307 Temporary Redirect\r\nlocation: /elsewhere\r\n"
                     b"content-length: 0\r\n\r\n")
        server.read_request(rfile)

    with raw_server(handler) as upstream, proxy_to(tmp_path, upstream.url) as client:
        resp, body = _raw(client)
        assert (resp.status_code, body) == (307, b"")
        assert len(upstream.requests) == 1


def test_a_large_answer_to_a_slow_client_arrives_whole(tmp_path: Path) -> None:
    """4 MiB, more than any socket or client buffer holds, read slowly by the client."""
    big = bytes(range(256)) * (4 * 1024 * 1024 // 256)

    def handler(server: RawServer, rfile: BinaryIO, conn: socket.socket, _: int) -> None:
        server.read_request(rfile)
        conn.sendall(answer(big))
        server.read_request(rfile)

    with raw_server(handler) as upstream, proxy_to(tmp_path, upstream.url) as client, \
            client.stream("POST", "/chat/completions", content=CHAT) as resp:
        chunks = resp.iter_raw()
        received = next(chunks)
        time.sleep(0.5)  # the proxy's reading is held up by this client meanwhile
        received += b"".join(chunks)
        assert received == big
