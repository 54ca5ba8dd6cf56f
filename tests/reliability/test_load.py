"""Load on the live API (uvicorn, no worker: jobs stay queued): concurrent creates that carry
Idempotency-Keys make exactly one job per key, and concurrent creates never exceed the
per-tenant active-job quota. Both backends: SQLite's single writer and PostgreSQL's MVCC race
differently.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from lorajobs.core.db import get_sessionmaker
from lorajobs.core.tables import Job
from tests.servicefixtures import LiveService
from tests.worker.jobfactory import MODEL_NAME, ensure_model_and_dataset

pytestmark = pytest.mark.timeout(180)

CONCURRENT_REQUESTS = 200
DISTINCT_KEYS = 20
QUOTA = 5
QUOTA_REQUESTS = 40


@pytest.fixture
def api(request: pytest.FixtureRequest, tmp_path: Path,
        tiny_model_dir: Path) -> Iterator[tuple[LiveService, str]]:
    """The API alone with the (backend, quota) param; yields the service and a dataset id.
    The idempotency test sets the quota to exactly the number of keys: a replay racing its
    winner must be answered 200, not counted against the quota (429)."""
    backend, quota = request.param
    svc = LiveService(tmp_path, backend, max_active_jobs_per_tenant=quota)
    try:
        svc.migrate()
        _, dataset_id = ensure_model_and_dataset(svc.settings, tiny_model_dir)
        svc.start_api()
        yield svc, dataset_id
    finally:
        svc.close()


def _body(dataset_id: str, seed: int = 1) -> dict:
    return {"base_model": MODEL_NAME, "training_file": dataset_id,
            "training": {"max_steps": 4, "seed": seed}}


async def _post_all(svc: LiveService, bodies: list[tuple[dict, str]]) -> list[httpx.Response]:
    """All requests at once: a barrier-free gather over one pool of as many connections."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=svc.base_url or "", timeout=120, limits=limits,
                                 headers={"Authorization": f"Bearer {svc.admin_key}"}) as c:
        return list(await asyncio.gather(*(
            c.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
            for body, key in bodies)))


def _job_count(svc: LiveService) -> int:
    with get_sessionmaker(svc.settings)() as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


@pytest.mark.parametrize("api", [("sqlite", DISTINCT_KEYS), ("postgresql", DISTINCT_KEYS)],
                         indirect=True)
def test_concurrent_creates_with_idempotency_keys(api: tuple[LiveService, str]) -> None:
    svc, dataset_id = api
    bodies = [(_body(dataset_id), f"key-{i % DISTINCT_KEYS}")
              for i in range(CONCURRENT_REQUESTS)]
    responses = asyncio.run(_post_all(svc, bodies))
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 201}, [r.text for r in responses if r.status_code > 201][:3]
    assert statuses[201] == DISTINCT_KEYS, statuses
    ids_per_key: dict[str, set[str]] = {}
    for (_, key), r in zip(bodies, responses, strict=True):
        ids_per_key.setdefault(key, set()).add(r.json()["id"])
    assert all(len(ids) == 1 for ids in ids_per_key.values()), ids_per_key
    assert len({next(iter(ids)) for ids in ids_per_key.values()}) == DISTINCT_KEYS
    assert _job_count(svc) == DISTINCT_KEYS


@pytest.mark.parametrize("api", [("sqlite", QUOTA), ("postgresql", QUOTA)], indirect=True)
def test_concurrent_creates_never_exceed_the_quota(api: tuple[LiveService, str]) -> None:
    svc, dataset_id = api
    bodies = [(_body(dataset_id, seed=i), f"q-{i}") for i in range(QUOTA_REQUESTS)]
    responses = asyncio.run(_post_all(svc, bodies))
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {201: QUOTA, 429: QUOTA_REQUESTS - QUOTA}, (
        statuses, [r.text for r in responses if r.status_code not in (201, 429)][:3])
    refused = next(r.json()["error"] for r in responses if r.status_code == 429)
    assert refused["code"] == "too_many_active_jobs"
    assert f"the limit is {QUOTA}" in refused["message"]
    assert _job_count(svc) == QUOTA
