"""`/metrics` (issue 10, item 10): a token when one is set, no job ids to an open scrape, and
job figures from aggregate queries whose count does not grow with the jobs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client.parser import text_string_to_metric_families

from lorajobs.core import keys
from lorajobs.core.tables import Job, JobMetric, JobStatus, new_id
from tests.api.conftest import MODEL_NAME, Api
from tests.dbfixtures import recorded_statements

TOKEN = "metrics-token-0123456789"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _add_jobs(api: Api, *specs: tuple[str, float | None, float | None]) -> list[str]:
    """Jobs (status, seconds from T0 to started, run seconds) straight into the database, in
    a tenant of their own; a running job gets two logged steps (100 then 200 tokens/s)."""
    ids = []
    with api.sessions() as session:
        tenant = keys.create_tenant(session, name=new_id("t"))
        for status, start, seconds in specs:
            job = Job(id=new_id("job"), tenant_id=tenant.id, status=status,
                      base_model=MODEL_NAME, training_file="ds_x", spec={},
                      started_at=None if start is None else T0 + timedelta(seconds=start),
                      finished_at=None if seconds is None
                      else T0 + timedelta(seconds=start + seconds))
            session.add(job)
            session.flush()
            if status == JobStatus.RUNNING:
                session.add_all([JobMetric(job_id=job.id, step=1, tokens_per_second=100.0),
                                 JobMetric(job_id=job.id, step=2, tokens_per_second=200.0)])
            ids.append(job.id)
        session.commit()
    return ids


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}




def test_metrics_token_is_required_when_set(api: Api) -> None:
    running = _add_jobs(api, (JobStatus.RUNNING, 0, None))[0]
    open_scrape = api.client.get("/metrics")
    assert open_scrape.status_code == 200
    assert "job_id" not in open_scrape.text and running not in open_scrape.text
    assert _samples(open_scrape.text)[("lorajobs_training_tokens_per_second", ())] == 200.0

    api.client.app.state.settings.metrics_token = TOKEN
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"},
                    {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {api.keys['admin']}"}):
        refused = api.client.get("/metrics", headers=headers)
        assert refused.status_code == 401, headers
        assert refused.json()["error"]["code"] == "unauthorized"
        assert refused.headers["www-authenticate"] == "Bearer"
        assert running not in refused.text
    scrape = api.client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert scrape.status_code == 200
    m = _samples(scrape.text)
    assert m[("lorajobs_job_tokens_per_second", (("job_id", running),))] == 200.0
    assert m[("lorajobs_training_tokens_per_second", ())] == 200.0


def test_job_figures_are_aggregates(api: Api) -> None:
    """Durations 5, 60 (a bucket's bound, exactly), 4000 s succeeded; 30 s failed: counts,
    sums and cumulative buckets computed by the database; the statements of a scrape are
    the same number whatever the number of jobs, and each one aggregates."""
    _add_jobs(api, (JobStatus.SUCCEEDED, 0, 5), (JobStatus.SUCCEEDED, 1.5, 60),
              (JobStatus.SUCCEEDED, 7, 4000), (JobStatus.FAILED, 3, 30),
              (JobStatus.CANCELLED, None, None), (JobStatus.QUEUED, None, None),
              (JobStatus.RUNNING, 0, None))
    with recorded_statements(api.settings) as few:
        m = _samples(api.client.get("/metrics").text)

    def h(suffix: str, status: str, **labels: str) -> float:
        key = (f"lorajobs_job_duration_seconds_{suffix}",
               tuple(sorted({"status": status, **labels}.items())))
        return m[key]

    assert h("count", "succeeded") == 3 and h("sum", "succeeded") == 4065
    assert [h("bucket", "succeeded", le=le) for le in ("10", "60", "300", "3600",
                                                        "14400", "+Inf")] == [1, 2, 2, 2, 3, 3]
    assert h("count", "failed") == 1 and h("sum", "failed") == 30
    assert h("bucket", "failed", le="10") == 0 and h("bucket", "failed", le="60") == 1
    assert h("count", "cancelled") == 0  # never started: no run time
    assert m[("lorajobs_jobs", (("status", "queued"),))] == 1
    assert m[("lorajobs_queue_depth", ())] == 1
    assert m[("lorajobs_training_tokens_per_second", ())] == 200.0

    _add_jobs(api, *[(JobStatus.SUCCEEDED, 0, 50)] * 40, *[(JobStatus.RUNNING, 0, None)] * 5)
    with recorded_statements(api.settings) as many:
        m = _samples(api.client.get("/metrics").text)
    assert h("count", "succeeded") == 43
    assert m[("lorajobs_training_tokens_per_second", ())] == 6 * 200.0
    assert len(many) == len(few) <= 4, many
    reads = [s.lower() for s in many if "from jobs" in s.lower()]
    assert reads and all("count(" in s or "sum(" in s for s in reads), reads
