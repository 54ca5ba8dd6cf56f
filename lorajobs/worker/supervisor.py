"""Run one claimed job attempt: spawn the trainer child, watch it, and settle the job.

The child runs in its own process group (`start_new_session`), so a cancel or a lost lease can
stop every rank of a torchrun launch at once, and dies with the worker (`PR_SET_PDEATHSIG`), so
a worker killed outright never leaves a trainer writing into a directory the next attempt
resumes from. A single-process trainer is forked from the pre-warmed zygote when there is one
(prewarm.py: same guarantees, no cold imports), else spawned as `python -m lora_core run`.
Every `worker_poll_seconds` the loop:

    tails the events file       -> typed by lora_core.events.parse_event (a line that is not
                                   a valid event is logged and skipped), then
                                   records.EventRecorder (rows, progress, checkpoints)
    renews the lease            -> lost it? SIGKILL the group: someone else owns the job now
    reads cancel_requested      -> stop file, SIGTERM after cancel_grace_seconds, then SIGKILL
    reads pause_requested       -> the same stop sequence; the job ends paused (resumable)
    checks the shutdown flag    -> the same stop sequence; the job is requeued, not failed
    checks the runtime limit    -> the same stop sequence past max_job_runtime_seconds of this
                                   attempt; the job fails `max_runtime_exceeded`, checkpoint kept

Around the child (checkpoint_sync.py, settle.py): before it starts, the run dir in node-local
scratch is made to hold exactly the newest checkpoint the database records as resumable
(downloaded from the store on a node that lacks it) and the attempt's log files of its earlier
runs (run_logs.py: a paused job resumes on any node); while it runs, each sealed checkpoint is
snapshotted and uploaded by a background thread and recorded once whole; after it exits, the
settle waits (bounded) for pending uploads, uploads the final artifacts and registers them in
the transaction that settles the job. A `LeaseKeeper` thread renews the lease while the worker
prepares and uploads (the loop below does it while the child runs). The job's scratch dir is
removed once it settles terminally; a paused job's keeps only its logs (settle.py says why).

Outcomes (`settle`, deciding with `service.policy.next_state`): finished completed ->
succeeded; finished stopped -> cancelled (cancel) or queued (shutdown); an error event -> failed
with the child's `JobError`; no verdict (crash, OOM kill) -> cancelled if a cancel is pending,
else queued again while attempts remain, else failed trainer_crashed.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select

from lora_core.events import (
    EvalEvent,
    ProgressEvent,
    TrainerEvent,
    parse_event,
    read_events,
)
from lora_core.spec import RunSpec
from lorajobs.core import jobs
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.settings import Settings
from lorajobs.core.storage import ArtifactStore, get_store
from lorajobs.core.tables import Job, JobMetric, JobStatus
from lorajobs.worker import model_cache, prewarm, run_logs, settle, shutdown
from lorajobs.worker.checkpoint_sync import CheckpointUploader, prepare_resume, run_prefix
from lorajobs.worker.event_recorder import EventRecorder
from lorajobs.worker.process_control import die_with_parent, killpg
from lorajobs.worker.runspec import (
    PrepareError,
    RunPaths,
    build_run_spec,
    trainer_command,
    trainer_env,
    write_spec,
)

__all__ = ["Supervisor", "supervise", "typed_events", "LeaseKeeper"]

log = logging.getLogger(__name__)

# What the loop needs of a trainer: pid (= its process group), poll(), wait(), returncode.
TrainerProcess = subprocess.Popen[bytes] | prewarm.ZygoteChild


def typed_events(job_id: str, objects: list[dict[str, Any]]) -> list[TrainerEvent]:
    """The protocol's events among the child's JSON lines; any other line is logged and
    skipped (a garbled or foreign line must not stop the job's bookkeeping)."""
    events = []
    for obj in objects:
        try:
            events.append(parse_event(obj))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                 for e in exc.errors()[:3])
            log.warning("job %s: skipped a trainer event outside the protocol (%s): %.300s",
                        job_id, problems, obj)
    return events


class LeaseKeeper:
    """Renews the lease from a thread while the worker itself is busy (fetching inputs,
    waiting for uploads); `lost` once the database says the job is no longer ours."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        every = self.supervisor.settings.lease_renew_seconds
        while not self._stop.wait(every):
            if self.supervisor._renew() is False:
                self.lost = True
                return


class Supervisor:
    """One attempt of one job, from spawn to a settled job row."""

    def __init__(self, settings: Settings, job_id: str, owner: str,
                 shutdown_requested: Callable[[], bool] | None = None,
                 store: ArtifactStore | None = None) -> None:
        self.settings = settings
        self.job_id = job_id
        self.owner = owner
        self.shutdown_requested = shutdown_requested or (lambda: shutdown.requested(settings))
        self.sessions = get_sessionmaker(settings)
        self.store: ArtifactStore = store or get_store(settings)
        self.stop_reason: str | None = None  # "cancel" | "pause" | "shutdown" | "timeout"
        # The runtime limit counts from the claim, so preparing and merging count too.
        self.deadline = time.monotonic() + settings.max_job_runtime_seconds
        self.lost = False
        self._stop_sent_at: float | None = None
        self._term_sent_at: float | None = None
        self._killed = False
        self._offset = 0
        self._pending: list[TrainerEvent] = []  # read but not yet recorded (DB outage)
        self.uploader: CheckpointUploader | None = None

    def run(self) -> str:
        """Prepare, spawn, watch, upload, settle. Returns the outcome (a settle.* constant)."""
        with self.sessions() as session:
            job = session.get(Job, self.job_id)
            assert job is not None
            attempt = job.attempt
        paths = RunPaths.for_attempt(self.settings, self.job_id, attempt)
        with LeaseKeeper(self) as keeper:
            prepared = self._prepare(paths, attempt)
        if isinstance(prepared, str) or keeper.lost:
            return prepared if isinstance(prepared, str) else settle.LOST
        run_spec, context = prepared
        self.uploader = uploader = CheckpointUploader(
            self.sessions, self.store, job_id=self.job_id, attempt=attempt, owner=self.owner,
            upload_dir_root=paths.upload_dir, retry_seconds=self.settings.store_retry_seconds)
        recorder = EventRecorder(self.sessions, job_id=self.job_id, owner=self.owner,
                                 attempt=attempt, checkpoint_sink=uploader.submit)
        try:
            self._recover_lost_events(recorder, attempt=attempt)
            self._skip_earlier_runs(paths)
            proc = self._spawn(run_spec, paths)
            try:
                returncode = self._watch(proc, paths, recorder)
            finally:
                if proc.poll() is None:  # leaving on an exception: never orphan a trainer
                    killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            log.info("job %s: trainer exited (returncode %d)", self.job_id, returncode)
            t_exit = time.monotonic()
            with LeaseKeeper(self) as keeper:
                if not self.lost and not uploader.drain(self.settings.store_retry_seconds):
                    log.warning("job %s: checkpoint uploads still pending after %g s; they "
                                "are not resumable", self.job_id,
                                self.settings.store_retry_seconds)
                self.lost = self.lost or recorder.lease_lost or uploader.lease_lost
                outputs = settle.Outputs() if self.lost else \
                    settle.upload_outputs(self.sessions, context, recorder, job_id=self.job_id)
            log.info("job %s: outputs uploaded in %.2f s", self.job_id,
                     time.monotonic() - t_exit)
            self.lost = self.lost or keeper.lost
        finally:
            uploader.close()
            model_cache.release(context.model)  # evictable again once no job of ours uses it
        with self.sessions() as session:
            job = session.get(Job, self.job_id)
            assert job is not None
            outcome = settle.settle(session, job, owner=self.owner, recorder=recorder,
                                    returncode=returncode, stop_reason=self.stop_reason,
                                    lost=self.lost, context=context, outputs=outputs)
        if outcome in settle.TERMINAL or outcome == settle.LOST:
            settle.remove_scratch(paths)
        elif outcome == settle.PAUSED:
            settle.trim_paused_scratch(paths)  # resumable on any node from the store
        return outcome

    def _prepare(self, paths: RunPaths, attempt: int
                 ) -> str | tuple[RunSpec, settle.SettleContext]:
        """Inputs on this node, the resume point, the spec file; or the settled outcome."""
        with self.sessions() as session:
            job = session.get(Job, self.job_id)
            assert job is not None
            try:
                t0 = time.monotonic()
                run_spec, model, dataset = build_run_spec(session, job, self.settings,
                                                          self.store, paths)
                t1 = time.monotonic()
                step = prepare_resume(self.sessions, self.store, job_id=self.job_id,
                                      checkpoints_dir=paths.checkpoints_dir,
                                      retry_seconds=self.settings.store_retry_seconds)
                log.info("job %s: inputs ready in %.2f s (model + dataset %.2f s, resume "
                         "point step %s %.2f s)", self.job_id, time.monotonic() - t0, t1 - t0,
                         step, time.monotonic() - t1)
            except PrepareError as exc:
                outcome = settle.fail(session, job, owner=self.owner, error=exc.error,
                                      settings=self.settings)
                settle.remove_scratch(paths)
                return outcome
            except Exception as exc:  # noqa: BLE001 - the store, a corrupt checkpoint
                log.exception("job %s: preparing the resume point failed", self.job_id)
                return settle.end(session, job, settle.Outcome.CRASHED, owner=self.owner,
                                  settings=self.settings, error=settle.JobError(
                                      code="store_unavailable",
                                      message=f"fetching the job's checkpoint failed: {exc}"),
                                  messages={JobStatus.QUEUED: "fetching the checkpoint "
                                            f"failed ({exc}); requeued"})
        write_spec(run_spec, paths)
        paths.stop_file.unlink(missing_ok=True)  # a previous attempt's stop request
        run_logs.restore_logs(self.sessions, self.store, job_id=self.job_id, paths=paths,
                              retry_seconds=self.settings.store_retry_seconds)
        return run_spec, settle.SettleContext(paths=paths, run_spec=run_spec, model=model,
                                              dataset=dataset, store=self.store,
                                              settings=self.settings, attempt=attempt,
                                              prefix=run_prefix(self.job_id, attempt,
                                                                self.owner))

    def _skip_earlier_runs(self, paths: RunPaths) -> None:
        """Start tailing the events file at its end.

        A graceful shutdown refunds the attempt, so the next run appends to the same
        `events-attempt<N>.jsonl`; read from 0, its earlier run's events (started, progress,
        checkpoints, finished "stopped") were recorded a second time. A partial last line (a
        run killed mid-write) is terminated first, so it cannot swallow our first event.
        """
        try:
            with open(paths.events_file, "rb+") as fh:
                size = fh.seek(0, os.SEEK_END)
                if size:
                    fh.seek(size - 1)
                    if fh.read(1) != b"\n":
                        fh.write(b"\n")
                        size += 1
                self._offset = size
        except FileNotFoundError:
            self._offset = 0

    def _recover_lost_events(self, recorder: EventRecorder, *, attempt: int) -> None:
        """Record the progress that earlier attempts' trainers on this node wrote but their
        worker never did.

        A worker killed outright dies with up to one poll of unread events. They are still in
        that attempt's events file in this node's scratch; the metric rows past the newest
        recorded step are applied now (upserts), so the loss curve has no hole where the
        resumed run does not redo the steps. Checkpoints are not recovered: only what was
        uploaded and recorded is ever resumed from (checkpoint_sync.prepare_resume).
        """
        if attempt <= 1:
            return
        try:
            with self.sessions() as session:
                recorded = session.scalar(select(func.max(JobMetric.step))
                                          .where(JobMetric.job_id == self.job_id)) or 0
            lost: list[TrainerEvent] = []
            for earlier in range(1, attempt):
                path = RunPaths.for_attempt(self.settings, self.job_id, earlier).events_file
                for event in typed_events(self.job_id, read_events(path, 0)[0]):
                    if isinstance(event, ProgressEvent | EvalEvent) and event.step > recorded:
                        lost.append(event)
            if lost:
                recorder.apply(lost)
                log.info("job %s: recorded %d events a lost worker had not", self.job_id,
                         len(lost))
        except Exception:  # noqa: BLE001 - never block a retry on bookkeeping
            log.exception("job %s: recovering earlier attempts' events failed", self.job_id)

    def _spawn(self, run_spec: RunSpec, paths: RunPaths) -> TrainerProcess:
        try:
            child = prewarm.spawn(self.settings, run_spec, paths)
        except Exception:  # noqa: BLE001 - a fault in the fast path must not fail the job
            log.exception("job %s: the pre-warmed zygote failed; starting the trainer cold",
                          self.job_id)
            child = None
        if child is not None:
            log.info("job %s: trainer pid %d forked from the pre-warmed zygote", self.job_id,
                     child.pid)
            return child
        cmd = trainer_command(self.settings, run_spec, paths)
        log.info("job %s: starting trainer: %s", self.job_id, " ".join(cmd))
        with open(paths.log_file, "ab") as out:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=paths.run_dir,
                                    env=trainer_env(self.settings), start_new_session=True,
                                    preexec_fn=die_with_parent)

    def _drain(self, paths: RunPaths, recorder: EventRecorder) -> bool:
        """Record the child's new events; False if the database refused them.

        A refused batch stays pending and is applied again (with whatever arrived since) on
        the next poll, so a database restart delays events but never drops them. Re-applying
        is safe: the batch's transaction was rolled back and every row write is an upsert.
        """
        events, self._offset = read_events(paths.events_file, self._offset)
        self._pending.extend(typed_events(self.job_id, events))
        if not self._pending:
            return True
        try:
            recorder.apply(self._pending)
        except Exception as exc:  # noqa: BLE001 - a DB hiccup must not orphan the child
            log.warning("job %s: recording %d events failed (kept, retried next poll): %s",
                        self.job_id, len(self._pending), exc)
            return False
        self._pending = []
        return True

    def _final_drain(self, paths: RunPaths, recorder: EventRecorder) -> None:
        """The child has exited: its last events (the verdict) must land before we settle.
        Retries through a database outage for up to one lease; after that the reaper's
        requeue is the safety net."""
        deadline = time.monotonic() + self.settings.lease_seconds
        while not self._drain(paths, recorder) and time.monotonic() < deadline:
            time.sleep(self.settings.worker_poll_seconds)

    def _watch(self, proc: TrainerProcess, paths: RunPaths,
               recorder: EventRecorder) -> int:
        """Poll until the child exits; returns its returncode (negative: killed by a signal)."""
        poll = self.settings.worker_poll_seconds
        renew_every = self.settings.lease_renew_seconds
        last_renewed = next_renew = time.monotonic()
        next_renew += renew_every
        while True:
            returncode = proc.poll()
            self._drain(paths, recorder)
            if returncode is not None:
                killpg(proc.pid, signal.SIGKILL)  # stray ranks/grandchildren
                self._final_drain(paths, recorder)
                return returncode
            now = time.monotonic()
            fenced = recorder.lease_lost or (self.uploader is not None
                                             and self.uploader.lease_lost)
            if fenced and not self.lost:
                log.warning("job %s: a fenced write found the lease lost; killing the trainer",
                            self.job_id)
                self.lost = True
                killpg(proc.pid, signal.SIGKILL)
            if now >= next_renew and not self.lost:
                next_renew = now + renew_every
                renewed = self._renew()
                if renewed:
                    last_renewed = now
                if renewed is False or now - last_renewed > self.settings.lease_seconds:
                    log.warning("job %s: lease lost; killing the trainer", self.job_id)
                    self.lost = True
                    killpg(proc.pid, signal.SIGKILL)
            if self.stop_reason is None and not self.lost:
                if self.shutdown_requested():
                    self._request_stop(paths, "shutdown")
                elif self._cancel_requested():
                    self._request_stop(paths, "cancel")
                elif self._cancel_requested(Job.pause_requested):
                    self._request_stop(paths, "pause")
                elif now >= self.deadline:
                    log.warning("job %s: past max_job_runtime_seconds=%g; stopping it",
                                self.job_id, self.settings.max_job_runtime_seconds)
                    self._request_stop(paths, "timeout")
            self._escalate(proc.pid, now)
            time.sleep(poll)

    def _renew(self) -> bool | None:
        """True renewed, False lost, None unknown (database unreachable: retry next time)."""
        try:
            with self.sessions() as session:
                return jobs.renew_lease(session, self.job_id, owner=self.owner,
                                        lease_seconds=self.settings.lease_seconds)
        except Exception:  # noqa: BLE001
            log.exception("job %s: lease renewal failed", self.job_id)
            return None

    def _cancel_requested(self, flag: Any = Job.cancel_requested) -> bool:
        """The job's cancel flag (or `flag`: Job.pause_requested) as the database has it."""
        try:
            with self.sessions() as session:
                return bool(session.query(flag).filter(Job.id == self.job_id).scalar())
        except Exception:  # noqa: BLE001
            log.exception("job %s: reading cancel flag failed", self.job_id)
            return False

    def _request_stop(self, paths: RunPaths, reason: str) -> None:
        """Cooperative first: the child sees the stop file, checkpoints and exits."""
        log.info("job %s: asking the trainer to stop (%s)", self.job_id, reason)
        self.stop_reason = reason
        paths.stop_file.parent.mkdir(parents=True, exist_ok=True)
        paths.stop_file.write_text(reason + "\n")
        self._stop_sent_at = time.monotonic()

    def _escalate(self, pgid: int, now: float) -> None:
        """Stop file ignored for cancel_grace_seconds: SIGTERM; as long again: SIGKILL."""
        grace = self.settings.cancel_grace_seconds
        if self._stop_sent_at is not None and self._term_sent_at is None \
                and now - self._stop_sent_at > grace:
            log.warning("job %s: trainer ignored the stop file; SIGTERM", self.job_id)
            killpg(pgid, signal.SIGTERM)
            self._term_sent_at = now
        elif self._term_sent_at is not None and not self._killed \
                and now - self._term_sent_at > grace:
            log.warning("job %s: trainer ignored SIGTERM; SIGKILL", self.job_id)
            killpg(pgid, signal.SIGKILL)
            self._killed = True


def supervise(settings: Settings, job_id: str, owner: str) -> str:
    return Supervisor(settings, job_id, owner).run()
