"""Disk full while the real trainer writes a checkpoint, and while it writes the merged model.

The jobs directory of the artifact store is a small tmpfs, sized from what the tiny model's run
writes (a checkpoint with optimizer state is ~190 KB, the merged model ~810 KB), so the disk
fills at a known point without racing the trainer. Expected: the job fails with a clear
storage error (a system fault), and the newest sealed checkpoint before it is intact (its files
match the digests recorded when it was made) and is what a resume would pick.

Mounting needs root (CAP_SYS_ADMIN); elsewhere this is `service_missing` (a failure in CI).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from lora_core.model_files.manifest import sha256_file
from lora_core.training.callbacks import find_resumable_checkpoint
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.tables import Artifact
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
    jobs_dir = svc.settings.resolved_artifact_root / "jobs"
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
    """Sealed, the one a resume picks, and byte-identical to what was registered."""
    root = svc.settings.resolved_artifact_root / f"jobs/{job_id}/run/checkpoints"
    resumable = find_resumable_checkpoint(root)
    assert resumable is not None and resumable.name == f"checkpoint-{step}"
    with get_sessionmaker(svc.settings)() as session:
        arts = session.scalars(select(Artifact).where(
            Artifact.job_id == job_id, Artifact.kind == "adapter", Artifact.step == step)).all()
    assert {a.name for a in arts} >= {"adapter_config.json", "adapter_model.safetensors"}
    for a in arts:
        path = svc.settings.resolved_artifact_root / a.storage_key
        assert sha256_file(path) == a.sha256, f"{a.name} changed after it was registered"


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
    run_dir = svc.settings.resolved_artifact_root / f"jobs/{job_id}/run"
    assert not (run_dir / "merged" / "final").exists(), "a partial merge must not be published"
    assert not list((run_dir / "merged").glob(".*partial*")), "partial merge left behind"
    assert "merged model" in job["error"]["message"]  # lora_core's own StorageError
    _assert_checkpoint_intact(svc, job_id, 4)  # the final step is also a sealed checkpoint
