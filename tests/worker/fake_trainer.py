#!/usr/bin/env python3
"""A fake trainer child that speaks lora_core's events protocol: a true process boundary.

Invoked exactly like the real one (`<python> -m lora_core run --spec S --events-file E
--stop-file F`): the worker's `trainer_python` points here. It trains nothing: it sleeps per
step, writes checkpoint/adapter/merged directories with small files, resumes from the newest
complete checkpoint, stops cooperatively on the stop file or SIGTERM, and misbehaves on
request. Behaviour comes from `<fake dir>/<job_id>.control.json` (written by the test; the fake
dir is $LORAJOBS_FAKE_TRAINER_DIR, else `<data_dir>/fake-trainer` for the default scratch
layout `<data_dir>/scratch/jobs/<job_id>/run`): the worker removes a job's scratch directory
when the job settles, so what tests read afterwards lives outside it.

    step_seconds   sleep per step (default 0.1)
    crash_at_step  SIGKILL itself when reaching this step ...
    crash_times    ... this many times in total (default 1; counted in the control file)
    error_at_step  emit an error event (user fault) and exit 2
    ignore_stop    ignore the stop file and SIGTERM (the worker must escalate to SIGKILL)

Every start is appended to `<fake dir>/<job_id>.starts`, so tests count training runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

STOP = {"flag": False}


def _emit(fh, type_: str, **fields) -> None:
    fh.write(json.dumps({"type": type_, "time": time.time(), **fields}) + "\n")
    fh.flush()


def _write_adapter(directory: Path, step: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps({"r": 8, "step": step}))
    (directory / "adapter_model.safetensors").write_bytes(os.urandom(256))


def _save_checkpoint(out: Path, step: int) -> Path:
    ckpt = out / "checkpoints" / f"checkpoint-{step}"
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    _write_adapter(tmp / "adapter", step)
    (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp / "COMPLETE").write_text(f"{step}\n")  # sealed, as lora_core's CheckpointCallback
    if ckpt.exists():
        import shutil

        shutil.rmtree(ckpt)
    tmp.rename(ckpt)
    return ckpt


def _newest_checkpoint(out: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*")
             if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").exists()]
    return max(steps, default=0)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", dest="module")
    parser.add_argument("command")
    parser.add_argument("--spec", required=True)
    parser.add_argument("--events-file", required=True)
    parser.add_argument("--stop-file", required=True)
    args = parser.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    out = Path(spec["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    job_id = out.parent.name
    fake_dir = Path(os.environ.get("LORAJOBS_FAKE_TRAINER_DIR")
                    or out.parents[3] / "fake-trainer")
    fake_dir.mkdir(parents=True, exist_ok=True)
    control_file = fake_dir / f"{job_id}.control.json"
    control = json.loads(control_file.read_text()) if control_file.exists() else {}
    training = spec.get("training") or {}
    total = int(training.get("max_steps") or 10)
    save_steps = int(training.get("save_steps") or 2)
    step_seconds = float(control.get("step_seconds", 0.1))
    stop_file = Path(args.stop_file)
    if not control.get("ignore_stop"):
        signal.signal(signal.SIGTERM, lambda *_: STOP.update(flag=True))
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    start = _newest_checkpoint(out) if spec.get("resume", True) else 0
    with open(fake_dir / f"{job_id}.starts", "a") as log:
        log.write(f"{os.getpid()} {start}\n")
    print(f"fake trainer pid {os.getpid()} starting at step {start}", flush=True)
    with open(args.events_file, "a", encoding="utf-8") as ev:
        _emit(ev, "started", total_steps=total, world_size=1, resumed_from_step=start,
              num_examples=4, num_tokens=100)
        _emit(ev, "stage", stage="training")
        for step in range(start + 1, total + 1):
            time.sleep(step_seconds)
            stop = STOP["flag"] or stop_file.exists()
            if stop and not control.get("ignore_stop"):
                ckpt = _save_checkpoint(out, step - 1) if step - 1 > start else None
                if ckpt:
                    _emit(ev, "checkpoint", step=step - 1, path=str(ckpt),
                          adapter_path=str(ckpt / "adapter"), resumable=True)
                _emit(ev, "finished", status="stopped", adapter_path=None, metrics={})
                return 0
            if control.get("crash_at_step") == step and control.get("crash_times", 1) > 0:
                control["crash_times"] = control.get("crash_times", 1) - 1
                control_file.write_text(json.dumps(control))
                os.kill(os.getpid(), signal.SIGKILL)
            if control.get("error_at_step") == step:
                _emit(ev, "error", code="dataset_error", message="line 3: empty output",
                      param="training_file", user_fault=True)
                return 2
            _emit(ev, "progress", step=step, total_steps=total, epoch=step / total,
                  loss=2.0 / step, learning_rate=1e-4, grad_norm=1.0, tokens_per_second=100.0,
                  eta_seconds=(total - step) * step_seconds)
            if step % save_steps == 0 and step < total:
                ckpt = _save_checkpoint(out, step)
                _emit(ev, "checkpoint", step=step, path=str(ckpt),
                      adapter_path=str(ckpt / "adapter"), resumable=True)
        _emit(ev, "stage", stage="saving")
        _write_adapter(out / "adapter", total)
        if spec.get("merge", "final") != "none":
            _emit(ev, "stage", stage="merging")
            merged = out / "merged" / "final"
            merged.mkdir(parents=True, exist_ok=True)
            (merged / "config.json").write_text("{}")
            (merged / "model.safetensors").write_bytes(os.urandom(512))
            _emit(ev, "merged", step=total, path=str(merged), max_abs_diff=0.0,
                  files=["config.json", "model.safetensors"], final=True)
        _emit(ev, "finished", status="completed", adapter_path=str(out / "adapter"),
              metrics={"train_loss": 2.0 / total})
    return 0


if __name__ == "__main__":
    sys.exit(main())
