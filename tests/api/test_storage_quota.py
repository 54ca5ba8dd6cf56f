"""The per-tenant storage quota: uploads and new jobs refused past it (413), DELETE of a dataset
and of a finished job's artifacts frees the bytes, and GET /v1/usage shows it."""

from __future__ import annotations

import hashlib
import io
import os

import pytest

from lorajobs.core import jobs
from lorajobs.core.settings import Settings
from lorajobs.core.storage import get_store
from lorajobs.core.tables import Job
from lorajobs.worker.event_recorder import register_dir
from tests.api.conftest import MODEL_NAME, Api, alpaca_lines, jsonl

DATASET = jsonl(alpaca_lines(12))
QUOTA = 2 * len(DATASET) + 200  # two datasets fit, a third does not


@pytest.fixture
def api_settings(api_settings: Settings) -> Settings:
    return api_settings.model_copy(update={"storage_quota_bytes_per_tenant": QUOTA})


def usage(api: Api, who: str = "alice") -> dict:
    resp = api.client.get("/v1/usage", headers=api.h(who))
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_dataset_quota_delete_frees_it(api: Api) -> None:
    first, second = api.dataset("alice"), api.dataset("alice")
    assert usage(api)["storage"] == {"datasets_bytes": 2 * len(DATASET), "artifacts_bytes": 0,
                                     "used_bytes": 2 * len(DATASET), "quota_bytes": QUOTA,
                                     "remaining_bytes": 200}
    over = api.upload("alice", DATASET)
    assert over.status_code == 413, over.text
    assert over.json()["error"]["code"] == "storage_quota_exceeded"
    assert "DELETE /v1/datasets" in over.json()["error"]["message"]
    assert api.upload("bob", DATASET).status_code == 201  # per tenant

    job = api.job("alice", first)  # a queued job trains on it: not deletable yet
    busy = api.client.delete(f"/v1/datasets/{first}", headers=api.h("alice"))
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "dataset_in_use"
    assert api.client.delete(f"/v1/datasets/{first}", headers=api.h("bob")).status_code == 404
    api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api.h("alice"))
    path = get_store(api.settings).local_path(
        f"datasets/{api.sessions().get(Job, job['id']).tenant_id}/{first}.jsonl")
    assert path.is_file()
    gone = api.client.delete(f"/v1/datasets/{first}", headers=api.h("alice"))
    assert gone.status_code == 200 and gone.json() == {
        "id": first, "object": "dataset", "deleted": True, "freed_bytes": len(DATASET)}
    assert not path.exists()
    assert api.client.get(f"/v1/datasets/{first}", headers=api.h("alice")).status_code == 404
    assert usage(api)["storage"]["used_bytes"] == len(DATASET)
    assert api.upload("alice", DATASET).status_code == 201
    assert second


def _finish_with_artifacts(api: Api, job_id: str, nbytes: int) -> None:
    """What a worker leaves behind: an adapter dir registered as artifacts, job succeeded."""
    store = get_store(api.settings)
    files = []
    for name, data in (("adapter_config.json", b"{}"),
                       ("adapter_model.safetensors", os.urandom(nbytes))):
        key = f"jobs/{job_id}/attempt-1/adapter/{name}"
        store.put_stream(key, io.BytesIO(data))
        files.append((name, key, len(data), hashlib.sha256(data).hexdigest()))
    with api.sessions() as session:
        job = jobs.claim(session, job_id, owner="w", lease_seconds=60)
        assert job is not None
        register_dir(session, job_id=job_id, kind="adapter", step=None, files=files)
        jobs.transition(session, job, to="succeeded", expect_owner="w")
        session.commit()


def test_artifacts_count_and_delete_frees_them(api: Api) -> None:
    ds = api.dataset("alice")
    job = api.job("alice", ds)
    url = f"/v1/jobs/{job['id']}/artifacts"
    running = api.client.delete(url, headers=api.h("alice"))
    assert running.status_code == 409 and running.json()["error"]["code"] == "job_not_finished"
    _finish_with_artifacts(api, job["id"], nbytes=QUOTA)  # now over the quota
    used = usage(api)["storage"]
    assert used["artifacts_bytes"] == QUOTA + 2 and used["remaining_bytes"] == 0
    refused = api.submit("alice", {"base_model": MODEL_NAME, "training_file": ds})
    assert refused.status_code == 413
    assert refused.json()["error"]["code"] == "storage_quota_exceeded"
    assert api.client.delete(url, headers=api.h("bob")).status_code == 404

    resp = api.client.delete(url, headers=api.h("alice"))
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"id": job["id"], "object": "job.artifacts", "deleted": True,
                           "files": 2, "freed_bytes": QUOTA + 2}
    assert not get_store(api.settings).local_path(f"jobs/{job['id']}").exists()
    assert api.client.get(url, headers=api.h("alice")).json()["data"] == []
    assert api.client.get(f"/v1/jobs/{job['id']}/adapter",
                          headers=api.h("alice")).status_code == 404
    assert usage(api)["storage"]["artifacts_bytes"] == 0
    assert api.client.get(f"/v1/jobs/{job['id']}", headers=api.h("alice")).json()[
        "status"] == "succeeded"  # the job itself stays
    assert api.submit("alice", {"base_model": MODEL_NAME, "training_file": ds}
                      ).status_code == 201


def test_usage_lists_active_jobs_and_limits(api: Api) -> None:
    ds = api.dataset("alice")
    api.job("alice", ds)
    body = usage(api)
    assert body["active_jobs"] == 1
    assert body["max_active_jobs"] == api.settings.max_active_jobs_per_tenant
    assert body["limits"]["max_seq_length"] == api.settings.max_seq_length
    assert body["limits"]["max_job_runtime_seconds"] == api.settings.max_job_runtime_seconds
    assert usage(api, "bob")["active_jobs"] == 0
