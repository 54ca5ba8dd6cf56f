"""The runtime limit with a real worker: a job past `max_job_runtime_seconds` is stopped the
cooperative way (it checkpoints), fails `max_runtime_exceeded` and is not retried; its
checkpoint stays registered."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from lorajobs.core.db import get_sessionmaker
from lorajobs.core.queue import enqueue_job
from lorajobs.core.tables import Checkpoint
from tests.servicefixtures import LiveService, wait_for
from tests.worker.jobfactory import get_job, make_job, status_history, trainer_starts

pytestmark = pytest.mark.timeout(120)


def test_job_past_the_runtime_limit_fails_keeping_its_checkpoint(tmp_path: Path) -> None:
    service = LiveService(tmp_path, "sqlite", max_job_runtime_seconds=1.5)
    try:
        service.migrate()
        settings = service.settings
        # 200 steps x 0.05 s = 10 s of training against a 1.5 s limit
        job_id = make_job(settings, max_steps=200, save_steps=1000,
                          control={"step_seconds": 0.05})
        service.start_worker()
        assert enqueue_job(job_id, settings)
        wait_for(lambda: get_job(settings, job_id).status in ("succeeded", "failed"),
                 timeout=60, what="job end")
        job = get_job(settings, job_id)
        assert job.status == "failed", service.log("worker")[-3000:]
        assert job.error["code"] == "max_runtime_exceeded" and job.error["user_fault"]
        step = job.progress["step"]
        assert 0 < step < 200
        with get_sessionmaker(settings)() as session:
            steps = list(session.scalars(select(Checkpoint.step)
                                         .where(Checkpoint.job_id == job_id)))
        assert steps == [step], "the stop checkpoint is registered"
        assert f"step {step}" in job.error["message"]
        assert trainer_starts(settings, job_id) == [0] and job.attempt == 1
        assert status_history(settings, job_id) == ["running", "failed"]
    finally:
        service.close()
