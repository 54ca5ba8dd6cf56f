"""The rest of the official client's fine-tuning surface (docs/OPENAI_COMPAT.md), each call as
a user copies it from OpenAI's docs: metadata limits and filters, validation files, result
files through `files.content`, estimated_finish, checkpoint metrics, events pagination."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterator

import openai
import pytest
from openai import OpenAI

from tests.client.live import MODEL, Live
from tests.openai_compat.test_openai_client import CHAT
from tests.servicefixtures import wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def client(live: Live) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{live.url}/openai/v1", api_key=live.key, max_retries=0) as c:
        yield c


def _upload(client: OpenAI, records: list[dict] = CHAT) -> tuple[str, bytes]:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    return client.files.create(file=("chat.jsonl", io.BytesIO(data)), purpose="fine-tune").id, data


def _end(client: OpenAI, job_id: str, timeout: float = 60):
    return wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status
                    in ("succeeded", "failed", "cancelled") and j, timeout=timeout,
                    what=f"{job_id} to end")


def test_metadata_limits_are_openais(client: OpenAI) -> None:
    file_id, _ = _upload(client)
    ok = {f"k{i}": "v" * 512 for i in range(16)}
    ok["x" * 64] = ok.pop("k0")
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=file_id, metadata=ok,
                                         hyperparameters={"n_epochs": 1})
    assert job.metadata == ok
    client.fine_tuning.jobs.cancel(job.id)
    for bad in ({f"k{i}": "v" for i in range(17)}, {"x" * 65: "v"}, {"k": "v" * 513}):
        with pytest.raises(openai.BadRequestError, match="metadata"):
            client.fine_tuning.jobs.create(model=MODEL, training_file=file_id, metadata=bad)


def test_list_filters_by_metadata(client: OpenAI) -> None:
    file_id, _ = _upload(client)
    run = uuid.uuid4().hex
    made = {}
    for team in ("nlp", "vision", "nlp"):
        j = client.fine_tuning.jobs.create(model=MODEL, training_file=file_id,
                                           metadata={"run": run, "team": team},
                                           hyperparameters={"n_epochs": 1})
        made[j.id] = team
        client.fine_tuning.jobs.cancel(j.id)
    nlp = [j.id for j in client.fine_tuning.jobs.list(metadata={"run": run, "team": "nlp"})]
    assert sorted(nlp) == sorted(i for i, t in made.items() if t == "nlp")
    assert {j.id for j in client.fine_tuning.jobs.list(metadata={"run": run})} == set(made)
    assert not list(client.fine_tuning.jobs.list(metadata={"run": run, "team": "audio"}))
    page = client.fine_tuning.jobs.list(metadata={"run": run}, limit=2)
    assert len(page.data) == 2 and page.has_more
    bare = client.fine_tuning.jobs.create(model=MODEL, training_file=file_id,
                                          hyperparameters={"n_epochs": 1})
    client.fine_tuning.jobs.cancel(bare.id)
    without = client.fine_tuning.jobs.list(extra_query={"metadata": "null"}, limit=100)
    assert bare.id in [j.id for j in without.data]
    assert not set(made) & {j.id for j in without.data}
    with pytest.raises(openai.BadRequestError, match="metadata"):
        client.fine_tuning.jobs.list(extra_query={"metadata": "team"})


def test_validation_file_result_files_and_checkpoint_metrics(client: OpenAI,
                                                             live: Live) -> None:
    train_id, train_bytes = _upload(client)
    valid_id, _ = _upload(client, CHAT[:4])
    assert client.files.content(train_id).content == train_bytes
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=train_id,
                                         validation_file=valid_id, seed=11,
                                         suffix="with valid",
                                         method={"type": "supervised", "supervised": {
                                             "hyperparameters": {"n_epochs": "auto"}}})
    assert job.validation_file == valid_id and job.seed == 11
    assert isinstance(job.hyperparameters.n_epochs, int)  # "auto" resolved, as OpenAI shows
    assert job.result_files == []
    running = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status
                       == "running" and j.estimated_finish and j, timeout=30, what="eta")
    assert running.estimated_finish >= running.created_at
    done = _end(client, job.id)
    assert done.status == "succeeded" and done.estimated_finish is None
    assert done.error is None and done.trained_tokens and done.trained_tokens > 0

    [result_id] = done.result_files
    meta = client.files.retrieve(result_id)
    assert meta.purpose == "fine-tune-results" and meta.filename.endswith(".csv")
    text = client.files.content(result_id).text
    assert meta.bytes == len(text.encode())
    rows = list(csv.DictReader(io.StringIO(text)))
    assert text.splitlines()[0] == "step,train_loss,train_accuracy,valid_loss," \
                                   "valid_mean_token_accuracy"
    curve = live.http.get(f"/v1/jobs/{job.id}/metrics", params={"limit": 1000}).json()["data"]
    assert [int(r["step"]) for r in rows] == [m["step"] for m in curve]
    assert [float(r["train_loss"]) for r in rows] == [m["train_loss"] for m in curve]

    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id, limit=100).data
    assert ckpts
    for c in ckpts:
        assert c.metrics.step == c.step_number and c.metrics.train_loss is not None
        assert c.metrics.train_mean_token_accuracy is None  # not computed: null, not made up
        assert c.fine_tuned_model_checkpoint == (
            f"ft:{MODEL}:with-valid:{job.id}:ckpt-step-{c.step_number}")
    first = client.fine_tuning.jobs.checkpoints.list(job.id, limit=1)
    assert first.has_more
    rest = client.fine_tuning.jobs.checkpoints.list(job.id, after=first.data[0].id, limit=100)
    assert [c.id for c in first.data + rest.data] == [c.id for c in ckpts]


def test_missing_files_are_400_naming_the_field(client: OpenAI) -> None:
    train_id, _ = _upload(client)
    with pytest.raises(openai.BadRequestError, match="validation_file"):
        client.fine_tuning.jobs.create(model=MODEL, training_file=train_id,
                                       validation_file="ds_nope")
    with pytest.raises(openai.NotFoundError):
        client.files.content("ftresults-job_nope")
    with pytest.raises(openai.NotFoundError):
        client.files.content("ds_nope")


def test_list_events_pages_to_the_end(client: OpenAI) -> None:
    file_id, _ = _upload(client)
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=file_id,
                                         hyperparameters={"n_epochs": 1})
    _end(client, job.id)
    every = [e.id for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data]
    paged = [e.id for e in client.fine_tuning.jobs.list_events(job.id, limit=3)]  # auto-pages
    assert paged == every and len(every) > 3
    page = client.fine_tuning.jobs.list_events(job.id, limit=3)
    assert page.has_more and len(page.data) == 3
    with pytest.raises(openai.BadRequestError, match="after"):
        client.fine_tuning.jobs.list_events(job.id, after="ftevent-x")


def test_files_delete(client: OpenAI, live: Live) -> None:
    file_id, _ = _upload(client)
    busy = live.submit(max_steps=200, training_file=file_id)
    with pytest.raises(openai.ConflictError, match="used by"):
        client.files.delete(file_id)  # a job still needs it
    client.fine_tuning.jobs.cancel(busy)
    live.wait_end(busy)
    deleted = client.files.delete(file_id)
    assert deleted.id == file_id and deleted.deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file_id)
