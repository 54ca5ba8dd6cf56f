"""The pre-warmed trainer (prewarm.py + zygote.py) with the real trainer and the tiny model.

Directly: a forked trainer has the plain spawn's guarantees (own session and group, cwd, log,
exit code; killpg reaches it) and was never exec'd, so it cannot have imported torch again;
a killed zygote takes its trainer and is replaced. Through a real Celery worker: jobs use the
zygote, cancel ends the trainer's group, a worker killed outright takes zygote and trainer, and
a job after a killed zygote still runs (cold), the next one forked from the replacement.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lora_core.events import read_events
from lora_core.spec import RunSpec
from lorajobs.core import jobs
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.queue import enqueue_job
from lorajobs.core.settings import Settings
from lorajobs.core.tables import Job
from lorajobs.worker import prewarm
from lorajobs.worker.process_control import pid_alive
from lorajobs.worker.runspec import FORK_SAFE_ENV, RunPaths, write_spec
from tests.servicefixtures import LiveService, wait_for
from tests.worker.jobfactory import ensure_model_and_dataset, events, get_job, make_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

READY_TIMEOUT = 120  # preloading torch + transformers + peft: ~4 s alone, far more when busy
STARTED_TIMEOUT = 120
DATA = "".join(f'{{"instruction": "repeat {w}", "output": "{w} {w}"}}\n'
               for w in ("red", "blue", "fish", "stone", "river", "wolf", "green", "book"))


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rfind(b")") + 2:].split()[1])


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _group_gone(pgid: int) -> bool:
    """No live process left in the group (a zombie awaiting its reaper has stopped running)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_bytes()
        except OSError:
            continue
        state, _ppid, pgrp = fields[fields.rfind(b")") + 2:].split()[:3]
        if int(pgrp) == pgid and state not in (b"Z", b"X"):
            return False
    return True


# -- the zygote itself, driven from this process --------------------------------------------

@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    yield Settings(data_dir=tmp_path / "data", trainer_threads=1, lease_seconds=60)
    prewarm.stop()
    prewarm._failed_starts = 0


def _run(tmp_path: Path, model_dir: Path, name: str, **spec: object) -> tuple[RunSpec, RunPaths]:
    train = tmp_path / "train.jsonl"
    train.write_text(DATA)
    job_dir = tmp_path / name
    paths = RunPaths(job_dir=job_dir, run_dir=job_dir / "run", spec_file=job_dir / "spec.json",
                     stop_file=job_dir / "run" / "STOP",
                     events_file=job_dir / "run" / "events-attempt1.jsonl",
                     log_file=job_dir / "run" / "trainer-attempt1.log")
    run_spec = RunSpec.model_validate({
        "model_dir": model_dir, "train_file": train, "output_dir": paths.run_dir,
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
        "training": {"max_steps": 100000, "save_steps": 100000, "batch_size": 2},
        "merge": "none", "resume": True, **spec})
    write_spec(run_spec, paths)
    return run_spec, paths


def _event_types(paths: RunPaths) -> list[str]:
    return [e["type"] for e in read_events(paths.events_file, 0)[0]]


def _ready_zygote(settings: Settings) -> prewarm.Zygote:
    prewarm.start(settings)
    zygote = prewarm.current()
    assert zygote is not None and zygote.wait_ready(READY_TIMEOUT), zygote and zygote.failure
    return zygote


def test_forked_trainer_keeps_the_plain_spawns_guarantees(settings: Settings, tmp_path: Path,
                                                          tiny_model_dir: Path) -> None:
    zygote = _ready_zygote(settings)
    run_spec, paths = _run(tmp_path, tiny_model_dir, "a")
    child = prewarm.spawn(settings, run_spec, paths)
    assert isinstance(child, prewarm.ZygoteChild)
    wait_for(lambda: "started" in _event_types(paths), timeout=STARTED_TIMEOUT,
             what="the forked trainer's started event")
    # forked, never exec'd: it runs the zygote's program with the modules the zygote preloaded
    assert _ppid(child.pid) == zygote.proc.pid
    assert _cmdline(child.pid) == _cmdline(zygote.proc.pid)
    assert os.getpgid(child.pid) == child.pid == os.getsid(child.pid)
    assert Path(f"/proc/{child.pid}/cwd").resolve() == paths.run_dir.resolve()
    assert "forked from the pre-warmed zygote" in paths.log_file.read_text()
    assert child.poll() is None
    paths.stop_file.write_text("cancel\n")  # the cooperative stop: checkpoint, exit 0
    assert child.wait(timeout=60) == 0
    assert _event_types(paths)[-1] == "finished"

    run_spec, paths = _run(tmp_path, tiny_model_dir, "b")
    child = prewarm.spawn(settings, run_spec, paths)
    assert isinstance(child, prewarm.ZygoteChild)
    os.killpg(child.pid, signal.SIGKILL)  # what cancel escalation and a lost lease do
    assert child.wait(timeout=30) == -signal.SIGKILL
    assert not Path(f"/proc/{child.pid}").exists()  # the zygote reaped it before it reported
    # what it had started in its group got the same SIGKILL; under load it may still be exiting
    wait_for(lambda: _group_gone(child.pid), timeout=30, what="the killed trainer's group")
    assert zygote.alive  # it serves the next job


def test_killed_zygote_takes_its_trainer_and_is_replaced(settings: Settings, tmp_path: Path,
                                                         tiny_model_dir: Path) -> None:
    zygote = _ready_zygote(settings)
    run_spec, paths = _run(tmp_path, tiny_model_dir, "a")
    child = prewarm.spawn(settings, run_spec, paths)
    assert isinstance(child, prewarm.ZygoteChild)
    os.kill(zygote.proc.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    assert not pid_alive(child.pid)
    # the next job starts cold; a replacement preloads for the one after
    run_spec, paths = _run(tmp_path, tiny_model_dir, "b")
    assert prewarm.spawn(settings, run_spec, paths) is None
    replacement = prewarm.current()
    assert replacement is not None and replacement is not zygote
    assert replacement.wait_ready(READY_TIMEOUT)
    child = prewarm.spawn(settings, run_spec, paths)
    assert isinstance(child, prewarm.ZygoteChild)
    os.killpg(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL


def test_cold_spawn_where_prewarm_does_not_apply(settings: Settings, tmp_path: Path,
                                                 tiny_model_dir: Path) -> None:
    run_spec, paths = _run(tmp_path, tiny_model_dir, "a",
                           distributed={"num_processes": 2, "zero_stage": 0})
    assert prewarm.spawn(settings, run_spec, paths) is None  # torchrun
    run_spec, paths = _run(tmp_path, tiny_model_dir, "b")
    for other in (settings.model_copy(update={"trainer_prewarm": False}),
                  settings.model_copy(update={"trainer_python": "/opt/trainer-python"})):
        prewarm.start(other)
        assert prewarm.current() is None
        assert prewarm.spawn(other, run_spec, paths) is None
    assert prewarm.current() is None
    same = settings.model_copy(update={"trainer_python": sys.executable})
    assert prewarm._usable_for(same, run_spec)  # the worker's own interpreter: no reason not to


def test_exit_now_keeps_what_the_interpreters_teardown_does(tmp_path: Path) -> None:
    """A trainer, forked or cold, leaves through exit_now (no seconds freeing objects one by one):
    its exit code, its non-daemon threads finished before the atexit handlers run, and its
    buffered output in the log are what a normal interpreter exit gives."""
    script = f"""
import atexit, sys, threading, time
from pathlib import Path
from lora_core.child_process import exit_now
out = Path({str(tmp_path)!r})
atexit.register(lambda: (out / "atexit").write_text(str((out / "thread").exists())))
def late():
    time.sleep(0.5)
    (out / "thread").write_text("done")
threading.Thread(target=late).start()
sys.stdout.write("buffered, no newline")
sys.stderr.write("to stderr")
exit_now(7)
"""
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.run([sys.executable, "-c", script], stdout=log, stderr=log,
                              stdin=subprocess.DEVNULL, timeout=60, check=False)
    assert proc.returncode == 7
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "True"  # after the thread, as at exit
    log_text = (tmp_path / "log").read_text()
    assert "buffered, no newline" in log_text and "to stderr" in log_text


def test_preload_takes_deepspeed_where_no_gpu_is_visible_and_stays_fork_safe() -> None:
    """accelerate imports deepspeed in every Trainer: preloaded where that cannot touch CUDA,
    left to the child where a GPU is visible; either way the zygote can still fork. What it
    preloaded is frozen out of the collector's sight (a child's gc.collect never walks it)."""
    code = ("import gc, json, sys, torch; from lorajobs.worker.zygote import fork_hazard, "
            "preload; preload(); hazard = fork_hazard(); print(json.dumps({'hazard': hazard, "
            "'deepspeed': 'deepspeed' in sys.modules, 'frozen': gc.get_freeze_count(), "
            "'tracked': len(gc.get_objects()), 'cuda': torch.cuda.is_available()}))")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **FORK_SAFE_ENV},
                          capture_output=True, text=True, timeout=READY_TIMEOUT, check=True)
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["hazard"] is None
    assert out["frozen"] > 100 * out["tracked"]
    assert out["deepspeed"] == (importlib.util.find_spec("deepspeed") is not None
                                and not out["cuda"])


def test_worker_process_init_imports_what_settling_a_job_imports() -> None:
    code = ("import sys; from lorajobs.worker import celery_app; "
            "before = 'tensorboard.summary.writer.record_writer' in sys.modules; "
            "celery_app._import_settle_modules(); "
            "print(before, 'tensorboard.summary.writer.record_writer' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=READY_TIMEOUT, check=True)
    assert proc.stdout.split()[-2:] == ["False", "True"]


# -- through a real worker ------------------------------------------------------------------

@pytest.fixture
def service(tmp_path: Path, tiny_model_dir: Path) -> Iterator[LiveService]:
    """SQLite + embedded broker, the real trainer (no trainer_python), the tiny model."""
    svc = LiveService(tmp_path, "sqlite", trainer=None)
    try:
        svc.migrate()
        ensure_model_and_dataset(svc.settings, tiny_model_dir)
        yield svc
    finally:
        svc.close()


def _zygotes_ready(svc: LiveService, count: int = 1) -> list[int]:
    pids = [int(p) for p in re.findall(r"trainer zygote (\d+) ready", svc.log("worker"))]
    return pids if len(pids) >= count else []


def _forked(svc: LiveService) -> list[int]:
    return [int(p) for p in re.findall(r"trainer pid (\d+) forked", svc.log("worker"))]


def _start_job(svc: LiveService) -> str:
    job_id = make_job(svc.settings, max_steps=100000, save_steps=100000, merge="none")
    enqueue_job(job_id, svc.settings)
    wait_for(lambda: events(svc.settings, job_id, "started"), timeout=STARTED_TIMEOUT,
             what=f"{job_id}'s started event")
    return job_id


def _cancel(svc: LiveService, job_id: str) -> None:
    with get_sessionmaker(svc.settings)() as session:
        jobs.request_cancel(session, session.get(Job, job_id))
    wait_for(lambda: get_job(svc.settings, job_id).status == "cancelled", timeout=60,
             what=f"{job_id} cancelled")


def test_worker_uses_the_zygote_cancel_and_worker_death_end_the_trainer(
        service: LiveService) -> None:
    worker = service.start_worker()
    zygote_pid = wait_for(lambda: _zygotes_ready(service), timeout=READY_TIMEOUT,
                          what="the worker's zygote ready")[0]
    job_id = _start_job(service)
    [trainer] = _forked(service)
    assert _ppid(trainer) == zygote_pid and _ppid(zygote_pid) == worker.pid
    _cancel(service, job_id)
    wait_for(lambda: _group_gone(trainer), timeout=5, what="the trainer's group gone")

    _start_job(service)
    trainer = _forked(service)[-1]
    assert pid_alive(trainer)
    os.kill(worker.pid, signal.SIGKILL)  # no shutdown hook runs: only the kernel's rules
    worker.wait()
    wait_for(lambda: not pid_alive(zygote_pid) and _group_gone(trainer), timeout=10,
             what="zygote and trainer gone with their worker")


def test_job_after_a_killed_zygote_runs_and_the_replacement_serves(
        service: LiveService) -> None:
    service.start_worker()
    zygote_pid = wait_for(lambda: _zygotes_ready(service), timeout=READY_TIMEOUT,
                          what="the worker's zygote ready")[0]
    os.kill(zygote_pid, signal.SIGKILL)
    job_id = _start_job(service)  # cold: the plain Popen path
    assert _forked(service) == []
    assert "is gone" in service.log("worker")
    _cancel(service, job_id)
    replacement = wait_for(lambda: _zygotes_ready(service, 2), timeout=READY_TIMEOUT,
                           what="the replacement zygote ready")[-1]
    assert replacement != zygote_pid
    job_id = _start_job(service)
    [trainer] = _forked(service)
    assert _ppid(trainer) == replacement
    _cancel(service, job_id)
