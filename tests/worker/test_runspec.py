"""The trainer command line and environment the worker builds (no processes)."""

from __future__ import annotations

from pathlib import Path

from lora_core.spec import RunSpec
from lorajobs.service.settings import Settings
from lorajobs.service.storage import LocalArtifactStore
from lorajobs.worker.runspec import RunPaths, trainer_command, trainer_env


def _spec(tmp_path: Path, nproc: int) -> RunSpec:
    return RunSpec.model_validate({"model_dir": tmp_path, "train_file": tmp_path / "t.jsonl",
                                   "output_dir": tmp_path / "run",
                                   "distributed": {"num_processes": nproc}})


def test_single_process_and_torchrun_commands(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, trainer_python="/opt/py", torchrun="/opt/torchrun",
                        trainer_threads=1)
    paths = RunPaths.for_attempt(LocalArtifactStore(tmp_path / "a"), "job_x", 2)
    tail = ["-m", "lora_core", "run", "--spec", str(paths.spec_file), "--events-file",
            str(paths.events_file), "--stop-file", str(paths.stop_file)]
    assert trainer_command(settings, _spec(tmp_path, 1), paths) == ["/opt/py", *tail]
    assert trainer_command(settings, _spec(tmp_path, 2), paths) == [
        "/opt/torchrun", "--standalone", "--nproc_per_node", "2", *tail]
    assert paths.events_file.name == "events-attempt2.jsonl"
    env = trainer_env(settings)
    assert env["OMP_NUM_THREADS"] == "1" and env["PYTHONUNBUFFERED"] == "1"
