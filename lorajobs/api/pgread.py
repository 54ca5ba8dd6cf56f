"""The hot read (`GET /v1/jobs/{id}`) on PostgreSQL, awaited on the event loop through asyncpg.

    route (async) ──await──▶ PgReader.job_as(digest, job_id) ──▶ asyncpg pool, one fetchrow
                                                                 of queries.JOB_AS_KEY

Clients poll this route. On the SQLAlchemy path (psycopg, sync) every request paid a
threadpool hop, about half of its in-process time; here the same statement (JOB_AS_KEY,
compiled once for asyncpg, so both paths run one definition) is awaited on the event loop,
and asyncpg prepares it once per connection. SQLite keeps the sync path (`pg_reader` is None).

Stale connections: a connection that lived through a PostgreSQL restart is closed by the
server; asyncpg sees the EOF and the pool opens a new one on the next acquire. A query that
still meets a dead connection (the restart happened mid-request, or the EOF was not read yet)
is retried once on another connection: the read is idempotent, and the same request answers
instead of a 500. A database that is down for longer is still an error (500), as on the sync
path.

Behind a connection pooler in transaction mode, asyncpg's named prepared statements need
PgBouncer >= 1.21 (`max_prepared_statements`).
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

from sqlalchemy.engine import make_url

from lorajobs.api.queries import JOB_AS_KEY

__all__ = ["PgReader", "asyncpg_dsn", "make_pg_reader"]

# Connections of this API process's asyncpg pool (the sync SQLAlchemy pool is separate).
# Requests in the app are capped at Settings.api_max_concurrent_requests (<= 20); one query
# takes well under a millisecond, so a few connections serve them all and leave PostgreSQL's
# CPU (on the same cores in small deployments) to the queries, not to idle backends.
POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 8
CONNECT_TIMEOUT_S = 10.0  # as a sync checkout that waits for a slow server, then fails
# A connection unused this long is closed (asyncpg's default), so an idle API holds one.
POOL_MAX_IDLE_S = 300.0


def asyncpg_dsn(url: str) -> str | None:
    """`postgresql+psycopg://u:p@h:5432/db?x=y` -> `postgresql://u:p@h:5432/db?x=y`; None for
    a database asyncpg cannot serve (SQLite)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return None
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def _compile_statement() -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """JOB_AS_KEY as asyncpg SQL ($1, $2, ...): (sql, bind names in order, constant binds)."""
    from sqlalchemy.dialects.postgresql.asyncpg import dialect

    compiled = JOB_AS_KEY.compile(dialect=dialect())
    names = tuple(compiled.positiontup or ())
    constants = {name: compiled.binds[name].value for name in names
                 if name not in ("digest", "job_id")}
    return str(compiled), names, constants


_SQL, _BIND_ORDER, _CONSTANTS = _compile_statement()
_JSON_TYPES = ("json", "jsonb")


class PgReader:
    """An asyncpg pool for the hot read path, opened on first use in the running event loop.

    A pool belongs to one event loop. uvicorn has one for the life of the process; a caller
    that runs each request in a fresh loop (Starlette's TestClient outside a `with` block)
    gets a fresh pool in each, and the previous one is dropped."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._pool: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: asyncio.Lock | None = None

    async def job_as(self, *, digest: str, job_id: str) -> SimpleNamespace | None:
        """The JOB_AS_KEY row (attributes by label, JSON decoded), None if no key matches."""
        import asyncpg

        args = [{"digest": digest, "job_id": job_id}.get(n, _CONSTANTS.get(n))
                for n in _BIND_ORDER]
        for attempt in (1, 2):
            pool = await self._pool_for_loop()
            try:
                record = await pool.fetchrow(_SQL, *args)
                break
            except (asyncpg.PostgresConnectionError, asyncpg.AdminShutdownError,
                    asyncpg.CrashShutdownError, ConnectionError) as error:
                # The connection died under us (server restart, killed backend); the pool
                # has already dropped it. A second failure is a database that is down.
                if attempt == 2:
                    raise error
        return SimpleNamespace(**record) if record is not None else None

    async def close(self) -> None:
        pool, self._pool, self._loop = self._pool, None, None
        if pool is not None:
            await pool.close()

    async def _pool_for_loop(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._pool is not None and self._loop is loop:
            return self._pool
        if self._loop is not loop:
            self._drop_foreign_pool()
            self._loop, self._opening = loop, asyncio.Lock()
        assert self._opening is not None
        async with self._opening:
            if self._pool is None:
                self._pool = await self._open()
        return self._pool

    async def _open(self) -> Any:
        import asyncpg

        return await asyncpg.create_pool(
            self.dsn, min_size=POOL_MIN_SIZE, max_size=POOL_MAX_SIZE, timeout=CONNECT_TIMEOUT_S,
            max_inactive_connection_lifetime=POOL_MAX_IDLE_S, init=_init_connection,
            reset=_keep_session)

    def _drop_foreign_pool(self) -> None:
        """Abort the sockets of a pool whose event loop is gone (or another one)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                pool.terminate()
            except RuntimeError:  # its loop is closed: the sockets went with it
                pass


async def _init_connection(conn: Any) -> None:
    """json/jsonb columns as Python objects, as SQLAlchemy's JSON type returns them."""
    for name in _JSON_TYPES:
        await conn.set_type_codec(name, schema="pg_catalog", encoder=json.dumps,
                                  decoder=json.loads)


async def _keep_session(_conn: Any) -> None:
    """Pool release without asyncpg's default reset query (`RESET ALL; UNLISTEN *; ...`, one
    more round trip per request): these connections only ever run the one SELECT, which
    changes no session state. An open transaction is still rolled back by the pool."""


def make_pg_reader(database_url: str) -> PgReader | None:
    """A PgReader for a PostgreSQL URL, None otherwise (the route then reads synchronously)."""
    dsn = asyncpg_dsn(database_url)
    return PgReader(dsn) if dsn is not None else None
