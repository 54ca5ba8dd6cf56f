"""kill -9 N times across N jobs (trainer or whole worker, at random steps): every job goes
back to queued, resumes from its newest recorded (uploaded) checkpoint, and succeeds with a
complete loss curve; after a trainer kill at most `save_steps` steps are redone (one more
interval if the kill fell between a seal and its event); a killed worker loses the uploads it
had not recorded yet. Small N here; `bench/reliability.py` runs more.

tests/worker/test_faults.py covers the single cases in detail (self-crash of the trainer,
worker killed with the reaper's timing, max_attempts); this is the repeated, mixed figure.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select

from lora_core.events import parse_event
from lorajobs.core import jobs
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.queue import enqueue_job
from lorajobs.core.tables import Checkpoint
from lorajobs.worker.event_recorder import EventRecorder
from tests.reliability.scenarios import kill9, metric_steps
from tests.servicefixtures import LiveService, wait_for
from tests.worker.jobfactory import get_job, make_job, run_dir, trainer_starts

pytestmark = pytest.mark.timeout(180)

SAVE_STEPS = 5


@pytest.mark.parametrize("service,n_jobs", [("sqlite", 3), ("postgresql", 2)],
                         indirect=["service"])
def test_kill9_across_jobs(service: LiveService, n_jobs: int) -> None:
    figures = kill9(service, n_jobs, seed=n_jobs, save_steps=SAVE_STEPS)
    print(figures)
    assert figures["killed"] == n_jobs
    assert figures["completed"] == n_jobs and figures["lost"] == 0
    assert figures["resumed_from_checkpoint"] == n_jobs
    # a killed trainer's worker records every checkpoint the trainer reported before it
    # settles: at most save_steps redone (+ one more interval if the kill fell between a seal
    # and its event); a killed worker loses the uploads it had not recorded (no bound asserted:
    # resumed_from_checkpoint checks it resumed from the newest one recorded)
    assert figures["max_steps_redone_trainer_kill"] <= 2 * SAVE_STEPS
    assert figures["loss_curve_complete"] == n_jobs


def test_events_a_killed_worker_never_read_are_recovered(service: LiveService) -> None:
    """The deterministic form of the race the figure above hits at random: the trainer wrote
    steps 1-12 and sealed checkpoint 10, the worker died having recorded only steps 1-9 and
    before checkpoint 10 was uploaded. The next attempt (same node) records steps 10-12 from
    the dead attempt's events file, but does not resume from checkpoint 10: it was never
    recorded, so it is removed and the run starts over; the loss curve ends complete."""
    settings = service.settings
    job_id = make_job(settings, max_steps=20, save_steps=SAVE_STEPS)
    owner = "dead-worker:1:x"
    with get_sessionmaker(settings)() as session:
        assert jobs.claim(session, job_id, owner=owner, lease_seconds=60) is not None
    run = run_dir(settings, job_id)
    ckpt = run / "checkpoints" / "checkpoint-10"
    (ckpt / "adapter").mkdir(parents=True)
    (ckpt / "adapter" / "adapter_config.json").write_text("{}")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    (ckpt / "COMPLETE").write_text("10\n")
    written = [{"type": "progress", "step": s, "total_steps": 20, "loss": 2.0 / s}
               for s in range(1, 11)]
    written += [{"type": "checkpoint", "step": 10, "path": str(ckpt),
                 "adapter_path": str(ckpt / "adapter"), "resumable": True}]
    written += [{"type": "progress", "step": s, "total_steps": 20, "loss": 2.0 / s}
                for s in (11, 12)]
    (run / "events-attempt1.jsonl").write_text("".join(json.dumps(e) + "\n" for e in written))
    EventRecorder(get_sessionmaker(settings), job_id=job_id, owner=owner) \
        .apply([parse_event(e) for e in written[:9]])  # what the worker read before it died
    assert metric_steps(service, job_id) == list(range(1, 10))
    expired = get_job(settings, job_id).lease_expires_at + timedelta(seconds=0.01)
    with get_sessionmaker(settings)() as session:  # the reaper, one lease later
        assert jobs.reap_expired_leases(session, now=expired) == [job_id]
    assert enqueue_job(job_id, settings)
    service.start_worker()
    wait_for(lambda: get_job(settings, job_id).status == "succeeded", timeout=30,
             what="the retried job")
    assert trainer_starts(settings, job_id) == [0]  # the unrecorded checkpoint was not used
    assert metric_steps(service, job_id) == list(range(1, 21))
    with get_sessionmaker(settings)() as session:
        row = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id,
                                                      Checkpoint.step == 10))
        assert row is not None and row.attempt == 2 and row.resumable  # the rerun's own
