"""The asyncio SDK against the same live server: the job lifecycle, awaitable.

Each test drives its coroutine with `asyncio.run` (no async test plugin needed).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from lorajobs.client import (
    AsyncClient,
    AuthenticationError,
    InvalidRequestError,
    Job,
    NotFoundError,
)
from tests.client.live import MODEL, Live, alpaca_records, write_jsonl
from tests.client.transports import AsyncDropFirstResponse
from tests.evalfixtures import EVALUATION_CURVE, record_evaluations

pytestmark = pytest.mark.timeout(120)


def test_async_create_retried_after_lost_response_makes_one_job(live: Live,
                                                                 tmp_path: Path) -> None:
    transport = AsyncDropFirstResponse(
        lambda r: r.method == "POST" and r.url.path == "/v1/jobs")

    async def scenario() -> tuple[str, str, list[str]]:
        async with AsyncClient(live.url, live.key, transport=transport) as client:
            ds = await client.upload_dataset(write_jsonl(tmp_path / "t.jsonl",
                                                         alpaca_records(8)))
            job = await client.create_job({"base_model": MODEL, "training_file": ds.id,
                                           "training": {"max_steps": 2}})
            listed = [j.id async for j in client.list_jobs(limit=1)
                      if j.training_file == ds.id]  # type: ignore[attr-defined]
            return ds.id, job.id, listed

    dataset, job_id, listed = asyncio.run(scenario())
    keys = {r.headers["Idempotency-Key"] for r in transport.requests
            if r.method == "POST" and r.url.path == "/v1/jobs"}
    assert transport.dropped == 1 and len(keys) == 1
    assert listed == [job_id]  # one job, found by walking one-job pages
    assert dataset.startswith("ds_")


def test_async_wait_with_async_progress_callback(live: Live) -> None:
    job_id = live.submit(max_steps=15)
    seen: list[int] = []

    async def on_progress(job: Job) -> None:
        await asyncio.sleep(0)
        seen.append(job.progress.step if job.progress and job.progress.step else 0)

    async def scenario() -> Job:
        async with AsyncClient(live.url, live.key) as client:
            return await client.wait(job_id, on_progress=on_progress, poll_interval=0.2)

    job = asyncio.run(scenario())
    assert job.status == "succeeded"
    assert seen == sorted(seen) and seen[-1] == 15 and any(0 < s < 15 for s in seen), seen


def test_async_cancel_and_errors(live: Live) -> None:
    job_id = live.submit(max_steps=1000)

    async def scenario() -> Job:
        async with AsyncClient(live.url, live.key) as client:
            while (await client.get_job(job_id)).status != "running":
                await asyncio.sleep(0.1)
            await client.cancel_job(job_id)
            with pytest.raises(InvalidRequestError, match="lora.rank"):
                await client.create_job({"base_model": MODEL, "training_file": "ds_x",
                                         "lora": {"rank": 8}})
            return await client.wait(job_id, poll_interval=0.2)

    assert asyncio.run(scenario()).status == "cancelled"

    async def wrong_key() -> None:
        async with AsyncClient(live.url, "lj_nope", max_retries=0) as client:
            await client.get_job(job_id)

    with pytest.raises(AuthenticationError):
        asyncio.run(wrong_key())


def test_async_transport_error_is_not_swallowed() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused (test)", request=request)

    async def scenario() -> None:
        transport = httpx.MockTransport(refuse)
        async with AsyncClient("http://lorajobs.test", "k", max_retries=1,
                               transport=transport) as client:
            await client.get_job("job_x")

    from lorajobs.client import APIConnectionError

    with pytest.raises(APIConnectionError):
        asyncio.run(scenario())


def test_async_evaluations_and_samples(live: Live) -> None:
    job_id = live.submit(max_steps=4)
    live.wait_end(job_id)
    record_evaluations(live, job_id)  # steps 0 (base), 2 (best) and 4

    async def scenario() -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
        async with AsyncClient(live.url, live.key) as client:
            with pytest.raises(NotFoundError, match="no evaluation at step 3"):
                await client.samples(job_id, 3)
            return (await client.evaluations(job_id), await client.samples(job_id),
                    await client.samples(job_id, 4))

    curve, best, step4 = asyncio.run(scenario())
    assert curve == EVALUATION_CURVE
    assert best["step"] == 2 and [s["output"] for s in best["samples"]] == ["fox", "<b>x</b>"]
    assert step4["step"] == 4 and step4["base_scores"] == {"exact_match": 0.0}
    assert [s["base_output"] for s in step4["samples"]] == ["tree", "tree"]
