"""Prometheus metrics: request latency by route template; job figures computed at scrape.

    lorajobs_http_request_duration_seconds{method,route,status}   histogram (middleware)
    lorajobs_jobs{status}                                         gauge
    lorajobs_queue_depth                                          gauge: jobs waiting (queued)
    lorajobs_job_duration_seconds{status}                         histogram, started->finished
    lorajobs_training_tokens_per_second                           gauge: sum over running jobs
    lorajobs_job_tokens_per_second{job_id}                        gauge: latest, per running job
                                                                  (only with a metrics_token)

Each app gets its own `CollectorRegistry`, so several apps in one process (tests) never
collide. The job figures come from the database on every scrape (the database is the source of
truth, and any API replica answers the same): always current, nothing to keep in sync; every
one is an aggregate query, so a scrape costs the same however many jobs there are.

`/metrics` is open unless `metrics_token` is set; open, it shows no job id (the per-job series
would list every tenant's running jobs to anyone). Also here: `RedactSecrets`, the access-log
filter that keeps credentials out of uvicorn's log lines.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorajobs.core.settings import Settings
from lorajobs.core.tables import Job, JobMetric, JobStatus

__all__ = ["make_registry", "MetricsMiddleware", "JobsCollector", "RedactSecrets", "redact",
           "install_access_log_redaction"]

# Seconds; API calls are ms-scale, uploads and tar downloads can take minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)
# Seconds from start to finish; tiny demo runs take seconds, real fine-tunes hours.
DURATION_BUCKETS = (10, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600, 72 * 3600)


class JobsCollector(Collector):
    """The job figures, read at scrape time in one session and three aggregate queries (COUNT
    / SUM ... GROUP BY status): a scrape costs the same with ten jobs or ten million, and
    no row of a job leaves the database but, when the per-job series is on, the running ones
    (one per busy GPU worker)."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings) -> None:
        self.sessions = sessions
        self.settings = settings

    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        # Read at each scrape (tests change settings on a live app).
        per_job = self.settings.metrics_token is not None
        with self.sessions() as session:
            yield from self._by_status(session)
            yield self._durations(session)
            yield from self._throughput(session, per_job=per_job)

    @staticmethod
    def _by_status(session: Session) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("lorajobs_jobs", "jobs by status", labels=["status"])
        counts = {status: 0 for status in JobStatus.ALL}
        for status, count in session.execute(select(Job.status, func.count())
                                             .group_by(Job.status)):
            counts[status] = count
        for status, count in counts.items():
            gauge.add_metric([status], count)
        yield gauge
        yield GaugeMetricFamily("lorajobs_queue_depth", "jobs waiting for a worker (queued)",
                                value=counts[JobStatus.QUEUED])

    @staticmethod
    def _durations(session: Session) -> HistogramMetricFamily:
        """Finished jobs' run time (started -> finished), by final status: count, sum and
        the cumulative buckets computed by the database."""
        seconds = _seconds_between(Job.started_at, Job.finished_at,
                                   session.get_bind().dialect.name)
        seconds = case((seconds < 0, 0.0), else_=seconds)  # clock skew between workers
        columns = [Job.status, func.count(), func.sum(seconds),
                   *(func.sum(case((seconds <= bound, 1), else_=0))
                     for bound in DURATION_BUCKETS)]
        rows = {row[0]: row[1:] for row in session.execute(
            select(*columns).where(Job.status.in_(JobStatus.TERMINAL),
                                   Job.started_at.is_not(None), Job.finished_at.is_not(None))
            .group_by(Job.status))}
        family = HistogramMetricFamily("lorajobs_job_duration_seconds",
                                       "run time of finished jobs (started -> finished)",
                                       labels=["status"])
        for status in sorted(JobStatus.TERMINAL):
            count, total, *in_buckets = rows.get(status) or (0, 0.0, *[0] * len(DURATION_BUCKETS))
            buckets = [(str(b), int(n or 0)) for b, n in zip(DURATION_BUCKETS, in_buckets,
                                                             strict=True)]
            family.add_metric([status], [*buckets, ("+Inf", int(count))],
                              sum_value=float(total or 0.0))
        return family

    @staticmethod
    def _throughput(session: Session, *, per_job: bool) -> Iterator[GaugeMetricFamily]:
        """The newest logged tokens/s of each running job, summed; per job (a `job_id` label:
        every tenant's job ids) only where /metrics needs the metrics token."""
        latest = (select(JobMetric.tokens_per_second)
                  .where(JobMetric.job_id == Job.id, JobMetric.tokens_per_second.is_not(None))
                  .order_by(JobMetric.step.desc()).limit(1)  # uq_job_metrics_step's index
                  .correlate(Job).scalar_subquery())
        running = select(Job.id, latest.label("rate")).where(Job.status == JobStatus.RUNNING)
        if per_job:
            rates = {job_id: rate for job_id, rate in session.execute(running)
                     if rate is not None}
            family = GaugeMetricFamily("lorajobs_job_tokens_per_second",
                                       "training throughput of a running job (latest step)",
                                       labels=["job_id"])
            for job_id, rate in rates.items():
                family.add_metric([job_id], rate)
            yield family
            total = sum(rates.values())
        else:
            rate = running.subquery().c.rate
            total = session.scalar(select(func.coalesce(func.sum(rate), 0.0))) or 0.0
        yield GaugeMetricFamily("lorajobs_training_tokens_per_second",
                                "training throughput summed over running jobs",
                                value=float(total))


def _seconds_between(start: Any, end: Any, dialect: str) -> Any:
    """`end - start` in seconds, in SQL. SQLite keeps datetimes as text: julianday()
    differences, rounded to the millisecond (a day number in a double is only good to
    ~20 us, which would move a job of exactly 60 s out of the 60 s bucket)."""
    if dialect == "postgresql":
        return func.extract("epoch", end - start)
    return func.round((func.julianday(end) - func.julianday(start)) * 86400.0, 3)


def make_registry(sessions: sessionmaker[Session], settings: Settings
                  ) -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    registry.register(JobsCollector(sessions, settings))
    latency = Histogram("lorajobs_http_request_duration_seconds", "HTTP request latency",
                        ["method", "route", "status"], buckets=LATENCY_BUCKETS,
                        registry=registry)
    return registry, latency


# Access log lines (uvicorn: `client - "GET /path?query HTTP/1.1" 200`) never show a
# credential: the value of any query parameter named like one, and anything shaped like an
# API key (keys.KEY_PREFIX + the secret) anywhere in the line. The API reads keys only from
# the Authorization header, which uvicorn does not log; these are keys a client put where it
# should not, and they must not reach log storage either.
_SECRET_PARAM = re.compile(
    r"(?i)((?:^|[?&;])[^=&;?#\s]*(?:key|token|secret|passw|auth|sig|credential|session)"
    r"[^=&;?#\s]*=)[^&;#\s\"]*")
_KEY_SHAPED = re.compile(r"lj(?:_|%5[Ff])[A-Za-z0-9_\-%]{8,}")  # raw or percent-encoded
_REDACTED = "[redacted]"
_REDACTED_LOGGERS = ("uvicorn.access", "uvicorn.error")


def redact(text: str) -> str:
    """`/ui?key=lj_abc&x=1` -> `/ui?key=[redacted]&x=1`; a key-shaped string anywhere ->
    `[redacted]`."""
    return _KEY_SHAPED.sub(_REDACTED, _SECRET_PARAM.sub(r"\1" + _REDACTED, text))


class RedactSecrets(logging.Filter):
    """Rewrites a record's message arguments (and message) through `redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def install_access_log_redaction() -> None:
    """Add RedactSecrets to uvicorn's loggers (once per process; create_app runs in every
    uvicorn process, however it was started: `lorajobs serve`, `lorajobs api`, `uvicorn`)."""
    for name in _REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())


class MetricsMiddleware:
    """Times every HTTP request; labels by the route *template* to keep cardinality bounded."""

    def __init__(self, app: ASGIApp, latency: Histogram) -> None:
        self.app = app
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: dict[str, Any] = {"code": 500}

        async def record_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.latency.labels(scope["method"], template, str(status["code"])).observe(
                time.perf_counter() - start)
