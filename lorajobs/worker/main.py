"""Process entry points: a worker, a beat (periodic reaper), a standalone reaper loop.

    python -m lorajobs.worker.main worker [--pool solo|prefork]
    python -m lorajobs.worker.main beat
    python -m lorajobs.worker.main reaper

Settings come from `LORAJOBS_*`. SIGTERM to a worker is a warm shutdown: the running trainer
gets its stop file, saves a checkpoint, and the job goes back to queued for another worker.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from types import FrameType

from lorajobs.service.settings import Settings, get_settings

__all__ = ["run_worker", "run_beat", "run_reaper", "settings_env"]

log = logging.getLogger(__name__)


def settings_env(settings: Settings) -> dict[str, str]:
    """`LORAJOBS_*` variables that reproduce `settings` in a child process."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"LORAJOBS_{name.upper()}"] = str(value)
    return env


def run_worker(settings: Settings | None = None, *, pool: str = "solo",
               loglevel: str = "INFO") -> None:
    """Run a Celery worker for this app in this process until a shutdown signal."""
    from lorajobs.worker.celery_app import WORKER_QUEUES, build_app

    settings = settings or get_settings()
    app = build_app(settings)
    app.worker_main([
        "worker", f"--pool={pool}", "--concurrency=1", f"--loglevel={loglevel}",
        "--queues", ",".join(WORKER_QUEUES),
        "--hostname", f"lorajobs-{os.getpid()}@{socket.gethostname()}",
        "--without-gossip", "--without-mingle",
    ])


def run_beat(settings: Settings | None = None, *, loglevel: str = "INFO") -> None:
    """Celery beat sending the reaper task every `reaper_interval_seconds`."""
    from lorajobs.worker.celery_app import build_app

    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = build_app(settings)
    app.Beat(loglevel=loglevel,
             schedule=str(settings.data_dir / "celerybeat-schedule")).run()


def run_reaper(settings: Settings | None = None) -> None:
    """The reaper loop in the foreground until SIGTERM/SIGINT (no broker consumer needed)."""
    from lorajobs.worker.reaper import run_reaper_loop

    settings = settings or get_settings()
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    run_reaper_loop(settings, stop)


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
        run_beat(loglevel=args.loglevel)
    else:
        run_reaper()


if __name__ == "__main__":
    main()
