"""The OpenAI proxy relays a stream as it comes and lets go of the server when the client does.

A real uvicorn serves the app (in a thread); the vLLM server is a raw socket server that sends
the first SSE event and then nothing more until its connection closes: a proxy that waited for
the whole answer would never deliver that event (the client's read timeout fails the test),
and a proxy that kept reading after its client left would never close that connection.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lorajobs.core.settings import Settings
from tests.servicefixtures import api_in_thread, migrated_tenant_key

HANG_GUARD_S = 30.0  # a relay that buffers or never lets go fails here, instead of hanging


class SilentAfterFirstEvent(threading.Thread):
    """Answers one request with the head of a chunked SSE stream and one event, then waits
    for the connection to close (`closed` is set once it has)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.closed = threading.Event()
        self.request = b""

    def run(self) -> None:
        conn, _ = self.sock.accept()
        conn.settimeout(HANG_GUARD_S)
        with conn:
            while b"\r\n\r\n" not in self.request:
                self.request += conn.recv(65536)
            event = b"data: {\"choices\": [{\"delta\": {\"content\": \"Hel\"}}]}\n\n"
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n"
                         + b"%x\r\n" % len(event) + event + b"\r\n")
            try:
                while conn.recv(65536):
                    pass
                self.closed.set()
            except TimeoutError:
                pass


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[tuple[str, str, SilentAfterFirstEvent]]:
    upstream = SilentAfterFirstEvent()
    upstream.start()
    settings = Settings(data_dir=tmp_path / "data", serving_targets=[
        {"name": "t", "urls": [upstream.url], "base_models": ["tiny"],
         "adapter_dir": str(tmp_path / "adapters")}])
    key = migrated_tenant_key(settings)
    try:
        with api_in_thread(settings, timeout=HANG_GUARD_S) as base_url:
            yield base_url, key, upstream
    finally:
        upstream.sock.close()


def test_a_stream_is_relayed_as_it_comes_and_released_when_the_client_leaves(
        proxy: tuple[str, str, SilentAfterFirstEvent]) -> None:
    api, key, upstream = proxy
    body = {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=HANG_GUARD_S) as client, client.stream(
            "POST", f"{api}/openai/v1/chat/completions", json=body,
            headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "text/event-stream"
        first = next(resp.iter_raw())  # the server has sent nothing else, and will not
        assert first.startswith(b"data: ") and b"Hel" in first
    # The client left mid-stream: the proxy closes its connection to the server.
    assert upstream.closed.wait(HANG_GUARD_S)
    assert upstream.request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
