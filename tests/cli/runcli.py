"""Run `python -m lorajobs ...` as a subprocess, the way a person or a script does."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from tests.client.live import Live

__all__ = ["cli", "cli_in_terminal", "cli_env"]

REPO = Path(__file__).resolve().parents[2]


def cli_env(live: Live, home: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without any LORAJOBS_* setting of its own, plus the server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAJOBS_")}
    env.update({"LORAJOBS_URL": live.url, "LORAJOBS_API_KEY": live.key,
                "LORAJOBS_DATA_DIR": str(home), "COLUMNS": "120", "PYTHONPATH": str(REPO)})
    env.update(extra)
    return env


def cli(live: Live, *args: str, cwd: Path, timeout: float = 60,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI with pipes (not a terminal); text stdout/stderr and the exit code."""
    return subprocess.run([sys.executable, "-m", "lorajobs", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout,
                          env=env or cli_env(live, cwd / ".lorajobs-home"))


def cli_in_terminal(live: Live, *args: str, cwd: Path, timeout: float = 60) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal, as in an interactive shell; (exit code, all output)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "lorajobs", *args], cwd=cwd,
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                            env=cli_env(live, cwd / ".lorajobs-home", TERM="xterm-256color"))
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, b"".join(chunks).decode(errors="replace")
