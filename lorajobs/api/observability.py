"""Prometheus metrics: request latency by route template, jobs by status computed at scrape.

Each app gets its own `CollectorRegistry`, so several apps in one process (tests) never
collide. The jobs gauge is a collector that runs one GROUP BY per scrape: always current,
nothing to keep in sync.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorajobs.service.models import Job, JobStatus

__all__ = ["make_registry", "MetricsMiddleware", "JobsCollector"]

# Seconds; API calls are ms-scale, uploads and tar downloads can take minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)


class JobsCollector(Collector):
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("lorajobs_jobs", "jobs by status", labels=["status"])
        counts = {status: 0 for status in JobStatus.ALL}
        with self.sessions() as session:
            rows = session.execute(select(Job.status, func.count()).group_by(Job.status))
            for status, count in rows:
                counts[status] = count
        for status, count in counts.items():
            gauge.add_metric([status], count)
        yield gauge


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
