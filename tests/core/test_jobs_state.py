"""The job state machine (lorajobs.core.jobs) on SQLite and PostgreSQL.

Illegal transitions are refused in one place; claim is a no-op unless the job is queued and
not cancel-requested; the reaper requeues or fails expired leases; of two racing claims
exactly one wins.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from lora_core.events import JobError
from lorajobs.core import jobs
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.errors import IllegalTransition
from lorajobs.core.policy import Outcome
from lorajobs.core.settings import Settings
from lorajobs.core.tables import Job, JobEvent, JobStatus, Tenant, new_id, utcnow
from tests.dbfixtures import db_settings  # noqa: F401

S = JobStatus


def make_job(settings: Settings, *, status: str = S.QUEUED, **values) -> str:  # type: ignore[no-untyped-def]
    with get_sessionmaker(settings)() as session:
        tenant = session.scalar(select(Tenant)) or Tenant(id=new_id("ten"), name="t")
        session.add(tenant)
        session.flush()  # no relationship() declared: the ORM would not order the inserts
        job = Job(id=new_id("job"), tenant_id=tenant.id, base_model="m", training_file="ds_x",
                  spec={}, status=status, **values)
        session.add(job)
        session.commit()
        return job.id


def load(settings: Settings, job_id: str) -> Job:
    with get_sessionmaker(settings)() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_illegal_transitions_refused(db_settings: Settings) -> None:  # noqa: F811
    sessions = get_sessionmaker(db_settings)
    for start, target in [(S.QUEUED, S.SUCCEEDED), (S.SUCCEEDED, S.RUNNING),
                          (S.FAILED, S.QUEUED), (S.CANCELLED, S.QUEUED), (S.QUEUED, S.QUEUED)]:
        job_id = make_job(db_settings, status=start)
        with sessions() as session:
            job = session.get(Job, job_id)
            with pytest.raises(IllegalTransition):
                jobs.transition(session, job, to=target)
        assert load(db_settings, job_id).status == start
    job_id = make_job(db_settings)
    with sessions() as session:
        job = session.get(Job, job_id)
        jobs.transition(session, job, to=S.CANCELLED)
        session.commit()
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).all()
        assert [(e.type, e.data["from"], e.data["to"]) for e in events] == [
            ("status", S.QUEUED, S.CANCELLED)]
    assert load(db_settings, job_id).finished_at is not None


def test_transition_checks_the_lease_owner(db_settings: Settings) -> None:  # noqa: F811
    job_id = make_job(db_settings)
    with get_sessionmaker(db_settings)() as session:
        job = jobs.claim(session, job_id, owner="w1", lease_seconds=60)
        assert job is not None and job.status == S.RUNNING and job.attempt == 1
        with pytest.raises(IllegalTransition):
            jobs.transition(session, job, to=S.SUCCEEDED, expect_owner="w2")
        session.rollback()
        jobs.transition(session, job, to=S.SUCCEEDED, expect_owner="w1")
        session.commit()
    done = load(db_settings, job_id)
    assert done.status == S.SUCCEEDED and done.lease_owner is None


def test_claim_is_a_noop_unless_claimable(db_settings: Settings) -> None:  # noqa: F811
    sessions = get_sessionmaker(db_settings)
    claimed = make_job(db_settings)
    with sessions() as session:
        assert jobs.claim(session, claimed, owner="w1", lease_seconds=60) is not None
    others = [make_job(db_settings, status=s) for s in (S.SUCCEEDED, S.FAILED, S.CANCELLED)]
    flagged = make_job(db_settings, cancel_requested=True)
    for job_id in [claimed, *others, flagged, "job_missing"]:
        with sessions() as session:
            assert jobs.claim(session, job_id, owner="w2", lease_seconds=60) is None
    running = load(db_settings, claimed)
    assert running.lease_owner == "w1" and running.attempt == 1


def _race_claims(settings: Settings, job_id: str, owners: list[str]) -> list[bool]:
    """Each owner claims `job_id` from its own thread and session, all released at once."""
    sessions = get_sessionmaker(settings)
    barrier = threading.Barrier(len(owners))
    won: list[bool] = []

    def worker(owner: str) -> None:
        with sessions() as session:
            barrier.wait()
            won.append(jobs.claim(session, job_id, owner=owner, lease_seconds=60) is not None)

    threads = [threading.Thread(target=worker, args=(owner,)) for owner in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won


def test_two_racing_claims_one_wins(db_settings: Settings) -> None:  # noqa: F811
    for _ in range(3):
        job_id = make_job(db_settings)
        assert sorted(_race_claims(db_settings, job_id, ["w1", "w2"])) == [False, True]
        assert load(db_settings, job_id).attempt == 1


def test_reaper_requeues_fails_or_cancels(db_settings: Settings) -> None:  # noqa: F811
    sessions = get_sessionmaker(db_settings)
    retry, spent, stopping, live = (make_job(db_settings, max_attempts=m) for m in (3, 1, 3, 3))
    with sessions() as session:
        for job_id in (retry, spent, stopping, live):
            assert jobs.claim(session, job_id, owner="dead", lease_seconds=60)
        past = utcnow() - timedelta(seconds=5)
        session.execute(update(Job).where(Job.id.in_([retry, spent, stopping]))
                        .values(lease_expires_at=past))
        session.execute(update(Job).where(Job.id == stopping).values(cancel_requested=True))
        session.commit()
        assert jobs.reap_expired_leases(session) == [retry]
    assert load(db_settings, retry).status == S.QUEUED
    assert load(db_settings, retry).lease_owner is None
    failed = load(db_settings, spent)
    assert failed.status == S.FAILED and failed.error["code"] == "worker_lost"
    assert failed.error["user_fault"] is False
    assert load(db_settings, stopping).status == S.CANCELLED
    assert load(db_settings, live).status == S.RUNNING
    with sessions() as session:  # requeued job is claimable again: attempt 2
        again = jobs.claim(session, retry, owner="w2", lease_seconds=60)
        assert again is not None and again.attempt == 2


def test_request_cancel(db_settings: Settings) -> None:  # noqa: F811
    sessions = get_sessionmaker(db_settings)
    queued, running, done = make_job(db_settings), make_job(db_settings), make_job(
        db_settings, status=S.SUCCEEDED)
    with sessions() as session:
        assert jobs.request_cancel(session, session.get(Job, queued)).status == S.CANCELLED
        jobs.claim(session, running, owner="w1", lease_seconds=60)
        job = jobs.request_cancel(session, session.get(Job, running))
        assert job.status == S.RUNNING and job.cancel_requested
        with pytest.raises(IllegalTransition) as info:
            jobs.request_cancel(session, session.get(Job, done))
        assert info.value.code == "job_not_cancellable"
    with sessions() as session:  # renew still works; the worker sees the flag and stops
        assert jobs.renew_lease(session, running, owner="w1", lease_seconds=60)
        assert not jobs.renew_lease(session, running, owner="w9", lease_seconds=60)


def _claimed(settings: Settings, *, lease_seconds: int = 60) -> str:
    job_id = make_job(settings)
    with get_sessionmaker(settings)() as session:
        assert jobs.claim(session, job_id, owner="w1", lease_seconds=lease_seconds)
    return job_id


def test_cancel_racing_a_requeue_it_did_not_see(db_settings: Settings) -> None:  # noqa: F811
    """The API read the job running; the reaper requeued it; then the cancel lands. The cancel
    decides on the row as it is now: cancelled, not a flagged job left queued forever."""
    job_id = _claimed(db_settings, lease_seconds=0)
    sessions = get_sessionmaker(db_settings)
    with sessions() as api, sessions() as reaper:
        seen = api.get(Job, job_id)  # what the cancel route read: running
        assert seen is not None and seen.status == S.RUNNING
        assert jobs.reap_expired_leases(reaper, now=utcnow() + timedelta(seconds=1)) == [job_id]
        assert jobs.request_cancel(api, seen).status == S.CANCELLED
    job = load(db_settings, job_id)
    assert job.status == S.CANCELLED and job.finished_at is not None
    with sessions() as session:
        assert jobs.claim(session, job_id, owner="w2", lease_seconds=60) is None
        history = session.scalars(select(JobEvent.data).where(
            JobEvent.job_id == job_id, JobEvent.type == "status").order_by(JobEvent.id)).all()
    assert [e["to"] for e in history] == [S.RUNNING, S.QUEUED, S.CANCELLED]


def test_giving_up_racing_a_cancel_it_did_not_see(db_settings: Settings) -> None:  # noqa: F811
    """The reaper read a job on its last attempt, unflagged (-> failed); the cancel lands first:
    the policy's row "cancel requested -> cancelled" holds, not the stale decision."""
    job_id = make_job(db_settings, max_attempts=1)
    sessions = get_sessionmaker(db_settings)
    with sessions() as session:
        assert jobs.claim(session, job_id, owner="w1", lease_seconds=60)
    with sessions() as api, sessions() as reaper:
        seen = reaper.get(Job, job_id)
        assert seen is not None and not seen.cancel_requested
        jobs.request_cancel(api, api.get(Job, job_id))
        assert jobs.end_attempt(reaper, seen, Outcome.WORKER_LOST, owner="w1") == S.CANCELLED
        reaper.commit()
    job = load(db_settings, job_id)
    assert job.status == S.CANCELLED and job.error is None


def test_requeue_racing_a_cancel_it_did_not_see(db_settings: Settings) -> None:  # noqa: F811
    """The reaper (or a stopping worker) read the job unflagged; the cancel lands; then the
    requeue: running -> queued is refused on a flagged row and `end_attempt` decides again on
    the row as it is now: cancelled."""
    sessions = get_sessionmaker(db_settings)
    for refund in (False, True):
        job_id = _claimed(db_settings)
        with sessions() as api, sessions() as worker:
            seen = worker.get(Job, job_id)
            assert seen is not None and not seen.cancel_requested
            flagged = jobs.request_cancel(api, api.get(Job, job_id))
            assert flagged.status == S.RUNNING and flagged.cancel_requested
            # decided on the stale row: queued; refused (flag set), decided again: cancelled
            outcome = Outcome.SHUTDOWN if refund else Outcome.CRASHED
            assert jobs.end_attempt(worker, seen, outcome, owner="w1") == S.CANCELLED
            worker.commit()
            history = worker.scalars(select(JobEvent.data).where(
                JobEvent.job_id == job_id, JobEvent.type == "status").order_by(JobEvent.id))
            assert [e["to"] for e in history] == [S.RUNNING, S.CANCELLED]
        job = load(db_settings, job_id)
        assert job.status == S.CANCELLED and job.lease_owner is None and job.attempt == 1



def test_claim_goes_through_the_transition_table(db_settings: Settings,  # noqa: F811
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`ALLOWED_TRANSITIONS` is the single source: without queued -> running, no claim."""
    job_id = make_job(db_settings)
    monkeypatch.setitem(jobs.ALLOWED_TRANSITIONS, S.QUEUED, frozenset({S.CANCELLED, S.FAILED}))
    with get_sessionmaker(db_settings)() as session:
        assert jobs.claim(session, job_id, owner="w1", lease_seconds=60) is None
    assert load(db_settings, job_id).status == S.QUEUED


def test_end_attempt_applies_the_policy(db_settings: Settings) -> None:  # noqa: F811
    """A crash on the last attempt fails with the given error; with a cancel pending it is
    cancelled instead (the same rule as the reaper's); a job no longer ours raises."""
    sessions = get_sessionmaker(db_settings)
    spent, flagged = (make_job(db_settings, max_attempts=1) for _ in range(2))
    error = JobError(code="trainer_crashed", message="the trainer died")
    with sessions() as session:
        for job_id in (spent, flagged):
            assert jobs.claim(session, job_id, owner="w1", lease_seconds=60)
        jobs.request_cancel(session, session.get(Job, flagged))
        for job_id, expected in ((spent, S.FAILED), (flagged, S.CANCELLED)):
            job = session.get(Job, job_id)
            assert jobs.end_attempt(session, job, Outcome.CRASHED, owner="w1",
                                    error=error) == expected
            session.commit()
            with pytest.raises(IllegalTransition):  # settled: the attempt is no longer running
                jobs.end_attempt(session, job, Outcome.CRASHED, owner="w1", error=error)
            session.rollback()
    assert load(db_settings, spent).error == {"code": "trainer_crashed", "param": None,
                                              "message": "the trainer died", "user_fault": False}
    assert load(db_settings, flagged).error is None
