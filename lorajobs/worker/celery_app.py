"""The worker's Celery app: `celery -A lorajobs.worker.celery_app worker --pool=solo -c 1`.

The app's broker config is the service's (`queue.get_celery_app`); this module adds the task
body, the warm-shutdown hook and the pre-warmed trainer zygote's start/stop (prewarm.py).
Workers consume job messages only: the reaper runs in `lorajobs beat`'s own process (reaper.py),
so it never waits behind a job. `app` is built on first access from the environment's settings, so
importing this module has no side effects.

Pool: `solo` is the default. Training runs in a child process of its own anyway, so there is no
memory to reclaim by recycling pool processes. `prefork -c 1` works too (shutdown.py carries
the warm-shutdown request from the main process to the pool child running the task).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import (
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
    worker_shutting_down,
)

from lorajobs.core.queue import QUEUE_NAME, RUN_JOB_TASK, get_celery_app
from lorajobs.core.settings import Settings, get_settings
from lorajobs.worker import prewarm, shutdown, tasks

__all__ = ["build_app", "WORKER_QUEUES"]

# A worker consumes job messages and nothing else (maintenance never queues behind a job).
WORKER_QUEUES = (QUEUE_NAME,)

_app: Celery | None = None


def build_app(settings: Settings | None = None) -> Celery:
    """The Celery app for `settings` with our tasks registered (idempotent)."""
    global _app
    settings = settings or get_settings()
    tasks.bind_settings(settings)
    app = get_celery_app(settings)
    if RUN_JOB_TASK not in app.tasks:
        app.task(name=RUN_JOB_TASK, ignore_result=True, acks_late=True)(tasks.run_job)
    _app = app
    return app


@worker_shutting_down.connect
def _on_worker_shutting_down(**_: Any) -> None:
    """Warm shutdown (SIGTERM/SIGINT): the running trainer checkpoints and the job is requeued."""
    shutdown.announce(tasks.current_settings())


@worker_init.connect
@worker_shutdown.connect
def _clear_shutdown_marker(**_: Any) -> None:
    shutdown.clear(tasks.current_settings())


@worker_process_init.connect
def _start_trainer_zygote(**_: Any) -> None:
    """In the process that runs tasks (solo: the worker; prefork: the pool child), so that the
    zygote is warm before the first job arrives."""
    prewarm.start(tasks.current_settings())


@worker_process_init.connect
def _import_settle_modules(**_: Any) -> None:
    """What settling a job imports, imported before the first job: the TensorBoard writer of
    event_recorder.write_tensorboard (0.7-0.9 s on 2 loaded cores, paid between each worker's
    first trainer exit and `succeeded` otherwise: bench/job_overhead_bench.py). Missing, it
    fails that job's settle as before, not the worker's start."""
    try:
        import tensorboard.compat.proto.event_pb2  # noqa: F401
        import tensorboard.compat.proto.summary_pb2  # noqa: F401
        import tensorboard.summary.writer.record_writer  # noqa: F401
    except ImportError:
        pass


@worker_process_shutdown.connect
@worker_shutdown.connect
def _stop_trainer_zygote(**_: Any) -> None:
    prewarm.stop()


def __getattr__(name: str) -> Any:
    if name == "app":
        return _app or build_app()
    raise AttributeError(name)
