"""`serve`: one command runs API + worker + reaper on SQLite and the embedded broker, runs a job,
and SIGTERM stops every process it started."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from tests.servicefixtures import wait_for
from tests.worker.embedded_server import embedded_serve
from tests.worker.jobfactory import ensure_model_and_dataset, trainer_starts

pytestmark = pytest.mark.timeout(120)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=False).stdout
    return [int(p) for p in out.split()]


def test_serve_runs_everything_and_stops_on_sigterm(tmp_path: Path,
                                                    tiny_model_dir: Path) -> None:
    with embedded_serve(tmp_path, ready_timeout=60) as server:
        _, dataset_id = ensure_model_and_dataset(server.settings, tiny_model_dir)
        r = httpx.post(f"{server.base}/v1/jobs", headers=server.headers, timeout=30, json={
            "base_model": "fake-tiny", "training_file": dataset_id,
            "training": {"max_steps": 4, "save_steps": 2}})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        wait_for(lambda: httpx.get(f"{server.base}/v1/jobs/{job_id}", headers=server.headers,
                                   timeout=5).json()["status"] == "succeeded",
                 timeout=30, what="job succeeded")
        assert trainer_starts(server.settings, job_id) == [0]
        children = _children(server.proc.pid)
        assert children, "serve should run the worker as a child process"
    assert server.returncode == 0, server.log_tail()
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or \
            "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
