"""The first five minutes: `lorajobs serve` on a fresh data directory, then the CLI with no URL
and no key (it finds both in the data directory), register the model, `submit --wait`, and
run the download command it prints. Everything the server wrote is its user's alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.client.live import MODEL, alpaca_records, write_jsonl
from tests.servicefixtures import FAKE_TRAINER, free_port, wait_for

pytestmark = pytest.mark.timeout(120)


def _readable_by_others(root: Path, *, skip: Path) -> list[str]:
    """Paths under `root` (itself included, `skip` not) with any group or other permission."""
    return [f"{p.relative_to(root.parent)} {oct(p.stat().st_mode & 0o777)}"
            for p in [root, *root.rglob("*")]
            if not p.is_symlink() and not p.is_relative_to(skip) and p.stat().st_mode & 0o077]


def test_fresh_embedded_server_submit_wait_download(tmp_path: Path,
                                                    tiny_model_dir: Path) -> None:
    data = tmp_path / "home"
    trainer = tmp_path / "trainer-python"  # the fake trainer, started like the real one
    trainer.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_TRAINER}" "$@"\n')
    trainer.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAJOBS_")}
    umask = os.umask(0o022)  # as a login shell has it: the server must not depend on it
    env.update({"LORAJOBS_DATA_DIR": str(data), "LORAJOBS_TRAINER_PYTHON": str(trainer),
                "LORAJOBS_TRAINER_THREADS": "1", "LORAJOBS_WORKER_POLL_SECONDS": "0.1",
                "COLUMNS": "120"})
    port = free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "lorajobs", "serve", "--port",
                                   str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    os.umask(umask)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lorajobs", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    def up() -> bool:
        assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).is_success
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=60, what="lorajobs serve")
        assert (data / "server_url").read_text().strip() == f"http://127.0.0.1:{port}"
        r = cli("models", "register", MODEL, str(tiny_model_dir))
        assert r.returncode == 0, r.stderr
        write_jsonl(tmp_path / "train.jsonl", alpaca_records(8))
        (tmp_path / "job.yaml").write_text(f"base_model: {MODEL}\ntraining_file: train.jsonl\n"
                                           "training:\n  max_steps: 10\n")
        r = cli("submit", "job.yaml", "--wait")
        assert r.returncode == 0, (r.stdout, r.stderr)
        last = r.stdout.strip().splitlines()[-1]
        assert last.startswith("download: lorajobs download job_"), r.stdout
        command = last.removeprefix("download: ").split(" (")[0].split()
        got = cli(*command[1:])
        assert got.returncode == 0, got.stderr
        assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
        # data dir 0700; database (+ WAL), broker, admin key, dataset, checkpoints, adapter,
        # merged model, logs 0600: under the usual umask 022 of the shell that started it
        assert data.stat().st_mode & 0o777 == 0o700
        assert (data / "admin_key").stat().st_mode & 0o777 == 0o600
        assert any(p.name.endswith(".jsonl") for p in (data / "artifacts").rglob("*"))
        # models/: the operator's base model, copied there by the CLI as its files were
        assert _readable_by_others(data, skip=data / "models") == []
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert not (data / "server_url").exists()  # a stopped server leaves no stale address
