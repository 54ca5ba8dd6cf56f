"""`reap_once` against a real database and the embedded broker, no worker running."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorajobs.service import jobs
from lorajobs.service.db import get_sessionmaker
from lorajobs.service.queue import pending_messages
from lorajobs.worker.reaper import reap_once
from tests.servicefixtures import LiveService
from tests.worker.jobfactory import get_job, make_job, status_history


@pytest.fixture
def service(tmp_path: Path) -> Iterator[LiveService]:
    svc = LiveService(tmp_path, "sqlite", requeue_after_seconds=0.05)
    try:
        svc.migrate()
        yield svc
    finally:
        svc.close()


def test_stale_queued_job_resent_only_without_backlog(service: LiveService) -> None:
    settings = service.settings
    job_id = make_job(settings)  # committed, never sent (API crashed, broker down...)
    assert reap_once(settings) == {"requeued": [], "resent": [job_id], "unsent": []}
    assert pending_messages(settings) == 1
    assert get_job(settings, job_id).enqueued_at is not None
    time.sleep(0.1)
    # its message waits in the queue (no idle worker): another copy would be a pure duplicate
    assert reap_once(settings)["resent"] == []
    assert pending_messages(settings) == 1


def test_expired_lease_requeued_then_failed_when_out_of_attempts(service: LiveService) -> None:
    settings = service.settings
    job_id = make_job(settings, max_attempts=2)
    sessions = get_sessionmaker(settings)
    for _ in range(2):
        with sessions() as session:  # a worker that claims and dies at once (lease 0 s)
            assert jobs.claim(session, job_id, owner="dead:1:x", lease_seconds=0)
        time.sleep(0.01)
        result = reap_once(settings)
    job = get_job(settings, job_id)
    assert job.status == "failed" and job.error["code"] == "worker_lost"
    assert status_history(settings, job_id) == ["running", "queued", "running", "failed"]
    assert result["requeued"] == []
