"""Pause and resume in the job state machine (lorajobs.core.jobs) on SQLite and PostgreSQL:
a queued job pauses at once and is never claimed while paused; a running one is flagged and
its attempt ends paused (refunded), or paused after a crash while the pause was pending; a
pause racing a claim is decided on the row as it is now; resume requeues only a paused job."""

from __future__ import annotations

import pytest

from lorajobs.core import jobs
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.errors import IllegalTransition
from lorajobs.core.policy import Outcome
from lorajobs.core.settings import Settings
from lorajobs.core.tables import Job, JobStatus
from tests.core.test_jobs_state import load, make_job
from tests.dbfixtures import db_settings  # noqa: F401

S = JobStatus


def _running(settings: Settings, owner: str = "w1") -> str:
    job_id = make_job(settings)
    with get_sessionmaker(settings)() as session:
        assert jobs.claim(session, job_id, owner=owner, lease_seconds=60) is not None
    return job_id


def test_a_queued_job_pauses_at_once_and_resumes(db_settings: Settings) -> None:  # noqa: F811
    sessions = get_sessionmaker(db_settings)
    job_id = make_job(db_settings)
    with sessions() as session:
        job = jobs.request_pause(session, session.get(Job, job_id))
        assert job.status == S.PAUSED and not job.pause_requested
        assert jobs.request_pause(session, job).status == S.PAUSED  # idempotent
        assert jobs.claim(session, job_id, owner="w1", lease_seconds=60) is None
        assert job_id not in jobs.fair_queue(session, limit=100)
        assert job_id not in jobs.stale_queued_jobs(session, older_than_seconds=0)
        job = jobs.request_resume(session, session.get(Job, job_id))
        assert job.status == S.QUEUED
        with pytest.raises(IllegalTransition, match="only a paused job"):
            jobs.request_resume(session, job)
        assert jobs.claim(session, job_id, owner="w1", lease_seconds=60) is not None


def test_a_running_job_ends_its_attempt_paused(db_settings: Settings) -> None:  # noqa: F811
    sessions = get_sessionmaker(db_settings)
    job_id = _running(db_settings)
    with sessions() as session:
        job = jobs.request_pause(session, session.get(Job, job_id))
        assert job.status == S.RUNNING and job.pause_requested and job.attempt == 1
        with pytest.raises(IllegalTransition, match="pausing"):
            jobs.request_resume(session, job)
        assert jobs.end_attempt(session, job, Outcome.PAUSE_STOP, owner="w1") == S.PAUSED
        session.commit()
    job = load(db_settings, job_id)
    assert job.status == S.PAUSED and job.attempt == 0 and job.lease_owner is None
    assert not job.pause_requested and job.finished_at is None


def test_a_crash_while_pausing_ends_paused(db_settings: Settings) -> None:  # noqa: F811
    sessions = get_sessionmaker(db_settings)
    job_id = _running(db_settings)
    with sessions() as session:
        job = jobs.request_pause(session, session.get(Job, job_id))
        assert jobs.end_attempt(session, job, Outcome.CRASHED, owner="w1") == S.PAUSED
        session.commit()
    assert load(db_settings, job_id).attempt == 1  # a crash is not refunded


def test_pause_is_refused_for_finished_and_cancelling_jobs(db_settings: Settings,  # noqa: F811
                                                           ) -> None:
    sessions = get_sessionmaker(db_settings)
    done = make_job(db_settings, status=S.SUCCEEDED)
    cancelling = _running(db_settings)
    with sessions() as session:
        with pytest.raises(IllegalTransition, match="already succeeded"):
            jobs.request_pause(session, session.get(Job, done))
        jobs.request_cancel(session, session.get(Job, cancelling))
        with pytest.raises(IllegalTransition, match="being cancelled"):
            jobs.request_pause(session, session.get(Job, cancelling))
    assert not load(db_settings, cancelling).pause_requested


def test_a_pause_decides_on_the_row_as_it_is_now(db_settings: Settings) -> None:  # noqa: F811
    """Read queued, claimed meanwhile: the pause flags the running job, it does not pause a
    job a worker holds."""
    sessions = get_sessionmaker(db_settings)
    job_id = make_job(db_settings)
    with sessions() as reader, sessions() as other:
        stale = reader.get(Job, job_id)
        assert stale is not None and stale.status == S.QUEUED
        assert jobs.claim(other, job_id, owner="w2", lease_seconds=60) is not None
        job = jobs.request_pause(reader, stale)
        assert job.status == S.RUNNING and job.pause_requested and job.lease_owner == "w2"


def test_a_paused_job_cancels_at_once(db_settings: Settings) -> None:  # noqa: F811
    sessions = get_sessionmaker(db_settings)
    job_id = make_job(db_settings)
    with sessions() as session:
        jobs.request_pause(session, session.get(Job, job_id))
        job = jobs.request_cancel(session, session.get(Job, job_id))
        assert job.status == S.CANCELLED and job.finished_at is not None
        with pytest.raises(IllegalTransition):
            jobs.request_resume(session, session.get(Job, job_id))
