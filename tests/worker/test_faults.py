"""Faults against real worker processes (SQLite + embedded broker; fake trainer):
claim races, cancel, trainer crashes, worker death and worker shutdown. Leases last 3 s here."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from lorajobs.core import jobs
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.queue import enqueue_job
from lorajobs.core.storage import get_store
from lorajobs.core.tables import Checkpoint, Job
from lorajobs.worker import tasks
from lorajobs.worker.process_control import pid_alive
from tests.servicefixtures import LiveService, wait_for
from tests.worker.jobfactory import (
    events,
    get_job,
    make_job,
    status_history,
    trainer_pids,
    trainer_starts,
)

pytestmark = pytest.mark.timeout(120)


def _status(svc: LiveService, job_id: str) -> str:
    return get_job(svc.settings, job_id).status


def _wait_status(svc: LiveService, job_id: str, status: str, timeout: float = 30) -> None:
    wait_for(lambda: _status(svc, job_id) == status, timeout=timeout,
             what=f"{job_id} {status} (now {_status(svc, job_id)})")


def _wait_checkpoint(svc: LiveService, job_id: str, timeout: float = 30) -> None:
    wait_for(lambda: events(svc.settings, job_id, "checkpoint"), timeout=timeout,
             what="a checkpoint")


def _cancel_after_a_checkpoint(svc: LiveService, control: dict[str, object]
                               ) -> tuple[str, float]:
    """A worker runs a long job; cancel it once it has a checkpoint. (job id, cancel time)."""
    svc.start_worker()
    job_id = make_job(svc.settings, max_steps=200, control=control)
    enqueue_job(job_id, svc.settings)
    _wait_checkpoint(svc, job_id)
    with get_sessionmaker(svc.settings)() as session:
        jobs.request_cancel(session, session.get(Job, job_id))
    return job_id, time.monotonic()


def test_claim_under_live_lease_is_noop(service: LiveService) -> None:
    settings = service.settings
    job_id = make_job(settings)
    with get_sessionmaker(settings)() as session:
        assert jobs.claim(session, job_id, owner="other:1:x", lease_seconds=60) is not None
    tasks.bind_settings(settings)
    assert tasks.run_job(job_id) == "noop"
    job = get_job(settings, job_id)
    assert job.lease_owner == "other:1:x" and job.attempt == 1
    assert trainer_starts(settings, job_id) == []


@pytest.mark.parametrize("service", ["sqlite", "postgresql"], indirect=True)
def test_cancel_stops_trainer_fast_and_keeps_checkpoint(service: LiveService) -> None:
    settings = service.settings
    job_id, t0 = _cancel_after_a_checkpoint(service, control={"step_seconds": 0.1})
    _wait_status(service, job_id, "cancelled", timeout=10)
    print(f"cancel -> cancelled: {time.monotonic() - t0:.2f}s")
    # fast = on the stop file, within the grace period: the worker never had to escalate
    assert "SIGTERM" not in service.log("worker")
    ckpts = [e.data["step"] for e in events(settings, job_id, "checkpoint")]
    assert max(ckpts) > 0
    with get_sessionmaker(settings)() as session:  # kept = uploaded and recorded, resumable
        row = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id)
                             .order_by(Checkpoint.step.desc()).limit(1))
    assert row is not None and row.step == max(ckpts) and row.resumable
    store = get_store(settings)
    assert all(store.size(f"{row.path}/{f['path']}") == f["size"] for f in row.manifest["files"])
    assert any(f["path"].startswith("adapter/") for f in row.manifest["files"])
    assert events(settings, job_id, "finished")[-1].data["status"] == "stopped"


def test_cancel_escalates_when_trainer_ignores_stop(service: LiveService) -> None:
    settings = service.settings
    job_id, t0 = _cancel_after_a_checkpoint(service, control={"ignore_stop": True})
    _wait_status(service, job_id, "cancelled", timeout=15)
    # stop file, SIGTERM after the 2 s grace (ignored), SIGKILL 2 s later: never sooner
    assert time.monotonic() - t0 > 2 * settings.cancel_grace_seconds - 0.5
    log = service.log("worker")
    assert 0 <= log.find("SIGTERM") < log.find("SIGKILL")


def test_trainer_crash_is_retried_and_resumes(service: LiveService) -> None:
    settings = service.settings
    service.start_worker()
    job_id = make_job(settings, max_steps=6, control={"crash_at_step": 4, "crash_times": 1})
    enqueue_job(job_id, settings)
    _wait_status(service, job_id, "succeeded")
    assert trainer_starts(settings, job_id) == [0, 2]
    assert status_history(settings, job_id) == ["running", "queued", "running", "succeeded"]
    job = get_job(settings, job_id)
    assert job.attempt == 2 and job.resumed_from_step == 2
    assert "SIGKILL" in events(settings, job_id, "status")[1].message


def test_trainer_crash_fails_after_max_attempts(service: LiveService) -> None:
    settings = service.settings
    service.start_worker()
    job_id = make_job(settings, max_steps=6, max_attempts=2,
                      control={"crash_at_step": 1, "crash_times": 99})
    enqueue_job(job_id, settings)
    _wait_status(service, job_id, "failed")
    job = get_job(settings, job_id)
    assert job.error["code"] == "trainer_crashed" and job.error["user_fault"] is False
    assert job.attempt == 2 and len(trainer_starts(settings, job_id)) == 2


def test_trainer_error_event_fails_with_its_error(service: LiveService) -> None:
    settings = service.settings
    service.start_worker()
    job_id = make_job(settings, max_steps=6, control={"error_at_step": 2})
    enqueue_job(job_id, settings)
    _wait_status(service, job_id, "failed")
    job = get_job(settings, job_id)
    assert job.error == {"code": "dataset_error", "message": "line 3: empty output",
                         "param": "training_file", "user_fault": True}
    assert len(trainer_starts(settings, job_id)) == 1


@pytest.mark.parametrize("service", ["sqlite", "postgresql"], indirect=True)
def test_worker_killed_lease_reaped_and_job_resumes(service: LiveService) -> None:
    settings = service.settings
    worker = service.start_worker("worker1")
    job_id = make_job(settings, max_steps=30, control={"step_seconds": 0.1})
    enqueue_job(job_id, settings)
    _wait_checkpoint(service, job_id)
    trainer_pid = trainer_pids(settings, job_id)[-1]
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    # the trainer dies with its worker (PR_SET_PDEATHSIG): nothing writes into the run dir
    wait_for(lambda: not pid_alive(trainer_pid), timeout=10, what="the trainer to die too")
    assert len(trainer_starts(settings, job_id)) == 1
    ckpt = max(e.data["step"] for e in events(settings, job_id, "checkpoint"))
    # the reaper's clock, injected: the lease holds until it expires, not a moment longer
    expires = get_job(settings, job_id).lease_expires_at
    assert expires is not None
    with get_sessionmaker(settings)() as session:
        assert jobs.reap_expired_leases(session, now=expires - timedelta(seconds=0.01)) == []
        assert jobs.reap_expired_leases(session, now=expires + timedelta(seconds=0.01)) \
            == [job_id]
    assert _status(service, job_id) == "queued"
    assert enqueue_job(job_id, settings)  # what reap_once does with the ids it requeued
    service.start_worker("worker2")
    _wait_status(service, job_id, "succeeded")
    starts = trainer_starts(settings, job_id)
    assert len(starts) == 2 and starts[1] >= ckpt > 0
    assert get_job(settings, job_id).resumed_from_step == starts[1]


def test_worker_lost_too_often_fails_worker_lost(service: LiveService) -> None:
    settings = service.settings
    worker = service.start_worker()
    job_id = make_job(settings, max_steps=100, max_attempts=1)
    enqueue_job(job_id, settings)
    _wait_status(service, job_id, "running")
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    service.start_reaper()
    _wait_status(service, job_id, "failed", timeout=15)
    assert get_job(settings, job_id).error["code"] == "worker_lost"


@pytest.mark.parametrize("service,pool", [("sqlite", "solo"), ("postgresql", "solo"),
                                          ("sqlite", "prefork")], indirect=["service"])
def test_worker_sigterm_requeues_and_another_worker_finishes(service: LiveService,
                                                             pool: str) -> None:
    settings = service.settings
    worker = service.start_worker("worker1", pool=pool)
    job_id = make_job(settings, max_steps=30, control={"step_seconds": 0.1})
    enqueue_job(job_id, settings)
    _wait_checkpoint(service, job_id)
    t0 = time.monotonic()
    assert LiveService.stop(worker, signal.SIGTERM, timeout=20) == 0
    print(f"worker SIGTERM -> exit: {time.monotonic() - t0:.2f}s")
    job = get_job(settings, job_id)
    assert job.status == "queued" and job.error is None
    assert job.attempt == 0  # a graceful shutdown does not use up one of max_attempts
    assert events(settings, job_id, "finished")[-1].data["status"] == "stopped"
    stopped_at = max(e.data["step"] for e in events(settings, job_id, "checkpoint"))
    service.start_worker("worker2")  # the requeue re-sent the id: no reaper needed
    _wait_status(service, job_id, "succeeded")
    starts = trainer_starts(settings, job_id)
    assert starts == [0, stopped_at]
    assert status_history(settings, job_id) == ["running", "queued", "running", "succeeded"]
