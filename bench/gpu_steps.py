"""The `job` and `zero3` steps of bench/gpu_run.py, each run as its own process (its timeout
is the parent's). Each prints one `... succeeded` / `... completed` line with its figures, or
exits non-zero with the reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "bench-model"
LORA = {"r": 16, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def _precision() -> str:
    import torch

    return "bf16" if torch.cuda.is_available() else "fp32"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def job(model_dir: str, train_file: str, steps: str, workdir: str) -> None:
    """Submit one job to an embedded `lorajobs serve` and wait for it; report where the trainer
    came from (the pre-warmed zygote's log line) and the merge's verified logits diff."""
    from lorajobs.client import Client
    from lorajobs.demo import start_service
    from lorajobs.localserver import free_port, stop_server

    work = Path(workdir)
    shutil.rmtree(work, ignore_errors=True)
    data = work / "data"
    (data / "models").mkdir(parents=True)
    # The server refuses a model path that leaves its root (a symlink would): hard links cost
    # no copy where the work dir shares the model's filesystem.
    shutil.copytree(model_dir, data / "models" / MODEL_NAME, copy_function=_link_or_copy)
    port = free_port()
    t0 = time.monotonic()
    proc = start_service(data, port, work / "serve.log")
    print(f"service ready in {time.monotonic() - t0:.1f} s", flush=True)
    try:
        key = (data / "admin_key").read_text().strip()
        with Client(f"http://127.0.0.1:{port}", key) as client:
            client.models.register(MODEL_NAME, MODEL_NAME)
            dataset = client.datasets.upload(Path(train_file))
            t1 = time.monotonic()
            created = client.jobs.create({
                "base_model": MODEL_NAME, "training_file": dataset.id, "lora": LORA,
                "training": {"max_steps": int(steps), "batch_size": 8, "max_seq_length": 1024,
                             "precision": _precision(), "logging_steps": 1},
                "merge": "final",
            })  # fmt: skip
            done = client.jobs.wait(created.id, poll_interval=0.5)
            seconds = time.monotonic() - t1
    finally:
        stop_server(proc)
    log = (work / "serve.log").read_text(errors="replace")
    zygote = [ln for ln in log.splitlines() if "zygote" in ln]
    print("\n".join(zygote[-4:]), flush=True)
    if done.status != "succeeded":
        raise SystemExit(f"job {done.id} ended {done.status}: {done.error}")
    print(
        f"job {done.id}: {steps} steps, submit -> succeeded {seconds:.1f} s, precision "
        f"{_precision()}",
        flush=True,
    )
    if not any("forked from the pre-warmed zygote" in ln for ln in log.splitlines()):
        raise SystemExit(
            "the job succeeded but its trainer started cold, not forked from the "
            f"pre-warmed zygote (serve.log: {work / 'serve.log'})"
        )
    print("job succeeded with the pre-warmed trainer", flush=True)


def zero3(model_dir: str, train_file: str, steps: str, workdir: str) -> None:
    """`torchrun --nproc_per_node 1 -m lora_core run` with ZeRO-3: the run completes, the
    gathered adapter merges and verifies."""
    from lora_core.events import read_events

    work = Path(workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    spec = {
        "model_dir": model_dir, "train_file": train_file, "output_dir": str(work / "out"),
        "lora": LORA,
        "training": {"max_steps": int(steps), "batch_size": 8, "max_seq_length": 1024,
                     "precision": _precision(), "save_steps": int(steps)},
        "distributed": {"num_processes": 1, "zero_stage": 3},
        "merge": "final",
    }  # fmt: skip
    (work / "spec.json").write_text(json.dumps(spec))
    events = work / "events.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "lora_core", "run", "--spec", str(work / "spec.json"), "--events-file",
           str(events)]  # fmt: skip
    t0 = time.monotonic()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    status = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    seconds = time.monotonic() - t0
    found = read_events(events)[0] if events.exists() else []
    last = found[-1] if found else {}
    if status != 0 or last.get("status") != "completed":
        raise SystemExit(f"zero3 run failed: exit {status}, last event {last}")
    merged = next((e for e in found if e["type"] == "merged"), {})
    print(
        f"zero3 completed: {steps} steps in {seconds:.1f} s (imports included), merged "
        f"max |logits diff| {merged.get('max_abs_diff')}",
        flush=True,
    )


STEPS = {"job": job, "zero3": zero3}
