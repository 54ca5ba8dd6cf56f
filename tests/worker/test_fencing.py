"""Fencing (issue 12): a worker whose lease was taken over registers nothing.

Driven deterministically with two owners and no sleeps: worker A claims attempt 1, the reaper
requeues the job one lease later (time injected), worker B claims attempt 2. Then A, unaware,
does everything a late worker does (records a batch of events, uploads and records a checkpoint,
settles a success with its final artifacts) and B records its own checkpoint. Every A write is
refused in its own transaction; B's lands. Against both stores: the local directory and a real
S3 server (moto).
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

from sqlalchemy import func, select

from lora_core.events import CheckpointEvent, FinishedEvent, ProgressEvent
from lorajobs.core import jobs
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.settings import Settings
from lorajobs.core.storage import ArtifactStore, get_store
from lorajobs.core.tables import Artifact, Checkpoint, Job, JobMetric
from lorajobs.worker import settle
from lorajobs.worker.checkpoint_sync import (
    CheckpointUploader,
    checkpoint_prefix,
    record_checkpoint,
    run_prefix,
    upload_dir,
)
from lorajobs.worker.event_recorder import EventRecorder
from tests.worker.jobfactory import get_job, make_job


def _sealed_checkpoint(root: Path, step: int) -> Path:
    ckpt = root / f"checkpoint-{step}"
    (ckpt / "adapter").mkdir(parents=True)
    (ckpt / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (ckpt / "adapter" / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4)
    (ckpt / "optimizer.pt").write_bytes(b"\x01" * 512)
    (ckpt / "COMPLETE").write_text(f"{step}\n")
    return ckpt


def _taken_over(settings: Settings) -> str:
    """A job claimed by A (attempt 1), reaped one lease later, claimed by B (attempt 2)."""
    job_id = make_job(settings)
    sessions = get_sessionmaker(settings)
    with sessions() as session:
        assert jobs.claim(session, job_id, owner="A", lease_seconds=60) is not None
    expired = get_job(settings, job_id).lease_expires_at + timedelta(seconds=0.01)
    with sessions() as session:
        assert jobs.reap_expired_leases(session, now=expired) == [job_id]
    with sessions() as session:
        job = jobs.claim(session, job_id, owner="B", lease_seconds=60)
        assert job is not None and job.attempt == 2
    return job_id


def _rows(settings: Settings, job_id: str) -> tuple[int, int, int]:
    with get_sessionmaker(settings)() as session:
        return tuple(session.scalar(select(func.count()).select_from(t).where(t.job_id == job_id))
                     for t in (Checkpoint, Artifact, JobMetric))  # type: ignore[return-value]


def _keys(store: ArtifactStore, prefix: str) -> list[str]:
    return [o.key for o in store.list(prefix)]


def test_a_worker_that_lost_its_lease_registers_nothing(settings: Settings,
                                                        tmp_path: Path) -> None:
    job_id = _taken_over(settings)
    sessions = get_sessionmaker(settings)
    store = get_store(settings)

    # A's recorder: a batch of progress and a sealed checkpoint -> no row, lease_lost
    sunk: list[int] = []
    late = EventRecorder(sessions, job_id=job_id, owner="A", attempt=1,
                         checkpoint_sink=lambda e, m: sunk.append(e.step))
    ckpt = _sealed_checkpoint(tmp_path / "a-scratch", 4)
    late.apply([ProgressEvent(step=4, loss=1.0),
                CheckpointEvent(step=4, path=str(ckpt), adapter_path=str(ckpt / "adapter"))])
    assert late.lease_lost and sunk == [] and _rows(settings, job_id) == (0, 0, 0)

    # A's background uploader: the files go up under A's attempt, the record is refused, and
    # what A uploaded is deleted again
    lost = []
    uploader = CheckpointUploader(sessions, store, job_id=job_id, attempt=1, owner="A",
                                  upload_dir_root=tmp_path / "a-upload", retry_seconds=5,
                                  on_lease_lost=lambda: lost.append(True))
    try:
        assert uploader.submit(CheckpointEvent(step=4, path=str(ckpt)), {"train_loss": 1.0})
        assert uploader.drain(timeout=30)
    finally:
        uploader.close()
    assert uploader.lease_lost and lost == [True] and uploader.recorded == []
    assert _keys(store, checkpoint_prefix(run_prefix(job_id, 1, "A"), 4)) == []
    assert _rows(settings, job_id) == (0, 0, 0)
    assert ckpt.is_dir() and not (tmp_path / "a-upload" / "step-4").exists()

    # A settles a "success" with final artifacts uploaded: IllegalTransition, rolled back
    adapter = upload_dir(store, ckpt / "adapter", f"jobs/{job_id}/attempt-1/adapter",
                         retry_seconds=5, manifest=False)
    outputs = settle.Outputs(dirs={("adapter", None): [(f.path, f.key, f.size, f.sha256)
                                                       for f in adapter]})
    late.lease_lost = False  # A as a worker that has not noticed yet
    late.finished = FinishedEvent(status="completed", adapter_path=str(ckpt / "adapter"))
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        outcome = settle.settle(session, job, owner="A", recorder=late, returncode=0,
                                stop_reason=None, lost=False, outputs=outputs,
                                context=SimpleNamespace(settings=settings))  # type: ignore[arg-type]
    assert outcome == settle.LOST and _rows(settings, job_id) == (0, 0, 0)
    assert get_job(settings, job_id).status == "running"  # B's attempt, untouched

    # B, the lease holder, records its checkpoint of the same step: it lands
    b_prefix = checkpoint_prefix(run_prefix(job_id, 2, "B"), 4)
    files = upload_dir(store, ckpt, b_prefix, retry_seconds=5)
    with sessions() as session:
        assert record_checkpoint(session, job_id=job_id, owner="B", attempt=2, step=4,
                                 prefix=b_prefix, files=files,
                                 metrics={"train_loss": 0.5})
    with sessions() as session:
        row = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id))
        arts = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
    assert row is not None and row.attempt == 2 and row.resumable
    assert {f["path"] for f in row.manifest["files"]} == {
        "COMPLETE", "optimizer.pt", "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors"}
    assert {(a.kind, a.step, a.name) for a in arts} == {
        ("adapter", 4, "adapter_config.json"), ("adapter", 4, "adapter_model.safetensors")}
    assert all(a.storage_key.startswith(f"jobs/{job_id}/attempt-2/") for a in arts)
