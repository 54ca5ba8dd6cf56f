"""lorajobs.core.submit: resolution, estimate, compatibility, idempotency, quota."""

from __future__ import annotations

import io

import pytest
from pydantic import ValidationError

from lora_core.spec import LoraSpec
from lorajobs.core import datasets, submit
from lorajobs.core.errors import InvalidRequest, LimitExceeded
from lorajobs.core.settings import Settings
from lorajobs.core.tables import JobEvent
from tests.api.conftest import alpaca_lines, jsonl
from tests.dbfixtures import db_settings, tiny_tenant  # noqa: F401


@pytest.fixture
def env(db_settings: Settings, tmp_path, tiny_model_dir):  # type: ignore[no-untyped-def]  # noqa: F811
    t = tiny_tenant(db_settings, tmp_path, tiny_model_dir)
    settings, store, session, tenant_id = t.settings, t.store, t.session, t.tenant_id
    ds = datasets.create_dataset(session, tenant_id=tenant_id, filename="d.jsonl",
                                 stream=io.BytesIO(jsonl(alpaca_lines(10))), data_format=None,
                                 settings=settings, store=store)
    sent: list[str] = []

    def create(body: dict, key: str | None = None, s: Settings = settings):  # type: ignore[no-untyped-def]
        request = submit.JobRequest(base_model="tiny", training_file=ds.id, **body)
        return submit.create_job(session, tenant_id=tenant_id, request=request, settings=s,
                                 store=store, idempotency_key=key, enqueue=sent.append)

    yield settings, session, create, sent
    session.close()


def test_resolved_spec_estimate_and_events(env) -> None:  # type: ignore[no-untyped-def]
    settings, session, create, sent = env
    job, created = create({"training": {"batch_size": 3, "gradient_accumulation_steps": 1,
                                        "epochs": 1.5}, "distributed": {"num_processes": 2}})
    assert created and sent == [job.id] and job.max_attempts == settings.max_attempts
    # every default filled in, the spec round-trips through the request model
    again = submit.JobRequest.model_validate(job.spec)
    assert again.lora.target_modules == ["q_proj", "v_proj"]
    assert job.spec["training"]["warmup_ratio"] == 0.0 and job.spec["merge"] == "final"
    assert job.estimate["total_steps"] == 3  # ceil(10 / (3*1*2)) = 2 per epoch, * 1.5
    assert job.estimate["num_tokens"] is None  # counted by the trainer (test_token_counts)
    types = [e.type for e in session.query(JobEvent).filter_by(job_id=job.id)]
    assert types == ["created"]


def test_max_steps_limits_and_quota(env) -> None:  # type: ignore[no-untyped-def]
    settings, session, create, _ = env
    assert create({"training": {"max_steps": 7}})[0].estimate["total_steps"] == 7
    with pytest.raises(InvalidRequest) as info:
        create({"training": {"max_steps": 7}},
               s=settings.model_copy(update={"max_total_steps": 6}))
    assert info.value.param == "training.max_steps"
    with pytest.raises(LimitExceeded):
        create({}, s=settings.model_copy(update={"max_active_jobs_per_tenant": 1}))


def test_idempotency_hash_is_canonical(env) -> None:  # type: ignore[no-untyped-def]
    _, _, create, sent = env
    first, created = create({}, key="k")
    same, created_again = create({"merge": "final", "lora": {"r": 16}}, key="k")
    assert created and not created_again and same.id == first.id and sent == [first.id]
    with pytest.raises(InvalidRequest) as info:
        create({"merge": "none"}, key="k")
    assert info.value.code == "idempotency_key_reused"


def test_compatibility_report() -> None:
    report = submit.compatibility_report(LoraSpec(r=16), truncated=0)
    assert report == {"warnings": [], "vllm": {"supported_rank": True, "max_lora_rank": 16}}
    odd = submit.compatibility_report(LoraSpec(r=24, modules_to_save=["lm_head"]), truncated=2)
    assert odd["vllm"] == {"supported_rank": False, "max_lora_rank": 32}
    assert len(odd["warnings"]) == 3 and "--max-lora-rank 32" in odd["warnings"][0]
    huge = submit.compatibility_report(LoraSpec(r=600), truncated=0)
    assert huge["vllm"]["max_lora_rank"] is None


def test_request_rejects_mass_assignment() -> None:
    with pytest.raises(ValidationError) as info:
        submit.JobRequest(base_model="m", training_file="d", status="succeeded", attempt=9,
                          suffix="UPPER", metadata={f"k{i}": "v" for i in range(17)})
    fields = {".".join(map(str, e["loc"])) for e in info.value.errors()}
    assert {"status", "attempt", "suffix", "metadata"} <= fields
