"""End to end with the real trainer (`python -m lora_core run`): HTTP API -> broker -> worker
-> trainer child -> rows and artifacts -> HTTP downloads. SQLite + embedded broker, tiny model.
Also the real trainer's cooperative stops: cancel -> checkpoint kept -> cancelled, and a worker's
warm shutdown -> checkpoint -> requeued -> resumed by another worker.

The other suites run the fake trainer (tests/worker/fake_trainer.py) or one part for real; the
SDK's and the CLI's own real-trainer tests are tests/client/test_sdk_real.py and
tests/cli/test_cli_real.py.
"""

from __future__ import annotations

import io
import os
import signal
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lorajobs.worker.runspec import RunPaths
from tests.client.live import Live, alpaca_records, start_live
from tests.servicefixtures import wait_for
from tests.worker.jobfactory import trainer_steps

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TRAINING = {"max_steps": 6, "batch_size": 4, "gradient_accumulation_steps": 1,
            "max_seq_length": 256, "save_steps": 2, "learning_rate": 1e-3, "seed": 3}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Live]:
    """API, worker and reaper, the real trainer, for the tests that leave the processes as they
    found them (each reads its own job only): one set of processes and one zygote's imports."""
    yield from start_live(tmp_path_factory.mktemp("real-trainer"), tiny_model_dir, trainer=None)


@pytest.fixture
def own_live(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Live]:
    """API, worker and reaper of this test's own (it stops the worker), the real trainer."""
    yield from start_live(tmp_path, tiny_model_dir, trainer=None)


def _event_types(live: Live, job_id: str) -> list[str]:
    body = live.http.get(f"/v1/jobs/{job_id}/events", params={"limit": 500}).json()
    return [e["type"] for e in body["data"]]


def _trainer_group(run_dir: Path) -> int | None:
    """The running trainer's process group: the process that leads its own group (supervisor:
    start_new_session) with the run directory as its working directory."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if Path(os.readlink(entry / "cwd")) == run_dir and os.getpgid(int(entry.name)) \
                    == int(entry.name):
                return int(entry.name)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return None


def _at_first_checkpoint(live: Live, *, total: int, save_steps: int) -> str:
    """A real-trainer job of `total` steps (merge none), once its first checkpoint is recorded.
    Tests freeze it there (below): a short run cannot end before what they do next."""
    dataset_id = live.upload(alpaca_records(256))
    r = live.http.post("/v1/jobs", json={"base_model": "tiny", "training_file": dataset_id,
                                         "training": {**TRAINING, "max_steps": total,
                                                      "save_steps": save_steps},
                                         "merge": "none"})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    wait_for(lambda: {"checkpoint", "error"} & set(_event_types(live, job_id)), timeout=180,
             what="first checkpoint")
    return job_id


@contextmanager
def _frozen_until_asked_to_stop(live: Live, job_id: str, total: int) -> Iterator[None]:
    """The trainer frozen (SIGSTOP) while the block makes the worker ask it to stop, and until
    the stop file is there: however fast it trains, it cannot finish before the request."""
    paths = RunPaths.for_attempt(live.svc.settings, job_id, 1)
    group = wait_for(lambda: _trainer_group(paths.run_dir.resolve()), timeout=10,
                     what="the trainer's process group")
    os.killpg(group, signal.SIGSTOP)
    try:
        assert max(trainer_steps(live.svc.settings, job_id, 1)) < total
        yield
        wait_for(paths.stop_file.exists, timeout=30, what="the worker's stop request")
    finally:
        os.killpg(group, signal.SIGCONT)


def test_real_trainer_end_to_end(live: Live) -> None:
    dataset_id = live.upload(alpaca_records(64))
    t0 = time.monotonic()
    r = live.http.post("/v1/jobs", json={"base_model": "tiny", "training_file": dataset_id,
                                         "lora": {"r": 8, "alpha": 16},
                                         "training": TRAINING, "merge": "final"})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    wait_for(lambda: {"started", "error"} & set(_event_types(live, job_id)), timeout=120,
             what="trainer started")
    print(f"submit -> trainer 'started' event (incl. torch import): {time.monotonic() - t0:.1f}s")
    job = live.wait_end(job_id, timeout=180)
    assert job["status"] == "succeeded", (job, live.svc.log("worker")[-3000:])
    assert job["progress"]["step"] == 6 and job["metrics"]["train_loss"] is not None
    types = _event_types(live, job_id)
    assert {"started", "checkpoint", "merged", "finished"} <= set(types)

    arts = live.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    kinds = {(a["kind"], a.get("step")) for a in arts}
    assert {("adapter", None), ("merged", None), ("manifest", None), ("log", None)} <= kinds
    assert ("adapter", 2) in kinds
    names = {a["name"] for a in arts if a["kind"] == "adapter" and a.get("step") is None}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    r = live.http.get(f"/v1/jobs/{job_id}/adapter")
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        assert any(n.endswith("adapter_model.safetensors") for n in tar.getnames())
    metrics = live.http.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
    assert [m["step"] for m in metrics] == list(range(1, 7))


def test_real_trainer_cancel_keeps_checkpoint(live: Live) -> None:
    total = 24
    job_id = _at_first_checkpoint(live, total=total, save_steps=3)
    assert live.job(job_id)["status"] == "running"
    with _frozen_until_asked_to_stop(live, job_id, total):
        t0 = time.monotonic()
        assert live.http.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)
    live.wait_status(job_id, "cancelled", timeout=30)
    print(f"cancel -> cancelled (real trainer): {time.monotonic() - t0:.2f}s")
    ckpts = live.http.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    assert ckpts and all(c["resumable"] for c in ckpts)
    assert _event_types(live, job_id).count("finished") == 1


def test_real_trainer_resumes_after_worker_sigterm(own_live: Live) -> None:
    """Warm shutdown: the trainer checkpoints, the job is requeued, another worker resumes."""
    worker = own_live.svc.procs[0]
    total = 24
    job_id = _at_first_checkpoint(own_live, total=total, save_steps=4)
    with _frozen_until_asked_to_stop(own_live, job_id, total):
        t0 = time.monotonic()
        worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    print(f"worker SIGTERM -> exit (real trainer): {time.monotonic() - t0:.2f}s")
    assert own_live.job(job_id)["status"] == "queued"
    own_live.svc.start_worker("worker2")
    job = own_live.wait_end(job_id, timeout=180)
    assert job["status"] == "succeeded", job
    body = own_live.http.get(f"/v1/jobs/{job_id}/events", params={"limit": 500}).json()
    started = [e for e in body["data"] if e["type"] == "started"]
    assert len(started) == 2 and started[1]["data"]["resumed_from_step"] > 0
    metrics = own_live.http.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
    steps = [m["step"] for m in metrics]
    assert steps == sorted(set(steps)) and steps[-1] == total  # redone steps overwrote
