"""`GET /v1/jobs/{id}`, the polled route: on PostgreSQL it reads through asyncpg and coalesces
concurrent requests (lorajobs/api/pg_job_reader.py); it must answer exactly as the sync path does.

Error order everywhere: 401 (missing, unknown, revoked key) before 404 (missing job, or
another tenant's). A revoked key is refused on its very next request (no key cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from lorajobs.api import pg_job_reader, queries
from lorajobs.api.app import create_app
from lorajobs.api.schemas import JobPublic
from lorajobs.core import keys
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.settings import Settings
from lorajobs.core.tables import Job, utcnow
from tests.api.conftest import Api

PG_ONLY = pytest.mark.parametrize("db_settings", ["postgresql"], indirect=True)


def _sync_body(api: Api, who: str, job_id: str) -> dict[str, Any]:
    """What the SQLAlchemy path (used on SQLite) answers for the same request."""
    with api.sessions() as session:
        row = queries.read_job_as(session, presented=api.keys[who], job_id=job_id)
    return json.loads(JobPublic.from_row(row, queue_position=row.queue_position)
                      .model_dump_json())


def _update(api: Api, job_id: str, **fields: Any) -> None:
    with api.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        for name, value in fields.items():
            setattr(job, name, value)
        session.commit()


@PG_ONLY
def test_asyncpg_path_answers_as_the_sync_path(api: Api) -> None:
    assert api.client.app.state.pg_reader is not None
    ds = api.dataset("alice")
    first, second, third = (api.job("alice", ds)["id"] for _ in range(3))
    now = utcnow()
    _update(api, second, status="running", stage="training", attempt=1, started_at=now,
            progress={"step": 3, "total_steps": 10, "epoch": 0.5, "eta_seconds": 7.5},
            metrics={"train_loss": 1.25, "eval_loss": None})
    _update(api, third, status="succeeded", started_at=now, finished_at=now,
            error=None, metadata_={"team": "x"}, suffix="demo")
    fourth = api.job("alice", ds)["id"]  # queued behind `first`: position 1
    for job_id in (first, second, third, fourth):
        resp = api.client.get(f"/v1/jobs/{job_id}", headers=api.h("alice"))
        assert resp.status_code == 200, resp.text
        assert resp.json() == _sync_body(api, "alice", job_id)
    assert api.client.get(f"/v1/jobs/{fourth}", headers=api.h("alice")).json()[
        "queue_position"] == 1
    assert api.client.get(f"/v1/jobs/{third}", headers=api.h("alice")).json()[
        "fine_tuned_model"] == f"ft:tiny-llama:demo:{third}"


def test_revoked_key_is_refused_on_its_next_request(api: Api) -> None:
    job_id = api.job("alice", api.dataset("alice"))["id"]
    made = api.client.post("/v1/keys", headers=api.h("alice"), json={"name": "poller"}).json()
    auth = {"Authorization": f"Bearer {made['key']}"}
    assert api.client.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 200
    assert api.client.delete(f"/v1/keys/{made['id']}", headers=api.h("alice")).status_code == 200
    refused = api.client.get(f"/v1/jobs/{job_id}", headers=auth)
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] == "API key revoked"
    assert refused.headers["www-authenticate"] == "Bearer"
    # 401 before 404: a revoked key learns nothing about which ids exist.
    assert api.client.get("/v1/jobs/job_missing", headers=auth).status_code == 401


@PG_ONLY
def test_concurrent_requests_each_get_their_own_answer(api: Api) -> None:
    """Requests read in one batch keep their own outcome: 200, 401 or 404."""
    alice_job = api.job("alice", api.dataset("alice"))["id"]
    made = api.client.post("/v1/keys", headers=api.h("alice"), json={}).json()
    api.client.delete(f"/v1/keys/{made['id']}", headers=api.h("alice"))
    cases = [  # (authorization, job id, status, error message or None)
        (api.keys["alice"], alice_job, 200, None),
        (api.keys["bob"], alice_job, 404, f"no job {alice_job!r}"),
        (api.keys["alice"], "job_missing", 404, "no job 'job_missing'"),
        ("lj_not-a-key", alice_job, 401, "invalid API key"),
        (made["key"], alice_job, 401, "API key revoked"),
        (None, alice_job, 401, "missing API key: send 'Authorization: Bearer <key>'"),
    ] * 5
    app = create_app(api.settings)
    batches: list[int] = []
    reader = app.state.pg_reader
    read = reader._read

    async def counting_read(batch):  # type: ignore[no-untyped-def]
        batches.append(len(batch))
        return await read(batch)

    reader._read = counting_read

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            try:
                return await asyncio.gather(*(
                    client.get(f"/v1/jobs/{job_id}",
                               headers={"Authorization": f"Bearer {key}"} if key else {})
                    for key, job_id, _, _ in cases))
            finally:
                await reader.close()

    responses = asyncio.run(run())
    for (_, job_id, status, message), resp in zip(cases, responses, strict=True):
        assert resp.status_code == status, (job_id, resp.text)
        if message is None:
            assert resp.json()["id"] == alice_job
        else:
            assert resp.json()["error"]["message"] == message
    assert max(batches) > 1, f"no request was coalesced: {batches}"
    assert sum(batches) == len([c for c in cases if c[0] is not None])


@PG_ONLY
def test_a_request_postgresql_refuses_fails_alone(api: Api) -> None:
    """A batch PostgreSQL refuses is read again one request at a time."""
    job_id = api.job("alice", api.dataset("alice"))["id"]
    reader = pg_job_reader.make_pg_reader(api.settings.resolved_database_url)
    assert reader is not None
    digest = keys.hash_key(api.keys["alice"])
    batches: list[int] = []
    read = reader._read

    async def counting_read(batch):  # type: ignore[no-untyped-def]
        batches.append(len(batch))
        return await read(batch)

    reader._read = counting_read  # type: ignore[method-assign]

    async def run() -> list[Any]:
        try:
            return await asyncio.gather(
                reader.job_as(digest=digest, job_id=job_id),
                reader.job_as(digest=digest, job_id="job_\x00"),  # text cannot hold NUL
                reader.job_as(digest=digest, job_id=job_id),
                return_exceptions=True)
        finally:
            await reader.close()

    good, bad, good_again = asyncio.run(run())
    assert good.id == job_id and good_again.id == job_id
    assert isinstance(bad, asyncpg.DataError), repr(bad)  # SQLSTATE class 22
    assert batches == [3, 1, 1, 1], "read together first, then one by one"


class _Connection:
    def __init__(self, pool: _Pool) -> None:
        self.pool, self.terminated = pool, False

    async def fetch(self, *_args: Any) -> list[Any]:
        self.pool.calls += 1
        if self.pool.error is not None:
            raise self.pool.error
        return []

    def terminate(self) -> None:
        self.terminated = True


class _Pool:
    """A pool whose every query raises `error` (None: answers no row)."""

    def __init__(self, error: BaseException | None) -> None:
        self.error, self.calls = error, 0

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[_Connection]:
        yield _Connection(self)


def _reader_on(pool: Any) -> pg_job_reader.PgReader:
    reader = pg_job_reader.PgReader("postgresql://unused")

    async def fake_pool() -> Any:
        return pool

    reader._pool_for_loop = fake_pool  # type: ignore[method-assign]
    return reader


@pytest.mark.parametrize(("error", "queries_sent"), [
    (asyncpg.QueryCanceledError("canceling statement due to statement timeout"), 1),
    (asyncpg.UndefinedTableError('relation "jobs" does not exist'), 1),
    (asyncpg.InsufficientPrivilegeError("permission denied for table jobs"), 1),
    (asyncpg.CharacterNotInRepertoireError("invalid byte sequence"), 1 + 3),
])
def test_only_a_data_error_splits_the_batch(error: Exception, queries_sent: int) -> None:
    """A database-wide error fails the batch with one query, not one more per request."""
    pool = _Pool(error)
    reader = _reader_on(pool)

    async def run() -> list[Any]:
        return await asyncio.gather(*(reader.job_as(digest="d", job_id=f"j{i}")
                                      for i in range(3)), return_exceptions=True)

    outcomes = asyncio.run(run())
    assert [type(o) for o in outcomes] == [type(error)] * 3
    assert pool.calls == queries_sent


def test_lost_connection_is_retried_once_on_a_new_one() -> None:
    """A query that meets a dead connection is sent again; a second loss is the error."""

    class Connection:
        def __init__(self, pool: Pool) -> None:
            self.pool, self.terminated = pool, False

        async def fetch(self, *_args: Any) -> list[Any]:
            self.pool.calls += 1
            if self.pool.calls <= self.pool.failures:
                raise asyncpg.ConnectionDoesNotExistError("connection was closed")
            return []

        def terminate(self) -> None:
            self.terminated = True

    class Pool:
        def __init__(self, failures: int) -> None:
            self.failures, self.calls = failures, 0
            self.handed_out: list[Connection] = []

        @contextlib.asynccontextmanager
        async def acquire(self) -> AsyncIterator[Connection]:
            conn = Connection(self)
            self.handed_out.append(conn)
            yield conn

    async def read(failures: int) -> tuple[Any, list[bool]]:
        reader = pg_job_reader.PgReader("postgresql://unused")
        pool = Pool(failures)

        async def fake_pool() -> Pool:
            return pool

        reader._pool_for_loop = fake_pool  # type: ignore[method-assign]
        try:
            outcome = await reader.job_as(digest="d", job_id="j")
        except asyncpg.ConnectionDoesNotExistError:
            outcome = "error"
        return outcome, [c.terminated for c in pool.handed_out]

    # None: no key row (the route's 401). The dead connection is never used again.
    assert asyncio.run(read(1)) == (None, [True, False])
    assert asyncio.run(read(2)) == ("error", [True, True])


@PG_ONLY
def test_killed_connections_are_replaced_not_a_500(api: Api) -> None:
    job_id = api.job("alice", api.dataset("alice"))["id"]
    url = f"/v1/jobs/{job_id}"
    assert api.client.get(url, headers=api.h("alice")).status_code == 200
    _terminate_backends(api.settings.resolved_database_url)
    for _ in range(3):
        resp = api.client.get(url, headers=api.h("alice"))
        assert resp.status_code == 200, resp.text


def _terminate_backends(database_url: str) -> None:
    """Every other session of this database dies, as in a server restart."""
    engine = create_engine(database_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            killed = conn.execute(text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
        assert killed
    finally:
        engine.dispose()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgresql_restart_costs_no_failed_request(tmp_path: Path, private_pg: Any,
                                                    mode: str) -> None:
    """The asyncpg pool's connections die with the server; the next request gets a new one."""
    from lorajobs.core.migrate import upgrade
    from tests.worker.jobfactory import make_job

    settings = Settings(data_dir=tmp_path / "data", database_url=private_pg.url)
    upgrade(settings)
    job_id = make_job(settings)
    with get_sessionmaker(settings)() as session:
        job = session.get(Job, job_id)
        assert job is not None
        _, key = keys.create_key(session, tenant_id=job.tenant_id)
        session.commit()
    auth = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings)) as client:
        assert client.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 200
        private_pg.stop(mode)
        private_pg.start()
        for _ in range(3):
            resp = client.get(f"/v1/jobs/{job_id}", headers=auth)
            assert resp.status_code == 200, resp.text


def test_asyncpg_dsn_keeps_only_the_options_asyncpg_reads() -> None:
    """libpq-only options would reach PostgreSQL as session settings and fail the connect."""
    from asyncpg.connect_utils import _parse_connect_dsn_and_args

    url = ("postgresql+psycopg://u:p%40ss@db.example:6432/lj?connect_timeout=3&keepalives=1"
           "&keepalives_idle=30&gssencmode=disable&channel_binding=prefer&sslmode=disable"
           "&client_encoding=utf8&application_name=api&target_session_attrs=read-write")
    dsn = pg_job_reader.asyncpg_dsn(url)
    assert dsn == ("postgresql://u:p%40ss@db.example:6432/lj?application_name=api"
                   "&sslmode=disable&target_session_attrs=read-write")
    assert pg_job_reader.connect_timeout(url) == 3.0
    # What asyncpg itself makes of it: only real server settings go to the server.
    _, params = _parse_connect_dsn_and_args(
        dsn=dsn, host=None, port=None, user=None, password=None, passfile=None,
        database=None, ssl=None, service=None, servicefile=None, direct_tls=None,
        server_settings=None, target_session_attrs=None, krbsrvname=None, gsslib=None)
    assert params.server_settings == {"application_name": "api"}
    assert (params.user, params.password, params.database) == ("u", "p@ss", "lj")

    plain = "postgresql+psycopg://u@h/lj"
    assert pg_job_reader.asyncpg_dsn(plain) == "postgresql://u@h/lj"
    assert pg_job_reader.connect_timeout(plain) == pg_job_reader.CONNECT_TIMEOUT_S
    timeout_default = pg_job_reader.CONNECT_TIMEOUT_S
    assert pg_job_reader.connect_timeout(plain + "?connect_timeout=0") == timeout_default
    assert pg_job_reader.connect_timeout(plain + "?connect_timeout=1") == 2.0  # libpq's minimum
    assert pg_job_reader.asyncpg_dsn("sqlite:////tmp/lj.db") is None
    reader = pg_job_reader.make_pg_reader(url)
    assert reader is not None and reader.connect_timeout == 3.0


def test_a_server_that_refuses_plan_cache_mode_still_serves(
        caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL < 12 (or a pooler) refuses the SET: logged once, the connection is kept."""

    class Conn:
        async def set_type_codec(self, *_args: Any, **_kwargs: Any) -> None:
            pass

        async def execute(self, sql: str) -> None:
            raise asyncpg.UndefinedObjectError(
                'unrecognized configuration parameter "plan_cache_mode"')

    pg_job_reader._plan_cache_refused = False
    try:
        for _ in range(2):
            asyncio.run(pg_job_reader._init_connection(Conn()))
    finally:
        pg_job_reader._plan_cache_refused = False
    assert sum("plan_cache_mode" in r.getMessage() for r in caplog.records) == 1


@PG_ONLY
def test_generic_plan_is_set_per_connection_not_at_startup(api: Api) -> None:
    reader = pg_job_reader.make_pg_reader(api.settings.resolved_database_url)
    assert reader is not None

    async def run() -> tuple[str, Any]:
        reader._adopt(asyncio.get_running_loop())
        try:
            pool = await reader._pool_for_loop()
            async with pool.acquire() as conn:
                return (await conn.fetchval("SHOW plan_cache_mode"),
                        conn._params.server_settings)
        finally:
            await reader.close()

    mode, startup_settings = asyncio.run(run())
    assert mode == "force_generic_plan"
    assert not startup_settings or "plan_cache_mode" not in startup_settings


@PG_ONLY
def test_a_query_that_hangs_fails_after_the_command_timeout(api: Api) -> None:
    """A lock held on api_keys: the read is cancelled after command_timeout, not awaited for
    ever; the connection serves the next read once the lock is gone."""
    job_id = api.job("alice", api.dataset("alice"))["id"]
    digest = keys.hash_key(api.keys["alice"])
    dsn = pg_job_reader.asyncpg_dsn(api.settings.resolved_database_url) or ""
    reader = pg_job_reader.PgReader(dsn, command_timeout=0.5)
    engine = create_engine(api.settings.resolved_database_url)

    async def run() -> tuple[Any, float, Any]:
        try:
            await reader.job_as(digest=digest, job_id=job_id)  # the pool is open
            with engine.connect() as locker:
                locker.execute(text("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE"))
                started = time.monotonic()
                try:
                    stuck: Any = await reader.job_as(digest=digest, job_id=job_id)
                except Exception as error:  # noqa: BLE001
                    stuck = error
                waited = time.monotonic() - started
                locker.rollback()
            return stuck, waited, await reader.job_as(digest=digest, job_id=job_id)
        finally:
            await reader.close()

    try:
        stuck, waited, after = asyncio.run(run())
    finally:
        engine.dispose()
    assert isinstance(stuck, TimeoutError), repr(stuck)
    assert waited < 5
    assert after.id == job_id


def test_close_fails_waiting_requests_and_opens_no_pool() -> None:
    """Shutdown while a batch waits for its pool and another request waits for a batch."""
    reader = pg_job_reader.PgReader("postgresql://unused")
    opened: list[Any] = []
    gate = asyncio.Event()

    class Pool:
        closed = False

        async def close(self) -> None:
            self.closed = True

    async def slow_open() -> Pool:
        opened.append(Pool())
        await gate.wait()
        return opened[-1]

    reader._open = slow_open  # type: ignore[method-assign]

    async def run() -> list[Any]:
        requests = []
        for i in range(3):  # in separate turns of the loop: two batches in flight, one waits
            requests.append(asyncio.ensure_future(reader.job_as(digest="d", job_id=f"j{i}")))
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        assert len(reader._waiting) == 1 and reader._in_flight == 2
        await reader.close()
        gate.set()
        return await asyncio.gather(*requests, return_exceptions=True)

    outcomes = asyncio.run(run())
    assert all(isinstance(o, asyncpg.InterfaceError) for o in outcomes), outcomes
    assert len(opened) == 1 and opened[0].closed  # the one opened meanwhile is closed
    assert reader._pool is None


@PG_ONLY
def test_timestamps_are_utc_whatever_the_session_time_zone(api: Api) -> None:
    """psycopg answers timestamptz in the session's TimeZone, asyncpg in UTC: both `Z`."""
    from sqlalchemy.orm import Session

    job_id = api.job("alice", api.dataset("alice"))["id"]
    engine = create_engine(api.settings.resolved_database_url,
                           connect_args={"options": "-c TimeZone=Asia/Kolkata"})
    try:
        with Session(engine) as session:
            row = queries.read_job_as(session, presented=api.keys["alice"], job_id=job_id)
            assert session.scalar(text("SHOW TimeZone")) == "Asia/Kolkata"
            job = session.get(Job, job_id)
            assert job is not None and job.created_at.utcoffset() is not None
            assert job.created_at.utcoffset().total_seconds() == 0
    finally:
        engine.dispose()
    sync_body = json.loads(JobPublic.from_row(row, queue_position=row.queue_position)
                           .model_dump_json())
    assert sync_body["created_at"].endswith("Z")
    resp = api.client.get(f"/v1/jobs/{job_id}", headers=api.h("alice"))
    assert resp.json() == sync_body
