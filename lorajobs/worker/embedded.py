"""`serve`: the whole service from one command (embedded mode: SQLite + embedded broker).

    migrate -> ensure the local admin key -> worker subprocess + reaper thread
            + webhook sender thread -> uvicorn

The data directory is 0700 and everything in it 0600 (umask 077 here, inherited by the worker
and its trainers): it holds every tenant's data and the admin key.

The worker is a subprocess, not a thread: Celery installs signal handlers (main thread only)
and a crash in training supervision must not take the API down. Ctrl-C / SIGTERM stops uvicorn;
then the worker gets SIGTERM (its trainer checkpoints, the job is requeued for the next start)
and the reaper thread stops.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading

from lorajobs.core.db import get_sessionmaker
from lorajobs.core.keys import ensure_admin_key
from lorajobs.core.migrate import upgrade
from lorajobs.core.queue import declare_job_queue
from lorajobs.core.settings import Settings, get_settings
from lorajobs.core.storage import private_dir, use_private_umask
from lorajobs.worker.main import settings_env
from lorajobs.worker.reaper import run_reaper_loop
from lorajobs.worker.serving_reconciler import start_serving_thread
from lorajobs.worker.webhook_sender import start_webhook_thread

__all__ = ["serve", "start_worker_process"]

log = logging.getLogger(__name__)

APP_FACTORY = "lorajobs.api.app:create_app"
# A warm worker shutdown waits for the trainer's checkpoint: give it the cancel grace twice
# (stop file, then SIGTERM), plus time to settle the job.
WORKER_STOP_MARGIN_SECONDS = 10.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def start_worker_process(settings: Settings, *, log_path: str | None = None
                         ) -> subprocess.Popen[bytes]:
    """`python -m lorajobs.worker.main worker` with `settings` in its environment."""
    env = {**os.environ, **settings_env(settings)}
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - owned by the child
    return subprocess.Popen([sys.executable, "-m", "lorajobs.worker.main", "worker"],
                            env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                            preexec_fn=_term_with_parent)


def _term_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """If `serve` dies outright, its worker gets SIGTERM: a warm shutdown that requeues."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _stop_worker(proc: subprocess.Popen[bytes], settings: Settings) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=2 * settings.cancel_grace_seconds + WORKER_STOP_MARGIN_SECONDS)
    except subprocess.TimeoutExpired:
        log.warning("worker did not stop in time; killing it (the reaper requeues its job)")
        proc.kill()
        proc.wait()


def serve(settings: Settings | None = None, host: str | None = None,
          port: int | None = None) -> None:
    """Run API + worker + reaper + webhook sender until Ctrl-C/SIGTERM; prints where the
    admin key is."""
    import uvicorn

    settings = settings or get_settings()
    use_private_umask()
    private_dir(settings.data_dir)
    upgrade(settings)
    with get_sessionmaker(settings)() as session:
        ensure_admin_key(session, key_file=settings.admin_key_file)
    print(f"lorajobs: admin key in {settings.admin_key_file}", flush=True)
    # The API process builds its settings from the environment (create_app is a factory).
    os.environ.update(settings_env(settings))
    get_settings.cache_clear()
    declare_job_queue(settings)  # before the worker and the API race to create it
    worker = start_worker_process(settings)
    stop = threading.Event()
    reaper = threading.Thread(target=run_reaper_loop, args=(settings, stop), daemon=True,
                              name="lorajobs-reaper")
    reaper.start()
    sender = start_webhook_thread(settings, stop)
    start_serving_thread(settings, stop)  # daemon: stops with `stop`
    # uvicorn re-raises the SIGTERM/SIGINT it caught once it has shut down; with a handler of
    # ours installed that lands here instead of killing the process before the cleanup below.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    try:
        uvicorn.run(APP_FACTORY, factory=True, host=host or settings.api_host,
                    port=port if port is not None else settings.api_port, log_level="info")
    finally:
        stop.set()
        _stop_worker(worker, settings)
        reaper.join(timeout=5)
        sender.join(timeout=5)
