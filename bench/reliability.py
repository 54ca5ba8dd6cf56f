"""Reliability figures at larger N: the scenarios of tests/reliability, run against real
processes (API, workers, reaper, trainer child) and printed as the rows of RELIABILITY.md.

    .venv/bin/python bench/reliability.py                  # every scenario, default N
    .venv/bin/python bench/reliability.py kill9 fuzz -n 20  # some, at N=20

Scenarios (N means): kill9 (jobs, each SIGKILLed once: trainer or worker), duplicate (jobs,
each delivered 4 times), sigterm (graceful worker shutdowns), broker_down (jobs submitted with
Redis stopped), idempotency (distinct keys; 10 concurrent POSTs per key), fuzz (schemathesis
examples per operation), and pytest-repeated ones: db_restart, api_restart, disk_full (N
repetitions each). Backend: SQLite + embedded broker unless --backend postgresql
(the shared PostgreSQL and Redis; fault servers are always private instances).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.reliability import scenarios  # noqa: E402
from tests.servicefixtures import LiveService, wait_for  # noqa: E402

DEFAULT_N = {"kill9": 10, "duplicate": 10, "sigterm": 5, "broker_down": 10,
             "idempotency": 20, "fuzz": 50, "db_restart": 3, "api_restart": 3, "disk_full": 2,
             "pollers": 3}
PYTEST_REPEATED = {
    "db_restart": "tests/reliability/test_db_restart.py",
    "api_restart": "tests/reliability/test_api_restart.py",
    "disk_full": "tests/reliability/test_disk_full.py",
}


def _service(backend: str, **overrides: Any) -> LiveService:
    svc = LiveService(Path(tempfile.mkdtemp(prefix="lorajobs-bench-")), backend, **overrides)
    svc.migrate()
    return svc


def run_kill9(n: int, backend: str) -> dict[str, Any]:
    svc = _service(backend)
    try:
        return scenarios.kill9(svc, n, seed=n)
    finally:
        svc.close()


def run_duplicate(n: int, backend: str) -> dict[str, Any]:
    svc = _service(backend)
    try:
        return scenarios.duplicate_delivery(svc, n, copies=3)
    finally:
        svc.close()


def run_sigterm(n: int, backend: str) -> dict[str, Any]:
    svc = _service(backend)
    try:
        return scenarios.graceful_sigterm(svc, n)
    finally:
        svc.close()


def run_broker_down(n: int, backend: str) -> dict[str, Any]:
    """N jobs submitted while a private Redis is stopped; it comes back; the reaper sends."""
    from lorajobs.core.queue import enqueue_job
    from tests.reliability.servers import PrivateRedis
    from tests.servicefixtures import free_port
    from tests.worker.jobfactory import get_job, make_job, trainer_starts

    tmp = Path(tempfile.mkdtemp(prefix="lorajobs-bench-"))
    redis = PrivateRedis(free_port(), tmp)
    redis.start()
    svc = LiveService(tmp, "sqlite", broker_url=f"redis://127.0.0.1:{redis.port}/0")
    try:
        svc.migrate()
        svc.start_worker()
        redis.stop()
        ids = [make_job(svc.settings, max_steps=4, control={"step_seconds": 0.05})
               for _ in range(n)]
        accepted = sum(not enqueue_job(j, svc.settings) for j in ids)  # all refused by broker
        queued = sum(get_job(svc.settings, j).status == "queued" for j in ids)
        redis.start()
        svc.start_reaper()
        wait_for(lambda: all(get_job(svc.settings, j).status in scenarios.TERMINAL
                             for j in ids), timeout=60 + 10 * n, what="all jobs")
        succeeded = sum(get_job(svc.settings, j).status == "succeeded" for j in ids)
        runs = sum(len(trainer_starts(svc.settings, j)) for j in ids)
        return {"jobs": n, "send_failed_at_submit": accepted, "queued_in_db": queued,
                "succeeded": succeeded, "trainer_runs": runs, "lost": n - succeeded}
    finally:
        svc.close()
        redis.stop()


def run_idempotency(n_keys: int, backend: str) -> dict[str, Any]:
    from tests.reliability.test_load import _body, _job_count, _post_all
    from tests.worker.jobfactory import ensure_model_and_dataset

    tiny = Path(tempfile.mkdtemp(prefix="lorajobs-tiny-"))
    from lora_core.model_files.tiny import make_tiny_model

    model = make_tiny_model(tiny, seed=0)
    svc = _service(backend, max_active_jobs_per_tenant=max(16, n_keys))
    try:
        _, dataset_id = ensure_model_and_dataset(svc.settings, model)
        svc.start_api()
        bodies = [(_body(dataset_id), f"key-{i % n_keys}") for i in range(10 * n_keys)]
        t0 = time.monotonic()
        responses = asyncio.run(_post_all(svc, bodies))
        return {"requests": len(bodies), "keys": n_keys,
                "statuses": dict(Counter(r.status_code for r in responses)),
                "jobs_in_db": _job_count(svc), "seconds": round(time.monotonic() - t0, 2)}
    finally:
        svc.close()


def run_fuzz(n: int, backend: str) -> dict[str, Any]:
    from tests.reliability.test_fuzz import SEED
    from tests.reliability.test_fuzz import run_fuzz as fuzz

    svc = _service(backend)
    try:
        svc.start_worker()
        svc.start_api()
        result = fuzz(svc, max_examples=n, seed=SEED)
        generated = re.search(r"(\d+) generated", result.stdout)
        failures = re.findall(r"❌ (ST\d+ [^:]+): (\d+)", result.stdout)
        return {"examples_per_operation": n, "exit_code": result.returncode,
                "generated": int(generated.group(1)) if generated else None,
                "failures": {k: int(v) for k, v in failures},
                "server_errors_in_log": svc.log("api").count('" 50')}
    finally:
        svc.close()


def run_pollers(n: int, backend: str) -> dict[str, Any]:
    """The trainer's tokens/s under 8 job pollers vs the same load on /healthz, `n` runs (the
    figure tests/reliability/test_pollers.py prints but cannot assert on a shared box)."""
    from lora_core.model_files.tiny import make_tiny_model
    from tests.reliability.conftest import api_with_tiny_model, submit_real_job

    ratios = []
    model = make_tiny_model(Path(tempfile.mkdtemp(prefix="lorajobs-tiny-")), seed=0)
    for _ in range(n):
        svc = LiveService(Path(tempfile.mkdtemp(prefix="lorajobs-bench-")), backend, trainer=None)
        with api_with_tiny_model(svc, model) as client:
            job_id = submit_real_job(client, max_steps=5000, save_steps=5000)
            figures = scenarios.pollers_vs_training(svc, dict(client.headers), job_id, pollers=8,
                                                    poll_interval=0.05, phase_seconds=3.0)
        ratios.append(figures["ratio_vs_control"])
    return {"runs": n, "ratio_vs_control": ratios, "min": min(ratios)}


def run_pytest_repeated(name: str) -> Callable[[int, str], dict[str, Any]]:
    def run(n: int, backend: str) -> dict[str, Any]:
        passed = failed = 0
        for _ in range(n):
            rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 PYTEST_REPEATED[name]], cwd=REPO, capture_output=True,
                                text=True).returncode
            passed += rc == 0
            failed += rc != 0
        return {"runs": n, "passed": passed, "failed": failed}
    return run


SCENARIOS: dict[str, Callable[[int, str], dict[str, Any]]] = {
    "kill9": run_kill9, "duplicate": run_duplicate, "sigterm": run_sigterm,
    "broker_down": run_broker_down, "idempotency": run_idempotency, "fuzz": run_fuzz,
    "pollers": run_pollers,
    **{name: run_pytest_repeated(name) for name in PYTEST_REPEATED},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenarios", nargs="*", help=f"any of {', '.join(SCENARIOS)}")
    parser.add_argument("-n", type=int, default=None, help="N for every chosen scenario")
    parser.add_argument("--backend", default="sqlite", choices=["sqlite", "postgresql"])
    args = parser.parse_args()
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    for name in args.scenarios or list(SCENARIOS):
        n = args.n or DEFAULT_N[name]
        t0 = time.monotonic()
        figures = SCENARIOS[name](n, args.backend)
        print(json.dumps({"scenario": name, "backend": args.backend, "n": n,
                          "seconds": round(time.monotonic() - t0, 1), **figures}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
