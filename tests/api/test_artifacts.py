"""Events, metrics, checkpoints and downloads (tar, single file with Range + sha256 headers)."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile

from lorajobs.core import jobs
from lorajobs.core.storage import get_store
from lorajobs.core.tables import Artifact, Checkpoint, JobMetric, new_id
from tests.api.conftest import Api

FILES = {"adapter_config.json": b'{"r": 16}', "adapter_model.safetensors": bytes(range(256)) * 9}


def add_artifacts(api: Api, job_id: str, kind: str, step: int | None,
                  files: dict[str, bytes] = FILES) -> list[str]:
    """What the worker would write: files in the store plus their Artifact rows."""
    store = get_store(api.settings)
    ids = []
    with api.sessions() as session:
        for name, data in files.items():
            key = f"jobs/{job_id}/{kind}/{step}/{name}"
            tmp = api.settings.data_dir / "tmp-artifact"
            tmp.write_bytes(data)
            store.put_file(key, tmp)
            row = Artifact(id=new_id("art"), job_id=job_id, kind=kind, step=step, name=name,
                           storage_key=key, size=len(data),
                           sha256=hashlib.sha256(data).hexdigest())
            session.add(row)
            ids.append(row.id)
        session.commit()
    return ids


def test_events_ordered_and_paged(api: Api) -> None:
    job = api.job("alice", api.dataset("alice"))
    with api.sessions() as session:
        for i in range(5):
            jobs.add_event(session, job["id"], "log", f"message {i}")
        session.commit()
    url = f"/v1/jobs/{job['id']}/events"
    events = api.client.get(url, headers=api.h("alice")).json()["data"]
    assert events[0]["type"] == "created"
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    assert [e["message"] for e in events[-5:]] == [f"message {i}" for i in range(5)]
    page = api.client.get(f"{url}?limit=2", headers=api.h("alice")).json()
    assert page["has_more"] and len(page["data"]) == 2
    rest = api.client.get(f"{url}?after={page['next_cursor']}", headers=api.h("alice")).json()
    assert [e["id"] for e in page["data"] + rest["data"]] == [e["id"] for e in events]
    api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api.h("alice"))
    with api.client.stream("GET", f"{url}/stream", headers=api.h("alice")) as resp:
        body = "".join(resp.iter_text())
    # every event, the cancel's status event, then the end of the stream (the job is over)
    assert body.count("event: ") == len(events) + 2 and "event: status" in body
    assert body.rstrip().endswith('event: end\r\ndata: {"reason": "finished"}')


def test_metrics_and_checkpoints(api: Api) -> None:
    job_id = api.job("alice", api.dataset("alice"))["id"]
    with api.sessions() as session:
        for step in (20, 10):
            session.add(JobMetric(job_id=job_id, step=step, epoch=step / 20,
                                  train_loss=3.0 - step / 10, learning_rate=1e-4))
        session.add(Checkpoint(job_id=job_id, step=10, path=f"jobs/{job_id}/ckpt/10",
                               metrics={"train_loss": 2.0}))
        session.add(Checkpoint(job_id=job_id, step=20, path=f"jobs/{job_id}/ckpt/20",
                               resumable=False))
        session.commit()
    add_artifacts(api, job_id, "adapter", 10)
    add_artifacts(api, job_id, "merged", 20, {"config.json": b"{}"})
    rows = api.client.get(f"/v1/jobs/{job_id}/metrics", headers=api.h("alice")).json()["data"]
    assert [r["step"] for r in rows] == [10, 20] and rows[0]["train_loss"] == 2.0
    assert set(rows[0]) == {"step", "epoch", "train_loss", "eval_loss", "learning_rate",
                            "grad_norm", "tokens_per_second", "rewards_chosen",
                            "rewards_rejected", "reward_margin", "reward_accuracy"}
    assert rows[0]["reward_margin"] is None  # a supervised step: DPO's figures are null
    ckpts = api.client.get(f"/v1/jobs/{job_id}/checkpoints",
                           headers=api.h("alice")).json()["data"]
    assert [(c["step"], c["resumable"]) for c in ckpts] == [(10, True), (20, False)]
    assert {f["name"] for f in ckpts[0]["adapter"]["files"]} == set(FILES)
    assert ckpts[0]["merged"] is None and ckpts[1]["adapter"] is None
    assert ckpts[1]["merged"]["url"] == f"/v1/jobs/{job_id}/merged?step=20"


def test_tar_downloads(api: Api) -> None:
    job_id = api.job("alice", api.dataset("alice"))["id"]
    assert api.client.get(f"/v1/jobs/{job_id}/adapter", headers=api.h("alice")).status_code == 404
    add_artifacts(api, job_id, "adapter", 5, {"adapter_config.json": b"old"})
    add_artifacts(api, job_id, "adapter", None)
    resp = api.client.get(f"/v1/jobs/{job_id}/adapter", headers=api.h("alice"))
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/x-tar"
    assert int(resp.headers["content-length"]) == len(resp.content)
    with tarfile.open(fileobj=io.BytesIO(resp.content)) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert got == {f"{job_id}-adapter/{k}": v for k, v in FILES.items()}
    old = api.client.get(f"/v1/jobs/{job_id}/adapter?step=5", headers=api.h("alice"))
    with tarfile.open(fileobj=io.BytesIO(old.content)) as tar:
        assert [m.name for m in tar.getmembers()] == [f"{job_id}-adapter-step5/adapter_config.json"]
    assert api.client.get(f"/v1/jobs/{job_id}/merged", headers=api.h("alice")).status_code == 404
    assert api.client.get(f"/v1/jobs/{job_id}/adapter?step=7",
                          headers=api.h("alice")).status_code == 404


def test_single_file_with_range_and_digests(api: Api) -> None:
    job_id = api.job("alice", api.dataset("alice"))["id"]
    add_artifacts(api, job_id, "adapter", None)
    listed = api.client.get(f"/v1/jobs/{job_id}/artifacts", headers=api.h("alice")).json()["data"]
    art = next(a for a in listed if a["name"] == "adapter_model.safetensors")
    data = FILES["adapter_model.safetensors"]
    assert art["size"] == len(data) and art["sha256"] == hashlib.sha256(data).hexdigest()
    url = art["url"]
    full = api.client.get(url, headers=api.h("alice"))
    assert full.status_code == 200 and full.content == data
    assert full.headers["etag"] == f'"{art["sha256"]}"'
    assert full.headers["x-checksum-sha256"] == art["sha256"]
    digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert full.headers["digest"] == f"sha-256={digest}"
    part = api.client.get(url, headers={**api.h("alice"), "Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    resumed = api.client.get(url, headers={**api.h("alice"), "Range": "bytes=2000-",
                                           "If-Range": full.headers["etag"]})
    assert resumed.status_code == 206 and resumed.content == data[2000:]
    assert api.client.get(f"/v1/jobs/{job_id}/artifacts/art_nope",
                          headers=api.h("alice")).status_code == 404
