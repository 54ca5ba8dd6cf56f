"""Thread-count benchmark: the trainer pinned at 2 threads, pinned at 1, and tuned by measurement
(lora_core.training.thread_tuner), on a quiet machine and beside busy neighbours.

    pinned-N   OMP_NUM_THREADS=N in the trainer's environment (Settings.trainer_threads = N)
    tuned      no OMP_NUM_THREADS, LORAJOBS_THREAD_TUNING=on (Settings.trainer_thread_tuning,
               opt-in): the tuner measures 1 and 2 threads and keeps the faster, re-measuring
               as it trains

Conditions: "quiet" (whatever else runs on the machine: the load is printed) and "busy" with
--neighbours busy-loop processes started by this script for the arms of that condition (the
shared, oversubscribed box of bench/README.md's training benchmark, made repeatable).
Arms run interleaved, each in a fresh child (`lora_core.training.trainer.train` on
train_bench's "body" shape, Llama-3.1-8B-like, precision auto), conditions alternate per
repeat and the arm order rotates. Figure: useful (loss-bearing) tokens/s from the end of the
first optimizer step (warm-up in every arm) to the end of the last, so the tuner's probing is
inside the timed window (every arm trains on the same steps: a run of 12 pinned steps beside
40 tuned ones timed other examples); CPU ms per useful token of the child; the tuner's
switches as it reported them ("warning" events). Ratios per condition: tuned / best pinned,
tuned / pinned-2 (target: tuned >= 0.9x the best pinned in both).

    .venv/bin/python bench/thread_bench.py          # 40 steps per arm, 3 neighbours
    .venv/bin/python bench/thread_bench.py --steps 60 --repeats 2 --neighbours 4
    .venv/bin/python bench/thread_bench.py --quick  # smoke: tiny model, 6 steps
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import train_bench as tb  # noqa: E402 - the shapes, data and helpers of the training bench

ARMS = {"pinned-2": "2", "pinned-1": "1", "tuned": None}  # arm -> OMP_NUM_THREADS
TARGET = 0.9  # tuned / best pinned, in every condition
# A smaller batch than train_bench's 8 x 2: ~1 s steps on 2 quiet cores, so a run holds dozens
# of steps (the tuner's first round takes ~5) in a minute or two per arm.
BATCH, ACCUM = 4, 1
BUSY_LOOP = "while True:\n    pass\n"
RESULT_TAG = "RESULT "


def child(model_dir: Path, train: Path, steps: int, out: Path) -> dict[str, Any]:
    """One arm: train() exactly as the service runs it, progress logged every step."""
    import torch

    from lora_core.spec import RunSpec
    from lora_core.training.trainer import train as lc_train

    marks: list[tuple[float, int, float]] = []
    switches: list[str] = []

    def on_event(type_: str, **f: Any) -> None:
        if type_ == "progress":
            marks.append((time.perf_counter(), f["tokens_seen"], tb._cpu_s()))
        elif type_ == "warning" and f["message"].startswith("threads "):
            switches.append(f"step {len(marks)}: {f['message']}")

    spec = RunSpec(
        model_dir=model_dir, train_file=train, output_dir=out, merge="none",
        lora={"r": tb.LORA_R, "alpha": tb.LORA_ALPHA, "dropout": tb.LORA_DROPOUT,
              "target_modules": tb.LORA_TARGETS},
        training={"max_steps": steps, "batch_size": BATCH, "gradient_accumulation_steps": ACCUM,
                  "learning_rate": tb.LR, "seed": tb.SEED, "max_seq_length": tb.MAX_LEN,
                  "logging_steps": 1, "save_steps": steps})
    start_threads = torch.get_num_threads()
    lc_train(spec, on_event=on_event)
    (t_a, n_a, c_a), (t_b, n_b, c_b) = marks[0], marks[-1]  # end of step 1 .. end of the last
    return {"tokens_per_s": (n_b - n_a) / (t_b - t_a), "cpu_ms_per_token":
            (c_b - c_a) / (n_b - n_a) * 1e3, "seconds": t_b - t_a, "steps": len(marks) - 1,
            "start_threads": start_threads, "switches": switches}


def run_arm(arm: str, paths: tuple[Path, Path], steps: int, out: Path) -> dict[str, Any]:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LORAJOBS_THREAD_TUNING")}
    env.update(PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false",
               LORAJOBS_TOKEN_CACHE="off")
    if ARMS[arm] is not None:
        env.update(OMP_NUM_THREADS=ARMS[arm], MKL_NUM_THREADS=ARMS[arm])
    else:
        env.update(LORAJOBS_THREAD_TUNING="on")  # opt-in (Settings.trainer_thread_tuning)
    cmd = [sys.executable, __file__, "--child", "--model-dir", str(paths[0]), "--train",
           str(paths[1]), "--steps", str(steps), "--out", str(out)]
    load0 = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode or not lines:
        sys.exit(f"arm {arm} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len(RESULT_TAG):])
    result["load"] = (load0, os.getloadavg()[0])
    return result


class Neighbours:
    """`n` busy-loop processes (pure Python spinning: one runnable thread each), ended by pid."""

    def __init__(self, n: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(n)]

    def __enter__(self) -> Neighbours:
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def bench(steps: int, repeats: int, neighbours: int, workdir: Path, model: str,
          arms: list[str], busy_only: bool = False) -> None:
    tb.BATCH, tb.ACCUM = BATCH, ACCUM  # build_workdir sizes the data as steps x batch x accum
    paths = tb.build_workdir(workdir / f"b{BATCH}x{ACCUM}", model, steps)[:2]
    conditions = {"quiet": 0, f"busy({neighbours})": neighbours}
    if busy_only:
        del conditions["quiet"]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {c: {a: [] for a in arms}
                                                            for c in conditions}
    print(f"model {model}, {steps} steps of {BATCH} x {ACCUM}, {os.cpu_count()} CPUs, "
          f"cpu flags {tb.cpu_flags()}", flush=True)
    for rep in range(repeats):
        order = list(conditions) if rep % 2 == 0 else list(reversed(conditions))
        for cond in order:
            with Neighbours(conditions[cond]):
                for arm in arms[rep % len(arms):] + arms[:rep % len(arms)]:
                    r = run_arm(arm, paths, steps, workdir / "runs" / f"{cond}-{arm}")
                    results[cond][arm].append(r)
                    print(f"  rep {rep} {cond:9} {arm:9} {r['steps'] + 1:3} steps"
                          f" {r['tokens_per_s']:7.1f} useful tok/s"
                          f"  {r['cpu_ms_per_token']:6.2f} CPU ms/tok  {r['seconds']:6.1f} s"
                          f"  load {r['load'][0]:.1f}->{r['load'][1]:.1f}  "
                          + "; ".join(r["switches"]), flush=True)
    print(f"\n{'condition':12} " + " ".join(f"{a:>9}" for a in ARMS)
          + "  tuned/best  tuned/2thr  load")
    for cond, by_arm in results.items():
        tps = {a: statistics.median(r["tokens_per_s"] for r in rs) for a, rs in by_arm.items()}
        loads = [x for rs in by_arm.values() for r in rs for x in r["load"]]
        best = max((tps[a] for a in ("pinned-2", "pinned-1") if a in tps), default=math.nan)
        ratio = tps.get("tuned", math.nan) / best
        print(f"{cond:12} " + " ".join(f"{tps.get(a, math.nan):9.1f}" for a in ARMS)
              + f"  {ratio:9.2f}x{'' if ratio >= TARGET else '!'}"
              + f"  {tps.get('tuned', math.nan) / tps.get('pinned-2', math.nan):9.2f}x"
              + f"  {min(loads):.1f}-{max(loads):.1f}")
    print(f"(useful tok/s, median of {repeats}; '!' = below the {TARGET}x target; "
          f"cpu flags {tb.cpu_flags()})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per arm")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--neighbours", type=int, default=3,
                   help="busy-loop processes beside the arms of the busy condition")
    p.add_argument("--quick", action="store_true", help="tiny model, 6 steps: a smoke test")
    p.add_argument("--arms", default=",".join(ARMS), help="comma list of " + ", ".join(ARMS))
    p.add_argument("--busy-only", action="store_true", help="skip the quiet condition")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lorajobs-thread-bench"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--model-dir", "--train", "--out"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    a = p.parse_args()
    # a SIGTERM unwinds like Ctrl-C: Neighbours ends its busy loops, subprocess.run its arm
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if a.quick:
        tb.use_quick_shape()
    if a.child:
        r = child(Path(a.model_dir), Path(a.train), a.steps, Path(a.out))
        print(RESULT_TAG + json.dumps(r), flush=True)
        return
    if a.quick:
        bench(6, 1, 1, a.workdir, "quick", list(ARMS))
        return
    bench(a.steps, a.repeats, a.neighbours, a.workdir, "body", a.arms.split(","), a.busy_only)


if __name__ == "__main__":
    main()
