"""The retried create on PostgreSQL + Redis (the production backends): a lost response and
its retry still make exactly one job, which a worker then runs to the end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lorajobs.client import Client
from tests.client.live import MODEL, Live, start_live
from tests.client.transports import DropFirstResponse

pytestmark = [pytest.mark.services, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def live_pg(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Live]:
    yield from start_live(tmp_path_factory.mktemp("live-pg"), tiny_model_dir,
                          backend="postgresql")


def test_retried_create_is_one_job_on_postgresql(live_pg: Live) -> None:
    def is_create(r: httpx.Request) -> bool:
        return r.method == "POST" and r.url.path == "/v1/jobs"

    dataset = live_pg.upload()
    transport = DropFirstResponse(is_create)
    with Client(live_pg.url, live_pg.key, transport=transport) as client:
        job = client.jobs.create({"base_model": MODEL, "training_file": dataset,
                                  "training": {"max_steps": 3}})
        done = client.jobs.wait(job.id, poll_interval=0.2, timeout=60)
        listed = [j.id for j in client.jobs.list(limit=1)]
    assert transport.dropped == 1
    assert listed == [job.id] and done.status == "succeeded"
