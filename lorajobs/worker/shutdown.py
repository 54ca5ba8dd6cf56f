""""This worker is shutting down": seen by the supervisor in the solo and the prefork pool.

Celery's warm-shutdown signal runs in the worker's main process. In the `solo` pool the task
runs there too and sees the in-process `SHUTDOWN` event. In `prefork` the task runs in a pool
child that never sees it, so the main process also drops a marker file named after its pid,
and a pool child looks for its parent's marker. Either way the supervisor stops the trainer
cooperatively and requeues the job instead of making the main process wait for hours.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

from lorajobs.core.settings import Settings

__all__ = ["SHUTDOWN", "announce", "clear", "requested"]

SHUTDOWN = threading.Event()
MARKER_DIR = "worker-shutdown"


def _marker(settings: Settings, pid: int) -> Path:
    return settings.data_dir / MARKER_DIR / f"{socket.gethostname()}-{pid}"


def announce(settings: Settings) -> None:
    """Called in the worker's main process when a warm shutdown begins."""
    SHUTDOWN.set()
    try:
        path = _marker(settings, os.getpid())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError:
        pass  # the solo pool still sees SHUTDOWN


def clear(settings: Settings) -> None:
    """At worker start and exit: a marker left by an earlier process with our pid is stale."""
    _marker(settings, os.getpid()).unlink(missing_ok=True)


def requested(settings: Settings) -> bool:
    """True in the task's process once its worker is shutting down (solo or prefork child)."""
    return SHUTDOWN.is_set() or _marker(settings, os.getppid()).exists()
