"""A job's log files across runs and nodes (worker/run_logs.py), on the local store and a real
S3 server: a pause refunds the attempt, so the resumed run writes logs of the same names; on
another node they must not replace the paused run's, and the log artifact holds every run."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from lorajobs.core import jobs
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.settings import Settings
from lorajobs.core.storage import ArtifactStore, get_store
from lorajobs.core.tables import Artifact, Checkpoint, Job, JobMetric
from lorajobs.worker import run_logs
from lorajobs.worker.checkpoint_sync import run_prefix
from lorajobs.worker.event_recorder import register_file
from lorajobs.worker.runspec import RunPaths
from lorajobs.worker.supervisor import Supervisor
from tests.servicefixtures import wait_for
from tests.worker.jobfactory import make_job, node_settings

pytestmark = pytest.mark.timeout(120)
EVENTS, TRAINER = "events-attempt1.jsonl", "trainer-attempt1.log"


def _registered(settings: Settings, job_id: str) -> dict[str, str]:
    """name -> storage key of the job's log artifacts."""
    with get_sessionmaker(settings)() as session:
        return dict(session.execute(select(Artifact.name, Artifact.storage_key).where(
            Artifact.job_id == job_id, Artifact.kind == "log")).all())


def _read(store: ArtifactStore, key: str) -> str:
    with store.open(key) as fh:
        return fh.read().decode()


def _run(settings: Settings, job_id: str, paths: RunPaths, owner: str, lines: str) -> None:
    """One run on a node, as the supervisor and the settle do it: restore, append, upload,
    register."""
    sessions, store = get_sessionmaker(settings), get_store(settings)
    run_logs.restore_logs(sessions, store, job_id=job_id, paths=paths, retry_seconds=5)
    for path in (paths.events_file, paths.log_file):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(lines)
    files = run_logs.upload_logs(sessions, store, job_id=job_id, paths=paths,
                                 prefix=run_prefix(job_id, 1, owner), retry_seconds=5)
    with sessions() as session:
        for name, key, size, sha256 in files:
            register_file(session, job_id=job_id, kind="log", step=None, name=name, key=key,
                          size=size, sha256=sha256)
        session.commit()


def test_every_run_of_an_attempt_lands_in_its_log_whichever_node_runs_it(
        settings: Settings, tmp_path: Path) -> None:
    job_id = make_job(settings)
    store = get_store(settings)
    node_a = RunPaths.for_attempt(node_settings(settings, tmp_path, "a"), job_id, 1)
    node_b = RunPaths.for_attempt(node_settings(settings, tmp_path, "b"), job_id, 1)

    _run(settings, job_id, node_a, "w1", "run 1\n")  # paused on A
    first = _registered(settings, job_id)
    _run(settings, job_id, node_b, "w2", "run 2\n")  # resumed on B: A's lines fetched first
    logs = _registered(settings, job_id)
    assert {_read(store, logs[name]) for name in (EVENTS, TRAINER)} == {"run 1\nrun 2\n"}
    assert logs[EVENTS].startswith(run_prefix(job_id, 1, "w2") + "/logs/")
    assert _read(store, first[EVENTS]) == "run 1\n"  # run 1's object is not overwritten

    _run(settings, job_id, node_a, "w3", "run 3\n")  # back on A: its copy is stale, replaced
    assert _read(store, _registered(settings, job_id)[EVENTS]) == "run 1\nrun 2\nrun 3\n"
    sessions = get_sessionmaker(settings)
    assert run_logs.restore_logs(sessions, store, job_id=job_id, paths=node_a,
                                 retry_seconds=5) == []  # A holds them now: nothing fetched

    # attempt 2 (a crash counts): B's copies of attempt 1's logs are stale, never uploaded
    # over the newer ones; A's events copy holds lines its killed worker never uploaded
    node_b2 = RunPaths.for_attempt(node_settings(settings, tmp_path, "b"), job_id, 2)
    assert run_logs.upload_logs(sessions, store, job_id=job_id, paths=node_b2,
                                prefix=run_prefix(job_id, 2, "w4"), retry_seconds=5) == []
    node_a2 = RunPaths.for_attempt(node_settings(settings, tmp_path, "a"), job_id, 2)
    with open(node_a.events_file, "a") as fh:
        fh.write("tail\n")
    node_a2.events_file.write_text("attempt 2\n")
    files = run_logs.upload_logs(sessions, store, job_id=job_id, paths=node_a2,
                                 prefix=run_prefix(job_id, 2, "w5"), retry_seconds=5)
    assert sorted(name for name, *_ in files) == [EVENTS, "events-attempt2.jsonl"]


def _wait_step(settings: Settings, job_id: str, step: int) -> None:
    def at() -> bool:
        with get_sessionmaker(settings)() as session:
            return (session.scalar(select(JobMetric.step).where(JobMetric.job_id == job_id)
                                   .order_by(JobMetric.step.desc()).limit(1)) or 0) >= step
    wait_for(at, timeout=60, what=f"step {step}")


def test_a_job_paused_on_one_node_and_resumed_on_another_keeps_both_runs(
        settings: Settings, tmp_path: Path) -> None:
    """Supervisors of two nodes with the fake trainer: paused on A, resumed on B. The events
    log and the trainer log hold both runs; A's uploads stay as they were; each run's
    objects are under its own prefix."""
    job_id = make_job(settings, max_steps=30, save_steps=2)
    sessions = get_sessionmaker(settings)
    store = get_store(settings)
    node_a, node_b = node_settings(settings, tmp_path, "a"), node_settings(settings, tmp_path, "b")
    with sessions() as session:
        assert jobs.claim(session, job_id, owner="w1", lease_seconds=60) is not None
    outcome: list[str] = []
    runner = threading.Thread(target=lambda: outcome.append(
        Supervisor(node_a, job_id, "w1", shutdown_requested=lambda: False).run()))
    runner.start()
    _wait_step(settings, job_id, 3)
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        jobs.request_pause(session, job)
    runner.join(60)
    assert outcome == ["paused"]
    paused_logs = _registered(settings, job_id)
    paused_text = {name: _read(store, key) for name, key in paused_logs.items()}
    assert paused_text[EVENTS].count('"type": "started"') == 1

    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        jobs.request_resume(session, job)
    with sessions() as session:
        job = jobs.claim(session, job_id, owner="w2", lease_seconds=60)
        assert job is not None and job.attempt == 1  # the pause refunded it
    assert Supervisor(node_b, job_id, "w2", shutdown_requested=lambda: False).run() \
        == "succeeded"

    logs = _registered(settings, job_id)
    events = _read(store, logs[EVENTS])
    assert events.startswith(paused_text[EVENTS]) and events.count('"type": "started"') == 2
    trainer = _read(store, logs[TRAINER])
    assert trainer.startswith(paused_text[TRAINER]) and trainer.count("fake trainer pid") == 2
    for name, key in paused_logs.items():  # the paused run's objects are as they were
        assert _read(store, key) == paused_text[name]
    a_run, b_run = run_prefix(job_id, 1, "w1"), run_prefix(job_id, 1, "w2")
    with sessions() as session:
        arts = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
        ckpts = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all()
    assert all(a.storage_key.startswith(b_run + "/") for a in arts if a.step is None)
    assert {c.path.rsplit("/", 2)[0] for c in ckpts} == {a_run, b_run}
    assert not any(o.key.startswith(f"jobs/{job_id}/attempt-1/logs") or
                   o.key.startswith(f"jobs/{job_id}/attempt-1/checkpoints")
                   for o in store.list(f"jobs/{job_id}"))  # nothing outside a run's prefix
