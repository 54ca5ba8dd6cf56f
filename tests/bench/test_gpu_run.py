"""bench/gpu.sh and bench/gpu_run.py without a GPU: the plan, a step's timeout line, the MFU
summary, and gpu.sh's install plan (--dry-run). The steps themselves run on a GPU only."""

from __future__ import annotations

import subprocess
import sys
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

    train = ("  ratio ours/peer [500m] (peer = peer-bf16): 1.72x (per-repeat paired: 1.72)\n"
             "  fraction of bf16 GEMM peak, ours [500m]: 43.5% (430 of 989000 GFLOP/s)\n")
    summarize({"train": train}, 989.0, "NVIDIA H200")
    out = capsys.readouterr().out
    assert "MFU ours: 43.5% of 989 TFLOP/s" in out and "[MISSED: target >= 50%]" in out
    assert "ours / arm (b): 1.72x [ok" in out
    assert gpu_peak("NVIDIA H100 PCIe") == 756.0 and gpu_peak("NVIDIA H200") == 989.0
    assert gpu_peak("NVIDIA H100 80GB HBM3") == 989.0 and gpu_peak("Tesla T4") is None


def test_gpu_sh_dry_run_installs_the_pinned_torch_and_nothing_else_runs(tmp_path):
    proc = _run("bash", "bench/gpu.sh", "--dry-run")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "torch==2.13.0" in proc.stdout and ".[train,server]" in proc.stdout
    assert "--only-binary=:all: flash-attn" in proc.stdout
    assert "bench/gpu_run.py" in proc.stdout  # then the steps
    assert not (ROOT / ".gpu-venv").exists()
