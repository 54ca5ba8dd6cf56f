"""What becomes of a job when one attempt of it ends: one pure function, `next_state`.

    how the attempt ended (Outcome)   cancel requested   attempts left   ->  next status
    SUCCEEDED                         any                any                 succeeded
    USER_ERROR, SYSTEM_ERROR          any                any                 failed (that error)
    MAX_RUNTIME                       any                any                 failed
    CANCEL_STOP                       (set)              any                 cancelled
    PAUSE_STOP                        yes                any                 cancelled
                                      no                 (refunded)          paused, refund
    SHUTDOWN                          yes                any                 cancelled
                                      no                 (refunded)          queued, refund
    CRASHED, WORKER_LOST              yes                any                 cancelled
                                      no, pause asked    any                 paused
                                      no                 yes                 queued
                                      no                 no                  failed

Only a running job has an attempt to end: for any other status the answer is None (someone
else settled it first: the reaper, a cancel, or the attempt's own worker).

Why the rows are in this order:
- a finished run is kept even if a cancel landed after its last step: the work is done;
- a named error (the trainer's or the worker's) and the runtime limit are verdicts: retrying
  would hit them again, and the error tells the user what to fix, so a pending cancel does not
  hide it;
- everything else is an interruption with no verdict: a cancel request ends it, else it is
  retried while attempts remain. A graceful worker shutdown is not the job's fault: its
  attempt is refunded (`refund_attempt`), so it is always queued again unless cancelled;
- a pause is the user's request: its attempt is refunded too, and an interruption while a
  pause is pending (the trainer crashed, the worker died) ends paused, not requeued: the
  user asked for no more training until they resume (the resume starts from the newest
  recorded checkpoint, as any retry does).

The worker (`worker/settle.py`) and the reaper (`jobs.reap_expired_leases`) both apply it
through `jobs.end_attempt`, which decides again on the refreshed row when it loses a race.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from lorajobs.core.tables import JobStatus

__all__ = ["Outcome", "Decision", "AttemptOf", "next_state", "RETRYABLE"]


class Outcome(StrEnum):
    """How one attempt ended, as the worker (or the reaper) saw it."""

    SUCCEEDED = "succeeded"        # the trainer finished: adapter (and merges) written
    USER_ERROR = "user_error"      # a named error that is the user's (bad data, bad spec)
    SYSTEM_ERROR = "system_error"  # a named error that is not (OOM, disk full, merge failed)
    MAX_RUNTIME = "max_runtime"    # stopped at max_job_runtime_seconds
    CANCEL_STOP = "cancel_stop"    # stopped because a cancel was requested
    SHUTDOWN = "shutdown"          # stopped for a graceful worker shutdown: attempt refunded
    PAUSE_STOP = "pause_stop"      # checkpointed and stopped because a pause was requested
    CRASHED = "crashed"            # the trainer died without a verdict (crash, OOM kill)
    WORKER_LOST = "worker_lost"    # the lease expired: the worker died


# Interruptions with no verdict: cancelled if asked, else retried while attempts remain.
RETRYABLE = frozenset({Outcome.SHUTDOWN, Outcome.CRASHED, Outcome.WORKER_LOST})


class AttemptOf(Protocol):
    """What `next_state` reads of a job (a `models.Job` row has it)."""

    status: str
    cancel_requested: bool
    pause_requested: bool
    attempt: int
    max_attempts: int


@dataclass(frozen=True)
class Decision:
    status: JobStatus
    refund_attempt: bool = False  # running -> queued without counting this attempt


def next_state(job: AttemptOf, outcome: Outcome) -> Decision | None:
    """The job's next status after an attempt ended with `outcome`; None if it is not running.

    Pure: reads the fields of `AttemptOf`, writes nothing. See the module's table.
    """
    if job.status != JobStatus.RUNNING:
        return None
    if outcome is Outcome.SUCCEEDED:
        return Decision(JobStatus.SUCCEEDED)
    if outcome in (Outcome.USER_ERROR, Outcome.SYSTEM_ERROR, Outcome.MAX_RUNTIME):
        return Decision(JobStatus.FAILED)
    if outcome is Outcome.CANCEL_STOP or job.cancel_requested:
        return Decision(JobStatus.CANCELLED)
    if outcome is Outcome.PAUSE_STOP:
        return Decision(JobStatus.PAUSED, refund_attempt=True)
    if job.pause_requested:
        return Decision(JobStatus.PAUSED, refund_attempt=outcome is Outcome.SHUTDOWN)
    if outcome is Outcome.SHUTDOWN:
        return Decision(JobStatus.QUEUED, refund_attempt=True)
    if job.attempt < job.max_attempts:
        return Decision(JobStatus.QUEUED)
    return Decision(JobStatus.FAILED)
