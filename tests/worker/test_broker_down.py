"""The broker is only a wake-up call: with Redis down a submit is still accepted and queued,
/readyz says so, and once Redis is back the reaper re-sends the id and the job runs.

Uses a private redis-server on a free port (never the shared one), SQLite for the database."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lorajobs.core.queue import broker_ok
from tests.reliability.servers import PrivateRedis
from tests.servicefixtures import LiveService, free_port, wait_for
from tests.worker.jobfactory import ensure_model_and_dataset, get_job, trainer_starts

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_submit_with_broker_down_then_reaper_resends(tmp_path: Path, tiny_model_dir: Path,
                                                     private_redis: PrivateRedis) -> None:
    svc = LiveService(tmp_path, "sqlite", broker_url=f"redis://127.0.0.1:{private_redis.port}/0")
    try:
        svc.migrate()
        settings = svc.settings
        svc.start_worker()
        base_url = svc.start_api()
        private_redis.stop()
        assert not broker_ok(settings)

        # through the API: 201 and queued although nothing could be sent
        _, dataset_id = ensure_model_and_dataset(settings, tiny_model_dir)
        headers = {"Authorization": f"Bearer {svc.admin_key}"}
        ready = httpx.get(f"{base_url}/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["checks"]["broker"] == "unreachable"
        t0 = time.monotonic()  # the POST alone (a hang bound, not a speed one)
        resp = httpx.post(f"{base_url}/v1/jobs", headers=headers, timeout=30, json={
            "base_model": "fake-tiny", "training_file": dataset_id,
            "training": {"max_steps": 4, "save_steps": 2}})
        assert resp.status_code == 201, resp.text
        job_id = resp.json()["id"]
        assert resp.json()["status"] == "queued"
        assert time.monotonic() - t0 < 5, "a submit must not hang on a dead broker"
        assert get_job(settings, job_id).status == "queued"
        # The API sends from a thread of its own (queue.JobSender): once its send has failed
        # it clears the row's enqueued_at, which tells the reaper to send it.
        wait_for(lambda: get_job(settings, job_id).enqueued_at is None, timeout=30,
                 what="the failed send to clear enqueued_at")

        private_redis.start()
        svc.start_reaper()
        wait_for(lambda: get_job(settings, job_id).status == "succeeded", timeout=60,
                 what="job to run after the broker came back")
        assert trainer_starts(settings, job_id) == [0]
        assert "re-sent" in svc.log("reaper") or "resent" in svc.log("reaper")
    finally:
        svc.close()
