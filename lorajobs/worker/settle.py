"""Record how a trainer attempt ended. This module names the outcome (`policy.Outcome`) and
the error; `policy.next_state` decides the job's next status and `jobs.end_attempt` applies it,
guarded by our lease owner: if the reaper or a cancel won a race, we lose quietly ("lost").

    finished completed            SUCCEEDED     (final adapter, manifest, logs registered first)
    error event                   USER_ERROR / SYSTEM_ERROR (the child's {code, message, ...})
    disk full, no named error     SYSTEM_ERROR  storage_error
    stopped / killed for a cancel CANCEL_STOP   (checkpoints kept)
    stopped at the runtime limit  MAX_RUNTIME   max_runtime_exceeded (checkpoints kept)
    stopped for worker shutdown   SHUTDOWN      queued and re-sent: another worker resumes it
    no verdict (crash, OOM kill)  CRASHED       queued while attempts remain, else failed
                                                trainer_crashed
    final upload failed           CRASHED       store_unavailable: queued while attempts
                                                remain (resumes from the newest recorded
                                                checkpoint), else failed

What a job leaves is uploaded from scratch first (`upload_outputs`, under the run's own prefix
`jobs/<job>/attempt-<N>/run-<token>/` (checkpoint_sync.run_prefix): logs always (run_logs.py);
adapter, merged models, TensorBoard file and reproducibility.json when it succeeded), then
registered as Artifact rows in the transaction that settles the job: if the lease was lost
meanwhile (`IllegalTransition`), the rollback takes the rows with it, so a late worker never
registers anything. A worker that knows it lost the lease uploads and registers nothing.

    <run prefix>/logs/<name>                  events-attempt<N>.jsonl, trainer-attempt<N>.log
    <run prefix>/adapter/...                  the final adapter (its manifest.json included)
    <run prefix>/merged/<dir>/...             each merged model (the final one, or per step)
    <run prefix>/tensorboard/events.out.tfevents.<job>
    <run prefix>/reproducibility.json
    <run prefix>/checkpoints/step-<S>/...     (checkpoint_sync.py)

A final upload that fails (adapter, merged models, reproducibility.json) deletes what it had
stored (best effort, logged) and registers none of it: no partial adapter or model is left in
the store, and the job is retried as a new run under new keys.
"""

from __future__ import annotations

import logging
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from lora_core.events import JobError
from lora_core.spec import RunSpec
from lorajobs.core import jobs
from lorajobs.core.errors import IllegalTransition
from lorajobs.core.policy import Outcome
from lorajobs.core.settings import Settings
from lorajobs.core.storage import ArtifactStore
from lorajobs.core.tables import Checkpoint, Dataset, Job, JobMetric, JobStatus, RegisteredModel
from lorajobs.worker import reproducibility, run_logs
from lorajobs.worker.checkpoint_sync import UploadedFile, upload_dir, upload_file
from lorajobs.worker.event_recorder import (
    EventRecorder,
    RegisteredFile,
    is_final_merge,
    register_dir,
    register_file,
    write_tensorboard,
)
from lorajobs.worker.runspec import RunPaths

__all__ = ["SUCCEEDED", "FAILED", "CANCELLED", "REQUEUED", "LOST", "TERMINAL", "SettleContext",
           "Outputs", "upload_outputs", "completed", "remove_scratch", "trim_paused_scratch",
           "settle", "end", "fail"]

log = logging.getLogger(__name__)

SUCCEEDED, FAILED, CANCELLED, REQUEUED, LOST = (
    "succeeded", "failed", "cancelled", "requeued", "lost")
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
PAUSED = "paused"  # stopped on a pause request: checkpoint kept, worker freed (issue 13)
MANIFEST_FILE = "reproducibility.json"
# Less free space than this where the trainer writes, after it failed: the disk filled up.
# (A failed write leaves the filesystem at ~0 free; 1 MiB is far below any checkpoint.)
STORAGE_FULL_BYTES = 1024 * 1024


@dataclass(frozen=True)
class SettleContext:
    paths: RunPaths
    run_spec: RunSpec
    model: RegisteredModel
    dataset: Dataset
    store: ArtifactStore
    settings: Settings
    attempt: int
    prefix: str  # the run's store prefix (checkpoint_sync.run_prefix)


def _exit_description(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


@dataclass
class Outputs:
    """What `upload_outputs` put in the store, to be registered by `settle`: (kind, step) ->
    files, and the merged dirs of checkpoints (step -> key prefix). `error`: the final upload
    failed (the store stayed down past store_retry_seconds)."""

    dirs: dict[tuple[str, int | None], list[RegisteredFile]] = field(default_factory=dict)
    files: list[tuple[str, RegisteredFile]] = field(default_factory=list)  # (kind, file)
    merged_keys: dict[int, str] = field(default_factory=dict)
    error: JobError | None = None

    def register(self, session: Session, job_id: str) -> None:
        for (kind, step), files in self.dirs.items():
            register_dir(session, job_id=job_id, kind=kind, step=step, files=files)
        for kind, (name, key, size, sha256) in self.files:
            register_file(session, job_id=job_id, kind=kind, step=None, name=name, key=key,
                          size=size, sha256=sha256)
        for step, key in self.merged_keys.items():
            session.execute(update(Checkpoint)
                            .where(Checkpoint.job_id == job_id, Checkpoint.step == step)
                            .values(merged_key=key))


def _registered(files: list[UploadedFile]) -> list[RegisteredFile]:
    return [(f.path, f.key, f.size, f.sha256) for f in files]


def completed(recorder: EventRecorder) -> bool:
    finished = recorder.finished
    return finished is not None and finished.status == "completed" and recorder.error is None


def upload_outputs(sessions: sessionmaker[Session], context: SettleContext,
                   recorder: EventRecorder, *, job_id: str) -> Outputs:
    """Upload what this attempt leaves (see the module docstring); never raises: a store that
    stays down becomes `Outputs.error`."""
    out = Outputs()
    store, retry = context.store, context.settings.store_retry_seconds
    try:
        for registered in run_logs.upload_logs(sessions, store, job_id=job_id,
                                               paths=context.paths, prefix=context.prefix,
                                               retry_seconds=retry):
            out.files.append((run_logs.LOG_KIND, registered))
        if recorder.finished is not None:  # completed or stopped (cancel, pause, shutdown)
            _upload_tensorboard(sessions, context, out, job_id=job_id)
        if not completed(recorder):
            return out
        _upload_final(sessions, context, recorder, out, job_id=job_id)
    except Exception as exc:  # noqa: BLE001 - the store's errors are its implementation's
        log.exception("job %s: uploading the attempt's outputs failed", job_id)
        out.error = JobError(code="store_unavailable",
                             message=f"the artifact store refused the job's final upload for "
                                     f"{retry:g} s: {exc}")
    return out


def _upload_final(sessions: sessionmaker[Session], context: SettleContext,
                  recorder: EventRecorder, out: Outputs, *, job_id: str) -> None:
    """The adapter, merged models and reproducibility.json, added to `out` only once all are
    stored; a failure deletes what this upload stored (`_discard`) and raises."""
    store, retry = context.store, context.settings.store_retry_seconds
    final = Outputs()
    started: list[str] = []  # each prefix before its upload starts: a partial one goes too
    try:
        finished = recorder.finished
        adapter = Path(finished.adapter_path if finished and finished.adapter_path
                       else context.paths.run_dir / "adapter")
        if adapter.is_dir():
            prefix = f"{context.prefix}/adapter"
            started.append(prefix)
            final.dirs[("adapter", None)] = _registered(upload_dir(
                store, adapter, prefix, retry_seconds=retry, manifest=False))
        for event in recorder.merged:
            step = None if is_final_merge(event) else event.step
            prefix = f"{context.prefix}/merged/{Path(event.path).name}"
            started.append(prefix)
            final.dirs[("merged", step)] = _registered(upload_dir(
                store, Path(event.path), prefix, retry_seconds=retry, manifest=False))
            if step is not None:
                final.merged_keys[step] = prefix
        with sessions() as session:
            job = session.get(Job, job_id)
            assert job is not None
            manifest = _write_reproducibility(context, recorder, job)
        key = f"{context.prefix}/{MANIFEST_FILE}"
        started.append(key)
        f = upload_file(store, manifest, key, MANIFEST_FILE, retry_seconds=retry)
        final.files.append(("manifest", (MANIFEST_FILE, f.key, f.size, f.sha256)))
    except Exception:
        _discard(store, started, job_id=job_id)
        raise
    out.dirs.update(final.dirs)
    out.merged_keys.update(final.merged_keys)
    out.files.extend(final.files)


def _discard(store: ArtifactStore, prefixes: list[str], *, job_id: str) -> None:
    """Delete what a failed final upload stored (best effort: the store may still be down;
    what stays is under this run's own prefix, which nothing records, and goes with the job's
    files)."""
    for prefix in prefixes:
        try:
            store.delete_prefix(prefix)
            log.info("job %s: deleted %s of the failed final upload", job_id, prefix)
        except Exception:  # noqa: BLE001 - the store's errors are its implementation's
            log.exception("job %s: deleting %s of the failed final upload failed", job_id,
                          prefix)


def _upload_tensorboard(sessions: sessionmaker[Session], context: SettleContext, out: Outputs,
                        *, job_id: str) -> None:
    """The TensorBoard file of the whole curve so far (every attempt, redone steps once), for
    any run the trainer ended itself: a cancelled or paused job's curve is worth seeing too."""
    with sessions() as session:
        rows = list(session.scalars(select(JobMetric).where(JobMetric.job_id == job_id)
                                    .order_by(JobMetric.step)))
    if not rows:
        return
    tb = context.paths.job_dir / "tensorboard" / f"events.out.tfevents.{job_id}"
    try:
        write_tensorboard(tb, rows)
    except Exception:  # noqa: BLE001 - observability must never fail a training run
        log.exception("job %s: writing the TensorBoard file failed", job_id)
        return
    key = f"{context.prefix}/tensorboard/{tb.name}"
    f = upload_file(context.store, tb, key, tb.name,
                    retry_seconds=context.settings.store_retry_seconds)
    out.files.append(("tensorboard", (tb.name, f.key, f.size, f.sha256)))


def _write_reproducibility(context: SettleContext, recorder: EventRecorder, job: Job) -> Path:
    started = recorder.started
    return reproducibility.write_manifest(
        context.paths.job_dir / MANIFEST_FILE, job_id=job.id, spec=job.spec,
        run_spec=context.run_spec.model_dump(mode="json"),
        base_model={"name": context.model.name, "architecture": context.model.architecture,
                    "weights_sha256": reproducibility.weights_digests(context.run_spec.model_dir,
                                                            context.model.weights_sha256)},
        dataset={"id": context.dataset.id, "sha256": context.dataset.sha256,
                 "num_examples": context.dataset.num_examples, "format": context.dataset.format},
        world_size=started.world_size if started else None, attempt=job.attempt,
        resumed_from_step=started.resumed_from_step if started else None)


# What `end` reports for each status the policy chose.
_RESULTS = {JobStatus.SUCCEEDED: SUCCEEDED, JobStatus.FAILED: FAILED,
            JobStatus.CANCELLED: CANCELLED, JobStatus.QUEUED: REQUEUED,
            JobStatus.PAUSED: PAUSED}


def end(session: Session, job: Job, outcome: Outcome, *, owner: str, settings: Settings,
        error: JobError | None = None, messages: dict[str, str] | None = None) -> str:
    """Apply the policy's decision for `outcome` and commit; a requeued job is re-sent now (the
    next attempt resumes from the newest checkpoint). Returns a settle.* constant."""
    try:
        status = jobs.end_attempt(session, job, outcome, owner=owner, error=error,
                                  messages=messages)
        session.commit()
    except IllegalTransition as exc:
        session.rollback()
        log.warning("job %s: could not settle (%s): %s", job.id, outcome, exc.message)
        return LOST
    if status == JobStatus.QUEUED:
        from lorajobs.core.queue import enqueue_job

        if not enqueue_job(job.id, settings):
            log.warning("job %s requeued but not sent (broker down); the reaper will send it",
                        job.id)
    return _RESULTS[status]


def fail(session: Session, job: Job, *, owner: str, error: JobError, settings: Settings,
         outputs: Outputs | None = None, outcome: Outcome | None = None) -> str:
    """A named error (the child's, the worker's): failed, whatever the cancel flag says."""
    if outputs is not None:
        outputs.register(session, job.id)
    if outcome is None:
        outcome = Outcome.USER_ERROR if error.user_fault else Outcome.SYSTEM_ERROR
    return end(session, job, outcome, owner=owner, settings=settings, error=error,
               messages={JobStatus.FAILED: f"failed: {error.code}: {error.message}"})


def _succeed(session: Session, job: Job, *, owner: str, outputs: Outputs,
             context: SettleContext) -> str:
    outputs.register(session, job.id)
    return end(session, job, Outcome.SUCCEEDED, owner=owner, settings=context.settings,
               messages={JobStatus.SUCCEEDED: "training completed"})


def _storage_full_error(context: SettleContext, recorder: EventRecorder,
                        returncode: int) -> JobError | None:
    """The trainer failed and its output filesystem is full: a clear storage error.

    Torch reports a full disk during a checkpoint save as an opaque RuntimeError
    ("unexpected pos ..."), and a trainer that cannot even append its error event dies with no
    verdict, which would be retried into the same full disk and end as "trainer_crashed". The
    worker can see the cause the child could not name.
    """
    try:
        free = shutil.disk_usage(context.paths.run_dir).free
    except OSError:
        return None
    if free >= STORAGE_FULL_BYTES:
        return None
    step = recorder.last_checkpoint_step
    kept = (f"the newest sealed checkpoint (step {step}) is intact and resumable"
            if step else "no checkpoint had been sealed yet")
    child = recorder.error.message if recorder.error else _exit_description(returncode)
    return JobError(code="storage_error",
                    message=f"No space left on device: {free} bytes free in the artifact store "
                            f"while the trainer was writing; {kept}. Free space and resubmit "
                            f"(trainer: {child})")


def _runtime_exceeded(settings: Settings, step: int | None) -> JobError:
    """The job ran past `max_job_runtime_seconds`: failed, not retried (it would run as long
    again), with what it saved on the way out still listed and downloadable."""
    kept = (f"its last checkpoint (step {step}) is kept: download it with ?step={step}"
            if step else "it had saved no checkpoint")
    return JobError(code="max_runtime_exceeded", user_fault=True,
                    message=f"the job ran longer than the limit of "
                            f"{settings.max_job_runtime_seconds:g} s and was stopped; {kept}. "
                            "Resubmit with fewer steps or a smaller dataset")


def settle(session: Session, job: Job, *, owner: str, recorder: EventRecorder,
           returncode: int, stop_reason: str | None, lost: bool,
           context: SettleContext, outputs: Outputs) -> str:
    """Turn (events seen, exit code, why we stopped it, what was uploaded) into the job's next
    state, registering the uploads in the same transaction."""
    if lost:
        return LOST
    settings = context.settings
    if completed(recorder) and outputs.error is None:
        return _succeed(session, job, owner=owner, outputs=outputs, context=context)
    child_error = recorder.error
    if stop_reason is None and not completed(recorder) \
            and not (child_error and child_error.user_fault) \
            and not (child_error and child_error.code == "storage_error"):  # named already
        full = _storage_full_error(context, recorder, returncode)
        if full is not None:
            return fail(session, job, owner=owner, error=full, settings=settings,
                        outputs=outputs)
    if child_error is not None:
        return fail(session, job, owner=owner, error=child_error, settings=settings,
                    outputs=outputs)
    outputs.register(session, job.id)
    step = recorder.last_checkpoint_step
    resume_note = f"; resumes from step {step}" if step else ""
    if outputs.error is not None:  # trained, but the final upload failed: train it again
        return end(session, job, Outcome.CRASHED, owner=owner, settings=settings,
                   error=outputs.error, messages={
                       JobStatus.QUEUED: f"{outputs.error.message}; requeued (attempt "
                                         f"{job.attempt} of {job.max_attempts})",
                       JobStatus.CANCELLED: "cancelled; the final upload had failed"})
    if stop_reason == "cancel":
        return end(session, job, Outcome.CANCEL_STOP, owner=owner, settings=settings,
                   messages={JobStatus.CANCELLED: f"cancelled; last checkpoint step {step}"})
    if stop_reason == "timeout":
        return fail(session, job, owner=owner, settings=settings, outcome=Outcome.MAX_RUNTIME,
                    error=_runtime_exceeded(settings, step))
    if stop_reason == "pause":
        return end(session, job, Outcome.PAUSE_STOP, owner=owner, settings=settings, messages={
            JobStatus.PAUSED: f"paused{resume_note.replace('resumes', 'resume continues')}",
            JobStatus.CANCELLED: "cancelled (cancel requested while pausing)"})
    if stop_reason == "shutdown":
        return end(session, job, Outcome.SHUTDOWN, owner=owner, settings=settings, messages={
            JobStatus.QUEUED: f"worker shutting down; requeued{resume_note}",
            JobStatus.CANCELLED: "cancelled (cancel requested while the worker shut down)"})
    how = _exit_description(returncode)
    return end(session, job, Outcome.CRASHED, owner=owner, settings=settings, error=JobError(
        code="trainer_crashed",
        message=f"the trainer {how} without reporting a result, on all {job.max_attempts} "
                "attempts (out of memory?); see the trainer log artifact"), messages={
        JobStatus.QUEUED: f"trainer {how} without a verdict (attempt {job.attempt} of "
                          f"{job.max_attempts}); requeued{resume_note}",
        JobStatus.CANCELLED: f"cancelled; trainer {how}"})


def remove_scratch(paths: RunPaths) -> None:
    """The job's node-local directory, once the job settled terminally (or another worker
    owns it): what had to be uploaded is in the store."""
    shutil.rmtree(paths.job_dir, ignore_errors=True)


def trim_paused_scratch(paths: RunPaths) -> None:
    """A paused job's node-local directory, all but its logs (events-attempt*.jsonl,
    trainer-attempt*.log: KBs, appended to by a resume on this node; a resume on another
    node fetches them from the store first, run_logs.py).

    Checkpoints, upload snapshots, the fetched parent adapter and the spec go: a pause may
    last days and the job resumes on whichever node claims it, from the newest checkpoint
    recorded in the store (checkpoint_sync.prepare_resume), so a local copy would hold disk
    for a resume that may never come here. It would not buy much where it does: a 100 MB
    checkpoint (an 8B model's r=16 q/v adapter + Adam state is ~85 MB) took 0.29-0.33 s to
    verify locally against 0.34-0.39 s fetched from a local-directory store and verified
    (this 2-core box, load 18); from S3 add ~1 s at 100 MB/s (an estimate), beside the
    base model's GBs that every resume loads."""
    logs = set(paths.log_files())
    for path in sorted(paths.job_dir.rglob("*"), reverse=True):  # children before parents
        if path in logs:
            continue
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        else:
            path.unlink(missing_ok=True)
