"""The Celery task body: claim a job under a lease, or do nothing.

Thin on purpose (Celery's own advice): the message carries only a job id and is a wake-up call.
The worker claims the job whose turn it is in the fair-share order (`jobs.claim_next`: the
tenant with the fewest running jobs, then the one served longest ago), which need not be the
message's job: with one worker, a tenant that queued 10 jobs no longer runs all 10 before
another tenant's one. Each message claims at most one job, and there is one per queued job,
so each is claimed once; a duplicate delivery, or a message whose job someone already ran,
finds nothing left and returns "noop".
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

from celery.exceptions import Reject

from lorajobs.core import jobs
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.settings import Settings, get_settings

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
        job = jobs.claim_next(session, owner=owner, lease_seconds=settings.lease_seconds)
    if job is None:
        log.info("job %s not claimable and no other job queued (duplicate delivery, "
                 "finished or cancelled): no-op", job_id)
        return "noop"
    log.info("job %s claimed by %s (attempt %d; woken by the message for %s)", job.id, owner,
             job.attempt, job_id)
    outcome = supervise(settings, job.id, owner)
    log.info("job %s attempt %d: %s", job.id, job.attempt, outcome)
    return outcome
