"""Pause and resume through the official client (`jobs.pause`, `jobs.resume`), our SDK and
the CLI, against a live server with the fake trainer (exactness of the resumed training is
tests/e2e/test_pause_exact.py, with the real one).

OpenAI's API reference lists `pausing` and `paused` among a job's statuses: a running job
with a pause pending shows `pausing`, a paused one `paused`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from lorajobs.client import AsyncClient, Client
from lorajobs.worker.runspec import job_scratch_dir
from tests.cli.runcli import cli
from tests.client.live import Live
from tests.servicefixtures import wait_for
from tests.worker.jobfactory import fake_dir

pytestmark = pytest.mark.timeout(150)
STEPS = 60  # fake trainer: 0.1 s a step, a checkpoint every 2
LOGS = ["run/events-attempt1.jsonl", "run/trainer-attempt1.log"]


@pytest.fixture
def client(live: Live) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{live.url}/openai/v1", api_key=live.key, max_retries=0) as c:
        yield c


def _at_step(live: Live, job_id: str, step: int) -> None:
    wait_for(lambda: (live.job(job_id)["progress"] or {}).get("step", 0) >= step, timeout=30,
             what=f"{job_id} at step {step}")


def _events(live: Live, job_id: str) -> list[dict]:
    return live.http.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]


def test_pause_frees_the_worker_and_resume_continues(client: OpenAI, live: Live) -> None:
    job_id = live.submit(max_steps=STEPS)
    _at_step(live, job_id, 4)
    pausing = client.fine_tuning.jobs.pause(job_id)
    assert pausing.id == job_id and pausing.status in ("pausing", "paused")
    paused = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status
                      == "paused" and j, timeout=30, what="paused")
    assert paused.finished_at is None and paused.fine_tuned_model is None
    native = live.job(job_id)
    assert native["status"] == "paused" and native["attempt"] == 0  # pause refunds the attempt
    stopped_at = max(c["step"] for c in live.http.get(
        f"/v1/jobs/{job_id}/checkpoints").json()["data"])
    assert client.fine_tuning.jobs.pause(job_id).status == "paused"  # idempotent
    # the node keeps only the logs (a resume here appends to them); checkpoints are in the store
    scratch = job_scratch_dir(live.svc.settings, job_id)
    wait_for(lambda: sorted(p.relative_to(scratch).as_posix() for p in scratch.rglob("*")
                            if p.is_file()) == LOGS, timeout=10, what="the scratch trimmed")

    other = live.submit(max_steps=4)  # the only worker is free: another job runs meanwhile
    assert live.wait_end(other)["status"] == "succeeded"
    assert live.job(job_id)["status"] == "paused"

    resumed = client.fine_tuning.jobs.resume(job_id)
    assert resumed.status in ("queued", "running")
    with pytest.raises(openai.ConflictError, match="paused"):  # only a paused job resumes
        client.fine_tuning.jobs.resume(job_id)
    done = live.wait_end(job_id, timeout=60)
    assert done["status"] == "succeeded", done["error"]
    started = [e for e in _events(live, job_id) if e["type"] == "started"]
    assert [e["data"]["resumed_from_step"] for e in started] == [0, stopped_at]
    steps = [m["step"] for m in live.http.get(f"/v1/jobs/{job_id}/metrics",
                                              params={"limit": 1000}).json()["data"]]
    assert steps == list(range(1, STEPS + 1))
    statuses = [e["data"]["to"] for e in _events(live, job_id) if e["type"] == "status"]
    assert statuses == ["running", "paused", "queued", "running", "succeeded"]
    # the events log artifact holds both runs (the pause refunded the attempt: one file)
    log = next(a for a in live.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
               if a["name"] == "events-attempt1.jsonl")
    body = live.http.get(f"/v1/jobs/{job_id}/artifacts/{log['id']}").text
    assert sum(json.loads(line)["type"] == "started" for line in body.splitlines()) == 2
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.pause(job_id)


def test_a_queued_job_pauses_at_once_and_a_paused_one_cancels(client: OpenAI,
                                                               live: Live) -> None:
    busy = live.submit(max_steps=STEPS)
    live.wait_status(busy, "running")
    waiting = live.submit(max_steps=4)
    paused = client.fine_tuning.jobs.pause(waiting)
    assert paused.status == "paused"
    r = live.http.delete(f"/v1/datasets/{live.job(waiting)['spec']['training_file']}")
    assert r.status_code == 409  # a paused job still needs its data
    cancelled = client.fine_tuning.jobs.cancel(waiting)
    assert cancelled.status == "cancelled"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.resume(waiting)
    client.fine_tuning.jobs.cancel(busy)
    live.wait_end(busy)


def test_sdk_and_cli_pause_and_resume(live: Live, tmp_path: Path) -> None:
    job_id = live.submit(max_steps=STEPS)
    _at_step(live, job_id, 2)
    with Client(base_url=live.url, api_key=live.key) as sdk:
        assert sdk.jobs.pause(job_id).status in ("running", "paused")
        live.wait_status(job_id, "paused")
        assert sdk.jobs.resume(job_id).status in ("queued", "running")
    _at_step(live, job_id, 10)

    asyncio.run(_aio_pause(live, job_id))
    live.wait_status(job_id, "paused")
    asyncio.run(_aio_resume(live, job_id))
    _at_step(live, job_id, 20)
    out = cli(live, "pause", job_id, cwd=tmp_path)
    assert out.returncode == 0 and job_id in out.stdout, out.stderr
    live.wait_status(job_id, "paused")
    out = cli(live, "resume", job_id, "--json", cwd=tmp_path)
    assert out.returncode == 0 and json.loads(out.stdout)["status"] in ("queued", "running")
    assert live.wait_end(job_id)["status"] == "succeeded"
    out = cli(live, "resume", job_id, cwd=tmp_path)
    assert out.returncode != 0 and "only a paused job can be resumed" in out.stderr


async def _aio_pause(live: Live, job_id: str) -> None:
    async with AsyncClient(base_url=live.url, api_key=live.key) as aio:
        assert (await aio.pause_job(job_id)).status in ("running", "paused")


async def _aio_resume(live: Live, job_id: str) -> None:
    async with AsyncClient(base_url=live.url, api_key=live.key) as aio:
        assert (await aio.resume_job(job_id)).status in ("queued", "running")


def test_a_failed_job_reports_an_openai_error_object(client: OpenAI, live: Live) -> None:
    """Paused, told (through the fake trainer's control file) to fail on resume: the job's
    `error` is OpenAI's {code, message, param}."""
    job_id = live.submit(max_steps=STEPS)
    _at_step(live, job_id, 2)
    client.fine_tuning.jobs.pause(job_id)
    live.wait_status(job_id, "paused")
    control = fake_dir(live.svc.settings) / f"{job_id}.control.json"  # tests/worker/fake_trainer
    control.write_text(json.dumps({"error_at_step": STEPS - 1}))
    client.fine_tuning.jobs.resume(job_id)
    failed = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status
                      == "failed" and j, timeout=60, what="failed")
    assert failed.error is not None
    assert failed.error.code == "dataset_error" and failed.error.param == "training_file"
    assert "line 3" in failed.error.message
    assert failed.result_files == [] and failed.fine_tuned_model is None
