"""Process entry points: a worker, and beat (the maintenance process: the reaper loop).

    python -m lorajobs.worker.main worker [--pool solo|prefork]
    python -m lorajobs.worker.main beat
    python -m lorajobs.worker.main reaper     # the reaper loop alone (no webhooks)

Settings come from `LORAJOBS_*`. SIGTERM to a worker is a warm shutdown: the running trainer
gets its stop file, saves a checkpoint, and the job goes back to queued for another worker.
Beat sweeps (and sends webhooks) in its own process: reaping must not wait for a worker
(each runs one job for hours), which a periodic message to the workers' queue would. Every
process here creates files 0600 and directories 0700 (`use_private_umask`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import threading
from types import FrameType

from lorajobs.core.settings import Settings, get_settings
from lorajobs.core.storage import use_private_umask

__all__ = ["run_worker", "run_beat", "run_reaper", "settings_env"]

log = logging.getLogger(__name__)


def settings_env(settings: Settings) -> dict[str, str]:
    """`LORAJOBS_*` variables that reproduce `settings` in a child process."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is not None:  # lists (serving_targets) as JSON, as pydantic-settings reads them
            env[f"LORAJOBS_{name.upper()}"] = (json.dumps(value) if isinstance(value, list | dict)
                                               else str(value))
    return env


def run_worker(settings: Settings | None = None, *, pool: str = "solo",
               loglevel: str = "INFO") -> None:
    """Run a Celery worker for this app in this process until a shutdown signal."""
    from lorajobs.worker.celery_app import WORKER_QUEUES, build_app

    settings = settings or get_settings()
    use_private_umask()  # the trainer child inherits it: checkpoints, adapters, merged models
    app = build_app(settings)
    app.worker_main([
        "worker", f"--pool={pool}", "--concurrency=1", f"--loglevel={loglevel}",
        "--queues", ",".join(WORKER_QUEUES),
        "--hostname", f"lorajobs-{os.getpid()}@{socket.gethostname()}",
        "--without-gossip", "--without-mingle",
    ])


def run_beat(settings: Settings | None = None) -> None:
    """The maintenance process: a reaper sweep every `reaper_interval_seconds`, and the
    webhook sender (worker/webhook_sender.py) and the serving reconciler
    (worker/serving_reconciler.py) in threads beside it, in this process, until
    SIGTERM/SIGINT. Needs the database and the broker (to re-send), no worker."""
    settings = settings or get_settings()
    log.info("beat: reaper sweeping every %.1fs, webhooks sent, in process %d",
             settings.reaper_interval_seconds, os.getpid())
    run_reaper(settings, send_webhooks=True)


def run_reaper(settings: Settings | None = None, *, send_webhooks: bool = False) -> None:
    """The reaper loop in the foreground until SIGTERM/SIGINT (no broker consumer needed);
    with `send_webhooks`, the webhook sender's loop in a thread (beat)."""
    from lorajobs.worker.reaper import run_reaper_loop
    from lorajobs.worker.serving_reconciler import start_serving_thread
    from lorajobs.worker.webhook_sender import start_webhook_thread

    settings = settings or get_settings()
    use_private_umask()
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    sender = start_webhook_thread(settings, stop) if send_webhooks else None
    if send_webhooks:  # beat: also keeps deployed adapters loaded on restarted vLLM servers
        start_serving_thread(settings, stop)
    run_reaper_loop(settings, stop)
    if sender is not None:
        sender.join(timeout=settings.webhook_read_timeout_seconds + 5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lorajobs.worker.main")
    parser.add_argument("command", choices=["worker", "beat", "reaper"])
    parser.add_argument("--pool", default="solo", choices=["solo", "prefork"])
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.loglevel,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "worker":
        run_worker(pool=args.pool, loglevel=args.loglevel)
    elif args.command == "beat":
        run_beat()
    else:
        run_reaper()


if __name__ == "__main__":
    main()
