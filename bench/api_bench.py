"""API benchmark: lorajobs endpoints vs a bare FastAPI endpoint, same server settings, same run.

    python bench/api_bench.py [--seconds 10] [--connections 32] [--backend postgresql|sqlite]

Arms (each a uvicorn process, 1 worker, uvloop + httptools, no access log; load from `wrk`):
  bare        GET /bare on a FastAPI app that does nothing (the ceiling for this server)
  get_job     GET /v1/jobs/{id}: auth (key hash lookup) + one job read + the JSON shape
  create_job  POST /v1/jobs with a fresh Idempotency-Key per request: validation against the
              registered model, tenant's dataset, estimate, INSERTs, commit, broker send; its
              dataset has --create-examples records (20,000): the estimate reads the stored
              token count, so the cost does not grow with the file (it re-tokenised it per POST
              before issue 10, item 3: 50-100 req/s with 64 records)
Latencies (real worker, real trainer `python -m lora_core run`, tiny model, idle worker):
  submit -> running   POST answered until the job is claimed and the trainer spawned
  submit -> started   ... until the trainer's first `started` event (torch imported, data ready)
  cancel -> cancelled POST cancel until the trainer exited and the job is `cancelled`

Figures are ratios against `bare` measured in the same run; target: create_job >= 300 req/s
on PostgreSQL. Needs `wrk` (apt-get install wrk),
PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 for the postgresql backend.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from lorajobs.localserver import ServerStartError, free_port, http_ok, start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_DB_URL = "redis://127.0.0.1:6379/13"  # a db number the test suite does not claim first
WRK_THREADS = 2
LATENCY_REPEATS = 3
CREATE_TARGET_RPS = 300  # issue 10, item 3 (PostgreSQL)
BARE_APP = '''
from fastapi import FastAPI
app = FastAPI()
@app.get("/bare")
def bare():
    return {"id": "job_x", "object": "job", "status": "queued"}
'''
# Keys unique per wrk thread: each thread has its own Lua state with the same random seed, so
# keys from math.random repeated across threads and half the POSTs were idempotent replays.
POST_LUA = '''
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
counter = 0
request = function()
  counter = counter + 1
  local key = string.format("bench-%d-%d", tid, counter)
  return wrk.format("POST", "/v1/jobs",
    {["Authorization"] = "Bearer KEY", ["Content-Type"] = "application/json",
     ["Idempotency-Key"] = key}, BODY)
end
'''


def make_database(backend: str, work: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{work / 'lorajobs.db'}"
    from sqlalchemy import create_engine, text

    name = f"lorajobs_bench_{secrets.token_hex(4)}"
    engine = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


def drop_database(url: str) -> None:
    if not url.startswith("postgresql"):
        return
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    engine.dispose()


def seed(env: dict[str, str], work: Path, create_examples: int) -> tuple[str, str, str, str]:
    """Migrate; create a tenant + key, the tiny model, two datasets (64 records for the latency
    arm, `create_examples` for create_job) and one job. -> (key, ds, big ds, job)"""
    os.environ.update(env)
    from lora_core.data.synthetic import bundled_demo_files
    from lora_core.model_files.tiny import make_tiny_model
    from lorajobs.core import datasets, keys, registry, submit
    from lorajobs.core.db import session_scope
    from lorajobs.core.migrate import upgrade
    from lorajobs.core.settings import Settings
    from lorajobs.core.storage import get_store

    settings = Settings()
    upgrade(settings)
    make_tiny_model(settings.resolved_model_root / "tiny-llama", seed=0)
    train_file, _ = bundled_demo_files()
    sample = work / "train.jsonl"
    lines = train_file.read_text().splitlines(True)
    sample.write_text("".join(lines[:64]))
    big = work / "train-big.jsonl"
    big.write_text("".join(lines[i % len(lines)] for i in range(create_examples)))
    with session_scope(settings) as session:
        tenant = keys.create_tenant(session, name="bench")
        _, key = keys.create_key(session, tenant_id=tenant.id, name="bench", is_admin=True)
        session.commit()
        registry.register_model(session, name="tiny-llama", path_under_model_root="tiny-llama",
                                settings=settings)
        with open(sample, "rb") as fh:
            ds = datasets.create_dataset(session, tenant_id=tenant.id, filename="train.jsonl",
                                         stream=fh, data_format=None, settings=settings,
                                         store=get_store(settings))
        with open(big, "rb") as fh:
            big_ds = datasets.create_dataset(session, tenant_id=tenant.id,
                                             filename="train-big.jsonl", stream=fh,
                                             data_format=None, settings=settings,
                                             store=get_store(settings))
        job, _ = submit.create_job(session, tenant_id=tenant.id, request=submit.JobRequest(
            base_model="tiny-llama", training_file=ds.id), settings=settings,
            store=get_store(settings), enqueue=lambda _id: None)
        return key, ds.id, big_ds.id, job.id


def cancel_queued(env: dict[str, str]) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(env["LORAJOBS_DATABASE_URL"])
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET status = 'cancelled', finished_at = CURRENT_TIMESTAMP "
                          "WHERE status = 'queued'"))
    engine.dispose()


def start_uvicorn(target: str, port: int, env: dict[str, str], cwd: Path,
                  factory: bool) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--loop", "uvloop", "--http", "httptools", "--no-access-log",
            "--log-level", "warning"]
    if factory:
        args.append("--factory")
    try:
        return start_server(args, env=env, cwd=cwd, timeout=60,
                            ready=lambda: http_ok(f"http://127.0.0.1:{port}/healthz", None))
    except ServerStartError as exc:
        raise SystemExit(f"{target} did not start: {exc}") from None


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(url: str, seconds: int, connections: int, key: str | None = None,
        script: Path | None = None, server: int | None = None) -> dict[str, float]:
    """wrk's req/s, p50, p99, non-2xx; with `server` (a pid) also its CPU ms per request: on a
    shared box req/s moves with the neighbours' load, the server's CPU per request much less."""
    args = ["wrk", "-t", str(WRK_THREADS), "-c", str(connections), "-d", f"{seconds}s",
            "--latency", url]
    if key:
        args += ["-H", f"Authorization: Bearer {key}"]
    if script:
        args += ["-s", str(script)]
    cpu0 = cpu_seconds(server) if server else 0.0
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    cpu = cpu_seconds(server) - cpu0 if server else float("nan")
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {p: _ms(v, u) for p, v, u in re.findall(r"\s(50|99)%\s+([\d.]+)(us|ms|s)", out)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": lat.get("50", float("nan")),
            "p99_ms": lat.get("99", float("nan")),
            "non_2xx": float(errors.group(1)) if errors else 0.0,
            "cpu_ms": 1e3 * cpu / max(requests, 1)}


def latencies(url: str, key: str, ds: str, env: dict[str, str], cwd: Path) -> dict[str, float]:
    """Submit -> running / started and cancel -> cancelled with a real worker + trainer."""
    log = open(Path(env["LORAJOBS_DATA_DIR"]).parent / "worker.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen([sys.executable, "-m", "lorajobs.worker.main", "worker"], env=env,
                              cwd=cwd, start_new_session=True, stdout=log, stderr=log)
    h = {"Authorization": f"Bearer {key}"}
    body = {"base_model": "tiny-llama", "training_file": ds,
            "training": {"max_steps": 100000, "batch_size": 2, "save_steps": 100000}}
    runs: dict[str, list[float]] = {"submit_to_running_s": [], "submit_to_started_s": [],
                                    "cancel_to_cancelled_s": []}
    try:
        time.sleep(3)  # the worker connects to the broker
        with httpx.Client(base_url=url, headers=h, timeout=30) as c:
            for _ in range(LATENCY_REPEATS):
                for name, value in _one_job(c, body).items():
                    runs[name].append(value)
    except SystemExit:
        log.flush()
        sys.stderr.write(Path(log.name).read_text(errors="replace")[-3000:])
        raise
    finally:
        stop_server(worker)
        log.close()
    return {k: statistics.median(v) for k, v in runs.items()}


def _one_job(c: httpx.Client, body: dict) -> dict[str, float]:
    t0 = time.monotonic()
    job = c.post("/v1/jobs", json=body).json()["id"]
    status = lambda: c.get(f"/v1/jobs/{job}").json()  # noqa: E731
    _poll(lambda: status()["status"] == "running", what="running", show=status)
    running = time.monotonic() - t0
    _poll(lambda: any(e["type"] == "started" for e in
                      c.get(f"/v1/jobs/{job}/events?limit=1000").json()["data"]),
          what="a started event", show=lambda: c.get(f"/v1/jobs/{job}/events?limit=1000").json())
    started = time.monotonic() - t0
    _poll(lambda: (status()["progress"]["step"] or 0) > 0, what="step > 0", show=status)
    t1 = time.monotonic()
    c.post(f"/v1/jobs/{job}/cancel")
    _poll(lambda: status()["status"] == "cancelled", timeout=60, what="cancelled", show=status)
    return {"submit_to_running_s": running, "submit_to_started_s": started,
            "cancel_to_cancelled_s": time.monotonic() - t1}


def _poll(pred, timeout: float = 120, interval: float = 0.02, what: str = "",  # type: ignore[no-untyped-def]
          show=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    state = show() if show else None
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}: {state}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--backend", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--create-examples", type=int, default=20_000,
                        help="records in the create_job arm's dataset")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="lorajobs-api-bench-"))
    url = make_database(args.backend, work)
    broker = REDIS_DB_URL if args.backend == "postgresql" else None
    env = {**os.environ, "LORAJOBS_DATA_DIR": str(work / "data"), "LORAJOBS_DATABASE_URL": url,
           "LORAJOBS_MAX_ACTIVE_JOBS_PER_TENANT": "100000000", "LORAJOBS_TRAINER_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    if broker:
        env["LORAJOBS_BROKER_URL"] = broker
        import redis

        redis.Redis.from_url(broker).flushdb()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        key, ds, big_ds, job = seed(env, work, args.create_examples)
        (work / "bare_app.py").write_text(BARE_APP)
        bare_port, api_port = free_port(), free_port()
        procs.append(start_uvicorn("bare_app:app", bare_port, {**env, "PYTHONPATH": str(work)},
                                   work, factory=False))
        procs.append(start_uvicorn("lorajobs.api.app:create_app", api_port, env, ROOT,
                                   factory=True))
        body = json.dumps({"base_model": "tiny-llama", "training_file": big_ds})
        lua = work / "post.lua"
        lua.write_text(POST_LUA.replace("KEY", key).replace("BODY", repr(body)))
        s, c = args.seconds, args.connections
        results = {
            "bare": wrk(f"http://127.0.0.1:{bare_port}/bare", s, c, server=procs[0].pid),
            "get_job": wrk(f"http://127.0.0.1:{api_port}/v1/jobs/{job}", s, c, key,
                           server=procs[1].pid),
            "create_job": wrk(f"http://127.0.0.1:{api_port}/v1/jobs", s, c, script=lua,
                              server=procs[1].pid),
        }
        stop_server(procs.pop())  # the latency arm runs its own API: no leftover load
        if broker:
            # The create_job arm left thousands of queued jobs, each sent to the broker: a real
            # worker would train them one by one (~8 s each) before the latency arm's job, so
            # the latency arm timed out. Measure on an idle worker: drop them from the broker
            # and cancel them in the database (else the reaper re-sends them).
            import redis

            redis.Redis.from_url(broker).flushdb()
        cancel_queued(env)
        report(results, args)
        if not args.skip_latency:
            procs.append(start_uvicorn("lorajobs.api.app:create_app", api_port, env, ROOT,
                                       factory=True))
            lat = latencies(f"http://127.0.0.1:{api_port}", key, ds, env, ROOT)
            for name, value in lat.items():
                print(f"{name:24} {value:6.2f} s (median of {LATENCY_REPEATS})")
    finally:
        for p in procs:
            stop_server(p)
        drop_database(url)
        if broker:
            import redis

            redis.Redis.from_url(broker).flushdb()
        shutil.rmtree(work, ignore_errors=True)


def report(results: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    print(f"backend={args.backend} connections={args.connections} seconds={args.seconds} "
          f"(1 uvicorn worker, uvloop + httptools, wrk -t{WRK_THREADS})")
    bare = results["bare"]["rps"]
    for name, r in results.items():
        print(f"{name:12} {r['rps']:9.0f} req/s  p50 {r['p50_ms']:7.2f} ms  "
              f"p99 {r['p99_ms']:7.2f} ms  non-2xx {r['non_2xx']:.0f}  "
              f"ratio vs bare {r['rps'] / bare:5.2f}  server CPU {r['cpu_ms']:5.2f} ms/req")
    create = results["create_job"]["rps"]
    print(f"target create_job >= {CREATE_TARGET_RPS} req/s ({args.create_examples} records in "
          f"its dataset): {create:.0f}: {'met' if create >= CREATE_TARGET_RPS else 'NOT met'}")


if __name__ == "__main__":
    main()
