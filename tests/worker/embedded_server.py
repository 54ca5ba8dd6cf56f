"""`lorajobs serve` (worker/embedded.py) in a subprocess for the embedded tests: SQLite, the
embedded broker, the fake trainer, a free port; SIGTERM when the block ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from lorajobs.core.settings import Settings
from tests.servicefixtures import FAKE_TRAINER, TEST_SETTINGS, free_port, wait_for

__all__ = ["EmbeddedServer", "embedded_serve"]


@dataclass
class EmbeddedServer:
    """The running `serve`: its URL, settings, process, and (after the block) exit code."""

    base: str
    settings: Settings
    proc: subprocess.Popen[bytes]
    log_path: Path
    returncode: int | None = None

    @property
    def headers(self) -> dict[str, str]:
        """The admin key `serve` wrote on its first start."""
        return {"Authorization": f"Bearer {self.settings.admin_key_file.read_text().strip()}"}

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


@contextmanager
def embedded_serve(tmp_path: Path, *, ready_timeout: float, **knobs: Any
                   ) -> Iterator[EmbeddedServer]:
    """Start `serve` with TEST_SETTINGS + `knobs` (as LORAJOBS_* variables) and wait for
    /readyz; stop it with SIGTERM when the block ends (exit code in `returncode`)."""
    wrapper = tmp_path / "trainer-python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_TRAINER}" "$@"\n')
    wrapper.chmod(0o755)
    port = free_port()
    knobs = {**TEST_SETTINGS, **knobs}
    settings = Settings(data_dir=tmp_path / "data", trainer_python=str(wrapper), **knobs)
    env = {**os.environ, "LORAJOBS_DATA_DIR": str(settings.data_dir),
           "LORAJOBS_TRAINER_PYTHON": str(wrapper),
           **{f"LORAJOBS_{k.upper()}": str(v) for k, v in knobs.items()}}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c",
             f"from lorajobs.worker.embedded import serve; serve(host='127.0.0.1', port={port})"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    server = EmbeddedServer(base=f"http://127.0.0.1:{port}", settings=settings, proc=proc,
                            log_path=log_path)
    try:
        def _ready() -> bool:
            assert proc.poll() is None, server.log_tail()
            try:
                return httpx.get(f"{server.base}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(_ready, timeout=ready_timeout, what="embedded server ready")
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        server.returncode = proc.wait(timeout=30)
