"""The Celery task body: claim the job under a lease, or do nothing.

Thin on purpose (Celery's own advice): the message carries only the job id, the row is re-read,
and `jobs.claim` decides whether there is work. A duplicate delivery, a message for a job that
finished, was cancelled or is running under someone else's live lease: all return "noop".
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

from celery.exceptions import Reject

from lorajobs.service import jobs
from lorajobs.service.db import get_sessionmaker
from lorajobs.service.settings import Settings, get_settings

__all__ = ["worker_owner", "run_job", "bind_settings"]

log = logging.getLogger(__name__)

_settings: Settings | None = None


def bind_settings(settings: Settings) -> None:
    """Use these settings instead of the environment's (an in-process worker, tests)."""
    global _settings
    _settings = settings


def current_settings() -> Settings:
    return _settings or get_settings()


def worker_owner() -> str:
    """`hostname:pid:uuid`: unique per attempt, and says where to look when a lease is stuck."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def run_job(job_id: str) -> str:
    """Claim and run one job attempt; returns the outcome ("noop" when not claimable)."""
    from lorajobs.worker import shutdown
    from lorajobs.worker.supervisor import supervise

    settings = current_settings()
    if shutdown.requested(settings):
        # A warm shutdown still runs the message prefetched before it: hand it back unclaimed
        # (the job may be the one we just requeued) for another worker.
        raise Reject(f"worker shutting down; job {job_id} left for another worker",
                     requeue=True)
    owner = worker_owner()
    with get_sessionmaker(settings)() as session:
        job = jobs.claim(session, job_id, owner=owner, lease_seconds=settings.lease_seconds)
    if job is None:
        log.info("job %s not claimable (duplicate delivery, finished or cancelled): no-op",
                 job_id)
        return "noop"
    log.info("job %s claimed by %s (attempt %d)", job_id, owner, job.attempt)
    outcome = supervise(settings, job_id, owner)
    log.info("job %s attempt %d: %s", job_id, job.attempt, outcome)
    return outcome
