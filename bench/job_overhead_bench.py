"""Job overhead (issue 15): the seconds a job spends around its training loop, ~20M model.

Real processes, as checkpoint_bench.py runs them (tests.servicefixtures.LiveService): the API,
one worker (PostgreSQL + Redis, or SQLite + the embedded broker) and the real trainer, on
train_bench's "small" model (hidden 256, 4 layers, vocab 32000, ~20M parameters) registered by
upload, and its Alpaca-like data (1024 examples, median ~120 tokens). Each job: --steps
optimizer steps of 8 examples, max_seq_length 512, merge "final" (the default: merge, logits
check, verify, upload adapter + merged model). From the job's own records (status events, the
trainer's events file as uploaded, the worker's log):

    head   `running` -> inputs ready (model + dataset in scratch) -> trainer started (forked or
           spawned) -> workflow entered (its `preparing` stage) -> training started -> step 1
    tail   the last step -> training returned (adapter saved) -> merged (+ logits checked) ->
           finished (verified) -> trainer exited -> outputs uploaded -> `succeeded`

`head` counts step 1's own compute; `head - step` (less the median step) is the overhead.

Arms, each --repeats times (medians printed), one worker per arm:

    prewarm-new     the pre-warmed zygote, a dataset never tokenised here (a new upload)
    prewarm-cached  the pre-warmed zygote, the same dataset again (the tokenised cache hits)
    cold            a worker with trainer_prewarm off (`python -m lora_core run` per job) on
                    the cached dataset: the baseline in the same run

--phases adds the trainer's own preparation, timed in a fresh interpreter after the zygote's
preload (what a forked trainer does): tokenise (cache miss, then hit), load the model, build
the Trainer. Target (issue 15): head and tail each < 3 s on the pre-warmed path.

    .venv/bin/python bench/job_overhead_bench.py [--repeats 3] [--steps 10] [--backend sqlite]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import train_bench  # noqa: E402 - after the path insert
from bench.checkpoint_bench import _job_events, _ts, _uploaded_events, cpu_flags  # noqa: E402

DATASET_STEPS = 64  # train_bench's data for 64 steps: 1024 Alpaca-like examples to tokenise
ARMS = ("prewarm-new", "prewarm-cached", "cold")
HEAD = ("inputs_ready", "trainer_started", "workflow_entered", "training_started", "first_step",
        "head_less_step")
MAX_SEQ_LENGTH = 512  # a step of ~1-2 s on the loaded box: step 1 weighs little in `head`
TAIL = ("training_returned", "merged", "finished", "trainer_exited", "uploaded", "succeeded")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _log_time(log: str, job_id: str, needle: str) -> float | None:
    """When the worker logged `needle` about `job_id` (logging's asctime, this machine's zone)."""
    for line in log.splitlines():
        if job_id in line and needle in line:
            m = LOG_TIME.match(line)
            if m:
                return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def timeline(client: Any, log: str, job_id: str) -> dict[str, float | None]:
    """Seconds from `running` to each head mark, and from the last step to each tail mark."""
    rows = _job_events(client, job_id)
    status = {e["data"].get("to"): _ts(e["created_at"]) for e in rows if e["type"] == "status"}
    trainer = _uploaded_events(client, job_id)
    stages = {e["stage"]: e["time"] for e in trainer if e["type"] == "stage"}
    steps = [e for e in trainer if e["type"] == "progress"]
    first = steps[0]["time"]
    last = steps[-1]["time"]
    merged = [e["time"] for e in trainer if e["type"] == "merged"]
    finished = next(e["time"] for e in trainer if e["type"] == "finished")
    t0 = status["running"]
    head = {"inputs_ready": _log_time(log, job_id, "inputs ready"),
            "trainer_started": _log_time(log, job_id, "trainer pid")
            or _log_time(log, job_id, "starting trainer"),
            "workflow_entered": stages.get("preparing"),
            "training_started": stages.get("training"), "first_step": first}
    tail = {"training_returned": stages.get("saving"),
            "merged": merged[-1] if merged else None, "finished": finished,
            "trainer_exited": _log_time(log, job_id, "trainer exited"),
            "uploaded": _log_time(log, job_id, "outputs uploaded"),
            "succeeded": status.get("succeeded")}
    out: dict[str, float | None] = {k: None if v is None else round(v - t0, 3)
                                    for k, v in head.items()}
    out.update({k: None if v is None else round(v - last, 3) for k, v in tail.items()})
    out["training_loop"] = round(last - first, 3)
    out["steps"] = len(steps)
    step = statistics.median(b["time"] - a["time"] for a, b in zip(steps, steps[1:], strict=False))
    out["step"] = round(step, 3)
    out["head_less_step"] = round(first - t0 - step, 3)
    return out


def phases(model_dir: Path, train: Path, workdir: Path) -> dict[str, float]:
    """The trainer's preparation, step by step, in this (fresh) interpreter after the zygote's
    preload: what a forked trainer does between `preparing` and `training`."""
    from lorajobs.worker.runspec import FORK_SAFE_ENV
    from lorajobs.worker.zygote import preload

    os.environ.update({**FORK_SAFE_ENV, "LORAJOBS_TOKEN_CACHE": str(workdir / "token-cache")})
    out: dict[str, float] = {}

    def timed(name: str, fn: Any, *a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        value = fn(*a, **k)
        out[name] = round(time.perf_counter() - t, 3)
        return value

    timed("preload (the zygote's)", preload)
    from lora_core.spec import RunSpec
    from lora_core.training import trainer

    spec = RunSpec(model_dir=model_dir, train_file=train, output_dir=workdir / "out",
                   lora={"r": 16, "alpha": 16},
                   training={"max_steps": 10, "batch_size": 8, "gradient_accumulation_steps": 1,
                             "max_seq_length": MAX_SEQ_LENGTH, "seed": 1})
    timed("validate model", trainer.validate_model, spec)
    timed("tokenise (cache miss)", trainer.prepare_data, spec)
    data = timed("tokenise (cache hit)", trainer.prepare_data, spec)
    collator = trainer._collator(spec, data.tokenizer)
    args = timed("training arguments", trainer.build_training_args, spec,
                 trainer.resolve_precision("auto"), has_eval=False,
                 packing=trainer._is_flattening(collator))
    model = timed("load model + LoRA", trainer._load_model, spec, trainer.args_precision(args))
    timed("build the Trainer", trainer._trainer_class(), model=model, args=args,
          train_dataset=data.train, data_collator=collator, processing_class=data.tokenizer)
    return out


def run_phases(model_dir: Path, train: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="overhead-phases-") as tmp:
        proc = subprocess.run([sys.executable, __file__, "--phases-child", str(model_dir),
                               str(train), tmp], capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(train_bench.RESULT_TAG):
            return dict(json.loads(line[len(train_bench.RESULT_TAG):]))
    raise SystemExit(f"phases failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 2) if values else None


def report(results: dict[str, list[dict[str, Any]]]) -> None:
    print(f"\n{'mark (median s)':<34}" + "".join(f"{arm:>16}" for arm in results))
    for label, keys in (("from `running` to", HEAD), ("from the last step to", TAIL)):
        print(label)
        for key in keys:
            print(f"  {key:<32}" + "".join(f"{_median(rows, key) or float('nan'):>16.2f}"
                                          for rows in results.values()))
    print(f"{'median step':<34}" + "".join(f"{_median(rows, 'step') or float('nan'):>16.2f}"
                                          for rows in results.values()))
    print(f"{'training loop (step 1 -> last)':<34}"
          + "".join(f"{_median(rows, 'training_loop') or float('nan'):>16.2f}"
                    for rows in results.values()))
    base = results.get("cold")
    for arm, rows in results.items():
        head, tail = _median(rows, "first_step"), _median(rows, "succeeded")
        loop = _median(rows, "training_loop")
        ratio = ""
        if base and arm != "cold":
            ratio = (f"; vs cold: head {head / _median(base, 'first_step'):.2f}x, "
                     f"tail {tail / _median(base, 'succeeded'):.2f}x")
        print(f"{arm}: head {head} s, tail {tail} s, training loop {loop} s "
              f"(head + tail = {((head or 0) + (tail or 0)) / (loop or 1):.2f}x the loop){ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--backend", default="postgresql", choices=["postgresql", "sqlite"])
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lorajobs-overhead-bench"))
    parser.add_argument("--phases", action="store_true", help="time the trainer's preparation")
    parser.add_argument("--phases-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phases_child:
        out = phases(*(Path(p) for p in args.phases_child))
        print(train_bench.RESULT_TAG + json.dumps(out), flush=True)
        return
    arms = [a for a in args.arms.split(",") if a]

    import httpx

    from tests.servicefixtures import LiveService, wait_for

    print(f"CPU flags: {cpu_flags()}; cores {os.cpu_count()}; load {os.getloadavg()}")
    model_dir, train, _ = train_bench.build_workdir(args.workdir, "small", DATASET_STEPS)
    if args.phases:
        for i in range(args.repeats):
            print(f"phases #{i + 1}: load {os.getloadavg()[0]:.2f} "
                  + json.dumps(run_phases(model_dir, train)), flush=True)
    lines = train.read_text().splitlines(keepends=True)
    tmp = Path(tempfile.mkdtemp(prefix="overhead-bench-"))
    svc = LiveService(tmp, args.backend, trainer=None, trainer_threads=None,
                      lease_seconds=30, lease_renew_seconds=2, worker_poll_seconds=0.1)
    env = {"LORAJOBS_TOKEN_CACHE": str(tmp / "token-cache")}
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        svc.migrate()
        client = httpx.Client(base_url=svc.start_api(), timeout=120,
                              headers={"Authorization": f"Bearer {svc.admin_key}"})
        files = [("files", (p.name, p.read_bytes())) for p in sorted(model_dir.iterdir())
                 if p.is_file()]
        r = client.post("/v1/models", data={"name": "m20"}, files=files)
        assert r.status_code == 201, r.text
        uploads = 0

        def dataset() -> str:
            nonlocal uploads  # rotated lines: other bytes (a cache miss), the same examples
            uploads += 1
            body = "".join(lines[uploads:] + lines[:uploads]).encode()
            r = client.post("/v1/datasets", files={"file": (f"t{uploads}.jsonl", body)})
            assert r.status_code == 201, r.text
            return str(r.json()["id"])

        def run_job(name: str, ds: str) -> dict[str, Any]:
            r = client.post("/v1/jobs", json={
                "base_model": "m20", "training_file": ds, "lora": {"r": 16, "alpha": 16},
                "training": {"max_steps": args.steps, "batch_size": 8,
                             "gradient_accumulation_steps": 1, "logging_steps": 1,
                             "max_seq_length": MAX_SEQ_LENGTH, "learning_rate": 1e-4,
                             "seed": 1}})
            assert r.status_code == 201, r.text
            job_id = str(r.json()["id"])

            def done() -> bool:
                status = client.get(f"/v1/jobs/{job_id}").json()["status"]
                assert status in ("queued", "running", "succeeded"), (status, svc.log(name))
                return status == "succeeded"

            wait_for(done, timeout=900, interval=0.2, what=f"job {job_id}")
            return timeline(client, svc.log(name), job_id)

        cached, filled = dataset(), False
        for arm in arms:
            name = f"worker-{arm}"
            prewarm = "0" if arm == "cold" else "1"
            worker = svc.start_worker(name, env={**env, "LORAJOBS_TRAINER_PREWARM": prewarm})
            if prewarm == "1":
                wait_for(lambda n=name: "trainer zygote" in svc.log(n)
                         and "ready (preloaded" in svc.log(n), timeout=120, what="zygote")
            rows = results.setdefault(arm, [])
            for i in range(args.repeats):
                if arm != "prewarm-new" and not filled:
                    run_job(name, cached)  # tokenises it once: the cached arms hit
                    filled = True
                row = run_job(name, dataset() if arm == "prewarm-new" else cached)
                rows.append(row)
                print(f"{arm} #{i + 1}: load {os.getloadavg()[0]:.2f} " + json.dumps(row),
                      flush=True)
            svc.stop(worker)
        report(results)
    finally:
        svc.close()


if __name__ == "__main__":
    main()
