"""The resume point of an attempt (checkpoint_sync.prepare_resume), on the local store and a
real S3 server: only the newest recorded checkpoint is left for the trainer, downloaded and
verified where this node lacks it or holds a copy that does not match its manifest."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from lora_core.events import CheckpointEvent
from lorajobs.core import jobs
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.settings import Settings
from lorajobs.core.storage import ArtifactStore, get_store
from lorajobs.core.tables import Checkpoint
from lorajobs.worker import checkpoint_sync
from lorajobs.worker.checkpoint_sync import (
    CheckpointUploader,
    checkpoint_prefix,
    prepare_resume,
    record_checkpoint,
    run_prefix,
    upload_dir,
)
from tests.worker.jobfactory import make_job


def _prefix(job_id: str, step: int, owner: str = "w") -> str:
    """Where the run of `owner` (attempt 1) stores checkpoint `step`."""
    return checkpoint_prefix(run_prefix(job_id, 1, owner), step)


def _checkpoint(root: Path, step: int) -> Path:
    ckpt = root / f"checkpoint-{step}"
    (ckpt / "adapter").mkdir(parents=True)
    (ckpt / "adapter" / "adapter_model.safetensors").write_bytes(bytes([step]) * 300)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (ckpt / "COMPLETE").write_text(f"{step}\n")
    return ckpt


def test_only_the_newest_recorded_checkpoint_is_resumed(settings: Settings,
                                                        tmp_path: Path) -> None:
    job_id = make_job(settings)
    sessions = get_sessionmaker(settings)
    store = get_store(settings)
    with sessions() as session:
        assert jobs.claim(session, job_id, owner="w", lease_seconds=60) is not None
    uploaded = tmp_path / "uploaded"
    for step in (2, 4):  # recorded by attempt 1
        files = upload_dir(store, _checkpoint(uploaded, step), _prefix(job_id, step),
                           retry_seconds=5)
        with sessions() as session:
            assert record_checkpoint(session, job_id=job_id, owner="w", attempt=1, step=step,
                                     prefix=_prefix(job_id, step), files=files,
                                     metrics={})

    # another node: nothing local -> step 4 downloaded, verified
    node_b = tmp_path / "b" / "checkpoints"
    assert prepare_resume(sessions, store, job_id=job_id, checkpoints_dir=node_b,
                          retry_seconds=5) == 4
    assert sorted(p.name for p in node_b.iterdir()) == ["checkpoint-4"]
    assert (node_b / "checkpoint-4" / "adapter" / "adapter_model.safetensors").read_bytes() \
        == bytes([4]) * 300

    # this node: a newer unrecorded dir (its upload never completed), an older recorded one,
    # and a tampered copy of the newest recorded one
    node_a = tmp_path / "a" / "checkpoints"
    for step in (2, 4, 6):
        _checkpoint(node_a, step)
    (node_a / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 99}')
    assert prepare_resume(sessions, store, job_id=job_id, checkpoints_dir=node_a,
                          retry_seconds=5) == 4
    assert sorted(p.name for p in node_a.iterdir()) == ["checkpoint-4"]
    assert json.loads((node_a / "checkpoint-4" / "trainer_state.json").read_text()) \
        == {"global_step": 4}

    # an intact local copy is kept as it is (no download)
    marker = (node_a / "checkpoint-4" / "COMPLETE").stat().st_ino
    assert prepare_resume(sessions, store, job_id=job_id, checkpoints_dir=node_a,
                          retry_seconds=5) == 4
    assert (node_a / "checkpoint-4" / "COMPLETE").stat().st_ino == marker


def test_no_recorded_checkpoint_starts_over(settings: Settings, tmp_path: Path) -> None:
    job_id = make_job(settings)
    local = tmp_path / "checkpoints"
    _checkpoint(local, 3)  # sealed, but never uploaded and recorded
    assert prepare_resume(get_sessionmaker(settings), get_store(settings), job_id=job_id,
                          checkpoints_dir=local, retry_seconds=5) is None
    assert list(local.iterdir()) == []


def test_a_step_reported_twice_is_uploaded_and_recorded_once(settings: Settings,
                                                             tmp_path: Path) -> None:
    """A stop mid-epoch used to report its checkpoint twice; both copies went into one
    snapshot folder and the second record listed no files, so the resume failed."""
    job_id = make_job(settings)
    sessions = get_sessionmaker(settings)
    store = get_store(settings)
    with sessions() as session:
        assert jobs.claim(session, job_id, owner="w", lease_seconds=60) is not None
    ckpt = _checkpoint(tmp_path / "scratch", 3)
    uploader = CheckpointUploader(sessions, store, job_id=job_id, attempt=1, owner="w",
                                  upload_dir_root=tmp_path / "upload", retry_seconds=5)
    try:
        event = CheckpointEvent(step=3, path=str(ckpt))
        assert uploader.submit(event, {}) and uploader.submit(event, {})
        assert uploader.drain(60)
    finally:
        uploader.close()
    assert uploader.recorded == [3] and uploader.failed == []
    with sessions() as session:
        row = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id))
        assert row is not None and row.resumable
        assert sorted(f["path"] for f in (row.manifest or {})["files"]) == [
            "COMPLETE", "adapter/adapter_model.safetensors", "trainer_state.json"]
    node_b = tmp_path / "b" / "checkpoints"
    assert prepare_resume(sessions, store, job_id=job_id, checkpoints_dir=node_b,
                          retry_seconds=5) == 3


def _uploader(settings: Settings, tmp_path: Path, store: ArtifactStore,
              retry_seconds: float = 5) -> tuple[str, CheckpointUploader]:
    job_id = make_job(settings)
    sessions = get_sessionmaker(settings)
    with sessions() as session:
        assert jobs.claim(session, job_id, owner="w", lease_seconds=60) is not None
    return job_id, CheckpointUploader(sessions, store, job_id=job_id, attempt=1, owner="w",
                                      upload_dir_root=tmp_path / "upload",
                                      retry_seconds=retry_seconds)


def _recorded(settings: Settings, job_id: str) -> list[int]:
    with get_sessionmaker(settings)() as session:
        return list(session.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job_id)))


def test_a_failed_upload_leaves_nothing_in_the_store(settings: Settings, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The store refuses the last file past retry_seconds: the files it took before are
    deleted again, nothing is recorded."""
    store = get_store(settings)
    real_put = store.put_file

    def put_file(key: str, src: Path, *, immutable: bool = False) -> None:
        if key.endswith("trainer_state.json"):  # sorted last: two files are stored before it
            raise OSError("store down (test)")
        real_put(key, src, immutable=immutable)

    monkeypatch.setattr(store, "put_file", put_file)
    job_id, uploader = _uploader(settings, tmp_path, store, retry_seconds=0.5)
    try:
        assert uploader.submit(CheckpointEvent(step=3, path=str(_checkpoint(tmp_path, 3))), {})
        assert uploader.drain(60)
    finally:
        uploader.close()
    assert uploader.failed == [3] and uploader.recorded == []
    assert list(store.list(_prefix(job_id, 3))) == []
    assert _recorded(settings, job_id) == []


def test_an_abandoned_upload_stops_and_deletes_what_it_stored(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """close() while a checkpoint uploads (the attempt settled without it): it stops at its
    next file and deletes the files already stored; a checkpoint still queued is dropped."""
    store = get_store(settings)
    real_put = store.put_file
    uploading, release = threading.Event(), threading.Event()

    def put_file(key: str, src: Path, *, immutable: bool = False) -> None:
        real_put(key, src, immutable=immutable)
        if key.endswith("/COMPLETE"):  # the first file of step 3: hold the upload here
            uploading.set()
            assert release.wait(30)

    monkeypatch.setattr(store, "put_file", put_file)
    job_id, uploader = _uploader(settings, tmp_path, store)
    for step in (3, 5):
        assert uploader.submit(CheckpointEvent(step=step, path=str(_checkpoint(tmp_path, step))),
                               {})
    assert uploading.wait(30)
    assert list(store.list(_prefix(job_id, 3)))  # one file stored so far
    uploader.close()  # waits CLOSE_WAIT_SECONDS, then leaves the thread to finish
    release.set()
    uploader._thread.join(30)
    assert not uploader._thread.is_alive()
    assert sorted(uploader.failed) == [3, 5] and uploader.recorded == []
    assert list(store.list(f"jobs/{job_id}")) == []
    assert _recorded(settings, job_id) == []
    assert list((tmp_path / "upload").iterdir()) == []  # the snapshots are gone too


@pytest.mark.parametrize("landed", [False, True])
def test_a_failed_recording_deletes_the_upload_unless_the_row_landed(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        landed: bool) -> None:
    """Recording keeps failing (the database): the uploaded objects are deleted once the
    database says no row points at them; kept when the commit landed but its answer was lost
    (a resumable checkpoint must never lose its files)."""
    real_record = checkpoint_sync.record_checkpoint

    def record(session: Session, **kwargs: Any) -> bool:
        if landed:
            real_record(session, **kwargs)
        raise OperationalError("COMMIT", {}, Exception("connection lost (test)"))

    monkeypatch.setattr(checkpoint_sync, "record_checkpoint", record)
    store = get_store(settings)
    job_id, uploader = _uploader(settings, tmp_path, store, retry_seconds=0.5)
    try:
        assert uploader.submit(CheckpointEvent(step=3, path=str(_checkpoint(tmp_path, 3))), {})
        assert uploader.drain(60)
    finally:
        uploader.close()
    assert uploader.failed == [3]
    stored = [o.key.rsplit("/", 1)[-1] for o in store.list(_prefix(job_id, 3))]
    assert _recorded(settings, job_id) == ([3] if landed else [])
    assert sorted(stored) == (sorted(["COMPLETE", "adapter_model.safetensors",
                                      "trainer_state.json", "manifest.json"]) if landed else [])


def _pause_and_resume(settings: Settings, job_id: str, *, owner: str, then: str) -> None:
    """The run of `owner` ends paused (the attempt is refunded) and `then` claims the job:
    the same attempt number again."""
    from lorajobs.core.policy import Outcome
    from lorajobs.core.tables import Job

    with get_sessionmaker(settings)() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.attempt == 1
        jobs.request_pause(session, job)
        jobs.end_attempt(session, job, Outcome.PAUSE_STOP, owner=owner)
        session.commit()
        jobs.request_resume(session, job)
    with get_sessionmaker(settings)() as session:
        job = jobs.claim(session, job_id, owner=then, lease_seconds=60)
        assert job is not None and job.attempt == 1


@pytest.mark.parametrize("late", ["while_the_new_run_uploads", "after_it_recorded"])
def test_an_earlier_runs_late_cleanup_never_touches_the_resumed_run(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, late: str) -> None:
    """A pause refunds the attempt, so the resumed run is attempt 1 again and saves the same
    step. The paused run's uploader, given up by close() but still holding step 3's upload,
    goes on to delete what it stored: under its own run's keys (and its own snapshot dir), so
    the resumed run's step 3 is recorded whole and resumes, whether the late cleanup comes
    while the new run uploads or after it recorded."""
    job_id = make_job(settings)
    sessions = get_sessionmaker(settings)
    store = get_store(settings)
    with sessions() as session:
        assert jobs.claim(session, job_id, owner="w1", lease_seconds=60) is not None
    old_run, new_run = run_prefix(job_id, 1, "w1"), run_prefix(job_id, 1, "w2")
    assert old_run != new_run
    held = {old_run: (threading.Event(), threading.Event())}  # prefix -> (arrived, release)
    if late == "while_the_new_run_uploads":
        held[new_run] = (threading.Event(), threading.Event())
    real_put = store.put_file

    def put_file(key: str, src: Path, *, immutable: bool = False) -> None:
        real_put(key, src, immutable=immutable)
        for prefix, (arrived, release) in held.items():
            if key.startswith(prefix + "/") and not arrived.is_set():  # its first file
                arrived.set()
                assert release.wait(30)

    monkeypatch.setattr(store, "put_file", put_file)
    upload_root = tmp_path / "scratch" / "upload"  # one node: both runs share the job's dir
    old = CheckpointUploader(sessions, store, job_id=job_id, attempt=1, owner="w1",
                             upload_dir_root=upload_root, retry_seconds=5)
    assert old.submit(CheckpointEvent(step=3, path=str(_checkpoint(tmp_path / "run1", 3))), {})
    assert held[old_run][0].wait(30)
    old.close()  # the paused run settles; its thread is still inside step 3's upload
    assert old._thread.is_alive()
    _pause_and_resume(settings, job_id, owner="w1", then="w2")

    resumed = _checkpoint(tmp_path / "run2", 3)
    (resumed / "adapter" / "adapter_model.safetensors").write_bytes(b"resumed" * 50)
    new = CheckpointUploader(sessions, store, job_id=job_id, attempt=1, owner="w2",
                             upload_dir_root=upload_root, retry_seconds=5)
    try:
        assert new.submit(CheckpointEvent(step=3, path=str(resumed)), {})
        if late == "while_the_new_run_uploads":
            assert held[new_run][0].wait(30)
        else:
            assert new.drain(60) and new.recorded == [3]
        held[old_run][1].set()  # the old thread stops at its next file and cleans up
        old._thread.join(30)
        assert not old._thread.is_alive() and old.failed == [3] and old.recorded == []
        if late == "while_the_new_run_uploads":
            held[new_run][1].set()
        assert new.drain(60)
    finally:
        new.close()
    assert new.recorded == [3] and new.failed == []
    with sessions() as session:
        row = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id))
        assert row is not None and row.path == _prefix(job_id, 3, "w2")
        files = [f["path"] for f in (row.manifest or {})["files"]]
    stored = {o.key[len(row.path) + 1:] for o in store.list(row.path)}
    assert stored == {*files, "manifest.json"}
    node_b = tmp_path / "b" / "checkpoints"
    assert prepare_resume(sessions, store, job_id=job_id, checkpoints_dir=node_b,
                          retry_seconds=5) == 3
    assert (node_b / "checkpoint-3" / "adapter" / "adapter_model.safetensors").read_bytes() \
        == b"resumed" * 50
    assert list(store.list(old_run)) == []  # the old run deleted its own objects
