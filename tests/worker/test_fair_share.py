"""Fair share with a real worker process: tenant A queues 4 jobs, then tenant B queues 1; with
one worker, B's job runs second, not fifth (the broker delivers A's four messages first)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import update

from lorajobs.core.db import get_sessionmaker
from lorajobs.core.keys import get_or_create_tenant
from lorajobs.core.queue import enqueue_job
from lorajobs.core.tables import Job
from tests.servicefixtures import LiveService, wait_for
from tests.worker.jobfactory import get_job, make_job

pytestmark = pytest.mark.timeout(120)


def test_one_worker_serves_the_waiting_tenant_second(tmp_path: Path) -> None:
    service = LiveService(tmp_path, "sqlite")
    try:
        service.migrate()
        settings = service.settings
        fast = {"step_seconds": 0.05}
        a_jobs = [make_job(settings, max_steps=2, save_steps=5, control=fast) for _ in range(4)]
        b_job = make_job(settings, max_steps=2, save_steps=5, control=fast)
        with get_sessionmaker(settings)() as session:
            tenant_b = get_or_create_tenant(session, name="tenant-b")
            session.execute(update(Job).where(Job.id == b_job).values(tenant_id=tenant_b.id))
            session.commit()
        for job_id in [*a_jobs, b_job]:  # the broker hands them out in this order
            assert enqueue_job(job_id, settings)
        service.start_worker()
        every = [*a_jobs, b_job]
        wait_for(lambda: all(get_job(settings, j).status == "succeeded" for j in every),
                 timeout=90, what="all five jobs")
        order = sorted(every, key=lambda j: get_job(settings, j).started_at)
        assert order == [a_jobs[0], b_job, *a_jobs[1:]], service.log("worker")[-3000:]
        assert all(get_job(settings, j).attempt == 1 for j in every)
    finally:
        service.close()
