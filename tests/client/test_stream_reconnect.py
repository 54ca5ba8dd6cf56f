"""`Client.jobs.stream_events` when a stream ends early: the SDK reconnects with
`Last-Event-ID` and loses or repeats nothing. The server is an `httpx.MockTransport` here (the
live server's maximum duration is tested in tests/api/test_streams.py): it scripts what a
proxy, a broken network or an older server does to a stream.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from lorajobs.client import APIConnectionError, AuthenticationError, Client

JOB = "job_000000000000000000000002"
SSE = {"content-type": "text/event-stream"}


def frame(event_id: int) -> bytes:
    data = {"id": event_id, "type": "progress", "level": "info", "message": f"e{event_id}",
            "data": {}, "created_at": "2026-12-01T00:00:00Z"}
    return f"id: {event_id}\nevent: progress\ndata: {json.dumps(data)}\n\n".encode()


class Broken(httpx.SyncByteStream):
    """Some bytes, then the connection breaks."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __iter__(self) -> Iterator[bytes]:
        yield self.body
        raise httpx.ReadError("connection reset (test)")


class Script:
    """Answers each stream request with the next scripted response; GET job -> `status`."""

    def __init__(self, *responses: httpx.Response, status: str = "running") -> None:
        self.responses = list(responses)
        self.status = status
        self.cursors: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events/stream"):
            self.cursors.append(request.headers.get("Last-Event-ID"))
            return self.responses.pop(0)
        if request.url.path == f"/v1/jobs/{JOB}":
            return httpx.Response(200, json={"id": JOB, "status": self.status})
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no"}})


def _stream(script: Script, max_retries: int = 3) -> list[int]:
    with Client("http://server.test", "lj_x", transport=httpx.MockTransport(script),
                max_retries=max_retries) as client:
        return [e.id for e in client.jobs.stream_events(JOB)]


def test_a_closed_stream_is_resumed_until_end() -> None:
    script = Script(
        httpx.Response(200, headers=SSE, stream=httpx.ByteStream(frame(1) + frame(2))),
        httpx.Response(200, headers=SSE, stream=Broken(frame(3))),
        httpx.Response(200, headers=SSE, stream=httpx.ByteStream(
            frame(4) + b'event: end\ndata: {"reason": "finished"}\n\n')))
    assert _stream(script) == [1, 2, 3, 4]
    assert script.cursors == [None, "2", "3"]


def test_a_server_without_end_closing_a_finished_jobs_stream() -> None:
    """An older server just closes the stream of a terminal job: the SDK asks the job."""
    script = Script(
        httpx.Response(200, headers=SSE, stream=httpx.ByteStream(frame(1))),
        httpx.Response(200, headers=SSE, stream=httpx.ByteStream(b"")), status="succeeded")
    assert _stream(script) == [1]
    assert script.cursors == [None, "1"]


def test_a_stream_that_keeps_closing_at_once_is_an_error() -> None:
    empty = [httpx.Response(200, headers=SSE, stream=httpx.ByteStream(b"")) for _ in range(2)]
    with pytest.raises(APIConnectionError, match="keeps closing"):
        _stream(Script(*empty), max_retries=1)


def test_a_revoked_key_raises() -> None:
    revoked = (b'event: error\ndata: {"error": {"code": "unauthorized", '
               b'"message": "API key revoked", "param": "Authorization"}}\n\n')
    script = Script(httpx.Response(200, headers=SSE, stream=httpx.ByteStream(
        frame(1) + revoked)))
    with pytest.raises(AuthenticationError, match="API key revoked") as err:
        _stream(script)
    assert err.value.status == 401 and script.cursors == [None]
