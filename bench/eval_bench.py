"""Graded generations' cost: the fraction of a job's time spent evaluating (issue 14).

Two arms on the ~20M Llama-style model of train_bench.py ("small": hidden 256, 4 layers, vocab
32000; Alpaca-like data, median ~120 tokens), each in a fresh interpreter, same seed, same data:

    plain    lora_core.workflow.run, no evaluation
    graded   the same run with `evaluation` at its defaults: 32 held-out prompts, greedy,
             max_new_tokens 32, batch 16, one string_check + one rouge_l grader; the base at
             step 0 and every checkpoint (save_steps = steps / CHECKPOINTS)

Printed: each arm's wall time (trainer start to finish, imports excluded), the graded arm's own
evaluation seconds (EvaluationCallback.seconds: generation + grading), the fraction of the
graded run they take, graded / plain wall, and the load average before and after each arm (the
box is shared: read the share, measured within one run, not walls across arms). Target:
evaluation < 10% of the job's time.

    python bench/eval_bench.py [--steps 60] [--repeats 1] [--arms plain,graded] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import train_bench  # noqa: E402 - after the path insert

CHECKPOINTS = 3  # a job saving once per epoch over 3 epochs (the service's default cadence)
RESULT_TAG = "RESULT "
GRADERS = [{"type": "string_check", "name": "exact_match", "operation": "eq",
            "input": "{{sample.output_text}}", "reference": "{{item.reference}}"},
           {"type": "text_similarity", "name": "rouge_l", "evaluation_metric": "rouge_l",
            "input": "{{sample.output_text}}", "reference": "{{item.reference}}"}]


def child(arm: str, model_dir: Path, train: Path, evals: Path, steps: int, out: Path) -> dict:
    import shutil

    from lora_core.spec import RunSpec
    from lora_core.workflow import run

    shutil.rmtree(out, ignore_errors=True)
    spec = RunSpec(
        model_dir=model_dir, train_file=train, validation_file=evals, output_dir=out,
        merge="none",
        lora={"r": train_bench.LORA_R, "alpha": train_bench.LORA_ALPHA,
              "dropout": train_bench.LORA_DROPOUT, "target_modules": train_bench.LORA_TARGETS},
        training={"max_steps": steps, "batch_size": train_bench.BATCH,
                  "gradient_accumulation_steps": train_bench.ACCUM,
                  "learning_rate": train_bench.LR, "seed": train_bench.SEED,
                  "max_seq_length": train_bench.MAX_LEN,
                  "save_steps": max(1, steps // CHECKPOINTS), "logging_steps": 5},
        evaluation={"graders": GRADERS} if arm == "graded" else None)
    t0 = time.perf_counter()
    result = run(spec)
    wall = time.perf_counter() - t0
    return {"arm": arm, "wall_s": wall, "evaluation_s": result.metrics.get("evaluation_seconds"),
            "evaluations": result.metrics.get("evaluations"),
            "eval_loss": result.metrics.get("eval_loss")}


def run_arm(arm: str, paths: tuple[Path, Path, Path], steps: int, workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", arm, "--model-dir", str(paths[0]),
           "--train", str(paths[1]), "--eval", str(paths[2]), "--steps", str(steps),
           "--out", str(workdir / f"out-{arm}")]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise SystemExit(f"{arm} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def _cpu_flags() -> str:
    try:
        flags = next(ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo")
                     if ln.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--arms", default="plain,graded",
                   help="comma-separated, of plain and graded (graded alone: the share only)")
    p.add_argument("--quick", action="store_true", help="8k-vocab model, 6 steps: a smoke test")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lorajobs-eval-bench"))
    p.add_argument("--child", choices=["plain", "graded"], help=argparse.SUPPRESS)
    for flag in ("--model-dir", "--train", "--eval", "--out"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        train_bench.use_quick_shape()
    if a.child:
        r = child(a.child, Path(a.model_dir), Path(a.train), Path(a.eval), a.steps,
                  Path(a.out))
        print(RESULT_TAG + json.dumps(r), flush=True)
        return
    model, steps = ("quick", 6) if a.quick else ("small", a.steps)
    paths = train_bench.build_workdir(a.workdir, model, steps)
    print(f"model {model}, {steps} steps, {CHECKPOINTS} checkpoints; CPU flags: {_cpu_flags()}")
    arms = [arm for arm in ("plain", "graded") if arm in a.arms.split(",")]
    for i in range(a.repeats):
        rows: dict[str, dict[str, Any]] = {}
        for arm in arms:
            load = os.getloadavg()[0]
            r = rows[arm] = run_arm(arm, paths, steps, a.workdir)
            print(f"repeat {i + 1} {arm:<7} wall {r['wall_s']:.1f} s"
                  + (f", evaluation {r['evaluation_s']:.1f} s over {r['evaluations']} "
                     f"evaluations = {r['evaluation_s'] / r['wall_s']:.1%} of the job"
                     if arm == "graded" else "")
                  + f" (load average {load:.1f} -> {os.getloadavg()[0]:.1f})", flush=True)
        if len(rows) == 2:
            ratio = rows["graded"]["wall_s"] / rows["plain"]["wall_s"]
            print(f"  graded / plain wall: {ratio:.3f}")


if __name__ == "__main__":
    main()
