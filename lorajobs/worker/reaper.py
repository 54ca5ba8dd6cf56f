"""The reaper: the periodic sweep that makes a lost worker or a lost message harmless.

- Running jobs whose lease expired (their worker died): requeued (or failed after max_attempts,
  or cancelled if a cancel was pending) by `jobs.reap_expired_leases`, then re-sent.
- Queued jobs whose cancel flag is set (left by an older version's cancel/requeue race): no
  claim would ever take them, so they are cancelled (`jobs.finish_cancelled_queued`).
- Queued jobs nobody picked up within `requeue_after_seconds` of their last send (the broker
  lost the message, or was down at submit): sent again once the queue holds no waiting
  messages (a backlog means busy workers, not lost messages). A duplicate is a no-op claim.

It runs as a loop in a process that never waits for a GPU: `lorajobs beat` (production,
main.run_beat), a thread of `lorajobs serve` (embedded), or `lorajobs reaper`. Never as a
message to the workers' queue: a worker runs one job for hours, and a reap message waiting
behind it is exactly the moment a dead worker's job needs requeueing. Sweeps are safe to run
from several processes at once (every change is a conditional UPDATE; a duplicate send is a
no-op claim).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from lorajobs.core import jobs
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.queue import enqueue_job, pending_messages
from lorajobs.core.settings import Settings

__all__ = ["reap_once", "run_reaper_loop"]

log = logging.getLogger(__name__)


def reap_once(settings: Settings) -> dict[str, Any]:
    """One sweep. Returns {requeued, cancelled, resent, unsent} job ids (unsent: broker down)."""
    sessions = get_sessionmaker(settings)
    with sessions() as session:
        requeued = jobs.reap_expired_leases(session)
        cancelled = jobs.finish_cancelled_queued(session)
    unsent = [job_id for job_id in requeued if not enqueue_job(job_id, settings)]
    with sessions() as session:
        stale = jobs.stale_queued_jobs(session,
                                       older_than_seconds=settings.requeue_after_seconds)
    stale = [job_id for job_id in stale if job_id not in requeued]
    waiting = pending_messages(settings) if stale else None
    if waiting:  # workers are busy with a backlog: its messages are not lost, only waiting
        stale = []
    resent: list[str] = []
    for job_id in stale:
        (resent if enqueue_job(job_id, settings) else unsent).append(job_id)
    if requeued or cancelled or resent or unsent:
        log.info("reaper: requeued %s, cancelled %s, re-sent %s, unsent %s",
                 requeued, cancelled, resent, unsent)
    return {"requeued": requeued, "cancelled": cancelled, "resent": resent, "unsent": unsent}


def run_reaper_loop(settings: Settings, stop_event: threading.Event) -> None:
    """Sweep every `reaper_interval_seconds` until `stop_event` is set. Never dies on an error."""
    while not stop_event.is_set():
        try:
            reap_once(settings)
        except Exception:  # noqa: BLE001 - a DB outage must not kill the loop
            log.exception("reaper sweep failed; retrying next interval")
        stop_event.wait(settings.reaper_interval_seconds)
