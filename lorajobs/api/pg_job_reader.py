"""The hot read (`GET /v1/jobs/{id}`) on PostgreSQL: asyncpg on the event loop, requests that
arrive together read in one round trip.

    request ─┐                          ┌─ at most BATCHES_IN_FLIGHT queries at a time
    request ─┼─▶ PgReader.job_as() ─▶ waiting ─▶ one fetch of queries.JOBS_AS_KEYS
    request ─┘       (a future each)         (unnest of every waiting (digest, job_id))

Clients poll this route. On the SQLAlchemy path (psycopg, sync) every request paid a
threadpool hop, about half of its in-process time. Here the read is awaited on the event loop,
and a round trip's own cost (two socket syscalls, the driver, PostgreSQL's per-statement work:
~100 us of API CPU per request, measured) is shared: while a query is in flight, the requests
that arrive wait for the next one, which reads all of them (~15 us of CPU per request in a
batch of 16). An idle server answers a lone request at once, in a batch of one.

Freshness is unchanged: a request is only ever answered by a query sent after it arrived (it
joins a batch that has not been sent), so a client sees its own cancel or a revoked key on
the next read, as on the sync path. Each request keeps its own outcome: 401 for its key, 404
for its job. A batch PostgreSQL refuses for its data (SQLSTATE class 22, e.g. a job id with
a NUL byte) is read again one request at a time, so that request fails alone; any other error
(a statement timeout, a missing table, a privilege) is the database's, and fails the batch's
requests at once instead of multiplying the queries sent to a struggling server. A query that
runs longer than COMMAND_TIMEOUT_S is cancelled and its requests fail (500), not hang.

Stale connections: a connection that lived through a PostgreSQL restart is closed by the
server; asyncpg sees the EOF and the pool opens a new one on the next acquire. A query that
still meets a dead connection (the restart happened mid-request, or the EOF was not read yet)
is sent again once on another connection (the read is idempotent), instead of a 500. A
database that stays down is still an error (500), as on the sync path.

asyncpg prepares the statement once per connection; behind a pooler in transaction mode that
needs PgBouncer >= 1.21 (`max_prepared_statements`). SQLite keeps the sync path.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from lorajobs.api.queries import JOBS_AS_KEYS

__all__ = ["PgReader", "asyncpg_dsn", "connect_timeout", "make_pg_reader"]

log = logging.getLogger(__name__)

# Queries in flight at once. While they are, new requests wait and go together in the next
# one: fewer in flight, bigger batches, less CPU per request; a request waits at most about
# one round trip longer (~0.2 ms idle). Two keep PostgreSQL busy while the API decodes a reply.
BATCHES_IN_FLIGHT = 2
# Requests per query; more wait for the next. Settings.api_max_concurrent_requests (<= 20)
# caps the requests inside the app, so under it a batch never splits.
MAX_BATCH = 64
POOL_MIN_SIZE = 1
POOL_MAX_SIZE = BATCHES_IN_FLIGHT  # the only users of this pool (the sync one is separate)
CONNECT_TIMEOUT_S = 10.0  # as a sync checkout that waits for a slow server, then fails
# A query (one batch) that runs longer is cancelled on the server and its requests fail. The
# read takes ~1 ms; 10 s is a server that is stuck (a lock held on api_keys or jobs, a
# saturated disk), where failing frees the route instead of piling requests behind it.
COMMAND_TIMEOUT_S = 10.0
POOL_MAX_IDLE_S = 300.0  # asyncpg's default: an idle API keeps one connection open
# One plan per connection for the one statement these connections run. PostgreSQL's default
# (`auto`) planned it afresh on every execution (~0.13 ms, more than running it): the generic
# plan's estimate for `unnest` of a parameter (10 rows) looks dearer than a custom plan for
# one. The generic plan is still replanned when ANALYZE changes the tables' statistics.
# Set by a SET when a connection opens (see _init_connection), not as a startup parameter,
# which PgBouncer refuses (unknown startup parameter) and PostgreSQL < 12 too.
PLAN_CACHE_SQL = "SET plan_cache_mode = force_generic_plan"

# The URL options (libpq's names) asyncpg reads itself; it sends any other one to the server
# as a session setting at startup, and PostgreSQL refuses the connection for a name that is
# not a setting (`keepalives`, `gssencmode` ...). Of the libpq-only options, connect_timeout
# becomes create_pool's `timeout` (connect_timeout()), the others (TCP keepalives, GSS
# encryption, channel binding, client_encoding: asyncpg always speaks UTF-8) are dropped.
_ASYNCPG_OPTIONS = frozenset({
    "host", "port", "dbname", "database", "user", "password", "passfile", "service",
    "sslmode", "sslcert", "sslkey", "sslrootcert", "sslcrl", "sslpassword", "sslnegotiation",
    "ssl_min_protocol_version", "ssl_max_protocol_version", "target_session_attrs",
    "krbsrvname", "gsslib",
    # Not asyncpg's, but PostgreSQL's own startup parameters, as libpq sends them.
    "application_name", "options",
})


def asyncpg_dsn(url: str) -> str | None:
    """`postgresql+psycopg://u:p@h:5432/db?sslmode=require&keepalives=1` ->
    `postgresql://u:p@h:5432/db?sslmode=require`: the options asyncpg understands (above),
    libpq-only ones dropped; None for a database asyncpg cannot serve (SQLite)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return None
    query = {name: value for name, value in parsed.query.items() if name in _ASYNCPG_OPTIONS}
    if "application_name" not in query and "fallback_application_name" in parsed.query:
        query["application_name"] = parsed.query["fallback_application_name"]
    return parsed.set(drivername="postgresql", query=query).render_as_string(
        hide_password=False)


def connect_timeout(url: str) -> float:
    """The URL's libpq `connect_timeout` (seconds; libpq's minimum of 2 s), else
    CONNECT_TIMEOUT_S; 0 (libpq: wait forever) and a value that is no number are the default
    too: a connect that never ends would hang the route."""
    value = make_url(url).query.get("connect_timeout")
    if isinstance(value, tuple):  # given twice: libpq takes the last
        value = value[-1]
    try:
        seconds = float(value) if value is not None else 0.0
    except ValueError:
        return CONNECT_TIMEOUT_S
    return max(seconds, 2.0) if seconds > 0 else CONNECT_TIMEOUT_S


def _compile_statement() -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """JOBS_AS_KEYS as asyncpg SQL ($1, $2, ...): (sql, bind names in order, the values of
    the statement's own constants, e.g. the 'queued' of the queue position)."""
    from sqlalchemy.dialects.postgresql.asyncpg import dialect

    compiled = JOBS_AS_KEYS.compile(dialect=dialect())
    names = tuple(compiled.positiontup or ())
    constants = {name: compiled.binds[name].value for name in names
                 if name not in ("digests", "job_ids")}
    return str(compiled), names, constants


_SQL, _BIND_ORDER, _CONSTANTS = _compile_statement()
_JSON_TYPES = ("json", "jsonb")
# The connection died under a query (server restart or crash, a killed backend), and the same
# query on another connection may well succeed. InternalClientError too: a server that ends a
# session sends its FATAL error unasked; a query sent before asyncpg has read the EOF that
# follows finds the protocol mid-error ("another operation is in progress").
_CONNECTION_LOST = (asyncpg.PostgresConnectionError, asyncpg.AdminShutdownError,
                    asyncpg.CrashShutdownError, ConnectionError)
_CONNECTION_BROKEN = (*_CONNECTION_LOST, asyncpg.InternalClientError)
_Request = tuple[str, str, "asyncio.Future[SimpleNamespace | None]"]  # digest, job_id, answer


class PgReader:
    """An asyncpg pool for the hot read path, opened on first use in the running event loop.

    A pool belongs to one event loop. uvicorn has one for the life of the process; a caller
    that runs each request in a fresh loop (Starlette's TestClient outside a `with` block)
    gets a fresh pool in each, and the previous one is dropped."""

    def __init__(self, dsn: str, *, connect_timeout: float = CONNECT_TIMEOUT_S,
                 command_timeout: float = COMMAND_TIMEOUT_S) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._closed = False
        self._pool: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: asyncio.Lock | None = None
        self._waiting: list[_Request] = []
        self._in_flight = 0
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def job_as(self, *, digest: str, job_id: str) -> SimpleNamespace | None:
        """This request's JOBS_AS_KEYS row (attributes by label, JSON decoded; the columns of
        queries.JOB_AS_KEY), None if no key matches `digest`. Read together with the other
        requests waiting at the time (see above)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._adopt(loop)
        if self._closed:
            raise asyncpg.InterfaceError("the job reader is closed")
        answer: asyncio.Future[SimpleNamespace | None] = loop.create_future()
        self._waiting.append((digest, job_id, answer))
        self._schedule_flush()
        return await answer

    async def close(self) -> None:
        """Shutdown: waiting requests fail, a batch in flight opens no new pool; the pool
        closes once the queries in flight are done. A later use in another event loop (a new
        TestClient) starts afresh."""
        self._closed = True
        waiting, self._waiting = self._waiting, []
        _fail(waiting, asyncpg.InterfaceError("the job reader is closed"))
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _schedule_flush(self) -> None:
        # call_soon, not now: the requests made runnable by the same read of the sockets
        # register first and go in this batch.
        if not self._flush_scheduled and self._in_flight < BATCHES_IN_FLIGHT:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch = [r for r in self._waiting[:MAX_BATCH] if not r[2].done()]  # done: cancelled
        del self._waiting[:MAX_BATCH]
        if batch:
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._answer(batch))
            self._tasks.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(self._tasks.discard)
        if self._waiting:
            self._schedule_flush()

    async def _answer(self, batch: list[_Request]) -> None:
        try:
            await self._settle(batch)
        finally:
            self._in_flight -= 1
            if self._waiting:
                self._schedule_flush()

    async def _settle(self, batch: list[_Request]) -> None:
        """Read `batch` and hand each request its row, or the error to every one of them."""
        try:
            rows = await self._read(batch)
        except asyncpg.PostgresError as error:
            if len(batch) > 1 and _is_data_error(error):
                # One request's values were refused: refuse them to that request only.
                for request in batch:
                    await self._settle([request])
                return
            _fail(batch, error)
            return
        except Exception as error:  # noqa: BLE001 - handed to the requests, not lost
            _fail(batch, error)
            return
        for (_, _, answer), row in zip(batch, rows, strict=True):
            if not answer.done():
                answer.set_result(row)

    async def _read(self, batch: Sequence[_Request]) -> list[SimpleNamespace | None]:
        """One JOBS_AS_KEYS round trip; a broken connection is retried once on another."""
        binds = {**_CONSTANTS, "digests": [r[0] for r in batch],
                 "job_ids": [r[1] for r in batch]}
        args = [binds[name] for name in _BIND_ORDER]
        for attempt in (1, 2):
            pool = await self._pool_for_loop()
            async with pool.acquire() as conn:
                try:
                    records = await conn.fetch(_SQL, *args)
                    break
                except _CONNECTION_BROKEN:
                    # Never hand this connection out again; the pool opens a new one. A
                    # second failure is a database that is down.
                    _discard(conn)
                    if attempt == 2:
                        raise
        rows: list[SimpleNamespace | None] = [None] * len(batch)
        for record in records:
            fields = dict(record.items())
            rows[fields.pop("n") - 1] = SimpleNamespace(**fields)
        return rows

    def _adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        """First use in `loop`: forget a pool and requests of another (or a closed) loop."""
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                pool.terminate()
            except RuntimeError:  # its loop is closed: the sockets went with it
                pass
        self._loop, self._opening, self._closed = loop, asyncio.Lock(), False
        self._waiting, self._in_flight, self._flush_scheduled = [], 0, False
        self._tasks = set()

    async def _pool_for_loop(self) -> Any:
        if self._pool is not None:
            return self._pool
        assert self._opening is not None
        async with self._opening:
            if self._closed:
                raise asyncpg.InterfaceError("the job reader is closed")
            if self._pool is None:
                pool = await self._open()
                if self._closed:  # closed while this pool opened: nobody would close it
                    await pool.close()
                    raise asyncpg.InterfaceError("the job reader is closed")
                self._pool = pool
        return self._pool

    async def _open(self) -> Any:
        return await asyncpg.create_pool(
            self.dsn, min_size=POOL_MIN_SIZE, max_size=POOL_MAX_SIZE,
            timeout=self.connect_timeout, command_timeout=self.command_timeout,
            max_inactive_connection_lifetime=POOL_MAX_IDLE_S, init=_init_connection,
            reset=_keep_session)


def _is_data_error(error: asyncpg.PostgresError) -> bool:
    """SQLSTATE class 22 (data exception): the values of a request, not the database."""
    return str(getattr(error, "sqlstate", "") or "").startswith("22")


def _discard(conn: Any) -> None:
    """Close a broken connection for good (the pool opens a new one in its place)."""
    try:
        conn.terminate()
    except asyncpg.InterfaceError:  # closed already, and handed back to the pool by asyncpg
        pass


def _fail(batch: list[_Request], error: BaseException) -> None:
    for _, _, answer in batch:
        if not answer.done():
            answer.set_exception(error)


_plan_cache_refused = False  # logged once per process, not once per connection


async def _init_connection(conn: Any) -> None:
    """json/jsonb columns as Python objects, as SQLAlchemy's JSON type returns them; one
    generic plan (PLAN_CACHE_SQL) where the server allows it, else PostgreSQL's default."""
    global _plan_cache_refused
    for name in _JSON_TYPES:
        await conn.set_type_codec(name, schema="pg_catalog", encoder=json.dumps,
                                  decoder=json.loads)
    try:
        await conn.execute(PLAN_CACHE_SQL)
    except asyncpg.PostgresError as error:  # PostgreSQL < 12, or a pooler that refuses it
        if not _plan_cache_refused:
            _plan_cache_refused = True
            log.warning("job reader: %r refused (%s); PostgreSQL plans each read itself",
                        PLAN_CACHE_SQL, error)


async def _keep_session(_conn: Any) -> None:
    """Pool release without asyncpg's default reset query (`RESET ALL; UNLISTEN *; ...`, one
    more round trip per request): these connections only ever run the one SELECT, which
    changes no session state. An open transaction is still rolled back by the pool."""


def make_pg_reader(database_url: str) -> PgReader | None:
    """A PgReader for a PostgreSQL URL, None otherwise (the route then reads synchronously)."""
    dsn = asyncpg_dsn(database_url)
    if dsn is None:
        return None
    return PgReader(dsn, connect_timeout=connect_timeout(database_url))
