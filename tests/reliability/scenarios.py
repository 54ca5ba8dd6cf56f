"""Fault and load scenarios as plain functions returning their figures, shared by the pytest
suite (small N, asserted) and `bench/reliability.py` (larger N, printed for RELIABILITY.md).

Each takes a migrated `LiveService` (or what it needs) and returns a dict of counts; the
caller asserts. Fake trainer throughout (speed and events protocol are what matter here),
except `pollers_vs_training`, which measures the real trainer's tokens/s.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import threading
import time
from typing import Any

import httpx
from sqlalchemy import func, select

from lorajobs.core.db import get_sessionmaker
from lorajobs.core.queue import enqueue_job
from lorajobs.core.tables import Checkpoint, JobMetric
from tests.servicefixtures import LiveService, wait_for
from tests.worker.jobfactory import (
    events,
    get_job,
    make_job,
    trainer_checkpoints,
    trainer_pids,
    trainer_starts,
    trainer_steps,
)

__all__ = ["kill9", "duplicate_delivery", "graceful_sigterm", "pollers_vs_training",
           "metric_steps", "TERMINAL"]

TERMINAL = ("succeeded", "failed", "cancelled")


def _status(svc: LiveService, job_id: str) -> str:
    return get_job(svc.settings, job_id).status


def _wait_end(svc: LiveService, job_id: str, timeout: float = 60) -> str:
    return wait_for(lambda: (s := _status(svc, job_id)) in TERMINAL and s, timeout=timeout,
                    what=f"{job_id} to finish")


def metric_steps(svc: LiveService, job_id: str) -> list[int]:
    with get_sessionmaker(svc.settings)() as session:
        return list(session.scalars(select(JobMetric.step).where(JobMetric.job_id == job_id)
                                    .order_by(JobMetric.step)).all())


def recorded_by_attempt(svc: LiveService, job_id: str, attempt: int) -> int:
    """The newest checkpoint an attempt uploaded and recorded (0: none): where the next
    attempt resumes from."""
    with get_sessionmaker(svc.settings)() as session:
        return session.scalar(select(func.max(Checkpoint.step)).where(
            Checkpoint.job_id == job_id, Checkpoint.attempt == attempt,
            Checkpoint.resumable.is_(True))) or 0


def kill9(svc: LiveService, n_jobs: int, *, seed: int = 0, total: int = 30,
          save_steps: int = 5) -> dict[str, Any]:
    """N jobs, each SIGKILLed once mid-training: the trainer (the worker requeues it) or the
    whole worker (the reaper requeues it after the lease, a new worker resumes it), chosen
    at random, at a random step past the first checkpoint.

    A checkpoint is resumable once uploaded and recorded (issue 12). A killed trainer's
    worker records every checkpoint the trainer reported before it settles; a killed worker's
    upload thread dies with it, so the checkpoints it had not recorded yet are lost (how many
    depends on how far its uploads lagged: a few on a loaded machine).

    Figures: jobs, killed, completed, resumed_from_checkpoint (resume step == the newest
    checkpoint attempt 1 recorded, and for a trainer kill == the newest one the trainer
    reported), max_steps_redone_trainer_kill / _worker_kill (kill step - resume step),
    loss_curve_complete.
    """
    rng = random.Random(seed)
    worker = svc.start_worker("worker-k0")
    svc.start_reaper()
    figures: dict[str, Any] = {"jobs": n_jobs, "killed": 0, "completed": 0, "lost": 0,
                               "resumed_from_checkpoint": 0, "max_steps_redone_trainer_kill": 0,
                               "max_steps_redone_worker_kill": 0, "loss_curve_complete": 0,
                               "trainer_kills": 0, "worker_kills": 0}
    for i in range(n_jobs):
        job_id = make_job(svc.settings, max_steps=total, save_steps=save_steps,
                          control={"step_seconds": 0.05})
        enqueue_job(job_id, svc.settings)
        kill_after = rng.randint(save_steps + 1, total - 2)
        wait_for(lambda j=job_id, k=kill_after:
                 max(trainer_steps(svc.settings, j, 1), default=0) >= k,
                 timeout=30, what="training to the kill step")
        target = rng.choice(["trainer", "worker"])
        reported = None
        if target == "trainer":
            os.kill(trainer_pids(svc.settings, job_id)[-1], signal.SIGKILL)
            figures["trainer_kills"] += 1
            reported = max(trainer_checkpoints(svc.settings, job_id, 1), default=0)
        else:
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait()
            figures["worker_kills"] += 1
            worker = svc.start_worker(f"worker-k{i + 1}")
        killed_at = max(trainer_steps(svc.settings, job_id, 1))
        figures["killed"] += 1
        outcome = _wait_end(svc, job_id)
        figures["completed"] += outcome == "succeeded"
        figures["lost"] += outcome != "succeeded"
        starts = trainer_starts(svc.settings, job_id)
        expected = recorded_by_attempt(svc, job_id, 1)
        if len(starts) == 2 and starts[1] == expected and reported in (None, expected):
            figures["resumed_from_checkpoint"] += 1
        if len(starts) == 2:
            key = f"max_steps_redone_{target}_kill"
            figures[key] = max(figures[key], killed_at - starts[1])
        figures["loss_curve_complete"] += metric_steps(svc, job_id) == list(range(1, total + 1))
    return figures


def duplicate_delivery(svc: LiveService, n_jobs: int, copies: int = 3) -> dict[str, Any]:
    """Each job sent `copies` times up front and once more while it runs: one run each."""
    svc.start_worker()
    ids = [make_job(svc.settings, max_steps=6, control={"step_seconds": 0.05})
           for _ in range(n_jobs)]
    for job_id in ids:
        for _ in range(copies):
            enqueue_job(job_id, svc.settings)
    for job_id in ids:
        wait_for(lambda j=job_id: _status(svc, j) != "queued", timeout=60, what="pickup")
        enqueue_job(job_id, svc.settings)  # while it runs (or just after)
    outcomes = [_wait_end(svc, job_id) for job_id in ids]
    deliveries = n_jobs * (copies + 1)
    wait_for(lambda: len(svc.task_outcomes()) >= deliveries, timeout=60,
             what="the worker to handle every copy")  # the duplicates are no-op claims
    return {"jobs": n_jobs, "deliveries": deliveries,
            "trainer_starts": sum(len(trainer_starts(svc.settings, j)) for j in ids),
            "started_events": sum(len(events(svc.settings, j, "started")) for j in ids),
            "completed": outcomes.count("succeeded"),
            "lost": n_jobs - outcomes.count("succeeded")}


def graceful_sigterm(svc: LiveService, n_jobs: int) -> dict[str, Any]:
    """SIGTERM the worker mid-job N times; a fresh worker finishes each job from the
    checkpoint the shutdown saved. Figures count requeued (not failed) and resumed jobs."""
    figures = {"jobs": n_jobs, "sigterms": 0, "requeued_not_failed": 0, "attempt_refunded": 0,
               "resumed_from_stop_checkpoint": 0, "events_once": 0, "completed": 0, "lost": 0}
    worker = svc.start_worker("worker-t0")
    for i in range(n_jobs):
        job_id = make_job(svc.settings, max_steps=30, control={"step_seconds": 0.05})
        enqueue_job(job_id, svc.settings)
        wait_for(lambda j=job_id: events(svc.settings, j, "checkpoint"), timeout=30,
                 what="a checkpoint")
        LiveService.stop(worker, signal.SIGTERM, timeout=20)
        figures["sigterms"] += 1
        job = get_job(svc.settings, job_id)
        figures["requeued_not_failed"] += job.status == "queued" and job.error is None
        figures["attempt_refunded"] += job.attempt == 0
        stopped_at = max(e.data["step"] for e in events(svc.settings, job_id, "checkpoint"))
        worker = svc.start_worker(f"worker-t{i + 1}")
        outcome = _wait_end(svc, job_id)
        figures["completed"] += outcome == "succeeded"
        figures["lost"] += outcome != "succeeded"
        figures["resumed_from_stop_checkpoint"] += \
            trainer_starts(svc.settings, job_id) == [0, stopped_at]
        # one "started" per run and one "finished": the resumed run shares the refunded
        # attempt's events file, whose earlier lines must not be recorded twice
        figures["events_once"] += (len(events(svc.settings, job_id, "started")) == 2
                                   and len(events(svc.settings, job_id, "finished")) == 2)
    return figures


def pollers_vs_training(svc: LiveService, client_headers: dict[str, str], job_id: str, *,
                        pollers: int, poll_interval: float,
                        phase_seconds: float) -> dict[str, Any]:
    """The real trainer's tokens/s in three timed phases of one run: quiet, then `pollers`
    clients polling `/healthz` (the control: the same HTTP and CPU load, no database), then
    as many polling GET /v1/jobs/{id}; then the job is cancelled. On a small shared machine
    any HTTP load steals CPU from the trainer; `ratio_vs_control` isolates what job reads add
    on top, which "the API does no work in the worker's path" predicts to be ~1.

    Figures: requests and errors per phase, tps_quiet/tps_control/tps_polled (median per
    step), ratio (polled / quiet), ratio_vs_control (polled / control).
    """
    stop = threading.Event()
    counts = {"requests": 0, "errors": 0}
    lock = threading.Lock()
    # Clients are built (and connected) up front: building one costs ~0.1 s of CPU (an SSL
    # context), which would otherwise eat into a phase.
    clients = [httpx.Client(base_url=svc.base_url or "", headers=client_headers, timeout=10)
               for _ in range(pollers)]
    for c in clients:
        c.get("/healthz")

    def poll(path: str, c: httpx.Client) -> None:
        while not stop.is_set():
            try:
                ok = c.get(path).status_code == 200
            except httpx.HTTPError:
                ok = False
            with lock:
                counts["requests"] += 1
                counts["errors"] += not ok
            stop.wait(poll_interval)

    def phase(path: str | None) -> tuple[int, int]:
        """(first, last) step of a phase, read from the job's progress at its edges."""
        first = _step(svc, job_id)
        stop.clear()
        threads = [threading.Thread(target=poll, args=(path, c)) for c in clients] \
            if path else []
        for t in threads:
            t.start()
        time.sleep(phase_seconds)
        stop.set()
        for t in threads:
            t.join()
        return first, _step(svc, job_id)

    wait_for(lambda: _step(svc, job_id) >= 3, timeout=120, what="training to start")
    quiet = phase(None)
    control = phase("/healthz")
    control_requests = counts["requests"]
    polled = phase(f"/v1/jobs/{job_id}")
    for c in clients:
        c.close()
    with get_sessionmaker(svc.settings)() as session:
        from lorajobs.core import jobs as jobs_service
        from lorajobs.core.tables import Job

        jobs_service.request_cancel(session, session.get(Job, job_id))
        rows = session.execute(select(JobMetric.step, JobMetric.tokens_per_second)
                               .where(JobMetric.job_id == job_id)).all()

    def median(edges: tuple[int, int]) -> float:
        # 2 steps of margin at each edge: progress in the database lags the trainer a little
        return statistics.median([t for s, t in rows if edges[0] + 2 < s <= edges[1] - 2 and t])

    tps_quiet, tps_control, tps_polled = median(quiet), median(control), median(polled)
    return {"control_requests": control_requests,
            "job_requests": counts["requests"] - control_requests, "errors": counts["errors"],
            "steps": [quiet, control, polled],
            "tps_quiet": round(tps_quiet, 1), "tps_control": round(tps_control, 1),
            "tps_polled": round(tps_polled, 1), "ratio": round(tps_polled / tps_quiet, 3),
            "ratio_vs_control": round(tps_polled / tps_control, 3)}


def _step(svc: LiveService, job_id: str) -> int:
    return int((get_job(svc.settings, job_id).progress or {}).get("step") or 0)
