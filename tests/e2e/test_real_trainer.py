"""End to end with the real trainer (`python -m lora_core run`): HTTP API -> broker -> worker
-> trainer child -> rows and artifacts -> HTTP downloads. SQLite + embedded broker, tiny model.
Also the real trainer's cooperative stop: cancel -> checkpoint kept -> cancelled."""

from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servicefixtures import LiveService, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WORDS = ["red", "blue", "fish", "stone", "river", "wolf", "green", "book", "wind", "bird"]
TRAINING = {"max_steps": 6, "batch_size": 4, "gradient_accumulation_steps": 1,
            "max_seq_length": 256, "save_steps": 2, "learning_rate": 1e-3, "seed": 3}


@pytest.fixture
def api(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[LiveService, httpx.Client]]:
    svc = LiveService(tmp_path, "sqlite", trainer=None)
    try:
        svc.migrate()
        svc.start_worker()
        if svc.start_api() is None:
            pytest.skip("lorajobs.api.app not available")
        shutil.copytree(tiny_model_dir, svc.settings.resolved_model_root / "tiny")
        client = httpx.Client(base_url=svc.base_url or "", timeout=30,
                              headers={"Authorization": f"Bearer {svc.admin_key}"})
        r = client.post("/v1/models", json={"name": "tiny", "path": "tiny"})
        assert r.status_code == 201, r.text
        yield svc, client
        client.close()
    finally:
        svc.close()


def _dataset(client: httpx.Client, lines: int = 64) -> str:
    """Seeded alpaca records (reverse the words): our own, so asset changes don't matter."""
    rng = random.Random(0)
    records = []
    for _ in range(lines):
        words = rng.sample(WORDS, rng.randint(2, 4))
        records.append(json.dumps({"instruction": "Reverse the order of the words.",
                                   "input": " ".join(words),
                                   "output": " ".join(reversed(words))}))
    data = ("\n".join(records) + "\n").encode()
    r = client.post("/v1/datasets", files={"file": ("train.jsonl", data)},
                    data={"format": "alpaca"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _job(client: httpx.Client, job_id: str) -> dict:
    r = client.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def _event_types(client: httpx.Client, job_id: str) -> list[str]:
    body = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 500}).json()
    return [e["type"] for e in body["data"]]


def test_real_trainer_end_to_end(api: tuple[LiveService, httpx.Client]) -> None:
    svc, client = api
    dataset_id = _dataset(client)
    t0 = time.monotonic()
    r = client.post("/v1/jobs", json={"base_model": "tiny", "training_file": dataset_id,
                                      "lora": {"r": 8, "alpha": 16},
                                      "training": TRAINING, "merge": "final"})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    wait_for(lambda: {"started", "error"} & set(_event_types(client, job_id)), timeout=120,
             what="trainer started")
    print(f"submit -> trainer 'started' event (incl. torch import): {time.monotonic() - t0:.1f}s")
    job = wait_for(lambda: (j := _job(client, job_id))["status"] in
                   ("succeeded", "failed", "cancelled") and j, timeout=180, what="job end")
    assert job["status"] == "succeeded", (job, svc.log("worker")[-3000:])
    assert job["progress"]["step"] == 6 and job["metrics"]["train_loss"] is not None
    types = _event_types(client, job_id)
    assert {"started", "checkpoint", "merged", "finished"} <= set(types)

    arts = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    kinds = {(a["kind"], a.get("step")) for a in arts}
    assert {("adapter", None), ("merged", None), ("manifest", None), ("log", None)} <= kinds
    assert ("adapter", 2) in kinds
    names = {a["name"] for a in arts if a["kind"] == "adapter" and a.get("step") is None}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    r = client.get(f"/v1/jobs/{job_id}/adapter")
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        assert any(n.endswith("adapter_model.safetensors") for n in tar.getnames())
    metrics = client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
    assert [m["step"] for m in metrics] == list(range(1, 7))


def test_real_trainer_cancel_keeps_checkpoint(api: tuple[LiveService, httpx.Client]) -> None:
    svc, client = api
    dataset_id = _dataset(client, lines=256)
    r = client.post("/v1/jobs", json={"base_model": "tiny", "training_file": dataset_id,
                                      "training": {**TRAINING, "max_steps": 5000,
                                                   "save_steps": 3},
                                      "merge": "none"})
    job_id = r.json()["id"]
    wait_for(lambda: {"checkpoint", "error"} & set(_event_types(client, job_id)), timeout=180,
             what="first checkpoint")
    assert _job(client, job_id)["status"] == "running"
    t0 = time.monotonic()
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)
    wait_for(lambda: _job(client, job_id)["status"] == "cancelled", timeout=30,
             what="cancelled")
    print(f"cancel -> cancelled (real trainer): {time.monotonic() - t0:.2f}s")
    ckpts = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    assert ckpts and all(c["resumable"] for c in ckpts)
    assert _event_types(client, job_id).count("finished") == 1


def test_real_trainer_resumes_after_worker_sigterm(api: tuple[LiveService, httpx.Client]
                                                   ) -> None:
    """Warm shutdown: the trainer checkpoints, the job is requeued, another worker resumes."""
    import signal

    svc, client = api
    worker = svc.procs[0]
    dataset_id = _dataset(client, lines=256)
    r = client.post("/v1/jobs", json={"base_model": "tiny", "training_file": dataset_id,
                                      "training": {**TRAINING, "max_steps": 120,
                                                   "save_steps": 4},
                                      "merge": "none"})
    job_id = r.json()["id"]
    wait_for(lambda: {"checkpoint", "error"} & set(_event_types(client, job_id)), timeout=180,
             what="first checkpoint")
    t0 = time.monotonic()
    assert LiveService.stop(worker, signal.SIGTERM, timeout=60) == 0
    print(f"worker SIGTERM -> exit (real trainer): {time.monotonic() - t0:.2f}s")
    job = _job(client, job_id)
    if job["status"] == "succeeded":
        pytest.skip("the run finished before the shutdown reached it")
    assert job["status"] == "queued", job
    svc.start_worker("worker2")
    job = wait_for(lambda: (j := _job(client, job_id))["status"] in
                   ("succeeded", "failed", "cancelled") and j, timeout=180, what="job end")
    assert job["status"] == "succeeded", job
    body = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 500}).json()
    started = [e for e in body["data"] if e["type"] == "started"]
    assert len(started) == 2 and started[1]["data"]["resumed_from_step"] > 0
    metrics = client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
    steps = [m["step"] for m in metrics]
    assert steps == sorted(set(steps)) and steps[-1] == 120  # redone steps overwrote, no dups
