"""The official `openai` package, unchanged, pointed at a live server's `/openai/v1`.

The fake trainer runs the jobs (the compat layer translates; what trains is covered by the
SDK and CLI real-trainer tests). Each call is the one a user copies from OpenAI's docs.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import openai
import pytest
from openai import OpenAI

from tests.client.live import MODEL, Live, alpaca_records
from tests.servicefixtures import wait_for

pytestmark = pytest.mark.timeout(120)

CHAT = [{"messages": [{"role": "system", "content": "You reverse words."},
                      {"role": "user", "content": r["input"]},
                      {"role": "assistant", "content": r["output"]}]}
        for r in alpaca_records(12)]


@pytest.fixture
def client(live: Live) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{live.url}/openai/v1", api_key=live.key, max_retries=0) as c:
        yield c


def _file(client: OpenAI) -> str:
    data = "".join(json.dumps(r) + "\n" for r in CHAT).encode()
    f = client.files.create(file=("chat.jsonl", io.BytesIO(data)), purpose="fine-tune")
    return f.id


def test_files_create_and_retrieve(client: OpenAI) -> None:
    data = "".join(json.dumps(r) + "\n" for r in CHAT).encode()
    f = client.files.create(file=("chat.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert f.object == "file" and f.purpose == "fine-tune" and f.bytes == len(data)
    assert f.filename == "chat.jsonl" and f.status == "processed"
    assert client.files.retrieve(f.id).id == f.id
    assert f.id in [x.id for x in client.files.list()]


def test_files_create_rejects_bad_lines(client: OpenAI) -> None:
    bad = b'{"messages": [{"role": "bot", "content": "x"}]}\nnot json\n'
    with pytest.raises(openai.BadRequestError) as info:  # 400, as OpenAI answers
        client.files.create(file=("bad.jsonl", io.BytesIO(bad)), purpose="fine-tune")
    assert "line 1" in str(info.value) and "line 2" in str(info.value)


def test_fine_tuning_job_lifecycle(client: OpenAI, live: Live) -> None:
    file_id = _file(client)
    job = client.fine_tuning.jobs.create(
        model=MODEL, training_file=file_id, suffix="Reverse Words!",
        seed=7, metadata={"team": "nlp"},
        hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 2.0})
    assert job.object == "fine_tuning.job" and job.status in ("validating_files", "queued",
                                                              "running")
    assert job.model == MODEL and job.training_file == file_id and job.seed == 7
    assert job.metadata == {"team": "nlp"} and job.fine_tuned_model is None
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4
    assert job.hyperparameters.learning_rate_multiplier == pytest.approx(2.0)
    assert job.user_provided_suffix == "reverse-words"
    spec = live.job(job.id)["spec"]["training"]
    assert spec["epochs"] == 2 and spec["batch_size"] == 4 and spec["seed"] == 7

    done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status
                    in ("succeeded", "failed", "cancelled") and j, timeout=60, what="job end")
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{MODEL}:reverse-words:{job.id}"
    assert done.finished_at and done.finished_at >= done.created_at
    assert done.trained_tokens is not None and done.trained_tokens > 0

    events = client.fine_tuning.jobs.list_events(job.id, limit=100)
    created = [e.created_at for e in events.data]
    assert created == sorted(created, reverse=True)  # newest first, like OpenAI
    assert all(e.object == "fine_tuning.job.event" for e in events.data)
    assert any("completed" in e.message for e in events.data)
    first_page = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert first_page.has_more
    rest = client.fine_tuning.jobs.list_events(job.id, limit=100,
                                               after=first_page.data[-1].id)
    assert [e.id for e in first_page.data + rest.data] == [e.id for e in events.data]

    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id)
    steps = [c.step_number for c in ckpts.data]
    assert steps and steps == sorted(steps, reverse=True)
    assert all(c.fine_tuning_job_id == job.id and c.object == "fine_tuning.job.checkpoint"
               for c in ckpts.data)
    assert ckpts.data[0].metrics.step == steps[0]


def test_list_pages_with_after_and_limit(client: OpenAI) -> None:
    file_id = _file(client)
    ids = [client.fine_tuning.jobs.create(model=MODEL, training_file=file_id,
                                          hyperparameters={"n_epochs": 1}).id
           for _ in range(3)]
    page = client.fine_tuning.jobs.list(limit=2)
    assert len(page.data) == 2 and page.has_more
    every = [j.id for j in client.fine_tuning.jobs.list(limit=2)]  # auto-pagination
    assert len(every) == len(set(every))
    assert [i for i in every if i in ids] == list(reversed(ids))


def test_cancel(client: OpenAI, live: Live) -> None:
    file_id = _file(client)
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=file_id,
                                         hyperparameters={"n_epochs": 200})
    live.wait_status(job.id, "running")
    cancelling = client.fine_tuning.jobs.cancel(job.id)
    assert cancelling.id == job.id and cancelling.status in ("running", "cancelled")
    done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status
                    == "cancelled" and j, timeout=30, what="cancelled")
    assert done.fine_tuned_model is None
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(job.id)


def test_errors_arrive_as_openai_exceptions(client: OpenAI, live: Live) -> None:
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    with pytest.raises(openai.BadRequestError) as bad:  # 400, as OpenAI answers
        client.fine_tuning.jobs.create(model=MODEL, training_file=_file(client),
                                       hyperparameters={"n_epochs": 0, "batch_size": 0})
    assert "n_epochs" in str(bad.value) and "batch_size" in str(bad.value)  # all at once
    with pytest.raises(openai.BadRequestError, match="no-such-model"):
        client.fine_tuning.jobs.create(model="no-such-model", training_file=_file(client))
    with OpenAI(base_url=f"{live.url}/openai/v1", api_key="sk-wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.fine_tuning.jobs.list()
