"""bench/gpu.sh and bench/gpu_run.py without a GPU: the plan, a step's timeout line (and the
processes it leaves none of), the MFU summary, and gpu.sh's install plan (--dry-run). The
steps themselves run on a GPU only."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_dry_run_lists_every_step_with_its_timeout(tmp_path):
    proc = _run(sys.executable, "bench/gpu_run.py", "--dry-run", "--cpu", "--workdir",
                str(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = [ln for ln in proc.stdout.splitlines() if ln.startswith("== ")]
    assert [ln.split(":")[0] for ln in steps] == ["== train", "== job", "== zero3", "== merge"]
    assert all("timeout" in ln for ln in steps)
    assert not (tmp_path / "train").exists()  # nothing ran


def test_a_step_over_its_timeout_prints_one_failed_line(tmp_path):
    proc = _run(sys.executable, "bench/gpu_run.py", "--cpu", "--only", "merge", "--budget-s",
                "2", "--workdir", str(tmp_path))  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "FAILED merge: timed out after 2 s" in proc.stdout
    assert "failed: merge" in proc.stdout


def test_summary_against_the_targets(capsys):
    from bench.gpu_run import gpu_peak, summarize

    train = (
        "  ratio ours/peer [500m] (peer = peer-bf16): 1.72x (per-repeat paired: 1.72)\n"
        "  fraction of bf16 GEMM peak, ours [500m]: 43.5% (430 of 989000 GFLOP/s)\n"
    )
    summarize({"train": train}, 989.0, "NVIDIA H200")
    out = capsys.readouterr().out
    assert "MFU ours: 43.5% of 989 TFLOP/s" in out and "[MISSED: target >= 50%]" in out
    assert "ours / arm (b): 1.72x [ok" in out
    assert gpu_peak("NVIDIA H100 PCIe") == 756.0 and gpu_peak("NVIDIA H200") == 989.0
    assert gpu_peak("NVIDIA H100 80GB HBM3") == 989.0 and gpu_peak("Tesla T4") is None
    assert gpu_peak("NVIDIA H200 NVL") == 835.0 and gpu_peak("NVIDIA GH200 480GB") == 989.0


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] == "Z"  # dead, not yet reaped
    except FileNotFoundError:
        return True


def test_a_timed_out_step_takes_its_whole_process_tree(tmp_path):
    """A step's descendants in sessions of their own (`lorajobs serve`, a torchrun rank) are out
    of reach of killpg: they must not outlive the step and hold the GPU during the next."""
    from bench.gpu_run import Step, run_step

    spawn = (
        "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
        "'import time; time.sleep(120)'], start_new_session=True); print(p.pid, flush=True);"
        " time.sleep(120)"
    )
    ok, why = run_step(
        Step("spawner", 3, [sys.executable, "-c", spawn], "never"), 3, tmp_path / "spawner.log"
    )
    assert not ok and why.startswith("timed out after 3 s")
    grandchild = int((tmp_path / "spawner.log").read_text().split()[0])
    deadline = time.monotonic() + 10  # hang bound: SIGKILL is immediate
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(grandchild)


def test_requirements_are_the_train_and_server_extras_from_pyproject():
    from bench.gpu_run import requirements

    reqs = requirements(ROOT / "pyproject.toml")
    assert "torch==2.13.0" in reqs  # the pin, as the train extra has it
    names = {r.split("[")[0].split(">")[0].split("=")[0].split("<")[0] for r in reqs}
    assert {
        "deepspeed",
        "transformers",
        "peft",
        "fastapi",
        "celery",
        "pydantic",
        "nvidia-ml-py",
    } <= names
    assert "pytest" not in names and "matplotlib" not in names  # dev, plot: not installed
    assert len(reqs) == len(set(reqs))


def test_gpu_sh_dry_run_installs_the_pinned_torch_and_nothing_else_runs(tmp_path):
    proc = _run("bash", "bench/gpu.sh", "--dry-run")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    plan = [ln for ln in proc.stdout.splitlines() if "would run" in ln]
    torch_line = next(ln for ln in plan if "torch==2.13.0 setuptools wheel" in ln)
    deps = next(ln for ln in plan if "deepspeed>=" in ln)
    package = next(ln for ln in plan if ln.endswith(" -e ."))
    assert plan.index(torch_line) < plan.index(deps) < plan.index(package)
    # deepspeed's sdist builds without asking nvcc about CUDA ops, against the torch installed
    assert "DS_ACCELERATOR=cpu" in deps and "--no-build-isolation" in deps
    assert "fastapi>=" in deps and "--ignore-requires-python" not in deps
    # the package itself on any Python >= 3.11 (the project pins 3.11, GPU images carry 3.12)
    assert "--no-deps" in package and "--ignore-requires-python" in package
    assert "--only-binary=:all: flash-attn" in proc.stdout
    assert "bench/gpu_run.py" in proc.stdout  # then the steps
    assert not (ROOT / ".gpu-venv").exists()


def test_gpu_sh_refuses_a_python_older_than_3_11(tmp_path):
    fake = tmp_path / "python3"  # answers as a Python 3.10 would
    fake.write_text(
        '#!/bin/sh\n[ "$1" = -V ] && echo "Python 3.10.13"\n[ "$1" = -c ] && exit 1\nexit 0\n'
    )
    fake.chmod(0o755)
    proc = subprocess.run(
        ["bash", "bench/gpu.sh"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHON": str(fake), "VENV": str(tmp_path / "venv")},
    )
    assert proc.returncode == 1
    assert "FAILED install: Python 3.11 or later needed" in proc.stdout
    assert "Python 3.10.13" in proc.stdout and not (tmp_path / "venv").exists()
