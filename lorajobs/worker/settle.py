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
"""

from __future__ import annotations

import logging
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from lora_core.events import JobError
from lora_core.spec import RunSpec
from lorajobs.core import jobs
from lorajobs.core.errors import IllegalTransition
from lorajobs.core.policy import Outcome
from lorajobs.core.settings import Settings
from lorajobs.core.storage import LocalArtifactStore
from lorajobs.core.tables import Dataset, Job, JobStatus, RegisteredModel
from lorajobs.worker import reproducibility
from lorajobs.worker.event_recorder import EventRecorder, register_dir, register_file
from lorajobs.worker.runspec import RunPaths

__all__ = ["SUCCEEDED", "FAILED", "CANCELLED", "REQUEUED", "LOST", "SettleContext",
           "settle", "end", "fail"]

log = logging.getLogger(__name__)

SUCCEEDED, FAILED, CANCELLED, REQUEUED, LOST = (
    "succeeded", "failed", "cancelled", "requeued", "lost")
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
    store: LocalArtifactStore
    settings: Settings


def _exit_description(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def _register_logs(session: Session, context: SettleContext, job_id: str) -> None:
    for path in context.paths.log_files():
        register_file(session, context.store, job_id=job_id, kind="log", step=None, path=path,
                      name=path.name)


# What `end` reports for each status the policy chose.
_RESULTS = {JobStatus.SUCCEEDED: SUCCEEDED, JobStatus.FAILED: FAILED,
            JobStatus.CANCELLED: CANCELLED, JobStatus.QUEUED: REQUEUED,
            JobStatus.PAUSED: "paused"}


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
         context: SettleContext | None = None, outcome: Outcome | None = None) -> str:
    """A named error (the child's, the worker's): failed, whatever the cancel flag says."""
    if context is not None:
        _register_logs(session, context, job.id)
    if outcome is None:
        outcome = Outcome.USER_ERROR if error.user_fault else Outcome.SYSTEM_ERROR
    return end(session, job, outcome, owner=owner, settings=settings, error=error,
               messages={JobStatus.FAILED: f"failed: {error.code}: {error.message}"})


def _succeed(session: Session, job: Job, *, owner: str, recorder: EventRecorder,
             context: SettleContext) -> str:
    finished = recorder.finished
    adapter = Path(finished.adapter_path if finished and finished.adapter_path
                   else context.paths.run_dir / "adapter")
    register_dir(session, context.store, job_id=job.id, kind="adapter", step=None,
                 directory=adapter)
    started = recorder.started
    manifest = reproducibility.write_manifest(
        context.paths.job_dir / MANIFEST_FILE, job_id=job.id, spec=job.spec,
        run_spec=context.run_spec.model_dump(mode="json"),
        base_model={"name": context.model.name, "architecture": context.model.architecture,
                    "weights_sha256": reproducibility.weights_digests(context.run_spec.model_dir,
                                                            context.model.weights_sha256)},
        dataset={"id": context.dataset.id, "sha256": context.dataset.sha256,
                 "num_examples": context.dataset.num_examples, "format": context.dataset.format},
        world_size=started.world_size if started else None, attempt=job.attempt,
        resumed_from_step=started.resumed_from_step if started else None)
    register_file(session, context.store, job_id=job.id, kind="manifest", step=None,
                  path=manifest, name=MANIFEST_FILE)
    _register_logs(session, context, job.id)
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
           context: SettleContext) -> str:
    """Turn (events seen, exit code, why we stopped it) into the job's next state."""
    if lost:
        _register_logs(session, context, job.id)
        session.commit()
        return LOST
    finished = recorder.finished
    if finished is not None and finished.status == "completed" and recorder.error is None:
        return _succeed(session, job, owner=owner, recorder=recorder, context=context)
    settings = context.settings
    child_error = recorder.error
    if stop_reason is None and not (child_error and child_error.user_fault) \
            and not (child_error and child_error.code == "storage_error"):  # named already
        full = _storage_full_error(context, recorder, returncode)
        if full is not None:
            return fail(session, job, owner=owner, error=full, settings=settings,
                        context=context)
    if child_error is not None:
        return fail(session, job, owner=owner, error=child_error, settings=settings,
                    context=context)
    _register_logs(session, context, job.id)
    step = recorder.last_checkpoint_step
    resume_note = f"; resumes from step {step}" if step else ""
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
