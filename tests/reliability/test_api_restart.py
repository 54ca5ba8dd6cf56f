"""The API process killed (-9) and restarted on the same port while a job trains: the job is
untouched (the API is not in the worker's path), and a client polling with the project's own
client (`lorajobs.client.Client`, which retries transport errors) keeps going to the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import httpx
import pytest

from lorajobs.client import Client
from lorajobs.core.queue import enqueue_job
from tests.servicefixtures import LiveService, free_port, wait_for
from tests.worker.jobfactory import get_job, make_job, status_history, trainer_starts

pytestmark = pytest.mark.timeout(120)

API_DOWN_SECONDS = 1.0


def start_api_on(svc: LiveService, port: int) -> subprocess.Popen[bytes]:
    """uvicorn on a given port (a restart must come back where clients look)."""
    proc = svc._spawn(["-m", "uvicorn", "lorajobs.api.app:create_app", "--factory",
                       "--host", "127.0.0.1", "--port", str(port)], "api")
    svc.base_url = f"http://127.0.0.1:{port}"

    def _up() -> bool:
        assert proc.poll() is None, svc.log("api")[-2000:]
        try:
            return httpx.get(f"{svc.base_url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(_up, timeout=180, what="API /healthz")  # a hang bound: imports crawl at load 20
    return proc


@pytest.mark.parametrize("service", ["sqlite", "postgresql"], indirect=True)
def test_api_killed_and_restarted_while_a_client_polls(service: LiveService) -> None:
    settings = service.settings
    service.start_worker()
    port = free_port()
    api = start_api_on(service, port)
    total = 40
    job_id = make_job(settings, max_steps=total, save_steps=10, control={"step_seconds": 0.1})
    enqueue_job(job_id, settings)

    seen: list[tuple[str, int]] = []
    outcome: dict[str, object] = {}

    def poll() -> None:
        try:
            with Client(service.base_url, service.admin_key, max_retries=8) as client:
                job = client.jobs.wait(job_id, poll_interval=0.1, timeout=60, on_progress=lambda
                                       j: seen.append((j.status, (j.progress.step or 0)
                                                       if j.progress else 0)))
                outcome["status"] = job.status
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = repr(exc)

    poller = threading.Thread(target=poll)
    poller.start()
    wait_for(lambda: any(step >= 8 for _, step in seen), timeout=30, what="polled progress")
    os.kill(api.pid, signal.SIGKILL)
    api.wait()
    polls_before = len(seen)
    time.sleep(API_DOWN_SECONDS)
    start_api_on(service, port)
    poller.join(timeout=60)

    assert outcome == {"status": "succeeded"}, outcome
    assert len(seen) > polls_before, "the client never polled again after the restart"
    steps = [step for _, step in seen]
    assert steps == sorted(steps), "progress went backwards"
    assert trainer_starts(settings, job_id) == [0]
    assert status_history(settings, job_id) == ["running", "succeeded"]
    with Client(service.base_url, service.admin_key) as client:
        assert [m.step for m in client.jobs.metrics(job_id)] == list(range(1, total + 1))
    assert get_job(settings, job_id).progress["step"] == total
