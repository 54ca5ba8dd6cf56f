"""The job state machine: every change of a job's status goes through `transition`.

    queued ──claim──▶ running ──▶ succeeded | failed | cancelled
      │  ▲               │
      │  └──requeue──────┘   (lease expired, trainer crashed, graceful shutdown: attempts left)
      ├──▶ cancelled | failed            running ──▶ paused (pause: checkpointed, refunded)
      └──▶ paused ──resume──▶ queued;  paused ──▶ cancelled

`ALLOWED_TRANSITIONS` is the one table of legal moves. Each transition is one conditional
UPDATE (`WHERE id = ? AND status = <from>` and, for a worker, `AND lease_owner = <me>`), so two
actors racing (two workers claiming, the worker finishing, the reaper requeueing, a user
cancelling) cannot both win; the loser gets `IllegalTransition`. Every successful transition
writes a `status` event in the same transaction. `claim` is the queued -> running transition.

How an attempt ends is decided by one pure function, `policy.next_state`, applied by
`end_attempt` for the worker (`worker/settle.py`) and the reaper alike.

Cancel against requeue: a queued job with its cancel flag set is never claimed and never
re-sent, so that state must not arise. `request_cancel` is one UPDATE that cancels a
queued row outright and only flags a running one; -> queued and -> running both require the
flag unset (`end_attempt`, refused a requeue by a flag set meanwhile, decides again: cancelled);
the reaper finishes any flagged queued row an older version left behind
(`finish_cancelled_queued`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Update, case, func, literal, null, select, text, update
from sqlalchemy.orm import Session

from lora_core.events import JobError, Stage
from lorajobs.core import webhooks
from lorajobs.core.errors import IllegalTransition
from lorajobs.core.policy import RETRYABLE, Outcome, next_state
from lorajobs.core.tables import Job, JobEvent, JobStatus, Tenant, utcnow

__all__ = [
    "ALLOWED_TRANSITIONS",
    "transition",
    "add_event",
    "claim",
    "claim_next",
    "fair_queue",
    "renew_lease",
    "hold_lease",
    "request_cancel",
    "request_pause",
    "request_resume",
    "end_attempt",
    "reap_expired_leases",
    "finish_cancelled_queued",
    "stale_queued_jobs",
    "mark_enqueued",
    "update_progress",
]

S = JobStatus
TERMINAL = S.TERMINAL
ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED, S.FAILED, S.PAUSED}),
    S.RUNNING: frozenset({S.QUEUED, S.SUCCEEDED, S.FAILED, S.CANCELLED, S.PAUSED}),
    S.PAUSED: frozenset({S.QUEUED, S.CANCELLED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


def add_event(
    session: Session,
    job_id: str,
    type_: str,
    message: str = "",
    *,
    level: str = "info",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    event = JobEvent(job_id=job_id, type=type_, message=message, level=level, data=data or {})
    session.add(event)
    webhooks.on_job_event(session, job_id, type_, event.data)  # the outbox: same transaction
    return event


def transition(
    session: Session,
    job: Job,
    *,
    to: str,
    expect_owner: str | None = None,
    error: JobError | None = None,
    message: str = "",
    stage: Stage | None = None,
    refund_attempt: bool = False,
    lease: tuple[str, float] | None = None,
    unflagged: bool = False,
    lease_expired_before: datetime | None = None,
) -> Job:
    """Move `job` to status `to` atomically, or raise IllegalTransition. Does not commit.

    `refund_attempt` (running -> queued only): the attempt did not fail (a graceful worker
    shutdown), so it does not count against `max_attempts`.
    `lease` (`(owner, seconds)`, exactly when queued -> running, see `claim`): the new
    attempt's lease; the attempt count goes up by one.
    `unflagged`: the caller decided on a row without a cancel request; refuse if one landed
    since (-> queued and -> running always are: a flagged job is never claimed).
    `lease_expired_before` (the reaper's clock): refuse unless the lease still expires before
    it, so a lease renewed since the reaper read the row is not taken from its live worker.
    """
    from_status = job.status
    if to not in ALLOWED_TRANSITIONS.get(from_status, frozenset()):
        raise IllegalTransition(f"job {job.id} is {from_status}; cannot become {to}",
                                param="status")
    if (lease is not None) != (to == S.RUNNING):
        raise ValueError("a lease is given exactly when a job becomes running")
    now = utcnow()
    values: dict[str, Any] = {"status": to, "updated_at": now, "stage": stage}
    if to in TERMINAL:
        values |= {"finished_at": now, "lease_owner": None, "lease_expires_at": None}
    if to in (S.QUEUED, S.PAUSED):
        values |= {"lease_owner": None, "lease_expires_at": None, "enqueued_at": now,
                   "pause_requested": False}
        if refund_attempt:
            values["attempt"] = Job.attempt - 1
    if lease is not None:
        values |= {"lease_owner": lease[0], "started_at": now, "error": None,
                   "lease_expires_at": now + timedelta(seconds=lease[1]),
                   "attempt": Job.attempt + 1}
    error_row = error.model_dump() if error is not None else None
    if error_row is not None:
        values["error"] = error_row
    stmt = update(Job).where(Job.id == job.id, Job.status == from_status)
    if expect_owner is not None:
        stmt = stmt.where(Job.lease_owner == expect_owner)
    if unflagged or to in (S.QUEUED, S.RUNNING):  # see the module docstring
        stmt = stmt.where(Job.cancel_requested.is_(False))
    if lease_expired_before is not None:
        stmt = stmt.where(Job.lease_expires_at < lease_expired_before)
    if _rowcount(session, stmt.values(**values)) != 1:
        session.refresh(job)
        raise IllegalTransition(
            f"job {job.id} changed concurrently (now {job.status}"
            f"{', cancel requested' if job.cancel_requested else ''}); cannot become {to}",
            param="status",
        )
    session.refresh(job)
    if lease is not None:
        message = message or f"queued -> running (attempt {job.attempt})"
    _status_event(session, job, from_status, to, message=message, error=error_row,
                  extra={"owner": lease[0]} if lease is not None else None)
    return job


def _rowcount(session: Session, stmt: Update) -> int:
    """Rows a conditional UPDATE changed: 1 when its WHERE still held, 0 when the row moved on.

    `Session.execute` is typed as returning `Result`; for an UPDATE it is a `CursorResult`,
    which is what carries `rowcount`.
    """
    return cast(CursorResult[Any], session.execute(stmt)).rowcount


def _status_event(session: Session, job: Job, from_status: str, to: str, *, message: str = "",
                  error: dict[str, Any] | None = None,
                  extra: dict[str, Any] | None = None) -> None:
    level = "error" if to == S.FAILED else "info"
    add_event(session, job.id, "status", message or f"{from_status} -> {to}", level=level,
              data={"from": from_status, "to": to, "attempt": job.attempt,
                    **({"error": error} if error else {}), **(extra or {})})
    webhooks.on_status_change(session, job, to, attempt=job.attempt)  # the outbox, same tx


def end_attempt(session: Session, job: Job, outcome: Outcome, *, owner: str | None,
                error: JobError | None = None,
                messages: dict[str, str] | None = None,
                lease_expired_before: datetime | None = None) -> JobStatus:
    """Apply `policy.next_state(job, outcome)` under `owner`'s lease. Does not commit.

    `error` is stored if the decision is failed; `messages` (status -> text) label the status
    event of each possible decision. A transition refused because the row changed since it was
    read (a cancel landed while we requeued, or failed a job out of attempts) is decided
    again, once, on the row as it is now. `lease_expired_before`: see `transition` (the reaper).
    Returns the new status; raises IllegalTransition when the attempt is no longer ours.
    """
    messages = messages or {}
    for again in (False, True):
        decision = next_state(job, outcome)
        if decision is None:
            raise IllegalTransition(f"job {job.id} is {job.status}; its attempt already ended",
                                    param="status")
        to = decision.status
        default = f"{to} (the job changed while it was being settled)" if again else ""
        try:
            transition(session, job, to=to, expect_owner=owner,
                       error=error if to == S.FAILED else None,
                       message=messages.get(to, default), refund_attempt=decision.refund_attempt,
                       unflagged=outcome in RETRYABLE and not job.cancel_requested,
                       lease_expired_before=lease_expired_before)
            return to
        except IllegalTransition:  # refreshed: decide again only if the attempt is still ours
            if again or job.status != S.RUNNING or job.lease_owner != owner:
                raise
    raise AssertionError("unreachable")


def claim(session: Session, job_id: str, *, owner: str, lease_seconds: float) -> Job | None:
    """Take a queued job with a lease, or return None if it is not claimable. Commits.

    Not claimable: running under someone's lease, finished, cancelled, or cancel requested.
    This is what makes a duplicate task delivery a no-op. The queued -> running `transition`
    is one conditional UPDATE, so of two workers racing for a job exactly one wins.
    """
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.status != S.QUEUED or job.cancel_requested:
        session.rollback()
        return None
    try:
        transition(session, job, to=S.RUNNING, stage=Stage.PREPARING,
                   lease=(owner, lease_seconds))
    except IllegalTransition:  # another worker (or a cancel) got there first
        session.rollback()
        return None
    session.execute(update(Tenant).where(Tenant.id == job.tenant_id)
                    .values(last_claimed_at=job.started_at))
    session.commit()
    return job


# Queued jobs one `claim_next` tries in fair order per read: more than the workers that can
# race for the head of the queue at once; after CLAIM_ROUNDS reads lost to racers it gives up
# (the message's job stays queued and the reaper re-sends it).
CLAIM_CANDIDATES = 8
CLAIM_ROUNDS = 3


def fair_queue(session: Session, *, limit: int) -> list[str]:
    """Claimable job ids in fair-share order, best first.

    1. the tenant with the fewest running jobs (one tenant cannot hold every worker while
       another waits);
    2. then the tenant served longest ago (`tenants.last_claimed_at`, never first): with one
       worker, tenants take turns instead of one tenant's backlog running first;
    3. then the tenant's oldest job (a requeued job keeps its place).
    """
    running = (select(Job.tenant_id, func.count().label("n"))
               .where(Job.status == S.RUNNING).group_by(Job.tenant_id).subquery())
    return list(session.scalars(
        select(Job.id)
        .join(Tenant, Tenant.id == Job.tenant_id)
        .outerjoin(running, running.c.tenant_id == Job.tenant_id)
        .where(Job.status == S.QUEUED, Job.cancel_requested.is_(False))
        .order_by(func.coalesce(running.c.n, 0), Tenant.last_claimed_at.asc().nulls_first(),
                  Job.created_at, Job.id)
        .limit(limit)))


def claim_next(session: Session, *, owner: str, lease_seconds: int) -> Job | None:
    """Claim the job whose turn it is (`fair_queue`), or None when nothing is claimable.

    The worker calls this on every broker message, whichever job id it carries: a message is
    a wake-up call, one per queued job, and each claims at most one job, so every queued job
    is still claimed once and a duplicate or stale message finds nothing left (a no-op).
    Racing workers: `claim` is conditional, the loser moves on to the next candidate.
    """
    for _ in range(CLAIM_ROUNDS):
        candidates = fair_queue(session, limit=CLAIM_CANDIDATES)
        session.rollback()  # end the read: each claim is its own short transaction
        if not candidates:
            return None
        for job_id in candidates:
            if (job := claim(session, job_id, owner=owner, lease_seconds=lease_seconds)):
                return job
    return None


# A fenced write transaction (hold_lease) idle this long is ended by PostgreSQL: far above any
# pause between its statements, far below the hours a dead TCP peer keeps a lock.
FENCED_IDLE_TIMEOUT_SECONDS = 10.0


def renew_lease(session: Session, job_id: str, *, owner: str, lease_seconds: int) -> bool:
    """Extend our lease. False means we lost the job (reaped or finished): stop working on it.

    A lease already past its expiry is still renewed while the job is ours: a worker late by
    a few seconds (a database outage, a long pause) whose job nobody reaped keeps its training.
    The reaper's UPDATE requires the lease still expired (`reap_expired_leases`) and this one
    requires our ownership, and both lock the row: whichever comes second sees the other."""
    now = utcnow()
    renewed = _rowcount(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == S.RUNNING, Job.lease_owner == owner)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds)),
    )
    session.commit()
    return renewed == 1


def hold_lease(session: Session, job_id: str, *, owner: str, attempt: int | None = None,
               idle_timeout_seconds: float = FENCED_IDLE_TIMEOUT_SECONDS) -> bool:
    """Fence the current transaction by our lease: True while the job is running under
    `owner` (and `attempt`). Does not commit.

    A write that must not land for a worker that lost the job (a paused or partitioned node's
    checkpoint or artifact rows) calls this first, in the same transaction: it is an UPDATE,
    so it takes the row's lock (PostgreSQL) or the database's write lock (SQLite) and the
    reaper's requeue cannot slip in between the check and the commit.

    That lock is why the transaction is bounded (PostgreSQL): a worker frozen or partitioned
    between this UPDATE and its COMMIT would otherwise hold the job's row, and with it the
    reaper's requeue, until TCP gives up on the connection (hours). Idle past
    `idle_timeout_seconds`, the server ends the session and its lock with it; the worker's
    batch fails and is retried, or the worker finds its lease lost."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT set_config('idle_in_transaction_session_timeout', "
                             ":ms, true)"), {"ms": str(int(idle_timeout_seconds * 1000))})
    stmt = update(Job).where(Job.id == job_id, Job.status == S.RUNNING, Job.lease_owner == owner)
    if attempt is not None:
        stmt = stmt.where(Job.attempt == attempt)
    return _rowcount(session, stmt.values(updated_at=utcnow())) == 1


def request_cancel(session: Session, job: Job) -> Job:
    """Queued or paused: cancelled at once. Running: flag it; the worker stops the trainer.
    Commits.

    One conditional UPDATE decides on the row as it is now, not on `job` as it was read: a job
    requeued or claimed since is still handled right. A finished job raises
    IllegalTransition (409 at the edge).
    """
    now = utcnow()
    was_queued = Job.status.in_((S.QUEUED, S.PAUSED))
    from_status = job.status
    flagged = _rowcount(
        session,
        update(Job)
        .where(Job.id == job.id,
               was_queued | ((Job.status == S.RUNNING) & Job.cancel_requested.is_(False)))
        .values(cancel_requested=True, updated_at=now,
                # SET expressions read the row before the update: queued -> cancelled only
                status=case((was_queued, S.CANCELLED), else_=Job.status),
                finished_at=case((was_queued, literal(now, Job.finished_at.type)),
                                 else_=Job.finished_at),
                stage=case((was_queued, null()), else_=Job.stage)),
    )
    if flagged != 1:
        session.rollback()
        session.refresh(job)
        if job.status == S.RUNNING:  # flagged already: nothing more to do
            return job
        raise IllegalTransition(f"job {job.id} is already {job.status}", param="status",
                                code="job_not_cancellable")
    session.refresh(job)  # our own write: the row is locked until we commit
    if job.status == S.CANCELLED:
        was = from_status if from_status in (S.QUEUED, S.PAUSED) else S.QUEUED
        _status_event(session, job, was, S.CANCELLED, message=f"cancelled while {was}")
    else:
        add_event(session, job.id, "cancel_requested", "cancel requested; stopping trainer")
    session.commit()
    return job


def request_pause(session: Session, job: Job) -> Job:
    """Queued: paused at once. Running: flag it; the worker asks the trainer to checkpoint
    and stop, and the attempt ends paused (policy.next_state). Paused already, or a pause
    already pending: unchanged. Commits. A finished job, or one being cancelled, raises
    IllegalTransition (409 at the edge).

    One conditional UPDATE decides on the row as it is now (a claim racing the request is
    seen), as `request_cancel` does.
    """
    now = utcnow()
    was_queued = Job.status == S.QUEUED
    changed = _rowcount(
        session,
        update(Job)
        .where(Job.id == job.id, Job.cancel_requested.is_(False),
               was_queued | ((Job.status == S.RUNNING) & Job.pause_requested.is_(False)))
        .values(updated_at=now,
                pause_requested=case((was_queued, False), else_=True),
                status=case((was_queued, S.PAUSED), else_=Job.status),
                stage=case((was_queued, null()), else_=Job.stage)),
    )
    if changed != 1:
        session.rollback()
        session.refresh(job)
        if job.status == S.PAUSED or (job.status == S.RUNNING and job.pause_requested
                                      and not job.cancel_requested):
            return job
        state = "being cancelled" if job.cancel_requested and job.status not in TERMINAL \
            else f"already {job.status}"
        raise IllegalTransition(f"job {job.id} is {state}; only a queued or running job can "
                                "be paused", param="status", code="job_not_pausable")
    session.refresh(job)
    if job.status == S.PAUSED:
        _status_event(session, job, S.QUEUED, S.PAUSED, message="paused while queued")
    else:
        add_event(session, job.id, "pause_requested",
                  "pause requested; the trainer saves a checkpoint and stops")
    session.commit()
    return job


def request_resume(session: Session, job: Job) -> Job:
    """Paused -> queued (the caller sends it to the broker); the next attempt continues from
    the newest recorded checkpoint, as any retry does. Anything else raises
    IllegalTransition (409), a running job whose pause is still pending too ("pausing":
    resume once it is paused; withdrawing the request would race the trainer's stop). Commits.
    """
    session.refresh(job)
    if job.status != S.PAUSED:
        state = "pausing" if job.status == S.RUNNING and job.pause_requested else job.status
        raise IllegalTransition(f"job {job.id} is {state}; only a paused job can be "
                                "resumed", param="status", code="job_not_paused")
    transition(session, job, to=S.QUEUED, message="resumed; requeued")
    session.commit()
    return job


def reap_expired_leases(session: Session, *, now: datetime | None = None) -> list[str]:
    """Settle running jobs whose lease expired (their worker died) as `Outcome.WORKER_LOST`:
    cancelled if a cancel was pending, requeued while attempts remain, else failed.

    Returns the ids that went back to queued (the caller sends them to the broker). Commits.
    Each job's UPDATE re-checks that its lease is still expired at `now`: a worker that renewed
    after the SELECT keeps its job (`renew_lease`).
    """
    now = now or utcnow()
    expired = session.scalars(
        select(Job).where(Job.status == S.RUNNING, Job.lease_expires_at < now)
    ).all()
    requeued: list[str] = []
    for job in expired:
        owner = job.lease_owner
        try:
            status = end_attempt(session, job, Outcome.WORKER_LOST, owner=owner, error=JobError(
                code="worker_lost", message=f"worker lost {job.attempt} times (max_attempts="
                                            f"{job.max_attempts}); giving up"), messages={
                S.QUEUED: f"lease expired (worker {owner} lost); requeued",
                S.CANCELLED: "cancelled (worker lost while stopping)"},
                lease_expired_before=now)
            session.commit()
        except IllegalTransition:
            session.rollback()  # the worker finished or renewed in between: fine
            continue
        if status == S.QUEUED:
            requeued.append(job.id)
    return requeued


def finish_cancelled_queued(session: Session) -> list[str]:
    """Cancel queued jobs whose cancel flag is set: no claim takes them and no re-send is made
    for them, so left alone they would stay queued (and count against the quota) forever.
    Today's transitions never leave such a row; this sweeps up rows from older versions.
    Returns their ids. Commits.
    """
    flagged = session.scalars(
        select(Job).where(Job.status == S.QUEUED, Job.cancel_requested.is_(True))
    ).all()
    cancelled: list[str] = []
    for job in flagged:
        try:
            transition(session, job, to=S.CANCELLED, message="cancelled while queued")
            session.commit()
            cancelled.append(job.id)
        except IllegalTransition:
            session.rollback()
    return cancelled


def stale_queued_jobs(session: Session, *, older_than_seconds: float) -> list[str]:
    """Queued jobs nobody picked up within `older_than_seconds` of their last send."""
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    return list(session.scalars(
        select(Job.id).where(Job.status == S.QUEUED, Job.cancel_requested.is_(False),
                             (Job.enqueued_at.is_(None)) | (Job.enqueued_at < cutoff))
    ).all())


def mark_enqueued(session: Session, job_ids: list[str]) -> None:
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(enqueued_at=utcnow()))
        session.commit()


def mark_unsent(session: Session, job_ids: list[str]) -> None:
    """Clear `enqueued_at` of jobs whose send failed: the reaper's next sweep sends them
    (instead of `requeue_after_seconds` after a stamp set when the row was inserted)."""
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(job_ids), Job.status == S.QUEUED)
                        .values(enqueued_at=None))
        session.commit()


def update_progress(
    session: Session,
    job_id: str,
    *,
    owner: str,
    progress: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    stage: Stage | None = None,
) -> bool:
    """Store the latest progress/metrics snapshot while we hold the lease. Does not commit."""
    values: dict[str, Any] = {"updated_at": utcnow()}
    if progress is not None:
        values["progress"] = progress
    if metrics is not None:
        values["metrics"] = metrics
    if stage is not None:
        values["stage"] = stage
    return _rowcount(
        session,
        update(Job).where(Job.id == job_id, Job.status == S.RUNNING, Job.lease_owner == owner)
        .values(**values),
    ) == 1
