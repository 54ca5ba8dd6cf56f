"""POST/GET /v1/jobs and cancel: resolution, validation naming fields, idempotency, paging."""

from __future__ import annotations

import threading

from sqlalchemy import func, select

from lorajobs.core import jobs
from lorajobs.core.tables import Job, JobStatus
from tests.api.conftest import MODEL_NAME, Api


def test_create_resolves_spec_and_get(api: Api) -> None:
    ds = api.dataset("alice", 12)
    job = api.job("alice", ds, suffix="demo-1", metadata={"team": "nlp"},
                  training={"batch_size": 2, "gradient_accumulation_steps": 2, "epochs": 3,
                            "max_seq_length": 16})
    assert job["status"] == "queued" and job["attempt"] == 0 and job["queue_position"] == 0
    assert api.enqueued == [job["id"]]
    spec = job["spec"]
    assert spec["lora"]["target_modules"] == ["q_proj", "v_proj"]  # the llama default
    assert spec["lora"]["r"] == 16 and spec["training"]["learning_rate"] == 1e-4
    assert spec["distributed"] == {"num_processes": 1, "zero_stage": 0}
    assert spec["merge"] == "final" and spec["training"]["lr_scheduler"] == "constant"
    est = job["estimate"]
    assert est["num_examples"] == 12 and est["total_steps"] == 9 and est["eta_seconds"] is None
    assert est["num_tokens"] is None  # the trainer counts (tests/worker/test_token_counts.py)
    assert job["compatibility"]["vllm"] == {"supported_rank": True, "max_lora_rank": 16}
    assert job["compatibility"]["warnings"] == []
    assert job["progress"] == {"step": 0, "total_steps": 9, "epoch": None, "fraction": 0.0,
                               "eta_seconds": None}
    assert job["metrics"] == {"train_loss": None, "eval_loss": None}
    assert job["fine_tuned_model"] is None and job["metadata"] == {"team": "nlp"}
    got = api.client.get(f"/v1/jobs/{job['id']}", headers=api.h("alice")).json()
    assert got == job
    second = api.job("alice", ds, lora={"r": 12, "target_modules": "all-linear",
                                        "modules_to_save": ["lm_head"]})
    assert second["queue_position"] == 1
    assert set(second["spec"]["lora"]["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    compat = second["compatibility"]
    assert compat["vllm"] == {"supported_rank": False, "max_lora_rank": 16}
    assert len(compat["warnings"]) == 2


def test_bad_spec_fields_are_named(api: Api) -> None:
    ds = api.dataset("alice")
    resp = api.submit("alice", {"base_model": MODEL_NAME, "training_file": ds,
                                "status": "succeeded", "tenant_id": "x",
                                "lora": {"r": 0, "rank": 8}, "training": {"epochs": -1},
                                "suffix": "Bad Suffix", "metadata": {str(i): "v"
                                                                     for i in range(17)}})
    assert resp.status_code == 422
    body = resp.json()
    fields = {e["field"] for e in body["errors"]}
    assert {"status", "tenant_id", "lora.r", "lora.rank", "training.epochs", "suffix",
            "metadata"} <= fields
    assert body["error"]["code"] == "invalid_request" and body["error"]["param"] in fields
    missing = api.submit("alice", {"base_model": MODEL_NAME})
    assert missing.json()["error"]["param"] == "training_file"
    with api.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0


def test_model_targets_datasets_and_limits_checked(api: Api) -> None:
    ds = api.dataset("alice")
    bobs = api.dataset("bob")

    def error(**body):  # type: ignore[no-untyped-def]
        resp = api.submit("alice", {"base_model": MODEL_NAME, "training_file": ds, **body})
        assert resp.status_code == 422, resp.text
        return resp.json()["error"]

    err = error(base_model="gpt-17")
    assert err["param"] == "base_model" and "gpt-17" in err["message"]
    err = error(lora={"target_modules": ["q_proj", "nope_proj"]})
    assert err["param"] == "lora.target_modules" and "v_proj" in err["message"]
    assert error(lora={"r": 64})["param"] == "lora.r"  # k/v are 32 wide in the tiny model
    err = error(training_file=bobs)
    assert err["param"] == "training_file" and err["message"] == f"no dataset {bobs!r}"
    assert error(validation_file="ds_nope")["param"] == "validation_file"
    api.client.app.state.settings.max_total_steps = 5
    assert error(training={"max_steps": 6})["param"] == "training.max_steps"
    assert error(training={"epochs": 100})["param"] == "training.epochs"
    api.client.app.state.settings.max_total_steps = 1000
    api.client.app.state.settings.max_active_jobs_per_tenant = 1
    api.job("alice", ds)
    resp = api.submit("alice", {"base_model": MODEL_NAME, "training_file": ds})
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "too_many_active_jobs"
    api.job("bob", bobs)  # the quota is per tenant


def test_a_paused_job_still_counts_against_the_active_quota(api: Api) -> None:
    """Pausing must not free room: pause N, submit N more, resume all would be 2N active."""
    ds = api.dataset("alice")
    api.client.app.state.settings.max_active_jobs_per_tenant = 1
    first = api.job("alice", ds)["id"]
    paused = api.client.post(f"/v1/jobs/{first}/pause", headers=api.h("alice"))
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    resp = api.submit("alice", {"base_model": MODEL_NAME, "training_file": ds})
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "too_many_active_jobs"
    assert "paused" in resp.json()["error"]["message"]
    cancelled = api.client.post(f"/v1/jobs/{first}/cancel", headers=api.h("alice"))
    assert cancelled.status_code == 200
    assert api.submit("alice", {"base_model": MODEL_NAME, "training_file": ds}).status_code == 201


def test_idempotency(api: Api) -> None:
    ds = api.dataset("alice")
    body = {"base_model": MODEL_NAME, "training_file": ds}
    first = api.submit("alice", body, **{"Idempotency-Key": "k1"})
    again = api.submit("alice", {**body, "merge": "final"}, **{"Idempotency-Key": "k1"})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = api.submit("alice", {**body, "suffix": "x"}, **{"Idempotency-Key": "k1"})
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    # Keys are per tenant: bob's "k1" is a different key.
    bobs = api.submit("bob", {**body, "training_file": api.dataset("bob")},
                      **{"Idempotency-Key": "k1"})
    assert bobs.status_code == 201 and bobs.json()["id"] != first.json()["id"]
    assert api.enqueued == [first.json()["id"], bobs.json()["id"]]


def test_concurrent_duplicates_make_one_job(api: Api) -> None:
    ds = api.dataset("alice")
    body = {"base_model": MODEL_NAME, "training_file": ds}
    n = 4
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def post(i: int) -> None:
        barrier.wait()
        results[i] = api.submit("alice", body, **{"Idempotency-Key": "race"})

    threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in results) == [200] * (n - 1) + [201]
    assert len({r.json()["id"] for r in results}) == 1
    with api.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1
    assert len(api.enqueued) == 1


def test_list_pagination_and_filters(api: Api) -> None:
    ds = api.dataset("alice")
    ids = [api.job("alice", ds)["id"] for _ in range(5)]
    api.job("bob", api.dataset("bob"))
    seen: list[str] = []
    url = "/v1/jobs?limit=2"
    while True:
        page = api.client.get(url, headers=api.h("alice")).json()
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        url = f"/v1/jobs?limit=2&after={page['next_cursor']}"
    assert seen == ids[::-1]  # newest first, alice's only
    cancelled = api.client.post(f"/v1/jobs/{ids[1]}/cancel", headers=api.h("alice")).json()
    assert cancelled["status"] == "cancelled" and cancelled["queue_position"] is None
    only = api.client.get("/v1/jobs?status=cancelled", headers=api.h("alice")).json()["data"]
    assert [j["id"] for j in only] == [ids[1]]
    bad = api.client.get("/v1/jobs?status=done", headers=api.h("alice"))
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "status"
    bad = api.client.get("/v1/jobs?limit=0", headers=api.h("alice"))
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "limit"
    assert api.client.get("/v1/jobs?after=job_x", headers=api.h("alice")).status_code == 422


def test_cancel_queued_running_and_terminal(api: Api) -> None:
    ds = api.dataset("alice")
    job = api.job("alice", ds)
    resp = api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api.h("alice"))
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    again = api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api.h("alice"))
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_not_cancellable"
    running = api.job("alice", ds)
    with api.sessions() as session:
        assert jobs.claim(session, running["id"], owner="w1", lease_seconds=60)
    resp = api.client.post(f"/v1/jobs/{running['id']}/cancel", headers=api.h("alice")).json()
    assert resp["status"] == JobStatus.RUNNING and resp["cancel_requested"] is True
