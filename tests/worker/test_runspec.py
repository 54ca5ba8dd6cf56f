"""The trainer command line and environment the worker builds (no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_core.spec import RunSpec
from lorajobs.core.settings import Settings
from lorajobs.worker.runspec import RunPaths, trainer_command, trainer_env, visible_gpus


def _spec(tmp_path: Path, nproc: int) -> RunSpec:
    return RunSpec.model_validate({"model_dir": tmp_path, "train_file": tmp_path / "t.jsonl",
                                   "output_dir": tmp_path / "run",
                                   "distributed": {"num_processes": nproc}})


def test_single_process_and_torchrun_commands(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, trainer_python="/opt/py", torchrun="/opt/torchrun",
                        trainer_threads=1)
    paths = RunPaths.for_attempt(settings, "job_x", 2)
    tail = ["-m", "lora_core", "run", "--spec", str(paths.spec_file), "--events-file",
            str(paths.events_file), "--stop-file", str(paths.stop_file)]
    assert trainer_command(settings, _spec(tmp_path, 1), paths) == ["/opt/py", *tail]
    assert trainer_command(settings, _spec(tmp_path, 2), paths) == [
        "/opt/torchrun", "--standalone", "--nproc_per_node", "2", *tail]
    assert paths.events_file.name == "events-attempt2.jsonl"
    assert paths.run_dir == tmp_path / "scratch" / "jobs" / "job_x" / "run"  # node-local
    env = trainer_env(settings)
    assert env["OMP_NUM_THREADS"] == "1" and env["PYTHONUNBUFFERED"] == "1"


def test_visible_gpus_counts_the_driver_narrowed_by_cuda_visible_devices(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = tmp_path / "gpus"
    for bus in ("0000:01:00.0", "0000:02:00.0"):
        (gpus / bus).mkdir(parents=True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus(gpus) == 2
    dev = tmp_path / "dev"  # a container without /proc/driver/nvidia: its device nodes
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidia2", "nvidiactl", "nvidia-uvm"):
        (dev / name).touch()
    assert visible_gpus(tmp_path / "no-driver", dev) == 3
    assert visible_gpus(tmp_path / "no-driver", tmp_path / "no-dev") == 0
    for value, expected in [("0", 1), ("1,0", 2), ("0,1,2,3", 2), ("", 0), ("-1", 0),
                            ("0,-1,1", 1)]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
        assert visible_gpus(gpus) == expected, value


def test_a_job_wider_than_the_worker_fails_at_claim_as_a_user_error(tmp_path: Path) -> None:
    """No trainer is started: one clear error naming the field, not a crashed launch."""
    from sqlalchemy import update

    from lorajobs.core import jobs
    from lorajobs.core.db import get_sessionmaker
    from lorajobs.core.migrate import upgrade
    from lorajobs.core.tables import Job
    from lorajobs.worker.supervisor import supervise
    from tests.worker.jobfactory import get_job, make_job, trainer_starts

    settings = Settings(data_dir=tmp_path / "data", max_processes_per_job=2)
    upgrade(settings)
    job_id = make_job(settings)
    sessions = get_sessionmaker(settings)
    with sessions() as session:
        spec = dict(session.get(Job, job_id).spec)
        spec["distributed"] = {"num_processes": 4, "zero_stage": 0}
        session.execute(update(Job).where(Job.id == job_id).values(spec=spec))
        session.commit()
        assert jobs.claim(session, job_id, owner="w1", lease_seconds=60)
    assert supervise(settings, job_id, "w1") == "failed"
    job = get_job(settings, job_id)
    assert job.error["code"] == "too_many_processes" and job.error["user_fault"]
    assert job.error["param"] == "distributed.num_processes"
    assert "at most 2" in job.error["message"] or "at most 1" in job.error["message"]
    assert trainer_starts(settings, job_id) == []


def test_thread_tuning_is_off_unless_settings_turn_it_on_and_a_pinned_count_wins(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings.trainer_thread_tuning turns the trainer's tuner on through its environment
    (lora_core.training.thread_tuner); trainer_threads pins and so keeps it off. A pre-warmed
    trainer gets this same environment (prewarm.spawn), so it decides as a cold one does."""
    from lora_core.training.thread_tuner import THREAD_TUNING_ENV, tuning_off_reason

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(THREAD_TUNING_ENV, raising=False)  # tests/conftest.py sets it

    def reason(**fields: object) -> str | None:
        settings = Settings(data_dir=tmp_path, **fields)  # type: ignore[arg-type]
        return tuning_off_reason(trainer_env(settings), cuda=False, world_size=1, threads=2)

    assert "off by default" in (reason() or "")
    assert reason(trainer_thread_tuning=True) is None
    pinned = Settings(data_dir=tmp_path, trainer_thread_tuning=True, trainer_threads=2)
    env = trainer_env(pinned)
    assert env["OMP_NUM_THREADS"] == "2" and THREAD_TUNING_ENV not in env
    assert reason(trainer_thread_tuning=True, trainer_threads=2) is not None
