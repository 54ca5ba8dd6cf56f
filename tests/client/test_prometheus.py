"""`/metrics` on a live server, read the way Prometheus reads it (the text format parser):
jobs by status, queue depth, finished jobs' durations, running jobs' tokens/s, HTTP latency.
The per-job series and the metrics token: tests/api/test_prometheus_scrape.py."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.client.live import Live
from tests.servicefixtures import wait_for

pytestmark = pytest.mark.timeout(90)


def _scrape(live: Live) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{live.url}/metrics", timeout=10).text  # open: no metrics_token set
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _get(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _active(live: Live) -> float:
    m = _scrape(live)
    return _get(m, "lorajobs_jobs", status="queued") + _get(m, "lorajobs_jobs", status="running")


def test_metrics_follow_the_jobs(live: Live) -> None:
    wait_for(lambda: _active(live) == 0, timeout=60, what="earlier tests' jobs to end")
    before = _scrape(live)
    # Checkpoints per job are bounded (max_checkpoints_per_job): save every 100 steps.
    blocker = live.submit(training={"max_steps": 1000, "save_steps": 100})
    live.wait_status(blocker, "running")
    waiting = [live.submit(max_steps=5) for _ in range(2)]  # one worker: these wait
    m = _scrape(live)
    assert _get(m, "lorajobs_queue_depth") == 2
    assert _get(m, "lorajobs_jobs", status="queued") == 2
    assert _get(m, "lorajobs_jobs", status="running") == 1

    wait_for(lambda: live.job(blocker)["progress"]["step"] >= 2, timeout=20, what="steps")
    m = _scrape(live)
    assert _get(m, "lorajobs_training_tokens_per_second") == 100.0  # fake trainer
    # No metrics_token on this server: the open scrape names no job (tests/api: with one).
    assert not any(k[0] == "lorajobs_job_tokens_per_second" for k in m)

    live.http.post(f"/v1/jobs/{blocker}/cancel")
    for job_id in waiting:
        assert live.wait_end(job_id)["status"] == "succeeded"
    m = _scrape(live)
    assert _get(m, "lorajobs_queue_depth") == 0
    assert _get(m, "lorajobs_training_tokens_per_second") == 0.0

    def grew(name: str, status: str) -> float:
        return _get(m, name, status=status) - _get(before, name, status=status)

    assert grew("lorajobs_job_duration_seconds_count", "succeeded") == 2
    assert grew("lorajobs_job_duration_seconds_count", "cancelled") == 1
    assert grew("lorajobs_job_duration_seconds_sum", "succeeded") >= 2 * 5 * 0.1
    assert _get(m, "lorajobs_job_duration_seconds_bucket", status="succeeded", le="+Inf") \
        == _get(m, "lorajobs_job_duration_seconds_count", status="succeeded")

    latency = _get(m, "lorajobs_http_request_duration_seconds_count", method="GET",
                   route="/v1/jobs/{job_id}", status="200")
    assert latency >= 3  # live.job() polls above, labelled by the route template

