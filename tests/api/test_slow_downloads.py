"""Slow-reading clients and one tenant's stalled bodies against a live uvicorn (issue 10,
item 1, continued), over raw sockets; helpers from test_slow_clients.

Before: a request kept its slot until its whole response was sent, and FileResponse / the tar
StreamingResponse waited on TCP flow control without a timeout: 16 downloads read at 1 byte/s
held every slot indefinitely. Now a request gives its slot back once its response has started
(the route and its session are done) and a body send that does not complete within
`response_send_timeout_seconds` ends the response and closes the connection. And one tenant's
stalled JSON bodies could reserve the whole 64 MiB body budget from their Content-Length, so
every other tenant's POST waited: now a tenant holds at most a quarter of it (429 past it) and
the wait for room is bounded (503).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from lorajobs.api.limits import BUFFERED_BODIES_BYTES, _ByteBudget, _NoRoom
from tests.api.test_slow_clients import _port, _response, _stall, _status
from tests.servicefixtures import LiveService, wait_for

pytestmark = pytest.mark.timeout(120)

LIMIT = 16  # the default api_max_concurrent_requests
BODY_TIMEOUT = 3.0
SEND_TIMEOUT = 2.0  # response_send_timeout_seconds
ANSWER_WITHIN = 1.0  # seconds, for another request while the sockets stall
FILE_SIZE = 8 * 1024 * 1024  # more than the socket buffers on both sides and uvicorn's
GAVE_UP = "did not complete within"  # the API's log line for an abandoned response


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    svc = LiveService(tmp_path_factory.mktemp("slowread"), "sqlite",
                      body_timeout_seconds=BODY_TIMEOUT,
                      response_send_timeout_seconds=SEND_TIMEOUT)
    assert svc.settings.api_max_concurrent_requests == LIMIT
    svc.migrate()
    svc.start_api()
    try:
        yield svc
    finally:
        svc.close()


def _tenant_key(svc: LiveService, name: str) -> str:
    """A key of a new tenant, written straight to the service's database."""
    from lorajobs.core import keys
    from lorajobs.core.db import get_sessionmaker

    with get_sessionmaker(svc.settings)() as session:
        tenant = keys.create_tenant(session, name=name)
        _, plaintext = keys.create_key(session, tenant_id=tenant.id, name=name)
        session.commit()
    return plaintext


def _big_artifact(svc: LiveService, size: int) -> tuple[str, str]:
    """A finished job of the admin's tenant with one `size`-byte adapter file: (job, artifact)."""
    from sqlalchemy import select

    from lorajobs.core.db import get_sessionmaker
    from lorajobs.core.storage import get_store
    from lorajobs.core.tables import ApiKey, Artifact, Job, new_id

    data = random.Random(7).randbytes(size)
    src = svc.tmp_path / "big.safetensors"
    src.write_bytes(data)
    job_id, artifact_id = new_id("job"), new_id("art")
    key = f"jobs/{job_id}/adapter/None/adapter_model.safetensors"
    get_store(svc.settings).put_file(key, src)
    with get_sessionmaker(svc.settings)() as session:
        tenant_id = session.scalars(select(ApiKey.tenant_id)).one()
        session.add(Job(id=job_id, tenant_id=tenant_id, status="succeeded", base_model="tiny",
                        training_file="ds_none", spec={}))
        session.flush()  # the job row before its artifact's foreign key
        session.add(Artifact(id=artifact_id, job_id=job_id, kind="adapter", step=None,
                             name="adapter_model.safetensors", storage_key=key, size=size,
                             sha256=hashlib.sha256(data).hexdigest()))
        session.commit()
    return job_id, artifact_id


def _unread_get(svc: LiveService, path: str) -> socket.socket:
    """An authenticated GET whose client will read one byte of the answer, then nothing: its
    receive buffer is tiny, so the server's sends soon block on TCP flow control."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    sock.settimeout(15)
    sock.connect(("127.0.0.1", _port(svc)))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Authorization: Bearer {svc.admin_key}\r\n\r\n".encode())
    return sock


def _timed(call: object) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    resp = call()  # type: ignore[operator]
    return resp, time.monotonic() - start


def test_slow_downloads_hold_no_slot(server: LiveService) -> None:
    """LIMIT + 4 downloads of an 8 MiB file (single file and tar), each read 1 byte and then
    no more: every response starts (old code: LIMIT did, holding every slot for as long as
    they were not read; the 4 others waited for one), no slot stays taken, and an
    authenticated GET /v1/jobs answers within 1 s. After response_send_timeout_seconds the
    server gives each up and closes its connection: reading on gets the bytes already sent,
    then EOF, short of the file (old code: all of it, then the connection stays open)."""
    job_id, artifact_id = _big_artifact(server, FILE_SIZE)
    paths = ([f"/v1/jobs/{job_id}/artifacts/{artifact_id}"] * LIMIT
             + [f"/v1/jobs/{job_id}/adapter"] * 4)
    gave_up_before = server.log("api").count(GAVE_UP)
    socks = [_unread_get(server, path) for path in paths]
    try:
        for sock in socks:
            assert sock.recv(1) == b"H"  # "HTTP/1.1 200 ...": the response has started
        with httpx.Client(base_url=server.base_url or "", timeout=30,
                          headers={"Authorization": f"Bearer {server.admin_key}"}) as http:
            resp, seconds = _timed(lambda: http.get("/v1/jobs"))
            assert resp.status_code == 200 and seconds < ANSWER_WITHIN, (resp.text, seconds)
            ready = http.get("/readyz").json()
            assert ready["requests"] == {"in_flight": 0, "limit": LIMIT, "waiting": 0}, ready
        wait_for(lambda: server.log("api").count(GAVE_UP) >= gave_up_before + len(socks),
                 timeout=SEND_TIMEOUT + 15, what="the stalled sends to time out")
        with ThreadPoolExecutor(len(socks)) as pool:
            answers = list(pool.map(lambda s: _response(s, 15), socks))
    finally:
        for sock in socks:
            sock.close()
    for path, raw in zip(paths, answers, strict=True):
        assert raw.startswith(b"TTP/1.1 200"), (path, raw[:100])
        assert len(raw) < FILE_SIZE, (path, len(raw))  # closed before the end of the file


def test_one_tenant_cannot_fill_the_body_budget(server: LiveService) -> None:
    """Old code: one tenant's 68 stalled 1 MiB JSON bodies reserved the whole 64 MiB budget
    and another tenant's POST /v1/jobs waited until they timed out. Now that tenant's bodies
    hold at most a quarter of it: 16 stall (408 after body_timeout_seconds), the 52 others get
    429 at once with Retry-After, and the other tenant's POST is answered at once."""
    body = server.settings.max_request_bytes
    share = BUFFERED_BODIES_BYTES // 4 // body
    count = BUFFERED_BODIES_BYTES // body + 4
    other = _tenant_key(server, "budget-other")
    stalled = [_stall(server, "/v1/jobs", key=server.admin_key, declared=body)
               for _ in range(count)]
    with httpx.Client(base_url=server.base_url or "", timeout=30,
                      headers={"Authorization": f"Bearer {other}"}) as http:
        resp, seconds = _timed(lambda: http.post(
            "/v1/jobs", json={"base_model": "tiny", "training_file": "ds_nope"}))
    # Served: the job is refused for its content (no such model / file), not for room.
    assert resp.status_code in (404, 422) and seconds < ANSWER_WITHIN, (resp.text, seconds)
    with ThreadPoolExecutor(len(stalled)) as pool:
        answers = list(pool.map(lambda s: _response(s, BODY_TIMEOUT + 10), stalled))
    statuses = sorted(_status(raw) for raw in answers)
    assert statuses == [408] * share + [429] * (count - share), statuses
    refused = next(raw for raw in answers if _status(raw) == 429)
    assert b"retry-after: 1" in refused.lower() and b"share" in refused, refused[:400]


def test_body_budget_shares_and_wait_timeout() -> None:
    """Past its share an owner is refused at once (own=True); past the capacity a request
    waits `timeout` at most (own=False); either leaves nothing reserved."""

    async def scenario() -> None:
        budget = _ByteBudget(100, share=50)
        async with budget.reserve(40, owner="a"):
            with pytest.raises(_NoRoom) as own:
                async with budget.reserve(20, owner="a"):
                    pass
            assert own.value.own
            async with budget.reserve(50, owner="b"):
                with pytest.raises(_NoRoom) as full:
                    async with budget.reserve(20, owner="c", timeout=0.05):
                        pass
                assert not full.value.own
                assert budget.by_owner == {"a": 40, "b": 50} and budget.used == 90
        assert budget.by_owner == {} and budget.used == 0

    asyncio.run(scenario())


def test_send_timeout_setting_is_wired(tmp_path: Path) -> None:
    """The app's bulkhead gets response_send_timeout_seconds from the settings."""
    from lorajobs.api.app import create_app
    from lorajobs.api.limits import ConcurrencyLimitMiddleware
    from lorajobs.core.settings import Settings

    app = create_app(Settings(data_dir=tmp_path, response_send_timeout_seconds=7))
    found = [m for m in app.user_middleware if m.cls is ConcurrencyLimitMiddleware]
    assert found and found[0].kwargs["send_timeout"] == 7
