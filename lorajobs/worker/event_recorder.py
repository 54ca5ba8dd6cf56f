"""Trainer events -> database rows. The supervisor tails the events file, types each line
(`lora_core.events.parse_event`) and hands batches here; this module dispatches on the model.

    started     -> JobEvent, job.resumed_from_step, progress.total_steps
    progress    -> JobMetric upsert by (job, step), job.progress / job.metrics snapshot
    eval        -> JobMetric.eval_loss, job.metrics.eval_loss, JobEvent
    checkpoint  -> the sealed dir goes to `checkpoint_sink` (the supervisor's
                   CheckpointUploader): its Checkpoint row, adapter Artifacts and "checkpoint"
                   JobEvent are written only once it is uploaded (record_checkpoint)
    stage       -> job.stage, JobEvent
    merged      -> JobEvent; kept for the settle, which uploads and registers it
    warning     -> JobEvent (level warning)
    error       -> JobEvent (level error); the supervisor decides the job's outcome
    finished    -> kept for the supervisor; final artifacts are uploaded and registered by it
                   (settle.py), in the transaction that settles the job

Every batch is fenced by our lease: `jobs.hold_lease` (still running under our owner and
attempt) is the batch transaction's first write, so a worker that lost the job writes no row
at all (`lease_lost` tells the supervisor). Only the lease holder writes a job's metrics, so a
plain select-then-write upsert is race-free. A resumed run redoes steps after its checkpoint:
their metric rows are overwritten, not duplicated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from lora_core.events import (
    CheckpointEvent,
    ErrorEvent,
    EvalEvent,
    EvaluationEvent,
    FinishedEvent,
    JobError,
    MergedEvent,
    ProgressEvent,
    Stage,
    StageEvent,
    StartedEvent,
    TrainerEvent,
    WarningEvent,
)
from lorajobs.core import evaluations, jobs, tokencounts
from lorajobs.core.tables import Artifact, Job, JobMetric, JobStatus, new_id

__all__ = ["EventRecorder", "register_dir", "register_file", "write_tensorboard",
           "TENSORBOARD_TAGS", "RegisteredFile", "is_final_merge"]

log = logging.getLogger(__name__)

# Events copied into the job's event log (progress is too chatty: it goes to job_metrics; the
# API serves it as the loss curve). Node-local paths are left out of the copies. A checkpoint's
# event is written when it is uploaded and recorded (checkpoint_sync.record_checkpoint), in
# that transaction: then it is resumable, and its webhook (job.checkpoint) says so.
LOGGED = (StartedEvent, StageEvent, WarningEvent, EvalEvent, MergedEvent, ErrorEvent,
          FinishedEvent)
_LOCAL_PATHS = {"path", "adapter_path", "merged"}
CheckpointSink = Callable[[CheckpointEvent, dict[str, Any]], object]


RegisteredFile = tuple[str, str, int, str]  # (name inside the artifact, key, size, sha256)


def register_file(session: Session, *, job_id: str, kind: str, step: int | None, name: str,
                  key: str, size: int, sha256: str) -> None:
    """One Artifact row for one stored file (replacing a row of the same job/kind/step/name)."""
    session.execute(delete(Artifact).where(
        Artifact.job_id == job_id, Artifact.kind == kind, Artifact.name == name,
        Artifact.step.is_(None) if step is None else Artifact.step == step))
    session.add(Artifact(id=new_id("art"), job_id=job_id, kind=kind, step=step, name=name,
                         storage_key=key, size=size, sha256=sha256))


def register_dir(session: Session, *, job_id: str, kind: str, step: int | None,
                 files: list[RegisteredFile]) -> int:
    """Artifact rows for every stored file of an adapter / merged-model directory (replacing
    the job/kind/step's rows); returns the count."""
    session.execute(delete(Artifact).where(
        Artifact.job_id == job_id, Artifact.kind == kind,
        Artifact.step.is_(None) if step is None else Artifact.step == step))
    for name, key, size, sha256 in files:
        session.add(Artifact(id=new_id("art"), job_id=job_id, kind=kind, step=step, name=name,
                             storage_key=key, size=size, sha256=sha256))
    return len(files)


# ProgressEvent fields of a DPO step, stored in JobMetric columns of the same names.
DPO_METRICS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")

# JobMetric column -> TensorBoard scalar tag (the names the HF Trainer's TB callback uses).
TENSORBOARD_TAGS = {"train_loss": "train/loss", "eval_loss": "eval/loss",
                    "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
                    "tokens_per_second": "train/tokens_per_second", "epoch": "train/epoch",
                    "rewards_chosen": "train/rewards/chosen",
                    "rewards_rejected": "train/rewards/rejected",
                    "reward_margin": "train/rewards/margins",
                    "reward_accuracy": "train/rewards/accuracies"}


def write_tensorboard(path: Path, rows: list[JobMetric]) -> None:
    """A TensorBoard event file of the metric rows, written atomically.

    tensorboard's own proto and record writer (no torch, no tensorflow): the file is what
    `SummaryWriter` would write, one Event per step holding that step's scalars.
    """
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.record_writer import RecordWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:
        writer = RecordWriter(fh)
        start = rows[0].created_at.timestamp() if rows and rows[0].created_at else 0.0
        writer.write(Event(wall_time=start, file_version="brain.Event:2").SerializeToString())
        for row in rows:
            values = [Summary.Value(tag=tag, simple_value=float(getattr(row, column)))
                      for column, tag in TENSORBOARD_TAGS.items()
                      if getattr(row, column) is not None]
            wall = row.created_at.timestamp() if row.created_at else start
            writer.write(Event(wall_time=wall, step=row.step,
                               summary=Summary(value=values)).SerializeToString())
        writer.flush()
    tmp.replace(path)


def is_final_merge(event: MergedEvent) -> bool:
    """A merge of the final adapter (step None in our rows) vs. of a checkpoint."""
    if event.final is not None:
        return event.final
    return event.step is None or Path(event.path).name == "final"


class EventRecorder:
    """Applies trainer events for one job attempt; remembers what the supervisor needs."""

    def __init__(self, session_factory: sessionmaker[Session], *, job_id: str, owner: str,
                 attempt: int | None = None,
                 checkpoint_sink: CheckpointSink | None = None) -> None:
        self.session_factory = session_factory
        self.job_id = job_id
        self.owner = owner
        self.attempt = attempt
        self.checkpoint_sink = checkpoint_sink
        self.started: StartedEvent | None = None
        self.finished: FinishedEvent | None = None
        self.error: JobError | None = None
        self.last_checkpoint_step: int | None = None
        self.checkpoints: list[CheckpointEvent] = []
        self.merged: list[MergedEvent] = []
        self.lease_lost = False
        self._total_steps: int | None = None
        self._metrics: dict[str, Any] = {"train_loss": None, "eval_loss": None}
        self.count = 0

    def apply(self, events: list[TrainerEvent]) -> None:
        """Write one batch in one transaction, fenced by our lease (nothing if it is lost)."""
        if not events or self.lease_lost:
            return
        with self.session_factory() as session:
            if not jobs.hold_lease(session, self.job_id, owner=self.owner,
                                   attempt=self.attempt):
                session.rollback()
                self.lease_lost = True
                log.warning("job %s: lease lost; %d trainer events not recorded", self.job_id,
                            len(events))
                return
            job = session.get(Job, self.job_id)
            if job is not None and job.metrics:
                self._metrics = {**self._metrics, **job.metrics}
            progress: dict[str, Any] | None = None
            stage: Stage | None = None
            sealed: list[CheckpointEvent] = []
            for event in events:
                self.count += 1
                match event:
                    case ProgressEvent():
                        progress = self._on_progress(session, event)
                    case EvalEvent():
                        self._on_eval(session, event)
                    case EvaluationEvent():  # graded generations (issue 14)
                        evaluations.record(session, self.job_id, event, self._metrics)
                    case StageEvent():
                        stage = event.stage
                    case StartedEvent():
                        self._on_started(session, event)
                    case CheckpointEvent():
                        sealed.append(event)
                    case MergedEvent():
                        self.merged.append(event)
                    case FinishedEvent():
                        self.finished = event
                    case ErrorEvent():
                        self.error = event.job_error()
                if isinstance(event, LOGGED):
                    self._log_event(session, event)
            jobs.update_progress(session, self.job_id, owner=self.owner, progress=progress,
                                 metrics=dict(self._metrics), stage=stage)
            session.commit()
        for event in sealed:  # after the commit: a refused batch is applied again, whole
            self._on_checkpoint(event)

    def _log_event(self, session: Session, event: TrainerEvent) -> None:
        data = event.model_dump(mode="json", exclude={"type", "time", *_LOCAL_PATHS})
        level = {"warning": "warning", "error": "error"}.get(event.type, "info")
        message = str(data.get("message") or data.get("stage") or event.type)
        jobs.add_event(session, self.job_id, event.type, message, level=level, data=data)

    def _on_started(self, session: Session, event: StartedEvent) -> None:
        self.started = event
        self._total_steps = event.total_steps
        tokencounts.record_started(session, self.job_id, event)  # counted once, kept for all
        session.execute(
            update(Job).where(Job.id == self.job_id, Job.status == JobStatus.RUNNING,
                              Job.lease_owner == self.owner)
            .values(resumed_from_step=event.resumed_from_step or None))

    def _metric_row(self, session: Session, step: int) -> JobMetric:
        row = session.scalar(select(JobMetric).where(JobMetric.job_id == self.job_id,
                                                     JobMetric.step == step))
        if row is None:
            row = JobMetric(job_id=self.job_id, step=step)
            session.add(row)
        return row

    def _on_progress(self, session: Session, event: ProgressEvent) -> dict[str, Any]:
        step = event.step
        total = event.total_steps or self._total_steps
        row = self._metric_row(session, step)
        row.epoch = event.epoch
        row.train_loss = event.loss
        row.learning_rate = event.learning_rate
        row.grad_norm = event.grad_norm
        row.tokens_per_second = event.tokens_per_second
        for name in DPO_METRICS:  # None on supervised steps
            setattr(row, name, getattr(event, name))
        if event.reward_accuracy is not None:
            self._metrics["reward_accuracy"] = event.reward_accuracy
            self._metrics["reward_margin"] = event.reward_margin
        if event.loss is not None:
            self._metrics["train_loss"] = event.loss
            self._log_metrics(session, event, total)
        return {"step": step, "total_steps": total, "epoch": event.epoch,
                "fraction": round(step / total, 4) if total else None,
                "eta_seconds": event.eta_seconds}

    def _log_metrics(self, session: Session, event: ProgressEvent, total: int | None) -> None:
        """A `metrics` event per logged step, as OpenAI's fine-tuning events list has ("Step
        N/M: training loss=..."; `type: metrics` on /openai/v1). A redone step (resume) logs
        again: the event log is a history, the metric rows are the curve."""
        data: dict[str, Any] = {"step": event.step, "train_loss": event.loss,
                                "total_steps": total, "learning_rate": event.learning_rate}
        data.update({name: getattr(event, name) for name in DPO_METRICS
                     if getattr(event, name) is not None})
        of_total = f"/{total}" if total else ""
        jobs.add_event(session, self.job_id, "metrics",
                       f"Step {event.step}{of_total}: training loss={event.loss:.4f}", data=data)

    def _on_eval(self, session: Session, event: EvalEvent) -> None:
        self._metric_row(session, event.step).eval_loss = event.eval_loss
        self._metrics["eval_loss"] = event.eval_loss

    def _on_checkpoint(self, event: CheckpointEvent) -> None:
        self.last_checkpoint_step = event.step
        self.checkpoints.append(event)
        if self.checkpoint_sink is not None and event.resumable:
            self.checkpoint_sink(event, dict(self._metrics))
