"""Prometheus metrics: request latency by route template; job figures computed at scrape.

    lorajobs_http_request_duration_seconds{method,route,status}   histogram (middleware)
    lorajobs_jobs{status}                                         gauge
    lorajobs_queue_depth                                          gauge: jobs waiting (queued)
    lorajobs_job_duration_seconds{status}                         histogram, started->finished
    lorajobs_training_tokens_per_second                           gauge: sum over running jobs
    lorajobs_job_tokens_per_second{job_id}                        gauge: latest, per running job

Each app gets its own `CollectorRegistry`, so several apps in one process (tests) never
collide. The job figures come from the database on every scrape (the database is the source of
truth, and any API replica answers the same): always current, nothing to keep in sync.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorajobs.service.models import Job, JobMetric, JobStatus

__all__ = ["make_registry", "MetricsMiddleware", "JobsCollector"]

# Seconds; API calls are ms-scale, uploads and tar downloads can take minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)
# Seconds from start to finish; tiny demo runs take seconds, real fine-tunes hours.
DURATION_BUCKETS = (10, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600, 72 * 3600)


class JobsCollector(Collector):
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        with self.sessions() as session:
            yield from self._by_status(session)
            yield self._durations(session)
            yield from self._throughput(session)

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
        """Finished jobs' run time (started -> finished), by final status."""
        rows = session.execute(select(Job.status, Job.started_at, Job.finished_at).where(
            Job.status.in_(JobStatus.TERMINAL), Job.started_at.is_not(None),
            Job.finished_at.is_not(None)))
        seconds: dict[str, list[float]] = {s: [] for s in sorted(JobStatus.TERMINAL)}
        for status, started, finished in rows:
            seconds[status].append(max(0.0, (finished - started).total_seconds()))
        family = HistogramMetricFamily("lorajobs_job_duration_seconds",
                                       "run time of finished jobs (started -> finished)",
                                       labels=["status"])
        for status, values in seconds.items():
            buckets = [(str(b), sum(v <= b for v in values)) for b in DURATION_BUCKETS]
            family.add_metric([status], [*buckets, ("+Inf", len(values))],
                              sum_value=sum(values))
        return family

    @staticmethod
    def _throughput(session: Session) -> Iterator[GaugeMetricFamily]:
        """The newest logged tokens/s of each running job (running jobs are few: one per GPU
        worker, so the job_id label stays bounded), and their sum."""
        per_job = GaugeMetricFamily("lorajobs_job_tokens_per_second",
                                    "training throughput of a running job (latest step)",
                                    labels=["job_id"])
        total = 0.0
        running = session.scalars(select(Job.id).where(Job.status == JobStatus.RUNNING))
        for job_id in running:
            rate = session.scalar(select(JobMetric.tokens_per_second)
                                  .where(JobMetric.job_id == job_id,
                                         JobMetric.tokens_per_second.is_not(None))
                                  .order_by(JobMetric.step.desc()).limit(1))
            if rate is not None:
                per_job.add_metric([job_id], rate)
                total += rate
        yield per_job
        yield GaugeMetricFamily("lorajobs_training_tokens_per_second",
                                "training throughput summed over running jobs", value=total)


def make_registry(sessions: sessionmaker[Session]) -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    registry.register(JobsCollector(sessions))
    latency = Histogram("lorajobs_http_request_duration_seconds", "HTTP request latency",
                        ["method", "route", "status"], buckets=LATENCY_BUCKETS,
                        registry=registry)
    return registry, latency


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
