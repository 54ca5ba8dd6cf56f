"""Disk full while the real trainer writes a checkpoint, and while it writes the merged model.

The jobs directory of the node-local scratch (where the trainer writes) is a small tmpfs,
sized from what the tiny model's run writes (a checkpoint with optimizer state is ~190 KB, the
merged model ~810 KB), so the disk fills at a known point without racing the trainer.
Expected: the job fails with a clear storage error (a system fault), and the newest checkpoint
before it is uploaded and recorded, intact in the store (its files match the digests recorded
with it), and is what a resume would pick.

Mounting needs root (CAP_SYS_ADMIN); elsewhere this is `service_missing` (a failure in CI).
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from lorajobs.core.db import get_sessionmaker
from lorajobs.core.storage import get_store
from lorajobs.core.tables import Artifact, Checkpoint
from tests.dbfixtures import service_missing
from tests.reliability.conftest import api_with_tiny_model, submit_real_job
from tests.servicefixtures import LiveService, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

KiB = 1024
CHECKPOINT_FITS_ONCE = 300 * KiB  # one ~190 KB checkpoint + logs fit; a second does not
MERGE_DOES_NOT_FIT = 720 * KiB  # 2 checkpoints + final adapter fit; the ~810 KB merge does not


def _mount_tmpfs(path: Path, size: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                        str(path)], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.CalledProcessError) as exc:
        service_missing("a tmpfs mount (root)", exc)


@pytest.fixture
def api(tmp_path: Path, tiny_model_dir: Path,
        request: pytest.FixtureRequest) -> Iterator[tuple[LiveService, httpx.Client]]:
    svc = LiveService(tmp_path, "sqlite", trainer=None)
    jobs_dir = svc.settings.resolved_scratch_dir / "jobs"  # where the trainer writes
    _mount_tmpfs(jobs_dir, request.param)
    try:
        with api_with_tiny_model(svc, tiny_model_dir) as client:
            yield svc, client
    finally:
        subprocess.run(["umount", "-l", str(jobs_dir)], check=False, timeout=10)


def _wait_end(client: httpx.Client, job_id: str) -> dict:
    return wait_for(lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["status"]
                    in ("succeeded", "failed", "cancelled") and j, timeout=150, what="job end")


def _assert_checkpoint_intact(svc: LiveService, job_id: str, step: int) -> None:
    """Uploaded and recorded: the one a resume picks, byte-identical in the store to what was
    registered (the node's scratch is gone with the failed job)."""
    store = get_store(svc.settings)
    with get_sessionmaker(svc.settings)() as session:
        newest = session.scalar(select(Checkpoint).where(
            Checkpoint.job_id == job_id, Checkpoint.resumable.is_(True))
            .order_by(Checkpoint.step.desc()).limit(1))
        arts = session.scalars(select(Artifact).where(
            Artifact.job_id == job_id, Artifact.kind == "adapter", Artifact.step == step)).all()
    assert newest is not None and newest.step == step and newest.manifest
    for f in newest.manifest["files"]:
        with store.open(f"{newest.path}/{f['path']}") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == f["sha256"], f["path"]
    assert {a.name for a in arts} >= {"adapter_config.json", "adapter_model.safetensors"}
    for a in arts:
        with store.open(a.storage_key) as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == a.sha256, f"{a.name} changed"


def _assert_storage_error(job: dict) -> None:
    error = job["error"]
    assert job["status"] == "failed", job
    assert error["code"] == "storage_error" and error["user_fault"] is False, error
    assert "no space left" in error["message"].lower(), error
    assert job["attempt"] == 1, "retrying into a full disk cannot help: fail at once"


@pytest.mark.parametrize("api", [CHECKPOINT_FITS_ONCE], indirect=True)
def test_disk_full_while_writing_a_checkpoint(api: tuple[LiveService, httpx.Client]) -> None:
    svc, client = api
    job_id = submit_real_job(client, max_steps=8, save_steps=2, examples=32)
    job = _wait_end(client, job_id)
    _assert_storage_error(job)
    ckpts = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    assert [c["step"] for c in ckpts] == [2] and ckpts[0]["resumable"]
    _assert_checkpoint_intact(svc, job_id, 2)


@pytest.mark.parametrize("api", [MERGE_DOES_NOT_FIT], indirect=True)
def test_disk_full_while_writing_the_merged_model(api: tuple[LiveService, httpx.Client]) -> None:
    svc, client = api
    job_id = submit_real_job(client, max_steps=4, save_steps=2, merge="final",
                             examples=32)
    job = _wait_end(client, job_id)
    _assert_storage_error(job)
    with get_sessionmaker(svc.settings)() as session:  # a partial merge is never published
        assert not session.scalars(select(Artifact).where(Artifact.job_id == job_id,
                                                          Artifact.kind == "merged")).all()
    assert not (svc.settings.resolved_scratch_dir / f"jobs/{job_id}").exists()  # cleaned
    assert "merged model" in job["error"]["message"]  # lora_core's own StorageError
    _assert_checkpoint_intact(svc, job_id, 4)  # the final step is also a sealed checkpoint
