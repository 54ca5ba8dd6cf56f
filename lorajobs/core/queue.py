"""The broker side of the service: one Celery app config, a never-raising `enqueue_job`.

The broker is only a wake-up call (DESIGN.md): the job row is committed first, then its id is
sent. A lost or duplicated message is harmless: the reaper re-sends queued jobs nobody picked
up, and a task whose job is not claimable is a no-op. So `enqueue_job` must never fail a
request because the broker is down; it returns False and the reaper sends the id later.

Celery settings for hours-long jobs, and why:
- `task_acks_late` + `worker_prefetch_multiplier=1` + `worker_concurrency=1`: a worker holds
  one job at a time and takes the next message only when it is free.
- `task_reject_on_worker_lost`: a prefork child killed mid-task puts the message back.
- Redis `visibility_timeout` set far beyond any job: a long job is not redelivered while it
  runs; if it were, the lease would make the duplicate a no-op, but nothing relies on it.
- Embedded broker: kombu's SQLAlchemy transport on SQLite. Its `polling_interval` must be set
  on the class (as a transport option it is forwarded to `create_engine` and crashes).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from queue import Empty, SimpleQueue

from celery import Celery
from kombu import Connection

from lorajobs.core.settings import Settings, get_settings
from lorajobs.core.storage import PRIVATE_DIR_MODE, private_file

__all__ = [
    "RUN_JOB_TASK",
    "QUEUE_NAME",
    "get_celery_app",
    "enqueue_job",
    "send_jobs",
    "JobSender",
    "broker_ok",
    "pending_messages",
    "declare_job_queue",
]

log = logging.getLogger(__name__)

RUN_JOB_TASK = "lorajobs.run_job"
QUEUE_NAME = "lorajobs"
# Embedded broker poll: a queued job waits at most this long for an idle worker to see it.
EMBEDDED_POLL_SECONDS = 0.1
# Far longer than any training run: Redis never redelivers a running job on its own.
REDIS_VISIBILITY_TIMEOUT_SECONDS = 7 * 24 * 3600
# Publishing must not hold an API request: one quick retry, then give up (the reaper re-sends).
PUBLISH_CONNECT_TIMEOUT_SECONDS = 1.0
PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2,
                        "interval_max": 0.2}
BROKER_CHECK_TIMEOUT_SECONDS = 1.0
SQLITE_BROKER_PREFIX = "sqla+sqlite:///"  # the embedded broker's URL: a SQLite file
# Ids per broker round trip (one Redis pipeline) and per `enqueued_at` UPDATE in JobSender.
SEND_BATCH_MAX = 64
# At shutdown JobSender sends what it holds for at most this long; the reaper sends the rest.
SENDER_CLOSE_SECONDS = 5.0

_apps: dict[str, Celery] = {}


def _configure_embedded_transport() -> None:
    from kombu.transport.sqlalchemy import Transport

    Transport.polling_interval = EMBEDDED_POLL_SECONDS


def _transport_options(settings: Settings) -> dict[str, object]:
    if settings.is_embedded_broker:
        return {}
    return {
        "visibility_timeout": REDIS_VISIBILITY_TIMEOUT_SECONDS,
        "socket_connect_timeout": PUBLISH_CONNECT_TIMEOUT_SECONDS,
        "socket_timeout": 30,
        # Fail a publish fast when Redis is gone instead of retrying for minutes.
        "max_retries": 1,
    }


def get_celery_app(settings: Settings | None = None) -> Celery:
    """The Celery app for `settings`' broker (one per broker URL per process)."""
    settings = settings or get_settings()
    url = settings.resolved_broker_url
    if url in _apps:
        return _apps[url]
    if settings.is_embedded_broker:
        _configure_embedded_transport()
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        if url.startswith(SQLITE_BROKER_PREFIX):  # 0600 before kombu creates it 0644
            private_file(Path(url.removeprefix(SQLITE_BROKER_PREFIX)))
    app = Celery("lorajobs", broker=url, set_as_current=False)
    app.conf.update(
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=PUBLISH_CONNECT_TIMEOUT_SECONDS,
        broker_transport_options=_transport_options(settings),
        task_default_queue=QUEUE_NAME,
        task_serializer="json",
        accept_content=["json"],
        # The worker re-reads the row; a stale message only costs a no-op claim.
        task_track_started=False,
        worker_send_task_events=False,
        worker_enable_remote_control=not settings.is_embedded_broker,
    )
    _apps[url] = app
    return app


def enqueue_job(job_id: str, settings: Settings | None = None) -> bool:
    """Send the job id to the worker queue. Never raises: False means the broker is down.

    On success the job's `enqueued_at` is stamped, so the reaper waits `requeue_after_seconds`
    before sending it again.
    """
    return send_jobs([job_id], settings)


def send_jobs(job_ids: Sequence[str], settings: Settings | None = None, *,
              stamp: bool = True) -> bool:
    """Send job ids in one broker round trip; stamp their `enqueued_at` in one UPDATE
    (`stamp=False`: the rows were stamped when inserted, see submit.submit_job).

    Never raises: False means nothing may have been sent; their `enqueued_at` is then cleared,
    so the reaper's next sweep sends them. One Celery message per id, as `enqueue_job` always
    sent; on Redis kombu buffers the batch in one pipeline (`Producer.batch`, kombu >= 5.6;
    older kombu publishes them one by one).
    """
    settings = settings or get_settings()
    if not job_ids:
        return True
    try:
        app = get_celery_app(settings)
        with app.producer_or_acquire() as producer:
            batch = getattr(producer, "batch", None)
            with batch() if batch is not None and len(job_ids) > 1 else nullcontext():
                for job_id in job_ids:
                    app.send_task(RUN_JOB_TASK, args=[job_id], queue=QUEUE_NAME,
                                  producer=producer, retry=True,
                                  retry_policy=PUBLISH_RETRY_POLICY)
    except Exception as exc:  # noqa: BLE001 - any broker failure means "send later"
        log.warning("enqueue of %s failed (broker down?): %s", ", ".join(job_ids), exc)
        _stamp(settings, job_ids, sent=False)
        return False
    if stamp:
        _stamp(settings, job_ids, sent=True)
    return True


def _stamp(settings: Settings, job_ids: Sequence[str], *, sent: bool) -> None:
    try:
        from lorajobs.core import jobs
        from lorajobs.core.db import get_sessionmaker

        with get_sessionmaker(settings)() as session:
            (jobs.mark_enqueued if sent else jobs.mark_unsent)(session, list(job_ids))
    except Exception as exc:  # noqa: BLE001 - a wrong stamp costs a re-send, or a late one
        log.warning("could not %s enqueued_at for %s: %s", "stamp" if sent else "clear",
                    ", ".join(job_ids), exc)


class JobSender:
    """Sends committed job ids to the broker from a thread of its own, in batches.

    `sender(job_id)` only queues the id in memory: the request that committed the job answers
    without waiting on the broker, and ids committed while a batch is being sent go out
    together in the next one (one Redis pipeline). Its row already carries `enqueued_at` (set
    at INSERT by submit_job), so a send costs no transaction of its own. Nothing is weakened:
    an id is queued here only after its row is committed; a failed send clears the stamp and
    the reaper's next sweep sends it; an id lost with the process is re-sent by the reaper's
    stale-queue pass `requeue_after_seconds` after its INSERT (DESIGN.md: the broker is only a
    wake-up call). The thread starts with the first id and ends at `close()`.
    """

    def __init__(self, settings: Settings,
                 send: Callable[[Sequence[str], Settings], bool] | None = None) -> None:
        self._settings = settings
        self._send = send or partial(send_jobs, stamp=False)
        self._ids: SimpleQueue[str | None] = SimpleQueue()  # None: stop
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def __call__(self, job_id: str) -> None:
        self._ids.put(job_id)
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="lorajobs-sender",
                                                    daemon=True)
                    self._thread.start()

    def close(self, timeout: float = SENDER_CLOSE_SECONDS) -> None:
        """Send what was queued (for up to `timeout` s), then stop the thread."""
        with self._start_lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._ids.put(None)
            thread.join(timeout)

    def _run(self) -> None:
        stop = False
        while not stop:
            batch: list[str] = []
            first = self._ids.get()
            if first is None:
                return
            batch.append(first)
            while len(batch) < SEND_BATCH_MAX:
                try:
                    job_id = self._ids.get_nowait()
                except Empty:
                    break
                if job_id is None:
                    stop = True
                    break
                batch.append(job_id)
            try:
                self._send(batch, self._settings)
            except Exception:  # noqa: BLE001 - never let the thread die; the reaper re-sends
                log.exception("sending jobs %s failed; the reaper will re-send them", batch)


def broker_ok(settings: Settings | None = None) -> bool:
    """Can we reach the broker right now? For /readyz: one connection, short timeout."""
    settings = settings or get_settings()
    try:
        if settings.is_embedded_broker:
            _configure_embedded_transport()
        with Connection(settings.resolved_broker_url,
                        connect_timeout=BROKER_CHECK_TIMEOUT_SECONDS,
                        transport_options=_transport_options(settings)) as conn:
            # kombu-stubs type the interval and timeout as int; kombu takes float seconds
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.1,  # type: ignore[arg-type]
                                   timeout=BROKER_CHECK_TIMEOUT_SECONDS)  # type: ignore[arg-type]
            if not settings.is_embedded_broker:
                conn.default_channel.client.ping()  # type: ignore[attr-defined]
        return True
    except Exception as exc:  # noqa: BLE001
        log.info("broker not reachable: %s", exc)
        return False


def pending_messages(settings: Settings | None = None) -> int | None:
    """Messages waiting in the job queue (not counting ones a worker holds); None if unknown.

    The reaper re-sends stale queued jobs only when this is 0: while messages wait, workers are
    busy and a re-send would only pile up duplicates (each a no-op, but one per sweep per job).
    """
    settings = settings or get_settings()
    try:
        app = get_celery_app(settings)
        with app.connection_for_write() as conn:
            # kombu-stubs: int intervals (kombu takes float seconds), and StdChannel lacks the
            # queue_declare that every transport's channel has
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.1,  # type: ignore[arg-type]
                                   timeout=BROKER_CHECK_TIMEOUT_SECONDS)  # type: ignore[arg-type]
            declared = conn.default_channel.queue_declare(queue=QUEUE_NAME, passive=True)  # type: ignore[attr-defined]
            return int(declared.message_count)
    except Exception as exc:  # noqa: BLE001 - not knowing means "re-send to be safe"
        log.info("cannot count pending messages: %s", exc)
        return None


def declare_job_queue(settings: Settings) -> None:
    """Create the job queue on the broker before the processes that share it start.

    kombu's SQLAlchemy transport (the embedded broker) creates a queue's row on first use by a
    select then an insert: an API publishing and a worker consuming for the first time at once
    can both insert, and the loser fails on `UNIQUE kombu_queue.name` (seen in CI: `lorajobs
    serve`'s worker died at start and every job stayed queued). Declared once here, by the one
    process that starts the others, both find the row."""
    with get_celery_app(settings).connection_for_write() as conn:
        conn.default_channel.queue_declare(queue=QUEUE_NAME)  # type: ignore[attr-defined]
