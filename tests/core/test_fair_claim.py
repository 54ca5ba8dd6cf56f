"""Fair share across tenants (`jobs.claim_next`) on SQLite and PostgreSQL: the claim order
interleaves tenants, prefers the tenant with the fewest running jobs, and racing claimers each
get a different job."""

from __future__ import annotations

import threading
from datetime import timedelta

from lorajobs.core import jobs
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.settings import Settings
from lorajobs.core.tables import Job, JobStatus, Tenant, new_id, utcnow
from tests.dbfixtures import db_settings  # noqa: F401

S = JobStatus


def queue_jobs(settings: Settings, plan: list[str]) -> dict[str, list[str]]:
    """One queued job per entry of `plan` (a tenant name), created in that order."""
    t0 = utcnow() - timedelta(minutes=10)
    made: dict[str, list[str]] = {}
    with get_sessionmaker(settings)() as session:
        tenants = {}
        for name in dict.fromkeys(plan):
            tenants[name] = Tenant(id=new_id("ten"), name=name)
            session.add(tenants[name])
        session.flush()
        for i, name in enumerate(plan):
            job_id = new_id("job")
            session.add(Job(id=job_id, tenant_id=tenants[name].id, base_model="m",
                            training_file="ds_x", spec={},
                            created_at=t0 + timedelta(seconds=i)))
            made.setdefault(name, []).append(job_id)
        session.commit()
    return made


def run_in_turn(settings: Settings, n: int) -> list[str]:
    """Claim, finish, claim ...: one worker working through the queue."""
    order = []
    with get_sessionmaker(settings)() as session:
        for _ in range(n):
            job = jobs.claim_next(session, owner="w1", lease_seconds=60)
            assert job is not None
            jobs.transition(session, job, to=S.SUCCEEDED, expect_owner="w1")
            session.commit()
            order.append(job.id)
        assert jobs.claim_next(session, owner="w1", lease_seconds=60) is None
    return order


def test_one_worker_interleaves_tenants(db_settings: Settings) -> None:  # noqa: F811
    made = queue_jobs(db_settings, ["a", "a", "a", "a", "b"])
    a, b = made["a"], made["b"]
    assert run_in_turn(db_settings, 5) == [a[0], b[0], a[1], a[2], a[3]]


def test_three_tenants_take_turns(db_settings: Settings) -> None:  # noqa: F811
    made = queue_jobs(db_settings, ["a", "a", "a", "b", "b", "c"])
    a, b, c = made["a"], made["b"], made["c"]
    assert run_in_turn(db_settings, 6) == [a[0], b[0], c[0], a[1], b[1], a[2]]


def test_fewest_running_first_and_skips_flagged(db_settings: Settings) -> None:  # noqa: F811
    made = queue_jobs(db_settings, ["a", "a", "a", "b", "b"])
    a, b = made["a"], made["b"]
    sessions = get_sessionmaker(db_settings)
    with sessions() as session:
        # a holds two workers; b one. The next free worker serves b (1 running < 2).
        for job_id, owner in [(a[0], "w1"), (a[1], "w2"), (b[0], "w3")]:
            assert jobs.claim(session, job_id, owner=owner, lease_seconds=60)
        nxt = jobs.claim_next(session, owner="w4", lease_seconds=60)
        assert nxt is not None and nxt.id == b[1]
        # a cancel-flagged queued job is never claimed
        session.execute(Job.__table__.update().where(Job.id == a[2])
                        .values(cancel_requested=True))
        session.commit()
        assert jobs.claim_next(session, owner="w5", lease_seconds=60) is None


def test_racing_claimers_get_different_jobs(db_settings: Settings) -> None:  # noqa: F811
    queue_jobs(db_settings, ["a", "a", "b", "b"])
    sessions = get_sessionmaker(db_settings)
    barrier = threading.Barrier(4)
    got: list[str | None] = []

    def worker(owner: str) -> None:
        with sessions() as session:
            barrier.wait()
            job = jobs.claim_next(session, owner=owner, lease_seconds=60)
            got.append(job.id if job else None)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert None not in got and len(set(got)) == 4
