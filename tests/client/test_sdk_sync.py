"""The synchronous SDK against a live server (API + worker + fake trainer, SQLite).

What a script relies on: a create that is retried after a lost response makes one job, not
two; iterators walk every page; `wait` reports progress as it moves; downloads resume where a
broken transfer stopped and refuse a file whose sha256 does not match; every API error arrives
as the documented exception class.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

import lorajobs.client as sdk
from lorajobs.client import (
    APIConnectionError,
    AuthenticationError,
    ChecksumError,
    Client,
    ConflictError,
    InvalidRequestError,
    Job,
    NotFoundError,
    ServerError,
)
from tests.client.live import MODEL, Live
from tests.client.transports import CutFirstBody, DropFirstResponse, Recording
from tests.evalfixtures import EVALUATION_CURVE, record_evaluations
from tests.servicefixtures import free_port

pytestmark = pytest.mark.timeout(120)


def _is_create(request: httpx.Request) -> bool:
    return request.method == "POST" and request.url.path == "/v1/jobs"


def test_public_surface() -> None:
    """The documented names, and only those: a rename is a breaking change for users."""
    assert set(sdk.__all__) == {
        "Client", "AsyncClient", "LorajobsError", "APIConnectionError", "APIError",
        "AuthenticationError", "ChecksumError", "ConflictError", "InvalidRequestError",
        "NotFoundError", "PayloadTooLargeError", "RateLimitError", "ServerError",
        "UnsafePathError", "Artifact", "Checkpoint", "Dataset", "Event", "Job", "MetricRow",
        "Model", "Webhook", "WebhookDelivery"}
    assert issubclass(sdk.NotFoundError, sdk.APIError)
    assert issubclass(sdk.APIError, sdk.LorajobsError)


def test_create_retried_after_lost_response_makes_one_job(live: Live) -> None:
    dataset = live.upload()
    transport = DropFirstResponse(_is_create)
    with Client(live.url, live.key, transport=transport) as client:
        job = client.jobs.create({"base_model": MODEL, "training_file": dataset,
                                  "training": {"max_steps": 2}})
    creates = [r for r in transport.requests if _is_create(r)]
    assert transport.dropped == 1 and len(creates) == 2
    keys = {r.headers["Idempotency-Key"] for r in creates}
    assert len(keys) == 1 and keys != {""}
    same_file = [j for j in live.http.get("/v1/jobs", params={"limit": 100}).json()["data"]
                 if j["training_file"] == dataset]
    assert [j["id"] for j in same_file] == [job.id]


def test_each_create_call_gets_its_own_key(live: Live) -> None:
    """Two deliberate creates are two jobs: the key is per call, not per client."""
    dataset = live.upload()
    transport = Recording()
    spec = {"base_model": MODEL, "training_file": dataset, "training": {"max_steps": 1}}
    with Client(live.url, live.key, transport=transport) as client:
        a, b = client.jobs.create(spec), client.jobs.create(spec)
    assert a.id != b.id
    keys = [r.headers["Idempotency-Key"] for r in transport.requests if _is_create(r)]
    assert len(set(keys)) == 2


def test_5xx_is_retried_and_then_raised(live: Live) -> None:
    calls: list[str] = []

    def always_503(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers.get("Idempotency-Key", ""))
        return httpx.Response(503, json={"error": {"code": "unavailable",
                                                   "message": "try later", "param": None}})

    with Client("http://lorajobs.test", "k", max_retries=2,
                transport=httpx.MockTransport(always_503)) as client:
        with pytest.raises(ServerError) as info:
            client.jobs.create({"base_model": MODEL, "training_file": "ds_x"})
    assert info.value.status == 503 and "try later" in str(info.value)
    assert len(calls) == 3 and len(set(calls)) == 1  # 1 + 2 retries, one key


def test_unreachable_server_is_a_connection_error() -> None:
    with Client(f"http://127.0.0.1:{free_port()}", "k", max_retries=1) as client:
        with pytest.raises(APIConnectionError, match="cannot reach"):
            client.jobs.get("job_x")


def test_list_iterates_every_page(live: Live) -> None:
    dataset = live.upload()
    created = [live.submit(max_steps=1, training_file=dataset) for _ in range(5)]
    transport = Recording()
    with Client(live.url, live.key, transport=transport) as client:
        listed = [j.id for j in client.jobs.list(limit=2)]
        datasets = [d.id for d in client.datasets.list()]
    assert len(listed) == len(set(listed))  # no job twice across page boundaries
    assert [i for i in listed if i in created] == list(reversed(created))  # newest first
    pages = [r for r in transport.requests if r.url.path == "/v1/jobs"]
    assert len(pages) >= 3 and all(r.url.params["limit"] == "2" for r in pages)
    assert dataset in datasets


def test_wait_reports_progress_until_the_end(live: Live) -> None:
    job_id = live.submit(max_steps=20)
    seen: list[Job] = []
    with Client(live.url, live.key) as client:
        job = client.jobs.wait(job_id, on_progress=seen.append, poll_interval=0.2, timeout=60)
    assert job.status == "succeeded" and job.is_terminal
    steps = [j.progress.step for j in seen if j.progress and j.progress.step is not None]
    assert steps == sorted(steps)
    assert any(0 < s < 20 for s in steps), steps  # we saw it move, not only start and end
    assert seen[-1].id == job_id and seen[-1].status == "succeeded"
    assert job.progress and job.progress.step == 20 and job.progress.total_steps == 20


def test_wait_timeout(live: Live) -> None:
    job_id = live.submit(max_steps=1000)
    try:
        with Client(live.url, live.key) as client:
            with pytest.raises(TimeoutError, match=job_id):
                client.jobs.wait(job_id, poll_interval=0.1, timeout=0.3)
    finally:
        live.http.post(f"/v1/jobs/{job_id}/cancel")
        live.wait_end(job_id)


def test_wait_returns_a_paused_job_instead_of_polling_forever(live: Live) -> None:
    job_id = live.submit(max_steps=1000)
    try:
        with Client(live.url, live.key) as client:
            live.wait_status(job_id, "running")
            client.jobs.pause(job_id)
            job = client.jobs.wait(job_id, poll_interval=0.1, timeout=60)
            assert job.status == "paused" and job.is_settled and not job.is_terminal
    finally:
        live.http.post(f"/v1/jobs/{job_id}/cancel")
        live.wait_end(job_id)


def test_events_stream_follows_to_the_end_and_resumes(live: Live) -> None:
    job_id = live.submit(max_steps=6)
    with Client(live.url, live.key) as client:
        streamed = list(client.jobs.stream_events(job_id))
        types = [e.type for e in streamed]
        assert "finished" in types and types[-1] in ("succeeded", "finished", "status")
        assert client.jobs.get(job_id).status == "succeeded"
        ids = [e.id for e in streamed]
        assert ids == sorted(ids)
        resumed = list(client.jobs.stream_events(job_id, last_event_id=ids[1]))
        assert [e.id for e in resumed] == ids[2:]
        assert [e.id for e in client.jobs.events(job_id)] == ids


def _finished_job(live: Live) -> str:
    job_id = live.submit(max_steps=2)
    assert live.wait_end(job_id)["status"] == "succeeded"
    return job_id


def test_download_resumes_after_a_broken_transfer(live: Live, tmp_path: Path) -> None:
    job_id = _finished_job(live)
    arts = {a["name"]: a for a in live.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
            if a["kind"] == "merged"}
    weights = arts["model.safetensors"]
    assert weights["size"] > 100

    def is_weights(r: httpx.Request) -> bool:
        return r.url.path.endswith(f"/artifacts/{weights['id']}")

    transport = CutFirstBody(is_weights, keep=100)
    with Client(live.url, live.key, transport=transport) as client:
        files = client.jobs.download(job_id, tmp_path / "merged", merged=True)
    assert sorted(p.name for p in files) == sorted(arts)
    for path in files:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == arts[path.name]["sha256"]
    gets = [r for r in transport.requests if is_weights(r)]
    assert transport.cut == 1 and len(gets) == 2
    assert "Range" not in gets[0].headers
    assert gets[1].headers.get("Range") == "bytes=100-"  # resumed, not restarted
    assert not list((tmp_path / "merged").glob("*.part"))


def test_download_continues_a_partial_file(live: Live, tmp_path: Path) -> None:
    """A `.part` left by an earlier run is continued with Range, then verified."""
    job_id = _finished_job(live)
    transport = Recording()
    with Client(live.url, live.key, transport=transport) as client:
        art = next(a for a in client.jobs.artifacts(job_id)
                   if a.kind == "adapter" and a.step is None and a.name.endswith(".safetensors"))
        full = live.http.get(f"/v1/jobs/{job_id}/artifacts/{art.id}").content
        dest = tmp_path / art.name
        dest.with_name(dest.name + ".part").write_bytes(full[:50])
        client.jobs.download_artifact(job_id, art, dest)
    assert dest.read_bytes() == full
    assert transport.requests[-1].headers.get("Range") == "bytes=50-"


def test_corrupt_partial_file_is_a_checksum_error(live: Live, tmp_path: Path) -> None:
    job_id = _finished_job(live)
    with Client(live.url, live.key) as client:
        art = next(a for a in client.jobs.artifacts(job_id)
                   if a.kind == "adapter" and a.step is None and a.name.endswith(".safetensors"))
        dest = tmp_path / art.name
        part = dest.with_name(dest.name + ".part")
        part.write_bytes(b"\0" * 50)  # the right length, the wrong bytes
        with pytest.raises(ChecksumError, match=art.sha256):
            client.jobs.download_artifact(job_id, art, dest)
    assert not dest.exists() and not part.exists()  # the next try starts clean


def test_errors_map_to_exception_classes(live: Live, tmp_path: Path) -> None:
    finished = _finished_job(live)
    with Client(live.url, "lj_wrong_key", max_retries=0) as bad:
        with pytest.raises(AuthenticationError) as auth:
            bad.jobs.get(finished)
    assert auth.value.status == 401
    with Client(live.url, live.key) as client:
        with pytest.raises(NotFoundError) as nf:
            client.jobs.get("job_000000000000000000000000")
        assert nf.value.status == 404
        with pytest.raises(InvalidRequestError) as typo:
            client.jobs.create({"base_model": MODEL, "training_file": live.upload(),
                                "training": {"max_step": 3}})
        assert typo.value.param == "training.max_step"
        assert "training.max_step" in str(typo.value)
        with pytest.raises(ConflictError):
            client.jobs.cancel(finished)
        bad_file = tmp_path / "bad.jsonl"
        bad_file.write_text('{"instruction": "a", "output": "b"}\nnot json\n'
                            '{"instruction": "c"}\n')
        with pytest.raises(InvalidRequestError) as ds:
            client.datasets.upload(bad_file)
        assert [e.get("line") for e in ds.value.errors] == [2, 3]
        assert "line 2" in str(ds.value)


def test_evaluations_and_samples(live: Live) -> None:
    job_id = live.submit(max_steps=4)
    live.wait_end(job_id)
    record_evaluations(live, job_id)  # steps 0 (base), 2 (best) and 4
    with Client(live.url, live.key) as client:
        curve = client.jobs.evaluations(job_id)
        best = client.jobs.samples(job_id)
        step4 = client.jobs.samples(job_id, 4)
        with pytest.raises(NotFoundError, match="no evaluation at step 3"):
            client.jobs.samples(job_id, 3)
    assert curve == EVALUATION_CURVE
    assert best["step"] == 2 and [s["output"] for s in best["samples"]] == ["fox", "<b>x</b>"]
    assert step4["step"] == 4 and step4["base_scores"] == {"exact_match": 0.0}
    assert [s["base_output"] for s in step4["samples"]] == ["tree", "tree"]
