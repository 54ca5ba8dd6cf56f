"""OpenAI's `method` (supervised, dpo) with "auto" hyperparameters resolved and reported, the
legacy top-level `hyperparameters`, and what is refused by name: reinforcement and checkpoint
permissions. The official client against a live server, fake trainer (what DPO
training does is tests/lora_core/test_dpo.py)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import openai
import pytest
from openai import OpenAI

from lora_core.data.synthetic import make_preference_pairs
from tests.client.live import MODEL, Live
from tests.openai_compat.test_openai_client import CHAT
from tests.servicefixtures import wait_for

pytestmark = pytest.mark.timeout(120)
AUTO = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}


@pytest.fixture
def client(live: Live) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{live.url}/openai/v1", api_key=live.key, max_retries=0) as c:
        yield c


def _upload(client: OpenAI, records: list[dict], name: str) -> str:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    return client.files.create(file=(name, io.BytesIO(data)), purpose="fine-tune").id


def test_dpo_with_auto_hyperparameters_reports_the_resolved_values(client: OpenAI,
                                                                   live: Live) -> None:
    prefs = _upload(client, make_preference_pairs(16, seed=1), "prefs.jsonl")
    job = client.fine_tuning.jobs.create(
        model=MODEL, training_file=prefs,
        method={"type": "dpo", "dpo": {"hyperparameters": {**AUTO, "beta": "auto"}}})
    assert job.method.type == "dpo"
    hp = job.method.dpo.hyperparameters
    assert hp.beta == pytest.approx(0.1)  # "auto": DPO's usual beta
    assert isinstance(hp.n_epochs, int) and isinstance(hp.batch_size, int)
    assert hp.learning_rate_multiplier == pytest.approx(1.0)
    spec = live.job(job.id)["spec"]
    assert spec["method"] == "dpo" and spec["dpo"] == {"beta": 0.1}
    done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status
                    in ("succeeded", "failed") and j, timeout=60, what="dpo job end")
    assert done.status == "succeeded", done.error

    set_ = client.fine_tuning.jobs.create(
        model=MODEL, training_file=prefs, method={"type": "dpo", "dpo": {"hyperparameters": {
            "beta": 0.25, "n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 0.5}}})
    hp = set_.method.dpo.hyperparameters
    assert (hp.beta, hp.n_epochs, hp.batch_size) == (0.25, 3, 2)
    assert hp.learning_rate_multiplier == pytest.approx(0.5)
    assert live.job(set_.id)["spec"]["training"]["learning_rate"] == pytest.approx(5e-5)
    client.fine_tuning.jobs.cancel(set_.id)


def test_supervised_method_and_legacy_hyperparameters(client: OpenAI, live: Live) -> None:
    chat = _upload(client, CHAT, "chat.jsonl")
    auto = client.fine_tuning.jobs.create(
        model=MODEL, training_file=chat,
        method={"type": "supervised", "supervised": {"hyperparameters": AUTO}})
    assert auto.method.type == "supervised"
    resolved = auto.method.supervised.hyperparameters
    assert isinstance(resolved.n_epochs, int) and resolved.batch_size == 8
    assert resolved.learning_rate_multiplier == pytest.approx(1.0)
    assert auto.hyperparameters.batch_size == resolved.batch_size  # also at the top level
    assert live.job(auto.id)["spec"]["method"] == "sft"
    legacy = client.fine_tuning.jobs.create(model=MODEL, training_file=chat,
                                            hyperparameters={"n_epochs": 1, "batch_size": 2})
    assert legacy.method.supervised.hyperparameters.batch_size == 2
    for j in (auto, legacy):
        client.fine_tuning.jobs.cancel(j.id)


def test_what_is_not_supported_is_a_clear_400(client: OpenAI, live: Live) -> None:
    chat = _upload(client, CHAT, "chat.jsonl")
    prefs = _upload(client, make_preference_pairs(8, seed=2), "prefs.jsonl")
    with pytest.raises(openai.BadRequestError, match="reinforcement.*not supported yet") as e:
        client.fine_tuning.jobs.create(model=MODEL, training_file=chat, method={
            "type": "reinforcement", "reinforcement": {"grader": {
                "type": "string_check", "name": "g", "input": "{{sample.output_text}}",
                "reference": "x", "operation": "eq"}}})
    assert e.value.param == "method.type"
    with pytest.raises(openai.BadRequestError, match="training_file.*preference.*use method dpo"):
        client.fine_tuning.jobs.create(model=MODEL, training_file=prefs)  # SFT on pairs
    with pytest.raises(openai.BadRequestError,
                       match="training_file.*chat.*method 'dpo'.*use method sft"):
        client.fine_tuning.jobs.create(model=MODEL, training_file=chat,
                                       method={"type": "dpo"})
    name = f"ft:{MODEL}:x:job_{'0' * 24}:ckpt-step-2"
    perms = client.fine_tuning.checkpoints.permissions
    for call in (lambda: perms.retrieve(name), lambda: perms.create(name, project_ids=["p"]),
                 lambda: perms.delete("perm_1", fine_tuned_model_checkpoint=name)):
        with pytest.raises(openai.BadRequestError, match="checkpoint permissions.*not "
                                                          "supported yet"):
            call()
