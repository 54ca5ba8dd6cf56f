"""Live event streams against a real uvicorn: what many open streams cost other tenants, the
caps (429), a revoked key ending its streams, and the maximum duration with a resume by
`Last-Event-ID` (api/streams.py, routes/events.py; the SDK's reconnect in client/sync.py).

Jobs and events are rows written straight to the database: the stream reads nothing else,
and no worker is needed to make a job emit.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from lorajobs.api import queries
from lorajobs.client import Client, RateLimitError
from lorajobs.core import jobs, keys
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.errors import LimitExceeded
from lorajobs.core.tables import Job, JobStatus, new_id
from tests.client.transports import Recording
from tests.servicefixtures import LiveService, wait_for

pytestmark = pytest.mark.timeout(180)

STREAM = "/v1/jobs/{}/events/stream"


@dataclass
class Server:
    svc: LiveService
    url: str
    keys: dict[str, str]  # tenant name -> a key of it (manage_keys)

    def h(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def sessions(self):  # type: ignore[no-untyped-def]
        return get_sessionmaker(self.svc.settings)()

    def job(self, who: str, events: int = 0) -> str:
        """A queued job row of tenant `who` with `events` events."""
        with self.sessions() as session:
            tenant_id = keys.authenticate(session, self.keys[who]).tenant_id
            job = Job(id=new_id("job"), tenant_id=tenant_id, base_model="tiny",
                      training_file="ds_none", spec={})
            session.add(job)
            session.flush()
            for i in range(events):
                jobs.add_event(session, job.id, "progress", f"step {i}", data={"step": i})
            session.commit()
            return job.id

    def emit(self, job_id: str, n: int, *, finish: bool = False) -> None:
        with self.sessions() as session:
            for i in range(n):
                jobs.add_event(session, job_id, "progress", f"more {i}")
            if finish:
                session.execute(update(Job).where(Job.id == job_id)
                                .values(status=JobStatus.CANCELLED))
                jobs.add_event(session, job_id, "cancelled", "cancelled")
            session.commit()


def _start(tmp_path: Path, tenants: tuple[str, ...], backend: str = "sqlite",
           **settings: Any) -> Iterator[Server]:
    svc = LiveService(tmp_path, backend, **settings)
    try:
        svc.migrate()
        made: dict[str, str] = {}
        with get_sessionmaker(svc.settings)() as session:
            for name in tenants:
                tenant = keys.create_tenant(session, name=name)
                _, made[name] = keys.create_key(session, tenant_id=tenant.id, name=name,
                                                manage_keys=True)
            session.commit()
        url = svc.start_api()
        assert url is not None
        yield Server(svc=svc, url=url, keys=made)
    finally:
        svc.close()


# ---------------------------------------------------------------------------------------------
# Other tenants' latency under many open streams
# ---------------------------------------------------------------------------------------------

N_STREAMS = 200
STREAMED_JOBS = 4  # N_STREAMS spread over these jobs of one tenant
# Idle and loaded windows alternate, ROUNDS of each, in the order idle-loaded, loaded-idle, ...
# so that a noisy neighbour or a drift of the shared machine hits both alike; the figure is
# the median of the ROUNDS p99s of each.
ROUNDS = 4
SAMPLES = 100  # sequential GET /v1/jobs per window (p99: near the slowest of the window)
# API CPU seconds per second while N_STREAMS idle streams are open: ~0.02 with one poller per
# job (4 jobs, every 0.5 s) and one key check every 2 s; 0.49 before (a poll per stream). The
# primary check: what the API spends does not depend on how busy the machine is.
CPU_WINDOW_S = 2.0
MAX_STREAM_CPU = 0.15


@pytest.fixture(scope="module")
def load_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _start(tmp_path_factory.mktemp("streams-load"), ("streamer", "reader"),
                      # room for an attempt's streams while the last one's are released
                      stream_max_per_key=2 * N_STREAMS, stream_max_total=2 * N_STREAMS)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (Linux /proc): what the API spends, whatever the noise
    of a shared machine does to latencies."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _p99(client: httpx.AsyncClient, n: int) -> float:
    took = []
    for _ in range(n):
        start = time.perf_counter()
        r = await client.get("/v1/jobs", params={"limit": 20})
        took.append(time.perf_counter() - start)
        assert r.status_code == 200, r.text
    return statistics.quantiles(took, n=100)[98]


async def _hold_streams(server: Server, job_ids: list[str], n: int, opened: asyncio.Event,
                        stop: asyncio.Event) -> None:
    """`n` streams, each until `stop`; `opened` once every one has delivered its first event."""
    count = 0
    limits = httpx.Limits(max_connections=n + 1, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.url, headers=server.h("streamer"),
                                 timeout=60, limits=limits) as client:

        async def hold(job_id: str) -> None:
            nonlocal count
            async with client.stream("GET", STREAM.format(job_id)) as r:
                assert r.status_code == 200, await r.aread()
                # One iterator, kept: leaving an `async for` would close the stream.
                lines = r.aiter_lines()
                while not (await anext(lines)).startswith("id:"):
                    pass
                count += 1
                if count == n:
                    opened.set()
                await stop.wait()

        await asyncio.gather(*(hold(job_ids[i % len(job_ids)]) for i in range(n)))


def test_other_tenants_p99_under_open_streams(load_server: Server) -> None:
    """With N_STREAMS streams open, the API spends under MAX_STREAM_CPU CPU s/s on them (before:
    every stream polled the database every 0.5 s through the shared thread pool: 0.49 CPU s/s,
    and another tenant's `GET /v1/jobs` p99 went x4.5 at 200 streams, ~x25 at 300). The p99s
    of alternating idle and loaded windows are printed (their medians)."""
    for _ in range(20):
        load_server.job("reader", events=0)
    streamed = [load_server.job("streamer", events=5) for _ in range(STREAMED_JOBS)]

    api_pid = load_server.svc.procs[-1].pid
    stream_cpu: list[float] = []  # API CPU s/s with only the streams open, one per round
    idle: list[float] = []
    loaded: list[float] = []

    async def loaded_window(reader: httpx.AsyncClient) -> None:
        opened, stop = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(_hold_streams(load_server, streamed, N_STREAMS,
                                                   opened, stop))
        await asyncio.wait_for(opened.wait(), 60)
        before, start = cpu_seconds(api_pid), time.monotonic()
        await asyncio.sleep(CPU_WINDOW_S)  # a measuring window, not a wait for an effect
        stream_cpu.append((cpu_seconds(api_pid) - before) / (time.monotonic() - start))
        loaded.append(await _p99(reader, SAMPLES))
        stop.set()
        await holder

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=load_server.url, headers=load_server.h("reader"),
                                     timeout=30) as reader:
            await _p99(reader, 20)  # warm-up: connections, prepared statements
            for n in range(ROUNDS):
                if n % 2 == 0:
                    idle.append(await _p99(reader, SAMPLES))
                    await loaded_window(reader)
                else:
                    await loaded_window(reader)
                    idle.append(await _p99(reader, SAMPLES))

    asyncio.run(scenario())
    idle_p99, loaded_p99 = statistics.median(idle), statistics.median(loaded)
    print(f"\nGET /v1/jobs p99 (median of {ROUNDS} windows of {SAMPLES}): idle "
          f"{idle_p99 * 1000:.1f} ms, with {N_STREAMS} streams {loaded_p99 * 1000:.1f} ms "
          f"(x{loaded_p99 / idle_p99:.2f}); windows idle {[round(x * 1000, 1) for x in idle]} "
          f"loaded {[round(x * 1000, 1) for x in loaded]} ms; API CPU with only the streams "
          f"open: {[round(c, 3) for c in stream_cpu]} s/s")
    assert statistics.median(stream_cpu) < MAX_STREAM_CPU, stream_cpu
    # The latency ratio is printed, not asserted: a fresh-clone CI run with 4 test processes on
    # 2 cores gave x2.7 with the fix in place. The CPU figure above is what the fix changed and
    # does not move with the machine's load; bench/stream_bench.py measures the p99s.


# ---------------------------------------------------------------------------------------------
# Caps, revocation, maximum duration
# ---------------------------------------------------------------------------------------------

MAX_SECONDS = 1.5
KEY_CHECK_SECONDS = 0.2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _start(tmp_path_factory.mktemp("streams"), ("alice", "bob", "carol"),
                      stream_max_per_key=2, stream_max_total=3,
                      stream_max_seconds=MAX_SECONDS, stream_key_check_seconds=KEY_CHECK_SECONDS,
                      stream_poll_seconds=0.1)


def _frames(response: httpx.Response) -> Iterator[dict[str, str]]:
    """SSE frames (field -> value) as they arrive; comments skipped."""
    return _frames_of(response.iter_lines())


def _frames_of(lines: Iterable[str]) -> Iterator[dict[str, str]]:
    frame: dict[str, str] = {}
    for line in lines:
        if not line:
            if frame:
                yield frame
            frame = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            frame[name] = value.removeprefix(" ")


def test_open_streams_are_capped_per_key_and_per_server(server: Server) -> None:
    job = server.job("alice", events=1)
    bob_job = server.job("bob", events=1)
    with httpx.Client(base_url=server.url, timeout=10) as http, HeldStreams() as held:
        for _ in range(2):
            held.open(http, STREAM.format(job), server.h("alice"))
        third = http.get(STREAM.format(job), headers=server.h("alice"))
        assert third.status_code == 429, third.text
        error = third.json()["error"]
        assert error["code"] == "too_many_streams" and "LORAJOBS_STREAM_MAX_PER_KEY" in \
            error["message"] and error["param"] == "Authorization"
        held.open(http, STREAM.format(bob_job), server.h("bob"))  # 3 of 3 on the server
        full = http.get(STREAM.format(bob_job), headers=server.h("bob"))
        assert full.status_code == 429 and "LORAJOBS_STREAM_MAX_TOTAL" in full.text
        held.close_first()  # a client that goes away frees its slot
        wait_for(lambda: held.try_open(http, STREAM.format(bob_job), server.h("bob")),
                 timeout=5, what="a freed stream slot")


class HeldStreams:
    """Open streams held until closed (first in, first out)."""

    def __init__(self) -> None:
        self.held: list[Any] = []

    def __enter__(self) -> HeldStreams:
        return self

    def __exit__(self, *exc: object) -> None:
        for cm, _ in self.held:
            cm.__exit__(None, None, None)

    def open(self, http: httpx.Client, path: str, headers: dict[str, str]) -> None:
        """Open one; retried while streams of an earlier test are still being released."""
        wait_for(lambda: self.try_open(http, path, headers), timeout=5, what="a stream slot")

    def try_open(self, http: httpx.Client, path: str, headers: dict[str, str]) -> bool:
        cm = http.stream("GET", path, headers=headers)
        response = cm.__enter__()
        if response.status_code != 200:
            response.read()
            cm.__exit__(None, None, None)
            return False
        frames = _frames(response)
        assert "id" in next(frames)  # the stream is live: its first event arrived
        self.held.append((cm, frames))
        return True

    def close_first(self) -> None:
        cm, _ = self.held.pop(0)
        cm.__exit__(None, None, None)


def test_revoking_a_key_ends_its_streams(server: Server) -> None:
    job = server.job("carol", events=1)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        made = http.post("/v1/keys", headers=server.h("carol"), json={"name": "watcher"}).json()
        watcher = {"Authorization": f"Bearer {made['key']}"}
        with http.stream("GET", STREAM.format(job), headers=watcher) as response:
            assert response.status_code == 200
            frames = _frames(response)
            assert next(frames)["id"]
            revoked = http.delete(f"/v1/keys/{made['id']}", headers=server.h("carol"))
            assert revoked.status_code == 200
            start = time.monotonic()
            rest = list(frames)  # the server ends the stream (a read timeout would fail here)
            took = time.monotonic() - start
    assert rest[-1]["event"] == "error" and "revoked" in rest[-1]["data"], rest
    # the `error` event above says the key check ended it; this bound is for a hang only
    assert took < KEY_CHECK_SECONDS + 8, took
    assert http_status(server, STREAM.format(job), watcher) == 401  # and no new one


def http_status(server: Server, path: str, headers: dict[str, str]) -> int:
    return httpx.get(server.url + path, headers=headers, timeout=10).status_code


def test_max_duration_ends_a_stream_and_the_sdk_resumes(server: Server) -> None:
    """The server ends each stream after MAX_SECONDS; the SDK reconnects with Last-Event-ID
    and sees every event once, in order, then the job's end."""
    job = server.job("alice", events=3)
    start = time.monotonic()  # before the request: the server's clock starts later, never earlier
    with httpx.stream("GET", server.url + STREAM.format(job), headers=server.h("alice"),
                      timeout=10) as response:
        lines = list(response.iter_lines())
    lasted = time.monotonic() - start
    frames = list(_frames_of(lines))
    assert [f["id"] for f in frames] == [str(i) for i in _event_ids(server, job)]
    assert "end" not in [f.get("event") for f in frames]
    # Ended by the server because of its age (a late client only makes `lasted` longer; the
    # upper bound is the read timeout: a stream that never ends fails there).
    assert any(line.startswith(":") and "stream_max_seconds reached" in line
               for line in lines), lines
    assert lasted >= MAX_SECONDS - 0.05, lasted

    transport = ReconnectRecording()
    emitted = threading.Event()
    failures: list[BaseException] = []

    def emit_later() -> None:  # while the SDK's first connection is open, then the end
        try:
            assert emitted.wait(30), "no first event"
            server.emit(job, 2)
            # past the first connection's end: the SDK has sent its second request
            assert transport.reconnected.wait(30), "the SDK did not reconnect"
            server.emit(job, 2, finish=True)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            failures.append(exc)
            server.emit(job, 0, finish=True)  # end the stream: the test fails, not hangs

    writer = threading.Thread(target=emit_later)
    writer.start()
    seen = []
    with Client(server.url, server.keys["alice"], transport=transport) as client:
        for event in client.jobs.stream_events(job):
            seen.append(event.id)
            emitted.set()
    writer.join()
    assert not failures, failures
    assert seen == _event_ids(server, job) and len(seen) == 3 + 2 + 2 + 1
    streams = [r for r in transport.requests if r.url.path.endswith("/events/stream")]
    assert len(streams) >= 2, "the SDK must have reconnected"
    assert "Last-Event-ID" not in streams[0].headers
    resumed = [int(r.headers["Last-Event-ID"]) for r in streams[1:]]
    assert resumed == sorted(resumed) and all(i in seen for i in resumed)


class ReconnectRecording(Recording):
    """`Recording`, with an event set when a second stream request (a reconnect) is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.reconnected = threading.Event()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        streams = sum(r.url.path.endswith("/events/stream") for r in self.requests)
        if request.url.path.endswith("/events/stream") and streams >= 1:
            self.reconnected.set()
        return super().handle_request(request)


def _event_ids(server: Server, job_id: str) -> list[int]:
    with server.sessions() as session:
        rows, _ = queries.list_events(session, job_id=job_id, after=None, limit=1000)
        return [r.id for r in rows]


def test_sdk_raises_when_too_many_streams(server: Server) -> None:
    job = server.job("bob", events=1)
    with httpx.Client(base_url=server.url, timeout=10) as http, HeldStreams() as held:
        for _ in range(2):
            held.open(http, STREAM.format(job), server.h("bob"))
        with Client(server.url, server.keys["bob"], max_retries=1) as client:
            with pytest.raises(RateLimitError, match="STREAM_MAX_PER_KEY"):
                next(client.jobs.stream_events(job))


def test_a_stream_that_stops_reading_is_ended_but_keeps_its_slot() -> None:
    """The hub alone (no database read happens): a stream MAX_PENDING_BATCHES behind is ended
    as "slow" and no longer fed, but counts against the caps until its response is over."""
    from lorajobs.api.schemas import EventPublic
    from lorajobs.api.streams import MAX_PENDING_BATCHES, End, StreamHub
    from lorajobs.core.settings import Settings

    def batch(first: int) -> list[EventPublic]:
        return [EventPublic(id=i, type="log", level="info", message="", data={},
                            created_at="2026-12-01T00:00:00Z") for i in range(first, first + 2)]

    async def scenario() -> None:
        hub = StreamHub(lambda: None, Settings(stream_max_per_key=1))  # type: ignore[arg-type,return-value]
        sub = hub.subscribe(job_id="job_x", key_id="key_x", cursor=0)
        for n in range(MAX_PENDING_BATCHES + 1):
            hub._fan_out("job_x", "running", batch(1 + 2 * n))
        assert sub.queue.qsize() == MAX_PENDING_BATCHES + 1
        items = [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]
        assert items[-1] == End("slow") and "job_x" not in hub.by_job
        assert [e.id for b in items[:-1] for e in b] == list(range(1, 2 * MAX_PENDING_BATCHES + 1))
        with pytest.raises(LimitExceeded):  # still holds the key's one slot
            hub.subscribe(job_id="job_x", key_id="key_x", cursor=0)
        hub.unsubscribe(sub)
        hub.unsubscribe(hub.subscribe(job_id="job_x", key_id="key_x", cursor=0))
        for task in (*hub.pollers.values(), hub.key_task):
            if task is not None:
                task.cancel()

    asyncio.run(scenario())
