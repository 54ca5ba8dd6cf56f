"""Live event streams, shared: one poller per job fans out to all of that job's streams.

    stream ─subscribe(job, key)─▶ StreamHub ── one poller task per watched job ──▶ database
       ▲                            │          (events after the slowest stream's cursor
       └── batches, then an End ────┘           + the job's status, every poll_seconds)
                                    └───────── one key task: revoked keys end their streams

Before, every stream polled the database every 0.5 s through the shared thread pool: 900
streams on one job took another tenant's `GET /v1/jobs` from 10-20 ms to 3-4 s, and a stream
outlived the revocation of its key. Now the database work is per job and per key-check
interval, never per stream, and at most DB_CALLS_IN_FLIGHT of it runs at once (one pooled
connection in one thread call each); a stream costs a task, a queue and a socket.

Limits (settings): `stream_max_per_key` and `stream_max_total` open streams per API process
(429 beyond); `stream_max_seconds` per stream, after which the server ends it and the client
resumes with `Last-Event-ID`; a stream whose key is revoked ends within
`stream_key_check_seconds`. A stream that falls MAX_PENDING_BATCHES behind (a client that
stopped reading) is ended the same way: it resumes where it stopped, from the database.

Ordering: a poll reads the job's status before its events, so when it sees a terminal status,
the events read after it include the last one; each stream receives every event id above its
cursor once, in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from lorajobs.api import queries
from lorajobs.api.schemas import EventPublic
from lorajobs.core.errors import LimitExceeded
from lorajobs.core.settings import Settings
from lorajobs.core.tables import ApiKey, Job, JobStatus

__all__ = ["StreamHub", "Subscription", "End", "hub_for", "STREAM_BATCH"]

log = logging.getLogger(__name__)

STREAM_BATCH = 100  # events per poll; a full batch is followed by another poll at once
# Database calls of all pollers and key checks at once: each holds one pooled connection
# inside one thread call. With 2 per request slot (16 x 2) and the auth lookups (4) this stays
# within db.POOL_CAPACITY (40); pollers that find it busy simply poll a little later.
DB_CALLS_IN_FLIGHT = 2
# Batches queued for a stream that is not reading (~100 events each); past it the stream is
# ended with "slow" and its client resumes from its Last-Event-ID.
MAX_PENDING_BATCHES = 50
KEY_CHECK_CHUNK = 500  # key ids per query (SQLite binds at most 32766 parameters)
ERROR_BACKOFF_SECONDS = 1.0  # a failed poll (database restarting) is retried after this


@dataclass(frozen=True)
class End:
    """The last item of a stream. `reason`: finished (the job is terminal and every event was
    sent), revoked (the key), slow (the client stopped reading), gone (the job row vanished)."""

    reason: str


@dataclass(eq=False)
class Subscription:
    """One open stream: its job, its key, the last event id queued for it."""

    job_id: str
    key_id: str
    cursor: int
    queue: asyncio.Queue[list[EventPublic] | End] = field(default_factory=asyncio.Queue)
    ended: bool = False

    def feed(self, events: list[EventPublic]) -> bool:
        """Queue the events above the cursor; False if the stream is too far behind."""
        new = [e for e in events if e.id > self.cursor]
        if not new:
            return True
        if self.queue.qsize() >= MAX_PENDING_BATCHES:
            return False
        self.queue.put_nowait(new)
        self.cursor = new[-1].id
        return True


class StreamHub:
    """The open streams of one API process, their caps, pollers and key checks."""

    def __init__(self, sessions: Callable[[], Session], settings: Settings) -> None:
        self.sessions = sessions
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self.db_calls = asyncio.Semaphore(DB_CALLS_IN_FLIGHT)
        self.by_job: dict[str, set[Subscription]] = defaultdict(set)
        self.by_key: dict[str, set[Subscription]] = defaultdict(set)
        self.wake: dict[str, asyncio.Event] = {}
        self.pollers: dict[str, asyncio.Task[None]] = {}
        self.key_task: asyncio.Task[None] | None = None
        self.polls = 0  # database polls made, for tests and the bench

    @property
    def open_streams(self) -> int:
        return sum(len(subs) for subs in self.by_key.values())

    # -- subscriptions ------------------------------------------------------------------------

    def subscribe(self, *, job_id: str, key_id: str, cursor: int) -> Subscription:
        """A new stream of `job_id` from event id `cursor` (0: from the first), or 429."""
        total, per_key = self.settings.stream_max_total, self.settings.stream_max_per_key
        if len(self.by_key.get(key_id, ())) >= per_key:
            raise LimitExceeded(
                f"this API key already has {per_key} event streams open, its limit "
                "(LORAJOBS_STREAM_MAX_PER_KEY); close one, or poll GET /v1/jobs/{id}/events",
                param="Authorization", code="too_many_streams")
        if self.open_streams >= total:
            raise LimitExceeded(
                f"this server has {total} event streams open, its limit "
                "(LORAJOBS_STREAM_MAX_TOTAL); retry later or poll GET /v1/jobs/{id}/events",
                code="too_many_streams")
        sub = Subscription(job_id=job_id, key_id=key_id, cursor=cursor)
        self.by_job[job_id].add(sub)
        self.by_key[key_id].add(sub)
        self._ensure_poller(job_id)
        self.wake[job_id].set()  # its first batch now, not after a poll interval
        if self.key_task is None or self.key_task.done():
            self.key_task = self.loop.create_task(self._check_keys())
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Forget a stream whose response is over (idempotent): its slot is free again, and
        its job's poller stops with its last stream."""
        self._stop_feeding(sub)
        _discard(self.by_key, sub.key_id, sub)

    def _end(self, sub: Subscription, reason: str) -> None:
        """Queue the stream's End and stop feeding it. It keeps its slot (by_key) until its
        response is over: a client that does not read holds a connection, and counts."""
        if not sub.ended:
            sub.queue.put_nowait(End(reason))
        self._stop_feeding(sub)

    def _stop_feeding(self, sub: Subscription) -> None:
        sub.ended = True
        _discard(self.by_job, sub.job_id, sub)

    # -- one poller per job -------------------------------------------------------------------

    def _ensure_poller(self, job_id: str) -> None:
        task = self.pollers.get(job_id)
        if task is None or task.done():
            self.wake[job_id] = asyncio.Event()
            self.pollers[job_id] = self.loop.create_task(self._poll_job(job_id))

    async def _poll_job(self, job_id: str) -> None:
        wake = self.wake[job_id]
        try:
            while subs := self.by_job.get(job_id):
                wake.clear()
                floor = min(s.cursor for s in subs)
                try:
                    async with self.db_calls:
                        status, events = await run_in_threadpool(self._read, job_id, floor)
                    self.polls += 1
                except Exception:  # noqa: BLE001 - a database hiccup must not end streams
                    log.exception("event stream poll of %s failed; retrying", job_id)
                    await asyncio.sleep(ERROR_BACKOFF_SECONDS)
                    continue
                self._fan_out(job_id, status, events)
                if len(events) == STREAM_BATCH:
                    continue  # more are waiting: no pause
                try:
                    await asyncio.wait_for(wake.wait(), self.settings.stream_poll_seconds)
                except TimeoutError:
                    pass
        finally:
            if self.pollers.get(job_id) is asyncio.current_task():
                del self.pollers[job_id]
                self.wake.pop(job_id, None)

    def _fan_out(self, job_id: str, status: str | None,
                 events: list[EventPublic]) -> None:
        complete = len(events) < STREAM_BATCH  # nothing above this batch was there to read
        for sub in list(self.by_job.get(job_id, ())):
            if status is None:
                self._end(sub, "gone")
            elif not sub.feed(events):
                self._end(sub, "slow")
            elif status in JobStatus.TERMINAL and complete:
                self._end(sub, "finished")

    def _read(self, job_id: str, after: int) -> tuple[str | None, list[EventPublic]]:
        """(the job's status or None, up to STREAM_BATCH events after `after`); the status is
        read first (see the module doc)."""
        with self.sessions() as session:
            status = session.scalar(select(Job.status).where(Job.id == job_id))
            if status is None:
                return None, []
            rows, _ = queries.list_events(session, job_id=job_id, after=after or None,
                                          limit=STREAM_BATCH)
            return status, [EventPublic.from_row(r) for r in rows]

    # -- one key check for all streams --------------------------------------------------------

    async def _check_keys(self) -> None:
        """Every stream_key_check_seconds: end the streams of keys revoked (or gone)."""
        while self.by_key:
            await asyncio.sleep(self.settings.stream_key_check_seconds)
            key_ids = list(self.by_key)
            if not key_ids:
                return
            try:
                async with self.db_calls:
                    live = await run_in_threadpool(self._live_keys, key_ids)
            except Exception:  # noqa: BLE001 - retried at the next interval
                log.exception("event stream key check failed; retrying")
                continue
            for key_id in set(key_ids) - live:
                for sub in list(self.by_key.get(key_id, ())):
                    self._end(sub, "revoked")

    def _live_keys(self, key_ids: list[str]) -> set[str]:
        live: set[str] = set()
        with self.sessions() as session:
            for i in range(0, len(key_ids), KEY_CHECK_CHUNK):
                chunk = key_ids[i:i + KEY_CHECK_CHUNK]
                live.update(session.scalars(select(ApiKey.id).where(
                    ApiKey.id.in_(chunk), ApiKey.revoked_at.is_(None))))
        return live

    async def check_job(self, *, tenant_id: str, job_id: str) -> None:
        """NotFound (404) unless the tenant has this job: before a stream starts."""
        def read() -> None:
            with self.sessions() as session:
                queries.get_job(session, tenant_id=tenant_id, job_id=job_id)

        async with self.db_calls:
            await run_in_threadpool(read)


def _discard(index: dict[str, set[Subscription]], name: str, sub: Subscription) -> None:
    subs = index.get(name)
    if subs is not None:
        subs.discard(sub)
        if not subs:
            del index[name]


def hub_for(app_state: Any) -> StreamHub:
    """The app's hub, made on first use in the running event loop (a test client that
    starts a new loop gets a new hub: asyncio objects belong to one loop)."""
    hub: StreamHub | None = getattr(app_state, "stream_hub", None)
    if hub is None or hub.loop is not asyncio.get_running_loop():
        hub = StreamHub(app_state.sessionmaker, app_state.settings)
        app_state.stream_hub = hub
    return hub
