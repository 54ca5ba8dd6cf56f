"""The key check on SQLite, read on the event loop: no threadpool hop per request.

    AuthMiddleware ─▶ SqliteKeyReader.authenticate(presented)
                        ├─ a row (live key)     ─▶ the principal
                        ├─ no row / revoked     ─▶ Unauthorized (401)
                        └─ None (locked, error) ─▶ the threadpool read (authenticate_presented)

Why not a threadpool call per request: the read itself is ~30 us of SQLite, the hop around it
(wake a worker thread, hand the GIL over and back, wake the event loop) ~1 ms of CPU and, on
a loaded machine, two scheduler waits: 3-9 ms of wall time per request at load 8-15 on 2
cores, most of what the OpenAI proxy added to a completion (bench/proxy_bench.py).

Reading on the event loop must never wait. This connection is the loop thread's own (one per
thread: a TestClient runs its loop in a thread of its own), opened with no busy timeout and
`query_only`: in WAL mode (db.make_engine sets it) a reader takes no lock a writer holds, and
anything that would wait (a lock, a WAL recovery, a database not in WAL mode under a writer)
fails at once with SQLITE_BUSY instead; that request is then read on the threadpool as before,
which waits out the lock. Each request still reads the row afresh, so a revoked key fails on
its next request, as on the threadpool path (no cache). PostgreSQL keeps the threadpool read.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.engine import make_url

from lorajobs.core import keys
from lorajobs.core.tables import ApiKey

__all__ = ["SqliteKeyReader", "make_key_reader"]

_COLUMNS = ("id", "tenant_id", "key_hash", "prefix", "name", "is_admin", "manage_keys",
            "created_by", "created_at", "revoked_at")
_SQL = f"SELECT {', '.join(_COLUMNS)} FROM api_keys WHERE key_hash = ?"  # unique index


class SqliteKeyReader:
    """`SqliteKeyReader("/data/lorajobs.db").authenticate(presented)`: the live key's row,
    Unauthorized, or None where the read would have to wait (see the module)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._local = threading.local()

    def authenticate(self, presented: str) -> ApiKey | None:
        digest = keys.hash_key(presented)
        try:
            # fetchall: the statement runs to its end, which ends its read transaction (a
            # fetchone would leave it open, pinning this connection's WAL snapshot).
            rows = self._connection().execute(_SQL, (digest,)).fetchall()
        except sqlite3.Error:  # busy, locked, no such table yet ...: the waiting path decides
            self.close()
            return None
        row = dict(zip(_COLUMNS, rows[0], strict=True)) if rows else None
        keys.check_key(row["key_hash"] if row else None, row["revoked_at"] if row else None,
                       digest)
        assert row is not None  # check_key raised otherwise
        row["is_admin"], row["manage_keys"] = bool(row["is_admin"]), bool(row["manage_keys"])
        row["created_at"] = _utc(row["created_at"])
        return ApiKey(**row)  # a transient row, as detached as the threadpool path's

    def close(self) -> None:
        """This thread's connection (the next read opens another)."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # timeout=0: no busy handler, SQLITE_BUSY at once (never a wait on the loop);
            # autocommit (isolation_level=None): each SELECT is its own read transaction.
            conn = sqlite3.connect(self.path, timeout=0, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA query_only = ON")
            self._local.conn = conn
        return conn


def _utc(value: object) -> datetime | None:
    """SQLAlchemy's SQLite text timestamps ('2026-12-06 14:51:28.123456', stored UTC), aware,
    as tables.UTCDateTime answers them."""
    if value is None:
        return None
    parsed = datetime.fromisoformat(str(value))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def make_key_reader(database_url: str) -> SqliteKeyReader | None:
    """A reader for a SQLite file database; None otherwise (in-memory or URI databases, and
    PostgreSQL: the threadpool read)."""
    url = make_url(database_url)
    database = url.database
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:" \
            or database.startswith("file:"):
        return None
    return SqliteKeyReader(str(Path(database)))
