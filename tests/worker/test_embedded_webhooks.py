"""`lorajobs serve` sends webhooks too: a job run by the embedded server's worker reaches a real
receiver as job.running, job.checkpoint and fine_tuning.job.succeeded, each verified by the
official `openai` client, from the serve process's own sender thread."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.webhook_receiver import Receiver
from tests.worker.embedded_server import embedded_serve
from tests.worker.jobfactory import ensure_model_and_dataset

# Generous bounds (hangs, not speed): on a shared 2-core CI box the worker subprocess and the
# trainer start under load; a whole run took 62 s there once with nothing delivered yet.
pytestmark = pytest.mark.timeout(600)
DELIVERY_SECONDS = 300

WEBHOOK_SETTINGS = {"webhook_allow_private_addresses": True, "webhook_allow_http": True,
                    "webhook_poll_seconds": 0.1}


def test_serve_delivers_job_webhooks(tmp_path: Path, tiny_model_dir: Path) -> None:
    receiver = Receiver().start()
    try:
        with embedded_serve(tmp_path, ready_timeout=180, **WEBHOOK_SETTINGS) as server:
            base, headers = server.base, server.headers
            hook = httpx.post(f"{base}/v1/webhooks", headers=headers, timeout=30, json={
                "url": receiver.url, "event_types": ["job.running", "job.checkpoint",
                                                     "fine_tuning.job.succeeded"]})
            assert hook.status_code == 201, hook.text
            receiver.secret = hook.json()["signing_secret"]
            _, dataset_id = ensure_model_and_dataset(server.settings, tiny_model_dir)
            r = httpx.post(f"{base}/v1/jobs", headers=headers, timeout=30, json={
                "base_model": "fake-tiny", "training_file": dataset_id,
                "training": {"max_steps": 4, "save_steps": 2}})
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            delivered = receiver.wait_for(lambda: any(
                getattr(x.event, "type", "") == "fine_tuning.job.succeeded"
                for x in receiver.received), timeout=DELIVERY_SECONDS)
            if not delivered:  # say where it stopped: the job, its events, the server's log
                job = httpx.get(f"{base}/v1/jobs/{job_id}", headers=headers, timeout=30).text
                events = httpx.get(f"{base}/v1/jobs/{job_id}/events", headers=headers,
                                   timeout=30).text
                pytest.fail(f"no succeeded webhook in {DELIVERY_SECONDS}s; received "
                            f"{receiver.received}\njob: {job}\nevents: {events[-3000:]}\n"
                            f"serve.log: {server.log_tail(4000)}")
    finally:
        receiver.stop()
    assert all(x.verified for x in receiver.received)
    types = [x.event.type for x in receiver.received]
    # Events are sent in parallel: no order is promised (receivers order by created_at).
    assert set(types) == {"job.running", "job.checkpoint", "fine_tuning.job.succeeded"}
    assert types.count("fine_tuning.job.succeeded") == 1
    assert {x.event.data.id for x in receiver.received} == {job_id}
