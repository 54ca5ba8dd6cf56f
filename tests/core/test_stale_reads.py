"""Races where a decision rested on a row read earlier (SQLite and PostgreSQL).

Each test drives one interleaving in a fixed order (a second session acts at the point the
race needs), no sleeps:

- a key revoked after the request authenticated cannot mint or revoke (core/keys.py);
- a dataset deleted after a submit read it is re-checked under the tenant lock, and a delete
  holds that lock across its active-job check (core/submit.py, core/datasets.py);
- a lease renewed after the reaper selected it is not reaped (core/jobs.py).
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, event, exc, select, update
from sqlalchemy.orm import Session, sessionmaker

from lorajobs.api.auth import authenticate_presented
from lorajobs.core import datasets, jobs, keys, registry, submit
from lorajobs.core.db import get_engine, get_sessionmaker
from lorajobs.core.errors import InvalidRequest, Unauthorized
from lorajobs.core.settings import Settings
from lorajobs.core.storage import get_store
from lorajobs.core.tables import ApiKey, Dataset, Job, JobStatus, Tenant, new_id, utcnow
from tests.api.conftest import alpaca_lines, jsonl
from tests.dbfixtures import db_settings  # noqa: F401

S = JobStatus


# --- keys --------------------------------------------------------------------------------


def test_a_key_revoked_after_authenticating_cannot_mint_or_revoke(
        db_settings: Settings) -> None:  # noqa: F811
    sessions = get_sessionmaker(db_settings)
    with sessions() as session:
        tenant = keys.create_tenant(session, name="t")
        admin, _ = keys.create_key(session, tenant_id=tenant.id, is_admin=True)
        x, x_plain = keys.mint_key(session, by=admin, name="x", manage_keys=True)
        other, _ = keys.mint_key(session, by=admin, name="other")
        session.commit()
    # The middleware's read, before the body arrives: the row travels in scope state.
    stale = authenticate_presented(sessions, x_plain)
    assert stale.revoked_at is None
    with sessions() as session:  # meanwhile X is revoked (by its admin)
        keys.revoke_key(session, key_id=x.id, by=admin)
        session.commit()
    with sessions() as session, pytest.raises(Unauthorized) as info:
        keys.mint_key(session, by=stale, name="y")
    assert type(info.value) is Unauthorized  # 401, not 403
    with sessions() as session, pytest.raises(Unauthorized):
        keys.revoke_key(session, key_id=other.id, by=stale)
    with sessions() as session:
        assert session.scalars(select(ApiKey).where(ApiKey.created_by == x.id)).all() == []
        assert session.get(ApiKey, other.id).revoked_at is None  # type: ignore[union-attr]


# --- datasets against submit ------------------------------------------------------------------


@pytest.fixture
def env(db_settings: Settings, tmp_path, tiny_model_dir) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]  # noqa: F811
    settings = db_settings.model_copy(update={"model_root": tmp_path / "models"})
    shutil.copytree(tiny_model_dir, settings.resolved_model_root / "tiny")
    store = get_store(settings)
    with get_sessionmaker(settings)() as session:
        tenant = keys.create_tenant(session, name="t")
        session.commit()
        registry.register_model(session, name="tiny", path_under_model_root="tiny",
                                settings=settings)
        ds = datasets.create_dataset(session, tenant_id=tenant.id, filename="d.jsonl",
                                     stream=io.BytesIO(jsonl(alpaca_lines(10))),
                                     data_format=None, settings=settings, store=store)
    yield {"settings": settings, "store": store, "tenant": tenant.id, "ds": ds.id}


def _submit(env: dict[str, Any], session: Session) -> Job:
    request = submit.JobRequest(base_model="tiny", training_file=env["ds"])
    return submit.create_job(session, tenant_id=env["tenant"], request=request,
                             settings=env["settings"], store=env["store"],
                             enqueue=lambda _job_id: None)[0]


def _delete(env: dict[str, Any], session: Session) -> None:
    datasets.delete_dataset(session, tenant_id=env["tenant"], dataset_id=env["ds"],
                            store=env["store"])


def _orphans(settings: Settings) -> list[str]:
    """Active jobs whose training dataset is gone: what the race must never leave."""
    with get_sessionmaker(settings)() as session:
        return list(session.scalars(
            select(Job.id).outerjoin(Dataset, Dataset.id == Job.training_file)
            .where(Job.status.in_([S.QUEUED, S.RUNNING]), Dataset.id.is_(None))))


def test_submit_rechecks_a_dataset_deleted_after_it_was_read(
        env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    real_lock = submit._lock_tenant

    def delete_then_lock(session: Session, *args: Any) -> Any:
        with get_sessionmaker(env["settings"])() as other:  # commits between read and lock
            _delete(env, other)
        return real_lock(session, *args)

    monkeypatch.setattr(submit, "_lock_tenant", delete_then_lock)
    with get_sessionmaker(env["settings"])() as session, \
            pytest.raises(InvalidRequest) as info:
        _submit(env, session)
    assert (info.value.param, info.value.code) == ("training_file", "dataset_not_found")
    assert _orphans(env["settings"]) == []
    with get_sessionmaker(env["settings"])() as session:
        assert session.scalars(select(Job.id)).all() == []


def _impatient_sessions(settings: Settings) -> sessionmaker[Session]:
    """Sessions whose lock waits give up after 0.2 s: proof that a lock is held, not a sleep."""
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 0.2})
    else:
        engine = create_engine(url, connect_args={"options": "-c lock_timeout=200"})
    return sessionmaker(engine, expire_on_commit=False)


def test_delete_holds_the_tenant_lock_across_its_active_job_check(
        env: dict[str, Any]) -> None:
    """A submit arriving between the delete's active-job check and its DELETE must wait for
    it (and then find the dataset gone), not slip a job in under a dataset about to vanish."""
    impatient = _impatient_sessions(env["settings"])
    outcome: list[str] = []

    def submit_during_check(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if outcome or "FROM jobs" not in statement or "training_file" not in statement:
            return
        with impatient() as session:
            try:
                outcome.append(_submit(env, session).id)
            except exc.OperationalError:  # lock wait timed out: the delete holds the lock
                session.rollback()
                outcome.append("blocked")

    engine = get_engine(env["settings"])
    event.listen(engine, "after_cursor_execute", submit_during_check)
    try:
        with get_sessionmaker(env["settings"])() as session:
            _delete(env, session)
    finally:
        event.remove(engine, "after_cursor_execute", submit_during_check)
        impatient.kw["bind"].dispose()
    assert outcome == ["blocked"]
    assert _orphans(env["settings"]) == []
    with get_sessionmaker(env["settings"])() as session, \
            pytest.raises(InvalidRequest) as info:  # after the delete: 422, as before
        _submit(env, session)
    assert info.value.param == "training_file"


# --- reaper against renew ----------------------------------------------------------------


def test_reaper_leaves_a_lease_renewed_after_its_select(
        db_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    sessions = get_sessionmaker(db_settings)
    with sessions() as session:
        tenant = Tenant(id=new_id("ten"), name="t")
        session.add(tenant)
        session.flush()
        job = Job(id=new_id("job"), tenant_id=tenant.id, base_model="m", training_file="ds_x",
                  spec={})
        session.add(job)
        session.commit()
        assert jobs.claim(session, job.id, owner="w1", lease_seconds=60) is not None
        # the worker missed its renewals (a database outage): the lease is past its expiry
        session.execute(update(Job).where(Job.id == job.id)
                        .values(lease_expires_at=utcnow() - timedelta(seconds=5)))
        session.commit()

    real_end_attempt = jobs.end_attempt
    renewed: list[bool] = []

    def renew_then_end(*args: Any, **kwargs: Any) -> Any:
        if not renewed:  # between the reaper's SELECT and its UPDATE, the worker renews
            with sessions() as worker:
                renewed.append(jobs.renew_lease(worker, job.id, owner="w1", lease_seconds=60))
        return real_end_attempt(*args, **kwargs)

    monkeypatch.setattr(jobs, "end_attempt", renew_then_end)
    with sessions() as reaper:
        assert jobs.reap_expired_leases(reaper) == []
    assert renewed == [True]
    with sessions() as session:
        row = session.get(Job, job.id)
        assert row is not None
        assert (row.status, row.lease_owner, row.attempt) == (S.RUNNING, "w1", 1)
        assert row.error is None
        # the worker still holds it: its next renewal succeeds
        assert jobs.renew_lease(session, job.id, owner="w1", lease_seconds=60)
