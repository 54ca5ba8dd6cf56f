"""Trainer events -> database rows. The supervisor tails the events file, types each line
(`lora_core.events.parse_event`) and hands batches here; this module dispatches on the model.

    started     -> JobEvent, job.resumed_from_step, progress.total_steps
    progress    -> JobMetric upsert by (job, step), job.progress / job.metrics snapshot
    eval        -> JobMetric.eval_loss, job.metrics.eval_loss, JobEvent
    checkpoint  -> Checkpoint row + its adapter files as Artifacts (kind "adapter", step)
    stage       -> job.stage, JobEvent
    merged      -> Artifacts (kind "merged"), Checkpoint.merged_key, JobEvent
    warning     -> JobEvent (level warning)
    error       -> JobEvent (level error); the supervisor decides the job's outcome
    finished    -> kept for the supervisor; final artifacts are registered by it, except the
                   TensorBoard event file (kind "tensorboard"), written here from the job's
                   metric rows (every attempt, redone steps once)

Every write is guarded by our lease (`jobs.update_progress` filters on the owner), and only the
lease holder writes a job's metrics, so a plain select-then-write upsert is race-free. A resumed
run redoes steps after its checkpoint: their metric rows are overwritten, not duplicated.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from lora_core.events import (
    CheckpointEvent,
    ErrorEvent,
    EvalEvent,
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
from lora_core.model_files.manifest import MANIFEST_NAME, sha256_file
from lorajobs.core import jobs, tokencounts
from lorajobs.core.storage import LocalArtifactStore
from lorajobs.core.tables import Artifact, Checkpoint, Job, JobMetric, JobStatus, new_id

__all__ = ["EventRecorder", "register_dir", "register_file", "storage_key_for",
           "write_tensorboard", "TENSORBOARD_TAGS"]

log = logging.getLogger(__name__)

# Events copied verbatim into the job's event log (progress is too chatty: it goes to
# job_metrics; the API serves it as the loss curve).
LOGGED = (StartedEvent, StageEvent, CheckpointEvent, WarningEvent, EvalEvent, MergedEvent,
          ErrorEvent, FinishedEvent)


def storage_key_for(store: LocalArtifactStore, path: str | Path) -> str:
    """The store key of a file the trainer wrote under the artifact root."""
    return Path(path).resolve().relative_to(store.root).as_posix()


def _known_digests(directory: Path) -> dict[str, tuple[int, str]]:
    """name -> (size, sha256) from the trainer's manifest.json, to avoid hashing GBs twice."""
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
        return {f["path"]: (int(f["size"]), f["sha256"]) for f in manifest["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def register_file(session: Session, store: LocalArtifactStore, *, job_id: str, kind: str,
                  step: int | None, path: Path, name: str, sha256: str | None = None) -> None:
    """One Artifact row for one file (replacing a row of the same job/kind/step/name)."""
    size = path.stat().st_size
    session.execute(delete(Artifact).where(
        Artifact.job_id == job_id, Artifact.kind == kind, Artifact.name == name,
        Artifact.step.is_(None) if step is None else Artifact.step == step))
    session.add(Artifact(id=new_id("art"), job_id=job_id, kind=kind, step=step, name=name,
                         storage_key=storage_key_for(store, path), size=size,
                         sha256=sha256 or sha256_file(path)))


def register_dir(session: Session, store: LocalArtifactStore, *, job_id: str, kind: str,
                 step: int | None, directory: Path) -> int:
    """Artifact rows for every file of an adapter / merged-model directory; returns the count."""
    directory = Path(directory)
    if not directory.is_dir():
        log.warning("artifact directory %s missing; nothing registered", directory)
        return 0
    session.execute(delete(Artifact).where(
        Artifact.job_id == job_id, Artifact.kind == kind,
        Artifact.step.is_(None) if step is None else Artifact.step == step))
    known = _known_digests(directory)
    count = 0
    for p in sorted(directory.rglob("*")):
        if not p.is_file() or p.name.endswith(".part"):
            continue
        name = p.relative_to(directory).as_posix()
        size = p.stat().st_size
        digest = known.get(name, (None, None))
        sha = digest[1] if digest[0] == size else None
        session.add(Artifact(id=new_id("art"), job_id=job_id, kind=kind, step=step, name=name,
                             storage_key=storage_key_for(store, p), size=size,
                             sha256=sha or sha256_file(p)))
        count += 1
    return count


# JobMetric column -> TensorBoard scalar tag (the names the HF Trainer's TB callback uses).
TENSORBOARD_TAGS = {"train_loss": "train/loss", "eval_loss": "eval/loss",
                    "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
                    "tokens_per_second": "train/tokens_per_second", "epoch": "train/epoch"}


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


def _is_final_merge(event: MergedEvent) -> bool:
    """A merge of the final adapter (step None in our rows) vs. of a checkpoint."""
    if event.final is not None:
        return event.final
    return event.step is None or Path(event.path).name == "final"


class EventRecorder:
    """Applies trainer events for one job attempt; remembers what the supervisor needs."""

    def __init__(self, session_factory: sessionmaker[Session], store: LocalArtifactStore, *,
                 job_id: str, owner: str) -> None:
        self.session_factory = session_factory
        self.store = store
        self.job_id = job_id
        self.owner = owner
        self.started: StartedEvent | None = None
        self.finished: FinishedEvent | None = None
        self.error: JobError | None = None
        self.last_checkpoint_step: int | None = None
        self._total_steps: int | None = None
        self._metrics: dict[str, Any] = {"train_loss": None, "eval_loss": None}
        self.count = 0

    def apply(self, events: list[TrainerEvent]) -> None:
        """Write one batch in one transaction. Rows are lease-guarded by the owner filter."""
        if not events:
            return
        with self.session_factory() as session:
            job = session.get(Job, self.job_id)
            if job is not None and job.metrics:
                self._metrics = {**self._metrics, **job.metrics}
            progress: dict[str, Any] | None = None
            stage: Stage | None = None
            for event in events:
                self.count += 1
                match event:
                    case ProgressEvent():
                        progress = self._on_progress(session, event)
                    case EvalEvent():
                        self._on_eval(session, event)
                    case StageEvent():
                        stage = event.stage
                    case StartedEvent():
                        self._on_started(session, event)
                    case CheckpointEvent():
                        self._on_checkpoint(session, event)
                    case MergedEvent():
                        self._on_merged(session, event)
                    case FinishedEvent():
                        self.finished = event
                        self._on_finished(session)
                    case ErrorEvent():
                        self.error = event.job_error()
                if isinstance(event, LOGGED):
                    self._log_event(session, event)
            jobs.update_progress(session, self.job_id, owner=self.owner, progress=progress,
                                 metrics=dict(self._metrics), stage=stage)
            session.commit()

    def _on_finished(self, session: Session) -> None:
        """The TensorBoard file of the whole curve so far; a failure here costs only the file."""
        rows = list(session.scalars(select(JobMetric).where(JobMetric.job_id == self.job_id)
                                    .order_by(JobMetric.step)))
        if not rows:
            return
        path = self.store.local_path(
            f"jobs/{self.job_id}/tensorboard/events.out.tfevents.{self.job_id}")
        try:
            write_tensorboard(path, rows)
        except Exception:  # noqa: BLE001 - observability must never fail a training run
            log.exception("job %s: writing the TensorBoard file failed", self.job_id)
            return
        register_file(session, self.store, job_id=self.job_id, kind="tensorboard", step=None,
                      path=path, name=path.name)

    def _log_event(self, session: Session, event: TrainerEvent) -> None:
        data = event.model_dump(mode="json", exclude={"type", "time"})
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
        if event.loss is not None:
            self._metrics["train_loss"] = event.loss
        return {"step": step, "total_steps": total, "epoch": event.epoch,
                "fraction": round(step / total, 4) if total else None,
                "eta_seconds": event.eta_seconds}

    def _on_eval(self, session: Session, event: EvalEvent) -> None:
        self._metric_row(session, event.step).eval_loss = event.eval_loss
        self._metrics["eval_loss"] = event.eval_loss

    def _on_checkpoint(self, session: Session, event: CheckpointEvent) -> None:
        step = event.step
        self.last_checkpoint_step = step
        adapter = event.adapter_path
        row = session.scalar(select(Checkpoint).where(Checkpoint.job_id == self.job_id,
                                                      Checkpoint.step == step))
        if row is None:
            row = Checkpoint(job_id=self.job_id, step=step)
            session.add(row)
        row.resumable = event.resumable
        row.path = storage_key_for(self.store, event.path)
        row.adapter_key = storage_key_for(self.store, adapter) if adapter else None
        row.metrics = {k: v for k, v in self._metrics.items() if v is not None}
        if adapter:
            register_dir(session, self.store, job_id=self.job_id, kind="adapter", step=step,
                         directory=Path(adapter))

    def _on_merged(self, session: Session, event: MergedEvent) -> None:
        final = _is_final_merge(event)
        step = None if final else event.step
        register_dir(session, self.store, job_id=self.job_id, kind="merged", step=step,
                     directory=Path(event.path))
        if step is not None:
            session.execute(
                update(Checkpoint)
                .where(Checkpoint.job_id == self.job_id, Checkpoint.step == step)
                .values(merged_key=storage_key_for(self.store, event.path)))
