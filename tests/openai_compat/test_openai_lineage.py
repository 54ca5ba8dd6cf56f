"""Checkpoints you can build on: a checkpoint's `fine_tuned_model_checkpoint`, or a finished
job's `fine_tuned_model`, as the `model` of a new job (the official client, fake trainer);
natively `base_model` naming a job or checkpoint. That the weights really carry over is
tests/lora_core/test_init_adapter.py and tests/e2e/test_lineage_real.py."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from openai import OpenAI

from tests.client.live import MODEL, Live
from tests.servicefixtures import wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def client(live: Live) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{live.url}/openai/v1", api_key=live.key, max_retries=0) as c:
        yield c


def _done(client: OpenAI, job_id: str):
    return wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status
                    in ("succeeded", "failed", "cancelled") and j, timeout=60, what="job end")


def test_new_jobs_from_a_checkpoint_and_from_a_fine_tuned_model(client: OpenAI,
                                                                 live: Live) -> None:
    file_id = live.upload()
    parent_id = live.submit(max_steps=6, training_file=file_id, suffix="parent",
                            lora={"r": 4, "alpha": 8, "target_modules": ["q_proj"]})
    parent = _done(client, parent_id)
    assert parent.status == "succeeded", parent.error
    [ckpt, *_] = client.fine_tuning.jobs.checkpoints.list(parent_id).data

    child = client.fine_tuning.jobs.create(model=ckpt.fine_tuned_model_checkpoint,
                                           training_file=file_id, suffix="child")
    assert child.model == ckpt.fine_tuned_model_checkpoint  # as created, like OpenAI
    native = live.job(child.id)
    assert native["spec"]["init_from"] == {"job": parent_id, "step": ckpt.step_number,
                                           "model": ckpt.fine_tuned_model_checkpoint}
    assert native["spec"]["base_model"] == MODEL
    assert native["spec"]["lora"]["r"] == 4  # inherited
    assert native["spec"]["lora"]["target_modules"] == ["q_proj"]
    done = _done(client, child.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{MODEL}:child:{child.id}"

    grandchild = client.fine_tuning.jobs.create(model=done.fine_tuned_model,
                                                training_file=file_id)
    assert live.job(grandchild.id)["spec"]["init_from"]["step"] is None  # the final adapter
    assert _done(client, grandchild.id).status == "succeeded"

    r = live.http.post("/v1/jobs", json={"base_model": f"{parent_id}:ckpt-step-"
                                         f"{ckpt.step_number}", "training_file": file_id,
                                         "training": {"max_steps": 2}})
    assert r.status_code == 201, r.text  # natively: the job id (and a checkpoint)
    assert r.json()["spec"]["init_from"]["job"] == parent_id
    live.wait_end(r.json()["id"])


def test_what_cannot_be_built_on_is_a_clear_400(client: OpenAI, live: Live) -> None:
    file_id = live.upload()
    parent_id = live.submit(max_steps=4, training_file=file_id,
                            lora={"r": 4, "alpha": 8})
    with pytest.raises(openai.BadRequestError, match="only a succeeded job") as info:
        client.fine_tuning.jobs.create(model=f"ft:{MODEL}:x:{parent_id}",
                                       training_file=file_id)
    assert info.value.param == "model"
    live.wait_end(parent_id)
    with pytest.raises(openai.BadRequestError, match="no checkpoint step 999"):
        client.fine_tuning.jobs.create(model=f"ft:{MODEL}:x:{parent_id}:ckpt-step-999",
                                       training_file=file_id)
    with pytest.raises(openai.BadRequestError, match="no fine-tuned model"):
        client.fine_tuning.jobs.create(model=f"ft:{MODEL}:x:job_{'0' * 24}",
                                       training_file=file_id)
    r = live.http.post("/v1/jobs", json={"base_model": parent_id, "training_file": file_id,
                                         "lora": {"r": 8, "alpha": 8}})
    assert r.status_code in (400, 422), r.text
    error = r.json()["error"]
    assert error["param"] == "lora.r" and "keeps its LoRA config" in error["message"]
    r = live.http.post("/v1/jobs", json={"base_model": parent_id, "training_file": file_id,
                                         "lora": {"r": 4, "alpha": 8},
                                         "training": {"max_steps": 2}})
    assert r.status_code == 201, r.text  # the same values are no conflict
    live.wait_end(r.json()["id"])
