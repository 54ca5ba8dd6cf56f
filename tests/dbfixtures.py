"""Database fixtures: a migrated SQLite file, and a fresh migrated PostgreSQL database.

PostgreSQL is the machine's shared server (127.0.0.1:5432, trust auth). Each test session gets
its own database, dropped afterwards. Without the server the PG tests skip, unless
LORAJOBS_REQUIRE_SERVICES=1 (CI), where its absence is a failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PG_ADMIN_URL = os.environ.get("LORAJOBS_TEST_PG_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("LORAJOBS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("LORAJOBS_REQUIRE_SERVICES") == "1"


def service_missing(what: str, exc: BaseException) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{what} is required (LORAJOBS_REQUIRE_SERVICES=1) but unreachable: {exc}")
    pytest.skip(f"{what} not reachable: {exc}")


def create_pg_database() -> str:
    """Create an empty database on the shared server; return its URL."""
    from sqlalchemy import create_engine, text

    name = f"lorajobs_t_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any connection failure means "no server"
        service_missing("PostgreSQL", exc)
    finally:
        admin.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_pg_database(url: str) -> None:
    from sqlalchemy import create_engine, text

    name = url.rsplit("/", 1)[1]
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def check_redis() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001
        service_missing("Redis", exc)
    return REDIS_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def db_settings(request: pytest.FixtureRequest, tmp_path) -> Iterator[object]:
    """Settings pointing at a freshly migrated database of each backend."""
    from lorajobs.core.migrate import upgrade
    from lorajobs.core.settings import Settings

    url = None
    if request.param == "postgresql":
        url = create_pg_database()
    settings = Settings(data_dir=tmp_path / "data", database_url=url)
    upgrade(settings)
    yield settings
    if url:
        from lorajobs.core.db import get_engine

        get_engine(settings).dispose()
        drop_pg_database(url)


@dataclass
class TinyTenant:
    """A migrated database with the tiny model registered as "tiny" and one tenant: what the
    in-process submit tests start from."""

    settings: Any
    store: Any
    session: Any
    tenant_id: str


def tiny_tenant(db_settings: Any, tmp_path: Path, tiny_model_dir: Path) -> TinyTenant:
    from lorajobs.core import keys, registry
    from lorajobs.core.db import get_sessionmaker
    from lorajobs.core.storage import get_store

    settings = db_settings.model_copy(update={"model_root": tmp_path / "models"})
    shutil.copytree(tiny_model_dir, settings.resolved_model_root / "tiny")
    session = get_sessionmaker(settings)()
    tenant = keys.create_tenant(session, name="t")
    session.commit()
    registry.register_model(session, name="tiny", path_under_model_root="tiny", settings=settings)
    return TinyTenant(settings, get_store(settings), session, tenant.id)


@contextmanager
def recorded_statements(settings: Any) -> Iterator[list[str]]:
    """Every SQL statement the settings' engine executes inside the block, in order."""
    from sqlalchemy import event

    from lorajobs.core.db import get_engine

    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    engine = get_engine(settings)
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)
