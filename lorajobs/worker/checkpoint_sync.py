"""Checkpoints between node-local scratch and the store: background upload, fenced recording,
and the resume point of a new attempt on any node.

    trainer seals checkpoint-<S>/ ──event──▶ recorder ──▶ CheckpointUploader.submit
        snapshot: hard links into <job scratch>/upload/run-<token>/step-<S>/ (microseconds;
                  the trainer may rotate or delete its dir meanwhile, the links keep the bytes)
        thread:   every file ──put_file(immutable)──▶ <run prefix>/checkpoints/step-<S>/
                  + manifest.json {files: [{path, size, sha256}]}; retried with backoff
                  (<run prefix> = jobs/<job>/attempt-<N>/run-<token>: `run_prefix`)
        then, in ONE transaction fenced by the lease (`jobs.hold_lease`: still running under
        our owner and attempt): Checkpoint row resumable with its prefix + manifest, the
        adapter files as Artifacts (kind adapter, step S), the job's "checkpoint" event (and
        with it the job.checkpoint webhook).
        A worker that lost its lease writes nothing (what it uploaded is under its own
        run's keys and is deleted again).
        An upload that fails (the store stayed down past retry_seconds, a file vanished) or
        is abandoned (`close` while it runs: the attempt settled without it) stops at the next
        file and deletes what it stored under the step's prefix (best effort, logged): no
        half checkpoint is left in the store. Recording that fails (the database stayed down)
        deletes it too, once the database confirms no row points at it.

The trainer never waits for any of this: it runs in another process; its only stall is its
own save (`CheckpointEvent.save_seconds`, bench/checkpoint_bench.py).

At the start of an attempt, `prepare_resume` makes the run dir hold exactly the newest
checkpoint the database records as resumable: a local copy verified against the manifest, or
one downloaded from the store and verified; every other local checkpoint dir (an upload that
never completed, a stale attempt's) is deleted, so the trainer (which resumes from its newest
sealed dir) can only resume from a recorded checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker
from tenacity import Retrying, stop_after_delay, wait_exponential

from lora_core.events import CheckpointEvent
from lora_core.model_files.manifest import MANIFEST_NAME, sha256_file, verify_files
from lorajobs.core import jobs
from lorajobs.core.storage import ArtifactStore
from lorajobs.core.tables import Artifact, Checkpoint, new_id

__all__ = ["attempt_prefix", "run_prefix", "checkpoint_prefix", "snapshot", "upload_dir",
           "upload_file", "known_digests", "UploadedFile", "UploadAbandoned",
           "CheckpointUploader", "record_checkpoint", "prepare_resume", "ADAPTER_SUBDIR"]

log = logging.getLogger(__name__)

ADAPTER_SUBDIR = "adapter"  # lora_core.training.callbacks: checkpoint-<S>/adapter/
COMPLETE_MARKER = "COMPLETE"  # lora_core.training.callbacks.COMPLETE_MARKER (torch-free here)
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
# Backoff between tries of one upload: 0.5, 1, 2, ... capped at 10 s.
RETRY_WAIT = wait_exponential(multiplier=0.5, max=10)
# close() waits this long for the upload in flight to stop at its next file and clean up; the
# daemon thread finishes that on its own while the process lives.
CLOSE_WAIT_SECONDS = 1.0
# 48 bits of sha256(lease owner) name a run inside its attempt: the runs of one attempt (one
# per pause or graceful shutdown) collide with odds ~n^2 / 2^49.
RUN_TOKEN_CHARS = 12


def attempt_prefix(job_id: str, attempt: int) -> str:
    """Every run of one attempt uploads under this prefix (`run_prefix`)."""
    return f"jobs/{job_id}/attempt-{attempt}"


def run_prefix(job_id: str, attempt: int, owner: str) -> str:
    """Everything one run (one claim of the job) uploads: `jobs/<job>/attempt-<N>/run-<token>`,
    token = the first RUN_TOKEN_CHARS hex digits of sha256(lease owner).

    The attempt number alone does not name a run: a pause or a graceful shutdown refunds it,
    so the next claim runs as attempt N again, and a thread of the earlier run still
    uploading (given up by `close`, or its lease lost) would delete, at the same keys, the
    checkpoint the resumed run recorded since. The lease owner is new for every claim
    (`tasks.worker_owner`: host:pid:uuid) and is what fences the run's rows
    (`jobs.hold_lease`), so it scopes the run's keys too: a run only ever writes and deletes
    under its own prefix, never another run's objects.

    Nothing reads a key by deriving it: readers use the keys recorded in the database
    (`Checkpoint.path`, `Artifact.storage_key`), so rows written under the earlier layout
    (`jobs/<job>/attempt-<N>/...`, one prefix per attempt) stay valid as recorded. The claim's
    status event names the owner (`data.owner`), from which the prefix follows.
    """
    token = hashlib.sha256(owner.encode()).hexdigest()[:RUN_TOKEN_CHARS]
    return f"{attempt_prefix(job_id, attempt)}/run-{token}"


def checkpoint_prefix(run: str, step: int) -> str:
    """A checkpoint's objects under the run prefix `run` (`run_prefix`)."""
    return f"{run}/checkpoints/step-{step}"


@dataclass(frozen=True)
class UploadedFile:
    """One stored file: `path` relative to the uploaded directory."""

    path: str
    key: str
    size: int
    sha256: str

    def manifest_entry(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


def snapshot(src: Path, dest: Path) -> Path:
    """Hard-link every file of the sealed dir `src` into `dest` (a copy across filesystems).

    Raises FileNotFoundError if `src` is not sealed or vanished while we linked (rotated by
    the trainer): a partial snapshot is never uploaded.
    """
    if not (src / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"{src} is not a sealed checkpoint")
    shutil.rmtree(dest, ignore_errors=True)
    try:
        for p in sorted(src.rglob("*")):
            target = dest / p.relative_to(src)
            if p.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(p, target)
            except OSError as exc:
                if isinstance(exc, FileNotFoundError):
                    raise
                shutil.copy2(p, target)
        if not (dest / COMPLETE_MARKER).is_file():
            raise FileNotFoundError(f"{src} vanished while it was snapshotted")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def _retrying(seconds: float) -> Retrying:
    return Retrying(stop=stop_after_delay(seconds), wait=RETRY_WAIT, reraise=True)


def known_digests(directory: Path) -> dict[str, tuple[int, str]]:
    """name -> (size, sha256) from a trainer-written manifest.json, to avoid hashing GBs twice."""
    try:
        doc = json.loads((directory / MANIFEST_NAME).read_text())
        return {f["path"]: (int(f["size"]), f["sha256"]) for f in doc["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


class UploadAbandoned(Exception):
    """`upload_dir` stopped between two files because its caller gave it up."""


def upload_dir(store: ArtifactStore, directory: Path, prefix: str, *,
               retry_seconds: float, manifest: bool = True,
               abandoned: Callable[[], bool] | None = None) -> list[UploadedFile]:
    """Upload every file under `directory` to `prefix/<relative path>`, each retried with
    backoff for up to `retry_seconds`. `manifest`: then write `prefix/manifest.json` of what
    was sent (a checkpoint); else a manifest.json the trainer wrote is uploaded as a file like
    the others and its digests are reused (an adapter, a merged model). `abandoned` is asked
    before each file: True raises UploadAbandoned (what was stored stays: the caller's)."""
    known = {} if manifest else known_digests(directory)
    uploaded: list[UploadedFile] = []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if not p.is_file() or p.name.endswith(".part") or (manifest and rel == MANIFEST_NAME):
            continue
        if abandoned is not None and abandoned():
            raise UploadAbandoned(f"{prefix}: given up after {len(uploaded)} file(s)")
        size, sha = known.get(rel, (None, None))
        uploaded.append(upload_file(store, p, f"{prefix}/{rel}", rel, retry_seconds=retry_seconds,
                                    sha256=sha if size == p.stat().st_size else None))
    if manifest:
        body = json.dumps({"files": [f.manifest_entry() for f in uploaded]}, indent=2).encode()
        for attempt in _retrying(retry_seconds):
            with attempt:
                store.put_stream(f"{prefix}/{MANIFEST_NAME}", io.BytesIO(body))
    return uploaded


def upload_file(store: ArtifactStore, path: Path, key: str, name: str, *,
                retry_seconds: float, sha256: str | None = None) -> UploadedFile:
    """One file to `key` (retried with backoff); its size and sha256."""
    size = path.stat().st_size
    digest = sha256 or sha256_file(path)
    for attempt in _retrying(retry_seconds):
        with attempt:
            store.put_file(key, path, immutable=True)
    return UploadedFile(path=name, key=key, size=size, sha256=digest)


def record_checkpoint(session: Session, *, job_id: str, owner: str, attempt: int, step: int,
                      prefix: str, files: list[UploadedFile], metrics: dict[str, Any],
                      save_seconds: float | None = None) -> bool:
    """The uploaded checkpoint becomes resumable, its adapter files downloadable: one
    transaction, written only while the lease is ours. Commits; False if the lease is lost
    (nothing written)."""
    if not jobs.hold_lease(session, job_id, owner=owner, attempt=attempt):
        session.rollback()
        return False
    row = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id,
                                                  Checkpoint.step == step))
    if row is None:
        row = Checkpoint(job_id=job_id, step=step)
        session.add(row)
    has_adapter = any(f.path.startswith(ADAPTER_SUBDIR + "/") for f in files)
    row.resumable = True
    row.path = prefix
    row.adapter_key = f"{prefix}/{ADAPTER_SUBDIR}" if has_adapter else None
    row.manifest = {"files": [f.manifest_entry() for f in files]}
    row.attempt = attempt
    row.metrics = {k: v for k, v in metrics.items() if v is not None}
    session.execute(delete(Artifact).where(Artifact.job_id == job_id, Artifact.kind == "adapter",
                                           Artifact.step == step))
    for f in files:
        if f.path.startswith(ADAPTER_SUBDIR + "/"):
            session.add(Artifact(id=new_id("art"), job_id=job_id, kind="adapter", step=step,
                                 name=f.path[len(ADAPTER_SUBDIR) + 1:], storage_key=f.key,
                                 size=f.size, sha256=f.sha256))
    jobs.add_event(session, job_id, "checkpoint",
                   f"checkpoint step {step} uploaded; resumable on any node",
                   data={"step": step, "resumable": True, "attempt": attempt,
                         "files": len(files), "bytes": sum(f.size for f in files),
                         "save_seconds": save_seconds})
    session.commit()
    return True


@dataclass
class _Pending:
    step: int
    snapshot: Path
    metrics: dict[str, Any]
    save_seconds: float | None
    queued_at: float = field(default_factory=time.monotonic)


class CheckpointUploader:
    """Uploads sealed checkpoints of one run in a background thread, in order, and records
    each one once it is whole in the store (see the module docstring).

    `owner` is the run's lease owner: it fences the recording and names the run's keys
    (`run_prefix`) and its snapshot dir `upload_dir_root/run-<token>/`, so a thread of an
    earlier run of the same attempt, still cleaning up, never touches this run's files."""

    def __init__(self, sessions: sessionmaker[Session], store: ArtifactStore, *, job_id: str,
                 attempt: int, owner: str, upload_dir_root: Path, retry_seconds: float,
                 on_lease_lost: Callable[[], None] | None = None) -> None:
        self.sessions = sessions
        self.store = store
        self.job_id = job_id
        self.attempt = attempt
        self.owner = owner
        self.prefix = run_prefix(job_id, attempt, owner)
        self.root = upload_dir_root / self.prefix.rsplit("/", 1)[-1]
        self.retry_seconds = retry_seconds
        self.on_lease_lost = on_lease_lost
        self.recorded: list[int] = []
        self.failed: list[int] = []
        self.upload_seconds: dict[int, float] = {}
        self.lease_lost = False
        self._abandoned = threading.Event()  # set by close(): what is left is not wanted
        self._submitted: set[int] = set()
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._idle = threading.Condition()
        self._outstanding = 0
        self._thread = threading.Thread(target=self._run, name=f"upload-{job_id}", daemon=True)
        self._thread.start()

    def submit(self, event: CheckpointEvent, metrics: dict[str, Any]) -> bool:
        """Snapshot the sealed dir now (cheap) and queue its upload; False if it is gone."""
        if self.lease_lost:
            return False
        if event.step in self._submitted:  # the same step reported twice: one upload
            log.info("job %s: checkpoint step %d already queued; not uploaded twice",
                     self.job_id, event.step)
            return True
        self._submitted.add(event.step)
        dest = self.root / f"step-{event.step}"
        try:
            snapshot(Path(event.path), dest)
        except FileNotFoundError as exc:
            log.warning("job %s: checkpoint step %d not uploaded: %s", self.job_id, event.step,
                        exc)
            self.failed.append(event.step)
            return False
        with self._idle:
            self._outstanding += 1
        self._queue.put(_Pending(event.step, dest, dict(metrics), event.save_seconds))
        return True

    def pending(self) -> int:
        with self._idle:
            return self._outstanding

    def drain(self, timeout: float) -> bool:
        """Wait until every submitted checkpoint is recorded or given up; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._outstanding:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self) -> None:
        """Give up what is still pending (`drain` first: after it, nothing is unless it timed
        out) and stop the thread: a queued checkpoint is dropped, the one uploading stops at
        its next file and deletes what it stored (waited for up to CLOSE_WAIT_SECONDS)."""
        self._abandoned.set()
        self._queue.put(None)
        self._thread.join(timeout=CLOSE_WAIT_SECONDS)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if self._abandoned.is_set():
                    log.warning("job %s: checkpoint step %d abandoned before its upload "
                                "started; it is not resumable", self.job_id, item.step)
                    self.failed.append(item.step)
                elif not self.lease_lost:
                    self._upload(item)
            except Exception:  # noqa: BLE001 - one checkpoint lost, never the thread
                log.exception("job %s: checkpoint step %d upload failed; it is not resumable",
                              self.job_id, item.step)
                self.failed.append(item.step)
            finally:
                shutil.rmtree(item.snapshot, ignore_errors=True)
                with self._idle:
                    self._outstanding -= 1
                    self._idle.notify_all()
        try:
            self.root.rmdir()  # the run's snapshot dir, empty once every item is done
        except OSError:
            pass

    def _upload(self, item: _Pending) -> None:
        prefix = checkpoint_prefix(self.prefix, item.step)
        started = time.monotonic()
        try:
            files = upload_dir(self.store, item.snapshot, prefix,
                               retry_seconds=self.retry_seconds,
                               abandoned=self._abandoned.is_set)
            if not files:  # never record a checkpoint nobody could resume from
                raise RuntimeError(f"checkpoint step {item.step}: no files to upload")
            if self._abandoned.is_set():  # the attempt settled meanwhile: unwanted
                raise UploadAbandoned(f"{prefix}: given up once uploaded")
        except Exception:
            self._discard(prefix)
            raise
        self.upload_seconds[item.step] = time.monotonic() - started
        try:
            for attempt in _retrying(self.retry_seconds):  # a database restart
                with attempt, self.sessions() as session:
                    ours = record_checkpoint(session, job_id=self.job_id, owner=self.owner,
                                             attempt=self.attempt, step=item.step,
                                             prefix=prefix, files=files, metrics=item.metrics,
                                             save_seconds=item.save_seconds)
        except Exception:
            self._discard_unless_recorded(prefix)
            raise
        if ours:
            self.recorded.append(item.step)
            log.info("job %s: checkpoint step %d uploaded in %.2f s and recorded", self.job_id,
                     item.step, self.upload_seconds[item.step])
            return
        log.warning("job %s: lease lost; checkpoint step %d not recorded (its upload is "
                    "deleted)", self.job_id, item.step)
        self.lease_lost = True
        self._discard(prefix)
        if self.on_lease_lost is not None:
            self.on_lease_lost()

    def _discard(self, prefix: str) -> None:
        """Delete a checkpoint's objects that will never be recorded (best effort)."""
        try:
            self.store.delete_prefix(prefix)
            log.info("job %s: deleted the unrecorded upload %s", self.job_id, prefix)
        except Exception:  # noqa: BLE001 - under our own run's keys: harmless garbage
            log.exception("job %s: deleting the unrecorded upload %s failed", self.job_id,
                          prefix)

    def _discard_unless_recorded(self, prefix: str) -> None:
        """After recording failed: a commit whose answer was lost may still have landed, so
        the objects go only once the database confirms that no checkpoint row points at
        them; a database still down leaves them (logged)."""
        try:
            with self.sessions() as session:
                recorded = session.scalar(select(Checkpoint.step).where(
                    Checkpoint.job_id == self.job_id, Checkpoint.path == prefix))
        except Exception:  # noqa: BLE001 - the database is still down
            log.warning("job %s: %s was uploaded but not recorded; the database cannot tell, "
                        "so it stays in the store", self.job_id, prefix)
            return
        if recorded is None:
            self._discard(prefix)


def _local_checkpoints(root: Path) -> dict[int, Path]:
    found = {}
    if root.is_dir():
        for d in root.iterdir():
            m = _CKPT_RE.match(d.name)
            if m and d.is_dir():
                found[int(m.group(1))] = d
    return found


def _matches(directory: Path, manifest: dict[str, Any]) -> bool:
    """Every file of the manifest, and nothing else, with its size and sha256."""
    entries = manifest.get("files", [])
    # an empty manifest describes no checkpoint
    return bool(entries) and not verify_files(directory, entries)


def prepare_resume(sessions: sessionmaker[Session], store: ArtifactStore, *, job_id: str,
                   checkpoints_dir: Path, retry_seconds: float) -> int | None:
    """Leave in `checkpoints_dir` only the newest recorded resumable checkpoint (verified,
    downloaded if this node lacks it); returns its step, or None (the run starts at 0)."""
    with sessions() as session:
        row = session.scalar(
            select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.resumable.is_(True),
                                     Checkpoint.manifest.is_not(None))
            .order_by(Checkpoint.step.desc()).limit(1))
        newest = (row.step, row.path, row.manifest or {}) if row is not None else None
    local = _local_checkpoints(checkpoints_dir)
    for step, path in local.items():
        if newest is None or step != newest[0]:
            log.info("job %s: removing local checkpoint step %d (not the newest recorded one)",
                     job_id, step)
            shutil.rmtree(path, ignore_errors=True)
    if newest is None:
        return None
    step, prefix, manifest = newest
    target = checkpoints_dir / f"checkpoint-{step}"
    if target.is_dir() and _matches(target, manifest):
        return step
    shutil.rmtree(target, ignore_errors=True)
    part = checkpoints_dir / f".download-{step}"
    shutil.rmtree(part, ignore_errors=True)
    for f in manifest["files"]:
        for attempt in _retrying(retry_seconds):
            with attempt:
                store.get_file(f"{prefix}/{f['path']}", part / f["path"])
    if not _matches(part, manifest):
        shutil.rmtree(part, ignore_errors=True)
        raise ValueError(f"checkpoint step {step} downloaded from {prefix} does not match its "
                         "recorded sha256 manifest")
    part.rename(target)
    log.info("job %s: checkpoint step %d downloaded from the store", job_id, step)
    return step
