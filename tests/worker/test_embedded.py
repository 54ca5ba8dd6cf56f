"""`serve`: one command runs API + worker + reaper on SQLite and the embedded broker, runs a job,
and SIGTERM stops every process it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from lorajobs.core.settings import Settings
from tests.servicefixtures import FAKE_TRAINER, TEST_SETTINGS, free_port, wait_for
from tests.worker.jobfactory import ensure_model_and_dataset, trainer_starts

pytestmark = pytest.mark.timeout(120)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=False).stdout
    return [int(p) for p in out.split()]


def test_serve_runs_everything_and_stops_on_sigterm(tmp_path: Path,
                                                    tiny_model_dir: Path) -> None:
    wrapper = tmp_path / "trainer-python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_TRAINER}" "$@"\n')
    wrapper.chmod(0o755)
    port = free_port()
    settings = Settings(data_dir=tmp_path / "data", trainer_python=str(wrapper),
                        **TEST_SETTINGS)
    env = {**os.environ, "LORAJOBS_DATA_DIR": str(settings.data_dir),
           "LORAJOBS_TRAINER_PYTHON": str(wrapper),
           **{f"LORAJOBS_{k.upper()}": str(v) for k, v in TEST_SETTINGS.items()}}
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-c",
         f"from lorajobs.worker.embedded import serve; serve(host='127.0.0.1', port={port})"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def _ready() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(_ready, timeout=60, what="embedded server ready")
        key = settings.admin_key_file.read_text().strip()
        _, dataset_id = ensure_model_and_dataset(settings, tiny_model_dir)
        headers = {"Authorization": f"Bearer {key}"}
        r = httpx.post(f"{base}/v1/jobs", headers=headers, timeout=30, json={
            "base_model": "fake-tiny", "training_file": dataset_id,
            "training": {"max_steps": 4, "save_steps": 2}})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        wait_for(lambda: httpx.get(f"{base}/v1/jobs/{job_id}", headers=headers, timeout=5)
                 .json()["status"] == "succeeded", timeout=30, what="job succeeded")
        assert trainer_starts(settings, job_id) == [0]
        children = _children(proc.pid)
        assert children, "serve should run the worker as a child process"
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        log.close()
    assert rc == 0, (tmp_path / "serve.log").read_text()[-3000:]
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or \
            "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
