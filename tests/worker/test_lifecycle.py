"""A real worker process runs jobs end to end with the fake trainer, on both backends:
rows, artifacts and the duplicate-delivery guarantee (one message too many never trains twice)."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import select

from lorajobs.core.db import get_sessionmaker
from lorajobs.core.queue import broker_ok, enqueue_job
from lorajobs.core.storage import get_store
from lorajobs.core.tables import Artifact, Checkpoint, JobMetric
from tests.servicefixtures import LiveService, wait_for
from tests.worker.jobfactory import (
    events,
    get_job,
    make_job,
    run_dir,
    status_history,
    trainer_starts,
)

pytestmark = pytest.mark.timeout(120)


def _finished(service: LiveService, job_id: str) -> str | None:
    status = get_job(service.settings, job_id).status
    return status if status in ("succeeded", "failed", "cancelled") else None


def test_job_runs_to_success_with_rows_and_artifacts(live_service: LiveService) -> None:
    settings = live_service.settings
    assert broker_ok(settings)
    job_id = make_job(settings, max_steps=6, save_steps=2)
    t0 = time.monotonic()
    assert enqueue_job(job_id, settings)
    wait_for(lambda: trainer_starts(settings, job_id), timeout=30, what="trainer start")
    submit_to_start = time.monotonic() - t0
    assert wait_for(lambda: _finished(live_service, job_id), timeout=30,
                    what="job end") == "succeeded", live_service.log("worker")[-3000:]
    print(f"submit -> trainer start: {submit_to_start:.2f}s")

    job = get_job(settings, job_id)
    assert job.attempt == 1 and job.error is None and job.lease_owner is None
    assert job.progress["step"] == 6 and job.progress["total_steps"] == 6
    assert job.progress["fraction"] == 1.0
    assert job.metrics["train_loss"] == pytest.approx(2.0 / 6)
    assert status_history(settings, job_id) == ["running", "succeeded"]
    types = {e.type for e in events(settings, job_id)}
    assert {"started", "stage", "checkpoint", "merged", "finished"} <= types
    with get_sessionmaker(settings)() as session:
        steps = session.scalars(select(JobMetric.step).where(JobMetric.job_id == job_id)
                                .order_by(JobMetric.step)).all()
        assert steps == [1, 2, 3, 4, 5, 6]
        ckpts = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all()
        assert sorted(c.step for c in ckpts) == [2, 4]
        arts = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
    by_kind: dict[tuple[str, int | None], set[str]] = {}
    for a in arts:
        by_kind.setdefault((a.kind, a.step), set()).add(a.name)
        assert a.size == get_store(settings).size(a.storage_key) and len(a.sha256) == 64
    assert by_kind[("adapter", None)] == {"adapter_config.json", "adapter_model.safetensors"}
    assert by_kind[("adapter", 2)] == {"adapter_config.json", "adapter_model.safetensors"}
    assert by_kind[("merged", None)] == {"config.json", "model.safetensors"}
    assert by_kind[("manifest", None)] == {"reproducibility.json"}
    assert {"events-attempt1.jsonl", "trainer-attempt1.log"} <= by_kind[("log", None)]
    # uploaded under the attempt's keys; checkpoints recorded with their sha256 manifest
    assert all(a.storage_key.startswith(f"jobs/{job_id}/attempt-1/") for a in arts)
    assert all(c.resumable and c.attempt == 1 and c.path.endswith(f"step-{c.step}")
               and {f["path"] for f in c.manifest["files"]} >= {"COMPLETE",
                                                                "adapter/adapter_config.json"}
               for c in ckpts)
    assert not run_dir(settings, job_id).parent.exists()  # scratch removed once settled
    key = next(a.storage_key for a in arts if a.name == "reproducibility.json")
    with get_store(settings).open(key) as fh:
        manifest = json.loads(fh.read())
    assert manifest["seed"] == 7 and manifest["world_size"] == 1
    assert manifest["base_model"]["weights_sha256"].keys() == {"model.safetensors"}
    assert {"torch", "transformers", "peft", "deepspeed"} <= manifest["libraries"].keys()
    assert manifest["hardware"]["cpu_count"] >= 1
    assert str(settings.data_dir) not in json.dumps(manifest)  # tenants download it: no paths


def test_duplicate_delivery_trains_once(live_service: LiveService) -> None:
    """Sent twice up front, and again while running: one claim, one trainer start."""
    settings = live_service.settings
    job_id = make_job(settings, max_steps=8, control={"step_seconds": 0.2})
    assert enqueue_job(job_id, settings) and enqueue_job(job_id, settings)
    wait_for(lambda: get_job(settings, job_id).status == "running", what="running")
    assert enqueue_job(job_id, settings)
    assert wait_for(lambda: _finished(live_service, job_id), timeout=40) == "succeeded"
    # all three messages handled (Celery logs each one's end): one run, two no-op claims
    outcomes = wait_for(lambda: len(o := live_service.task_outcomes()) >= 3 and o,
                        timeout=30, what="the worker to handle all three messages")
    assert sorted(outcomes) == ["noop", "noop", "succeeded"]
    assert trainer_starts(settings, job_id) == [0]
    assert status_history(settings, job_id) == ["running", "succeeded"]
    assert len(events(settings, job_id, "started")) == 1
    assert get_job(settings, job_id).attempt == 1
