"""bench/gpu.sh's checks, each with its own timeout and one clear line when it fails.

    train   bench/train_bench.py --gpu: arm (b) the tuned peer (PEFT + HF Trainer, dynamic
            padding, length grouping, bf16) vs arm (c) ours, ~0.5B Llama-style model built
            locally; MFU = model FLOPs/s over the GPU's dense bf16 datasheet peak
    job     the service end to end: `lorajobs serve` (embedded: SQLite, no Redis), register the
            same model, upload the data, submit a bf16 job, watch it succeed: the worker's
            pre-warmed trainer on CUDA, the adapter merged and verified layer by layer
    zero3   `torchrun --nproc_per_node 1 -m lora_core run` with distributed.zero_stage 3 (NCCL):
            DeepSpeed partitions, the whole adapter is gathered on save and merges
    merge   bench/merge_bench.py: our out-of-core merge of the 672M bf16 model, then the
            layer-by-layer and the whole-model verification (same logits diff, RSS, time)

    python bench/gpu_run.py                 # on the GPU machine (bench/gpu.sh installs first)
    python bench/gpu_run.py --dry-run       # the plan: commands, timeouts, the peak in use
    python bench/gpu_run.py --cpu           # every step at toy size on CPU (minutes)

A failing or timed-out step prints `FAILED <step>: <why>` and the run goes on; the exit status
is the number of failed steps. Each step's timeout is cut to what is left of the run's budget.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense bf16 tensor-core peaks, TFLOP/s (NVIDIA datasheets, without sparsity), matched in
# order against torch.cuda.get_device_name(): the first key contained in the name wins.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0,
                    "A100": 312.0, "L40S": 362.0}  # fmt: skip
RUN_BUDGET_S = 300  # steps only; gpu.sh's install (< 180 s) comes before: 8 minutes in all
TARGET_MFU, TARGET_RATIO = 0.50, 1.5  # issue 15, item 3: ours on the ~0.5B model


@dataclass
class Step:
    name: str
    timeout_s: int
    cmd: list[str]
    expect: str  # a line the step must print when it worked


def gpu_peak(name: str) -> float | None:
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def plan(work: Path, cpu: bool, peak: float) -> list[Step]:
    py = sys.executable
    bench = ROOT / "bench"
    if cpu:  # toy sizes: the same code paths, minutes on 2 cores
        train = [py, str(bench / "train_bench.py"), "--quick", "--arms", "peer-bf16,ours",
                 "--workdir", str(work / "train")]  # fmt: skip
        merge_size, model_dir = "small", work / "train" / "model-quick"
    else:
        train = [py, str(bench / "train_bench.py"), "--gpu", "--steps", "30", "--repeats", "1",
                 "--peak-tflops", str(peak), "--workdir", str(work / "train")]  # fmt: skip
        merge_size, model_dir = "full", work / "train" / "model-500m"
    data = sorted((work / "train").glob("data-*/train.jsonl"))
    train_file = str(data[0]) if data else str(work / "train" / "data-*" / "train.jsonl")
    steps = "3" if cpu else "20"
    me = [py, str(Path(__file__).resolve())]
    return [
        Step("train", 110 if cpu else 150, train, "ratio ours/peer"),
        Step("job", 240 if cpu else 90, [*me, "--step", "job", str(model_dir), train_file,
                                         steps, str(work / "job")], "job succeeded"),
        Step("zero3", 240 if cpu else 75, [*me, "--step", "zero3", str(model_dir), train_file,
                                           steps, str(work / "zero3")], "zero3 completed"),
        Step("merge", 200 if cpu else 90,
             [py, str(bench / "merge_bench.py"), "--size", merge_size, "--repeats", "1",
              "--arms", "ours,verify-layers,verify-whole", "--workdir", str(work / "merge")],
             "layers peak RSS"),
    ]  # fmt: skip


def run_step(step: Step, timeout_s: float, log: Path) -> tuple[bool, str]:
    """Run one step, stream its output to the console and `log`; (ok, the reason if not)."""
    t0 = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(step.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=ROOT, start_new_session=True)  # fmt: skip
        assert proc.stdout is not None
        out: list[str] = []
        try:
            deadline = t0 + timeout_s
            for line in _lines_until(proc, deadline):
                fh.write(line)
                out.append(line)
                if not line.startswith(("Loading weights", "Writing model shards")):
                    print(f"  [{step.name}] {line}", end="", flush=True)
        except TimeoutError:
            os.killpg(proc.pid, 9)
            proc.wait()
            return False, f"timed out after {timeout_s:.0f} s (log: {log})"
    status = proc.wait()
    if status != 0:
        return False, f"exit status {status} (log: {log}; last line: {_last(out)})"
    if not any(step.expect in line for line in out):
        return False, f"no {step.expect!r} line in its output (log: {log})"
    return True, f"{time.monotonic() - t0:.0f} s"


def _lines_until(proc: subprocess.Popen[str], deadline: float) -> Any:
    """The child's output lines; TimeoutError once `deadline` passes (checked every 0.5 s)."""
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        if sel.select(timeout=min(left, 0.5)):
            line = proc.stdout.readline()
            if not line:
                return
            yield line


def _last(out: list[str]) -> str:
    lines = [ln.strip() for ln in out if ln.strip()]
    return lines[-1][:200] if lines else "(no output)"


def summarize(outputs: dict[str, str], peak: float, device: str) -> None:
    """MFU and ratio lines against the targets, from the train step's output."""
    text = outputs.get("train", "")
    mfu = re.search(r"fraction of bf16 GEMM peak, ours \[\w+\]: ([\d.]+)%", text)
    ratio = re.search(r"ratio ours/peer \[\w+\] \(peer = [\w-]+\): ([\d.]+)x", text)
    if mfu:
        value = float(mfu.group(1)) / 100
        ok = "ok" if value >= TARGET_MFU else "MISSED"
        print(
            f"MFU ours: {value:.1%} of {peak:.0f} TFLOP/s dense bf16 ({device}) "
            f"[{ok}: target >= {TARGET_MFU:.0%}]"
        )
    if ratio:
        value = float(ratio.group(1))
        ok = "ok" if value >= TARGET_RATIO else "MISSED"
        print(f"ours / arm (b): {value:.2f}x [{ok}: target >= {TARGET_RATIO}x]")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    ap.add_argument("--cpu", action="store_true", help="toy sizes on CPU (tests the script)")
    ap.add_argument("--only", help="comma list of steps to run (default: all)")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help=f"seconds for all steps (default {RUN_BUDGET_S}; --cpu: no limit)",
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lorajobs-gpu-run"))
    ap.add_argument("--step", choices=["job", "zero3"], help=argparse.SUPPRESS)
    ap.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.step:
        from bench.gpu_steps import STEPS

        STEPS[a.step](*a.args)
        return 0
    device, peak = _device(a.cpu)
    print(
        f"device: {device} | dense bf16 peak {peak:.0f} TFLOP/s | python {sys.version.split()[0]}"
    )
    a.workdir.mkdir(parents=True, exist_ok=True)
    budget = a.budget_s if a.budget_s is not None else (1e9 if a.cpu else RUN_BUDGET_S)
    start, failed, outputs = time.monotonic(), [], {}
    names = [s.name for s in plan(a.workdir, a.cpu, peak)]
    for name in a.only.split(",") if a.only else names:
        step = next(s for s in plan(a.workdir, a.cpu, peak) if s.name == name)  # paths exist now
        left = budget - (time.monotonic() - start)
        timeout = min(step.timeout_s, left)
        print(f"== {step.name}: timeout {timeout:.0f} s: {' '.join(step.cmd)}", flush=True)
        if a.dry_run:
            continue
        if timeout <= 0:
            failed.append(step.name)
            print(f"FAILED {step.name}: no time left in the {budget:.0f} s budget", flush=True)
            continue
        log = a.workdir / f"{step.name}.log"
        ok, why = run_step(step, timeout, log)
        outputs[step.name] = log.read_text() if log.exists() else ""
        if ok:
            print(f"PASSED {step.name} ({why})", flush=True)
        else:
            failed.append(step.name)
            print(f"FAILED {step.name}: {why}", flush=True)
    if not a.dry_run:
        summarize(outputs, peak, device)
        total = time.monotonic() - start
        print(f"steps: {len(names) - len(failed) if not a.only else '-'} passed, failed: "
              f"{', '.join(failed) or 'none'}; {total:.0f} s")  # fmt: skip
    return len(failed)


def _device(cpu: bool) -> tuple[str, float]:
    import torch

    if cpu or not torch.cuda.is_available():
        if not cpu:
            raise SystemExit("FAILED env: torch sees no CUDA device (use --cpu to test on CPU)")
        return "CPU (toy sizes: no MFU)", float(BF16_PEAK_TFLOPS["H200"])
    name = torch.cuda.get_device_name(0)
    peak = gpu_peak(name)
    if peak is None:
        print(f"unknown GPU {name!r}: MFU against the H200's peak", flush=True)
        peak = BF16_PEAK_TFLOPS["H200"]
    return f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}", peak


if __name__ == "__main__":
    sys.exit(main())
