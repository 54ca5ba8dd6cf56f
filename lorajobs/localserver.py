"""Start a server process on this machine, wait until it answers, stop it with its children.

For the programs that run a server of their own for a while: `make demo` (`lorajobs serve`) and
the API bench (uvicorn). The service's own processes never use this.

    proc = start_server([sys.executable, "-m", "lorajobs", "serve", "--port", str(port)],
                        ready=lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), timeout=90)
    try: ...
    finally: stop_server(proc)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx

__all__ = ["ServerStartError", "free_port", "http_ok", "start_server", "stop_server"]

READY_POLL_SECONDS = 0.2  # how often `ready` is asked while a server starts
STOP_GRACE_SECONDS = 30.0  # SIGTERM, then this long before SIGKILL
HTTP_CHECK_TIMEOUT_SECONDS = 1.0


class ServerStartError(RuntimeError):
    """The server exited before it was ready, or was not ready in time (it is stopped)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_ok(url: str, status: int | None = 200) -> bool:
    """GET `url` answers, with `status` unless that is None (any answer will do)."""
    try:
        code = httpx.get(url, timeout=HTTP_CHECK_TIMEOUT_SECONDS).status_code
    except httpx.TransportError:
        return False
    return status is None or code == status


def start_server(args: list[str], *, ready: Callable[[], bool], timeout: float,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 log: Path | None = None) -> subprocess.Popen[bytes]:
    """Run `args` in a session of its own (so `stop_server` reaches every child it starts) and
    poll `ready()` until it is true. Output goes to `log` when given, else to ours.
    Raises ServerStartError if the process exits first or `timeout` seconds pass."""
    out = open(log, "wb") if log else None  # noqa: SIM115 - the child holds it from here on
    try:
        proc = subprocess.Popen(args, env=dict(env) if env is not None else None, cwd=cwd,
                                stdout=out, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True)
    finally:
        if out:
            out.close()
    where = f"; see {log}" if log else ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"{args[0]} exited with {proc.returncode} before it was "
                                   f"ready{where}")
        if ready():
            return proc
        time.sleep(READY_POLL_SECONDS)
    stop_server(proc)
    raise ServerStartError(f"{' '.join(args)} was not ready in {timeout:.0f}s{where}")


def stop_server(proc: subprocess.Popen[bytes], grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM to the server's process group; SIGKILL after `grace` seconds; reaped."""
    if proc.poll() is not None:
        return
    _killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        _killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _killpg(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # exited between the check and the signal
        pass
