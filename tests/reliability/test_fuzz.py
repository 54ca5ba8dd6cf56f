"""Schema fuzzing with schemathesis against the live API's own `/openapi.json`: every generated
request (valid and invalid, authenticated as a tenant that owns a dataset and a job) must get a
status the document lists, and never a 5xx. Fixed seed, small N here; `bench/reliability.py`
runs the same command with more examples.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorajobs.core.queue import enqueue_job
from tests.servicefixtures import LiveService
from tests.worker.jobfactory import make_job

pytestmark = [pytest.mark.timeout(600)]

CHECKS = "not_a_server_error,status_code_conformance"
SEED = 20261128
MAX_EXAMPLES = 10


def schemathesis_command(base_url: str, key: str, *, max_examples: int, seed: int,
                         report_dir: Path) -> list[str]:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
    return [exe, "run", f"{base_url}/openapi.json", "-H", f"Authorization: Bearer {key}",
            "--checks", CHECKS, "--seed", str(seed), "--max-examples", str(max_examples),
            "--phases", "examples,coverage,fuzzing", "--workers", "1", "--no-color",
            "--generation-deterministic", "--request-timeout", "30",
            "--exclude-path-regex", r".*/events/stream$",  # an open SSE stream never ends
            "--report", "ndjson", "--report-dir", str(report_dir)]


def run_fuzz(svc: LiveService, *, max_examples: int = MAX_EXAMPLES,
             seed: int = SEED) -> subprocess.CompletedProcess[str]:
    """A tenant with a finished job (so id routes have something to find), then the fuzzer."""
    job_id = make_job(svc.settings, max_steps=4)
    enqueue_job(job_id, svc.settings)
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run(schemathesis_command(svc.base_url or "", svc.admin_key or "",
                                               max_examples=max_examples, seed=seed,
                                               report_dir=svc.tmp_path / "schemathesis"),
                          capture_output=True, text=True, timeout=540, env=env)


@pytest.mark.parametrize("service", ["sqlite", "postgresql"], indirect=True)
def test_schemathesis_finds_nothing(service: LiveService) -> None:
    service.start_worker()
    service.start_api()
    result = run_fuzz(service)
    tail = result.stdout[-6000:]
    assert result.returncode == 0, tail
    # uvicorn's access log: `"GET /v1/jobs/x HTTP/1.1" 500 Internal Server Error`. Match the
    # status field only (a random id may contain "500").
    served = service.log("api").split("Application startup complete.")[-1]
    assert not re.search(r'HTTP/1\.[01]" 5\d\d ', served), service.log("api")[-4000:]
