"""Deploy a finished job's adapter to vLLM servers and chat with it through /openai/v1.

Against tests/fake_vllm.py (a fake vLLM HTTP server: load/unload/models/chat with streaming);
the real vLLM is in test_vllm_e2e.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lorajobs.core import serving
from lorajobs.core.storage import get_store
from lorajobs.core.tables import Artifact, Job, JobStatus, new_id
from tests.api.conftest import MODEL_NAME, Api
from tests.fake_vllm import FakeVllm

ADAPTER_CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                  "target_modules": ["q_proj", "v_proj"], "modules_to_save": None}


def finished_job(api: Api, who: str = "alice", *, step: int | None = None,
                 config: dict[str, Any] | None = None, **spec: Any) -> Job:
    """A job as the worker leaves it: succeeded, its adapter files stored and registered."""
    job_id = api.job(who, api.dataset(who), **spec)["id"]
    store = get_store(api.settings)
    files = {"adapter_config.json": json.dumps(config or ADAPTER_CONFIG).encode(),
             "adapter_model.safetensors": bytes(range(256)) * 4}
    with api.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status = JobStatus.SUCCEEDED
        for name, data in files.items():
            key = f"jobs/{job_id}/adapter/{step}/{name}"
            tmp = api.settings.data_dir / "tmp-artifact"
            tmp.write_bytes(data)
            store.put_file(key, tmp)
            session.add(Artifact(id=new_id("art"), job_id=job_id, kind="adapter", step=step,
                                 name=name, storage_key=key, size=len(data),
                                 sha256=hashlib.sha256(data).hexdigest()))
        session.commit()
        session.refresh(job)
        session.expunge(job)
        return job


def model_ids(api: Api, who: str) -> list[str]:
    resp = api.client.get("/openai/v1/models", headers=api.h(who))
    assert resp.status_code == 200, resp.text
    return [m["id"] for m in resp.json()["data"]]


@pytest.fixture
def fake() -> Iterator[FakeVllm]:
    with FakeVllm(MODEL_NAME, api_key="server-secret") as server:
        yield server


@pytest.fixture
def target(api: Api, fake: FakeVllm, tmp_path: Path) -> dict[str, Any]:
    body = {"name": "local", "urls": [fake.url], "base_models": [MODEL_NAME],
            "api_key": "server-secret", "adapter_dir": str(tmp_path / "adapters"),
            "max_lora_rank": 16}
    resp = api.client.post("/v1/serving-targets", headers=api.h("admin"), json=body)
    assert resp.status_code == 201, resp.text
    return body


def test_targets_are_admin_only_and_hide_their_key(api: Api, target: dict[str, Any]) -> None:
    body = {**target, "name": "other"}
    resp = api.client.post("/v1/serving-targets", headers=api.h("alice"), json=body)
    assert resp.status_code == 403
    again = api.client.post("/v1/serving-targets", headers=api.h("admin"), json=target)
    assert again.status_code == 409
    bad = api.client.post("/v1/serving-targets", headers=api.h("admin"),
                          json={**target, "name": "x", "urls": ["ftp://h"]})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "urls"
    listed = api.client.get("/v1/serving-targets", headers=api.h("alice")).json()["data"]
    assert [t["name"] for t in listed] == ["local"]
    assert listed[0]["has_api_key"] is True and "api_key" not in listed[0]


def test_deploy_chat_stream_isolation_reconcile_undeploy(api: Api, fake: FakeVllm,
                                                         target: dict[str, Any]) -> None:
    job = finished_job(api)
    name = f"ft:{MODEL_NAME}:lorajobs:{job.id}"
    resp = api.client.post(f"/v1/jobs/{job.id}/deploy", headers=api.h("alice"),
                           json={"target": "local"})
    assert resp.status_code == 200, resp.text
    dep = resp.json()
    assert dep["model"] == name and dep["live"] is True
    path = Path(fake.adapters[name])
    assert json.loads((path / "adapter_config.json").read_text())["r"] == 8
    assert path.is_relative_to(target["adapter_dir"])
    # Idempotent: a second deploy answers the same deployment, loads nothing twice.
    again = api.client.post(f"/v1/jobs/{job.id}/deploy", headers=api.h("alice"),
                            json={"target": "local"})
    assert again.status_code == 200 and again.json()["id"] == dep["id"]
    assert list(fake.adapters) == [name]

    chat = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
    answer = api.client.post("/openai/v1/chat/completions", headers=api.h("alice"), json=chat)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "Hello from the fake server"
    with api.client.stream("POST", "/openai/v1/chat/completions", headers=api.h("alice"),
                           json={**chat, "stream": True}) as streamed:
        assert streamed.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in streamed.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert "".join(json.loads(ln[6:])["choices"][0]["delta"]["content"]
                   for ln in lines[:-1]) == "Hello from the fake server"
    text = api.client.post("/openai/v1/completions", headers=api.h("alice"),
                           json={"model": name, "prompt": "x"})
    assert text.json()["choices"][0]["text"] == "Hello from the fake server"
    base = api.client.post("/openai/v1/chat/completions", headers=api.h("bob"),
                           json={**chat, "model": MODEL_NAME})
    assert base.status_code == 200  # a served base model: any tenant

    # Another tenant: the name does not exist for it, anywhere.
    assert api.client.post("/openai/v1/chat/completions", headers=api.h("bob"),
                           json=chat).status_code == 404
    assert api.client.post(f"/v1/jobs/{job.id}/deploy", headers=api.h("bob"),
                           json={"target": "local"}).status_code == 404
    assert model_ids(api, "alice") == [MODEL_NAME, name]
    assert model_ids(api, "bob") == [MODEL_NAME]

    # A restarted server forgot the adapter: the reconciler loads it again.
    fake.restart()
    with api.sessions() as session:
        assert serving.reconcile(session, api.settings, get_store(api.settings)) == 1
        assert serving.reconcile(session, api.settings, get_store(api.settings)) == 0
    assert name in fake.adapters

    gone = api.client.delete(f"/v1/jobs/{job.id}/deploy?target=local", headers=api.h("alice"))
    assert gone.status_code == 204
    assert name not in fake.adapters and not path.exists()
    assert model_ids(api, "alice") == [MODEL_NAME]
    assert api.client.post("/openai/v1/chat/completions", headers=api.h("alice"),
                           json=chat).status_code == 404


@pytest.mark.parametrize(("config", "problem"), [
    ({**ADAPTER_CONFIG, "r": 32}, "max_lora_rank 16"),
    ({**ADAPTER_CONFIG, "target_modules": ["q_proj", "lm_head"]}, "['lm_head']"),
    ({**ADAPTER_CONFIG, "modules_to_save": ["embed_tokens"]}, "modules_to_save"),
])
def test_unservable_adapters_are_refused_before_loading(api: Api, fake: FakeVllm,
                                                        target: dict[str, Any],
                                                        config: dict[str, Any],
                                                        problem: str) -> None:
    job = finished_job(api, config=config)
    resp = api.client.post(f"/v1/jobs/{job.id}/deploy", headers=api.h("alice"),
                           json={"target": "local"})
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "adapter_not_servable" and problem in error["message"]
    assert fake.adapters == {} and not [r for r in fake.requests if r[0] == "load"]
    with api.sessions() as session:
        assert serving.list_deployments(session, job_id=job.id) == []


def test_checkpoint_deploys_under_its_checkpoint_name(api: Api, fake: FakeVllm,
                                                      target: dict[str, Any]) -> None:
    job = finished_job(api, step=5)
    missing = api.client.post(f"/v1/jobs/{job.id}/deploy", headers=api.h("alice"),
                              json={"target": "local", "checkpoint": 7})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "checkpoint"
    resp = api.client.post(f"/v1/jobs/{job.id}/deploy", headers=api.h("alice"),
                           json={"target": "local", "checkpoint": 5})
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == f"ft:{MODEL_NAME}:lorajobs:{job.id}:ckpt-step-5"
    assert api.client.post(f"/v1/jobs/{job.id}/deploy", headers=api.h("alice"),
                           json={"target": "nowhere"}).status_code == 404


def test_a_server_that_is_down_is_recorded_and_reconciled(api: Api, fake: FakeVllm,
                                                          tmp_path: Path) -> None:
    from lorajobs.localserver import free_port

    down = f"http://127.0.0.1:{free_port()}"
    body = {"name": "pair", "urls": [fake.url, down], "base_models": [MODEL_NAME],
            "api_key": "server-secret", "adapter_dir": str(tmp_path / "adapters")}
    assert api.client.post("/v1/serving-targets", headers=api.h("admin"),
                           json=body).status_code == 201
    job = finished_job(api)
    dep = api.client.post(f"/v1/jobs/{job.id}/deploy", headers=api.h("alice"),
                          json={"target": "pair"}).json()
    state = {s["url"]: s for s in dep["servers"]}
    assert dep["live"] is True and state[fake.url]["loaded"] is True
    assert state[down]["loaded"] is False and "ConnectError" in state[down]["error"]
    # The proxy goes to the server that has it, whichever order the target lists.
    chat = {"model": dep["model"], "messages": [{"role": "user", "content": "hi"}]}
    assert api.client.post("/openai/v1/chat/completions", headers=api.h("alice"),
                           json=chat).status_code == 200
    assert api.client.delete("/v1/serving-targets/pair",
                             headers=api.h("admin")).status_code == 409


def test_an_unwritable_adapter_dir_is_502_and_nothing_is_recorded(api: Api, fake: FakeVllm,
                                                                   tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    body = {"name": "broken", "urls": [fake.url], "base_models": [MODEL_NAME],
            "api_key": "server-secret", "adapter_dir": str(blocker)}
    assert api.client.post("/v1/serving-targets", headers=api.h("admin"),
                           json=body).status_code == 201
    job = finished_job(api)
    resp = api.client.post(f"/v1/jobs/{job.id}/deploy", headers=api.h("alice"),
                           json={"target": "broken"})
    assert resp.status_code == 502, resp.text
    assert resp.json()["error"]["code"] == "serving_unavailable"
    assert fake.adapters == {}
    with api.sessions() as session:
        assert serving.list_deployments(session, job_id=job.id) == []


def test_async_sdk_deploys_and_undeploys(api: Api, fake: FakeVllm,
                                         target: dict[str, Any]) -> None:
    import asyncio

    import httpx

    from lorajobs.client.aio import AsyncClient

    job = finished_job(api)

    async def main() -> dict[str, Any]:
        transport = httpx.ASGITransport(app=api.client.app)
        async with AsyncClient("http://testserver", api.keys["alice"],
                               transport=transport, max_retries=1) as client:
            dep = await client.deploy(job.id, "local")
            assert list(fake.adapters) == [dep["model"]]
            await client.undeploy(job.id, "local")
            return dep

    dep = asyncio.run(main())
    assert dep["live"] is True and fake.adapters == {}


def test_a_spec_deploy_target_is_checked_at_submit_and_deployed_once_on_success(
        api: Api, fake: FakeVllm, target: dict[str, Any]) -> None:
    ds = api.dataset("alice")
    for deploy, lora, expected in [({"target": "nope"}, {}, "no serving target 'nope'"),
                                   ({"target": "local"}, {"r": 32}, "max_lora_rank 16")]:
        resp = api.submit("alice", {"base_model": MODEL_NAME, "training_file": ds,
                                    "deploy": deploy, "lora": lora})
        assert resp.status_code == 422, resp.text
        error = resp.json()["error"]
        assert error["param"] == "deploy.target" and expected in error["message"]
    plain = finished_job(api)  # no deploy asked: left alone
    job = finished_job(api, deploy={"target": "local"})
    store = get_store(api.settings)
    with api.sessions() as session:
        assert serving.deploy_succeeded_jobs(session, api.settings, store) == 1
        assert serving.deploy_succeeded_jobs(session, api.settings, store) == 0  # once
    name = f"ft:{MODEL_NAME}:lorajobs:{job.id}"
    assert list(fake.adapters) == [name]
    assert model_ids(api, "alice") == [MODEL_NAME, name]
    events = api.client.get(f"/v1/jobs/{job.id}/events", headers=api.h("alice")).json()["data"]
    deployed = [e for e in events if e["type"] == "deployed"]
    assert len(deployed) == 1 and deployed[0]["data"]["model"] == name
    listed = api.client.get(f"/v1/jobs/{plain.id}/deployments", headers=api.h("alice"))
    assert listed.status_code == 200 and listed.json()["data"] == []


def test_an_undeploy_during_a_reconcile_leaves_no_adapter_behind(
        api: Api, fake: FakeVllm, target: dict[str, Any], tmp_path: Path) -> None:
    """The reconciler read the deployment, then the undeploy ran (row gone, adapter unloaded)
    while its reload was on the way: the reload lands after the unload, so the reconciler
    re-checks the row and unloads again. Before, the adapter stayed on the server with no
    deployment (found by test_vllm_e2e on a loaded box)."""
    from lorajobs.core.vllm_client import VllmClient

    job = finished_job(api)
    dep = api.client.post(f"/v1/jobs/{job.id}/deploy", headers=api.h("alice"),
                          json={"target": "local"}).json()
    fake.restart()  # the server forgot it: the next sweep reloads it

    class UndeployedMidLoad(VllmClient):
        def load(self, name: str, path: str) -> None:
            kept = shutil.copytree(path, tmp_path / "kept")  # files a server still reads
            with api.sessions() as other:  # another process's undeploy, between read and load
                serving.undeploy(other, job=other.get(Job, job.id), target_name="local",
                                 step=None, settings=api.settings)
            assert name not in fake.adapters
            shutil.copytree(kept, path)
            super().load(name, path)
            assert name in fake.adapters  # landed after the unload

    with api.sessions() as session:
        assert serving.reconcile(session, api.settings, get_store(api.settings),
                                 client=UndeployedMidLoad) == 0
    assert dep["model"] not in fake.adapters
    with api.sessions() as session:
        assert serving.list_deployments(session, job_id=job.id) == []
        assert serving.reconcile(session, api.settings, get_store(api.settings)) == 0
    assert dep["model"] not in fake.adapters
