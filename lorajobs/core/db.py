"""Engine and session factory, one per process, built from the settings.

SQLite (the embedded default) gets WAL, a busy timeout and foreign keys, so the API, the worker
and the reaper can share one file. PostgreSQL gets `pool_pre_ping`, so a database restart costs
one reconnect instead of a failed request.

The ping is skipped for a connection checked back in less than `PING_IF_IDLE_S` ago: under
load every checkout found a connection used milliseconds earlier, and the ping was one extra
round trip per request (~20% of a `GET /v1/jobs/{id}`). A connection that sat in the pool
across a restart has been idle at least as long as the outage (a PostgreSQL restart takes
longer than that), so it is still pinged and replaced before use.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc, make_url
from sqlalchemy.orm import Session, sessionmaker

from lorajobs.core.settings import Settings, get_settings
from lorajobs.core.storage import PRIVATE_DIR_MODE, private_file

__all__ = ["make_engine", "get_engine", "get_sessionmaker", "session_scope"]

SQLITE_BUSY_TIMEOUT_MS = 30_000  # writers queue behind each other instead of failing
# Connections per process: >= 2 x Settings.api_max_concurrent_requests (<= 20), so an API at
# its concurrency limit never waits on the pool; the worker and reaper use one or two.
POOL_SIZE = 10
POOL_MAX_OVERFLOW = 30
POOL_CAPACITY = POOL_SIZE + POOL_MAX_OVERFLOW
PING_IF_IDLE_S = 0.2


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=POOL_SIZE, max_overflow=POOL_MAX_OVERFLOW)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    engine = create_engine(url, pool_size=POOL_SIZE, max_overflow=POOL_MAX_OVERFLOW)
    _ping_idle_connections(engine)
    _server_ended_sessions_are_disconnects(engine)
    return engine


def _server_ended_sessions_are_disconnects(engine: Engine) -> None:
    """PostgreSQL ends a session idle in a transaction past its timeout (jobs.hold_lease sets
    one) with an error SQLAlchemy does not know as a disconnect: marked as one, the connection
    is discarded instead of being rolled back (which raises again) and pooled."""

    @event.listens_for(engine, "handle_error")
    def _handle(context: Any) -> None:
        if type(context.original_exception).__name__ == "IdleInTransactionSessionTimeout":
            context.is_disconnect = True


def _ping_idle_connections(engine: Engine) -> None:
    """`pool_pre_ping`, for connections idle longer than PING_IF_IDLE_S only (see above).

    A failed ping raises DisconnectionError: the pool discards that connection and checks
    out another (SQLAlchemy's pessimistic disconnect handling)."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        last = record.info.get("checked_in_at")
        if last is not None and time.monotonic() - last < PING_IF_IDLE_S:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception as error:  # noqa: BLE001 - any failure: a dead connection
            raise exc.DisconnectionError() from error
        if not alive:
            raise exc.DisconnectionError()


@lru_cache(maxsize=4)
def _engine_for(url: str) -> Engine:
    database = make_url(url).database if url.startswith("sqlite") else None
    if database and database != ":memory:" and not database.startswith("file:"):
        private_file(Path(database))  # 0600 before SQLite creates it 0644 (and its WAL)
    return make_engine(url)


def get_engine(settings: Settings | None = None) -> Engine:
    settings = settings or get_settings()
    if settings.resolved_database_url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    return _engine_for(settings.resolved_database_url)


def get_sessionmaker(settings: Settings | None = None) -> sessionmaker[Session]:
    return sessionmaker(get_engine(settings), expire_on_commit=False)


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_sessionmaker(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
