"""Checkpoints on a fleet (issue 12): what a checkpoint costs the training loop when it is
uploaded to an S3 store in the background, and how long a job takes to resume on another node.

Real processes, as tests/reliability/test_fleet.py runs them: API + beat + worker nodes that
share only the database, the broker and an S3 server (moto, started here on a free port); the
real trainer on a ~20M-parameter Llama-style model (train_bench's "small" shapes) registered by
upload, so each node fetches it from the store.

    stall      job 1 on node A, checkpoints every --save-steps steps: the trainer's own save
               time per checkpoint (CheckpointEvent.save_seconds: Trainer's save + adapter export
               + seal) over the median step time, and all saves over the training wall time.
               The upload runs in the worker process meanwhile: the step a checkpoint was saved
               in (less the save) and the steps while an upload is in flight, each over the
               median of the other steps (1.0 = never blocked).
    resume     job 2 on A; A frozen (SIGSTOP: a partitioned node) once a checkpoint is recorded;
               node B (already warm) claims it after the lease expires: claim -> checkpoint
               downloaded and verified -> trainer `started` -> first step after the resume
               (B's model cache is cold: the base model is fetched from the store too).

    .venv/bin/python bench/checkpoint_bench.py                 # the figures of bench/README.md
    .venv/bin/python bench/checkpoint_bench.py --quick         # small vocab, few steps
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=688)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in CPU_FLAGS if f in have) or "(none of " + \
                    ", ".join(CPU_FLAGS) + ")"
    except OSError:
        pass
    return "unknown"


def _events(root: Path, job_id: str) -> list[dict[str, Any]]:
    out = []
    for f in sorted((root / "scratch" / "jobs" / job_id / "run").glob("events-*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def _job_events(client: Any, job_id: str) -> list[dict[str, Any]]:
    return list(client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"])


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def stall_figures(events: list[dict[str, Any]], recorded: dict[int, float]) -> dict[str, Any]:
    """From the trainer's events (wall times) and when each checkpoint was recorded."""
    progress = [(e["step"], e["time"]) for e in events if e["type"] == "progress"]
    saves = {e["step"]: e for e in events if e["type"] == "checkpoint"}
    steps = []  # (previous step, seconds, save before it, upload in flight during it)
    for (s0, t0), (_, t1) in zip(progress, progress[1:], strict=False):
        uploading = any(saves[c]["time"] <= t1 and recorded.get(c, float("inf")) >= t0
                        for c in saves)
        steps.append((s0, t1 - t0, s0 in saves, uploading))
    plain = [d for _, d, saved, up in steps if not saved and not up]
    during = [d for _, d, saved, up in steps if not saved and up]
    # a checkpoint's own step: its interval less the trainer's save = the step's compute, run
    # while the worker snapshots and (mostly) uploads that checkpoint
    beside = [d - float(saves[s0].get("save_seconds") or 0.0)
              for s0, d, saved, _ in steps if saved]
    step_s = statistics.median(plain or [d for _, d, _, _ in steps])
    save_s = [float(e.get("save_seconds") or 0.0) for e in saves.values()]
    wall = progress[-1][1] - progress[0][1] if len(progress) > 1 else float("nan")
    return {"steps": len(progress), "checkpoints": len(saves),
            "median_step_s": round(step_s, 4),
            "mean_save_s": round(statistics.mean(save_s), 4) if save_s else None,
            "stall_per_checkpoint_in_steps": round(statistics.mean(save_s) / step_s, 3)
            if save_s else None,
            "stall_fraction_of_training": round(sum(save_s) / wall, 4) if save_s else None,
            "median_step_during_upload_s": round(statistics.median(during), 4)
            if during else None,
            "step_during_upload_ratio": round(statistics.median(during) / step_s, 3)
            if during else None,
            "steps_during_upload": len(during),
            "checkpoint_step_less_save_s": round(statistics.median(beside), 4)
            if beside else None,
            "checkpoint_step_less_save_ratio": round(statistics.median(beside) / step_s, 3)
            if beside else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="vocab 8192, 24 steps")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--backend", default="postgresql", choices=["postgresql", "sqlite"])
    args = parser.parse_args()
    steps = 24 if args.quick else args.steps
    save_steps = 6 if args.quick else args.save_steps

    import httpx
    import psutil
    from sqlalchemy import select

    from lora_core.model_files.tiny import make_tiny_model
    from lorajobs.core.db import get_sessionmaker
    from lorajobs.core.tables import Checkpoint
    from tests.client.live import alpaca_records
    from tests.s3fixtures import AWS_ENV, S3Target, start_s3_server
    from tests.servicefixtures import LiveService, wait_for

    os.environ.update(AWS_ENV)
    print(f"CPU flags: {cpu_flags()}; cores {os.cpu_count()}")
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    s3 = S3Target(start_s3_server(tmp, buckets=("bench",)), "bench")
    model_dir = make_tiny_model(tmp / "model", seed=0, vocab_size=8192 if args.quick else 32000,
                                **SMALL)
    svc = LiveService(tmp, args.backend, trainer=None, **s3.settings(
        lease_seconds=10, lease_renew_seconds=1, reaper_interval_seconds=0.5,
        worker_poll_seconds=0.1, trainer_threads=None))
    nodes = {n: tmp / f"node-{n}" for n in "ab"}

    def node_env(root: Path) -> dict[str, str]:
        return {"LORAJOBS_DATA_DIR": str(root), "LORAJOBS_SCRATCH_DIR": str(root / "scratch"),
                "LORAJOBS_MODEL_CACHE_DIR": str(root / "model-cache")}

    try:
        svc.migrate()
        client = httpx.Client(base_url=svc.start_api(), timeout=120,
                              headers={"Authorization": f"Bearer {svc.admin_key}"})
        svc.start_beat()
        files = [("files", (p.name, p.read_bytes())) for p in sorted(Path(model_dir).iterdir())
                 if p.is_file()]
        assert client.post("/v1/models", data={"name": "m20"}, files=files).status_code == 201
        data = "".join(json.dumps(r) + "\n" for r in alpaca_records(512))
        ds = client.post("/v1/datasets", files={"file": ("t.jsonl", data.encode())}).json()["id"]
        worker_a = svc.start_worker("worker-a", env=node_env(nodes["a"]))

        def submit() -> str:
            r = client.post("/v1/jobs", json={
                "base_model": "m20", "training_file": ds, "lora": {"r": 16, "alpha": 16},
                "training": {"max_steps": steps, "save_steps": save_steps, "batch_size": 8,
                             "max_seq_length": 256, "learning_rate": 1e-4, "seed": 1},
                "merge": "none"})
            assert r.status_code == 201, r.text
            return str(r.json()["id"])

        def done(job_id: str) -> bool:
            status = client.get(f"/v1/jobs/{job_id}").json()["status"]
            assert status in ("queued", "running", "succeeded"), status
            return status == "succeeded"

        job1 = submit()
        wait_for(lambda: done(job1), timeout=1800, interval=0.5, what="job 1")
        recorded = {e["data"]["step"]: _ts(e["created_at"]) for e in _job_events(client, job1)
                    if e["type"] == "checkpoint"}
        # the node's scratch is removed at settle: the trainer's events file, as uploaded
        stall = stall_figures(_uploaded_events(client, job1), recorded)
        print(json.dumps({"stall": stall}, indent=2))

        job2 = submit()
        sessions = get_sessionmaker(svc.settings)

        def first_recorded() -> bool:
            with sessions() as session:
                return session.scalar(select(Checkpoint.step).where(
                    Checkpoint.job_id == job2, Checkpoint.resumable).limit(1)) is not None

        wait_for(first_recorded, timeout=1800, interval=0.05, what="job 2's first checkpoint")
        frozen = [psutil.Process(worker_a.pid), *psutil.Process(worker_a.pid).children(True)]
        for p in frozen:
            p.send_signal(signal.SIGSTOP)
        svc.start_worker("worker-b", env=node_env(nodes["b"]))
        try:
            wait_for(lambda: any(e["type"] == "progress" for e in _events(nodes["b"], job2)),
                     timeout=600, interval=0.05, what="B's first step")
            claimed = [e for e in _job_events(client, job2) if e["type"] == "status"
                       and e["data"].get("to") == "running" and e["data"].get("attempt") == 2]
            b_events = _events(nodes["b"], job2)
            started = next(e for e in b_events if e["type"] == "started")
            first = next(e for e in b_events if e["type"] == "progress")
            t_claim = _ts(claimed[0]["created_at"])
            log_b = svc.log("worker-b")
            ready = re.search(r"inputs ready in ([\d.]+) s \(model \+ dataset ([\d.]+) s, "
                              r"resume point step (\d+) ([\d.]+) s\)", log_b)
            print(json.dumps({"resume_on_another_node": {
                "prepare_s": float(ready.group(1)) if ready else None,
                "model_and_dataset_fetch_s": float(ready.group(2)) if ready else None,
                "checkpoint_fetch_and_verify_s": float(ready.group(4)) if ready else None,
                "trainer_forked_from_zygote": "forked from the pre-warmed zygote" in log_b,
                "resumed_from_step": started.get("resumed_from_step"),
                "claim_to_trainer_started_s": round(started["time"] - t_claim, 2),
                "claim_to_first_step_s": round(first["time"] - t_claim, 2),
                "first_step_after_resume": first["step"]}}, indent=2))
        finally:
            for p in reversed(frozen):
                p.send_signal(signal.SIGCONT)
    finally:
        svc.close()
        s3.server.stop()


def _uploaded_events(client: Any, job_id: str) -> list[dict[str, Any]]:
    arts = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    row = next(a for a in arts if a["kind"] == "log" and a["name"].startswith("events-"))
    body = client.get(f"/v1/jobs/{job_id}/artifacts/{row['id']}", follow_redirects=True).content
    return [json.loads(line) for line in body.decode().splitlines() if line.strip()]


if __name__ == "__main__":
    main()
