"""A worker frozen inside a fenced write (jobs.hold_lease: the job's row locked, no COMMIT)
does not hold the reaper's requeue hostage (PostgreSQL): the server ends the idle transaction
and the reaper requeues the job. Found by the fleet test: a SIGSTOPped node froze mid-batch
and its job waited until the node woke up."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy.exc import DBAPIError

from lorajobs.core import jobs
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.settings import Settings
from lorajobs.core.tables import Job, JobStatus
from tests.core.test_jobs_state import load, make_job
from tests.dbfixtures import create_pg_database, drop_pg_database


@pytest.fixture
def pg_settings(tmp_path) -> Iterator[Settings]:  # type: ignore[no-untyped-def]
    """PostgreSQL only: SQLite has one writer and no row locks held across processes."""
    from lorajobs.core.db import get_engine
    from lorajobs.core.migrate import upgrade

    url = create_pg_database()
    settings = Settings(data_dir=tmp_path / "data", database_url=url)
    upgrade(settings)
    yield settings
    get_engine(settings).dispose()
    drop_pg_database(url)


def test_a_frozen_fenced_write_releases_the_row(pg_settings: Settings) -> None:
    db_settings = pg_settings
    sessions = get_sessionmaker(db_settings)
    job_id = make_job(db_settings)
    with sessions() as session:
        assert jobs.claim(session, job_id, owner="frozen", lease_seconds=60) is not None
    expired = load(db_settings, job_id).lease_expires_at + timedelta(seconds=1)
    frozen = sessions()
    try:
        # the worker's batch began: the row is locked; then the node stops (no COMMIT)
        assert jobs.hold_lease(frozen, job_id, owner="frozen", idle_timeout_seconds=1.0)
        started = time.monotonic()
        with sessions() as reaper:
            assert jobs.reap_expired_leases(reaper, now=expired) == [job_id]
        waited = time.monotonic() - started
        with pytest.raises(DBAPIError, match="idle-in-transaction timeout"):
            frozen.commit()  # the node wakes up: its transaction was ended, nothing written
    finally:
        frozen.close()  # the ended connection is discarded, not pooled
    assert 0.5 < waited < 30, waited  # blocked by the lock until the server ended the session
    job = load(db_settings, job_id)
    assert job.status == JobStatus.QUEUED and job.lease_owner is None
    with sessions() as session:  # the frozen worker's late fenced write finds its lease lost
        assert not jobs.hold_lease(session, job_id, owner="frozen")
        assert session.get(Job, job_id) is not None
