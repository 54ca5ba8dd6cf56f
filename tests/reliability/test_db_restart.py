"""PostgreSQL restarted (clean and crash) while a job trains: the worker reconnects, the same
attempt finishes, and every trainer event written during the outage reaches the database.

A private cluster (tests/reliability/servers.py), never the shared server. The broker is the
embedded one, so only the database goes away. The outage lasts while the trainer writes 5 steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from lorajobs.core.db import get_sessionmaker
from lorajobs.core.queue import enqueue_job
from lorajobs.core.tables import JobMetric
from tests.reliability.servers import PrivatePostgres
from tests.servicefixtures import LiveService, wait_for
from tests.worker.jobfactory import (
    events,
    get_job,
    make_job,
    status_history,
    trainer_starts,
    trainer_steps,
)

pytestmark = pytest.mark.timeout(120)

OUTAGE_STEPS = 5  # ~0.5 s of fake-trainer steps: well inside the 3 s lease the worker must keep


def _step(svc: LiveService, job_id: str) -> int:
    progress = get_job(svc.settings, job_id).progress or {}
    return int(progress.get("step") or 0)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_database_restart_mid_run_loses_nothing(tmp_path: Path, private_pg: PrivatePostgres,
                                                mode: str) -> None:
    svc = LiveService(tmp_path, "sqlite", database_url=private_pg.url)
    try:
        svc.migrate()
        settings = svc.settings
        svc.start_worker()
        total, save_steps = 30, 5
        job_id = make_job(settings, max_steps=total, save_steps=save_steps,
                          control={"step_seconds": 0.1})
        enqueue_job(job_id, settings)
        wait_for(lambda: _step(svc, job_id) >= 6, timeout=30, what="training past step 6")
        private_pg.stop(mode)
        # down until the trainer has written OUTAGE_STEPS more steps the database could not
        # take (however slow the machine): those are what must not be lost
        down_at = max(trainer_steps(settings, job_id, 1))
        wait_for(lambda: max(trainer_steps(settings, job_id, 1)) >= down_at + OUTAGE_STEPS,
                 timeout=10, what=f"{OUTAGE_STEPS} steps written during the outage")
        private_pg.start()
        wait_for(lambda: get_job(settings, job_id).status in ("succeeded", "failed"),
                 timeout=60, what="job end")
        job = get_job(settings, job_id)
        assert job.status == "succeeded", (job.error, svc.log("worker")[-3000:])
        assert trainer_starts(settings, job_id) == [0], "the outage must not cost an attempt"
        assert status_history(settings, job_id) == ["running", "succeeded"]
        with get_sessionmaker(settings)() as session:
            steps = session.scalars(select(JobMetric.step).where(JobMetric.job_id == job_id)
                                    .order_by(JobMetric.step)).all()
        assert list(steps) == list(range(1, total + 1)), "progress events lost in the outage"
        ckpts = [e.data["step"] for e in events(settings, job_id, "checkpoint")]
        assert ckpts == list(range(save_steps, total, save_steps))
        assert [e.data["status"] for e in events(settings, job_id, "finished")] == ["completed"]
        assert job.progress["step"] == total
    finally:
        svc.close()
