"""Per-job lists are paged in SQL: `/artifacts`, `/checkpoints`, `/metrics` and the OpenAI
checkpoints route answer `limit` rows with `has_more` and a cursor, and read no more rows than
that (the statement carries the LIMIT) instead of loading every row and slicing."""

from __future__ import annotations

from typing import Any

from lorajobs.core.tables import Artifact, Checkpoint, JobMetric, new_id
from tests.api.conftest import Api
from tests.dbfixtures import recorded_statements

STEPS = [0, 2, 4, 6, 8, 10, 12]


def _seed(api: Api) -> str:
    """A job of alice with a metric row and a checkpoint per step of STEPS, an adapter file
    per checkpoint, a merged file at step 4, and final adapter + merged files (step NULL)."""
    job_id = api.job("alice", api.dataset("alice"))["id"]
    with api.sessions() as session:
        for step in STEPS:
            session.add(JobMetric(job_id=job_id, step=step, train_loss=1.0 / (step + 1)))
            session.add(Checkpoint(job_id=job_id, step=step, path=f"ckpt/{step}"))
        files = [("adapter", s, "adapter_model.safetensors") for s in STEPS]
        files += [("merged", 4, "model.safetensors"), ("adapter", None, "adapter_config.json"),
                  ("adapter", None, "adapter_model.safetensors"),
                  ("merged", None, "config.json"), ("merged", None, "model.safetensors")]
        for kind, step, name in files:
            session.add(Artifact(id=new_id("art"), job_id=job_id, kind=kind, step=step,
                                 name=name, storage_key=f"k/{kind}/{step}/{name}", size=1,
                                 sha256="0" * 64))
        session.commit()
    return job_id


def _walk(api: Api, path: str, limit: int) -> tuple[list[dict[str, Any]], int]:
    """Every row of a /v1 list, following `next_cursor`; (rows, pages)."""
    rows: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": limit}
    pages = 0
    while True:
        page = api.client.get(path, headers=api.h("alice"), params=params)
        assert page.status_code == 200, page.text
        body = page.json()
        pages += 1
        assert len(body["data"]) <= limit
        rows += body["data"]
        if not body["has_more"]:
            return rows, pages
        params["after"] = body["next_cursor"]




def test_metrics_pages_by_step(api: Api) -> None:
    job_id = _seed(api)
    path = f"/v1/jobs/{job_id}/metrics"
    whole = api.client.get(path, headers=api.h("alice")).json()
    assert [r["step"] for r in whole["data"]] == STEPS and whole["has_more"] is False
    rows, pages = _walk(api, path, limit=3)
    assert [r["step"] for r in rows] == STEPS and pages == 3
    first = api.client.get(path, headers=api.h("alice"), params={"limit": 3}).json()
    assert first["has_more"] is True and first["next_cursor"] == 4
    after = api.client.get(path, headers=api.h("alice"), params={"after": 0}).json()
    assert [r["step"] for r in after["data"]] == STEPS[1:]  # step 0 is a real cursor
    with recorded_statements(api.settings) as seen:
        api.client.get(path, headers=api.h("alice"), params={"limit": 2})
    reads = [s for s in seen if "FROM job_metrics" in s]
    assert reads and all("LIMIT" in s for s in reads), reads


def test_checkpoints_page_with_their_own_files(api: Api) -> None:
    job_id = _seed(api)
    path = f"/v1/jobs/{job_id}/checkpoints"
    whole = api.client.get(path, headers=api.h("alice")).json()
    assert [c["step"] for c in whole["data"]] == STEPS and whole["has_more"] is False
    rows, pages = _walk(api, path, limit=2)
    assert rows == whole["data"] and pages == 4
    by_step = {c["step"]: c for c in rows}
    assert by_step[4]["merged"]["url"] == f"/v1/jobs/{job_id}/merged?step=4"
    assert by_step[6]["merged"] is None
    assert [f["name"] for f in by_step[6]["adapter"]["files"]] == ["adapter_model.safetensors"]
    assert all(f["step"] == c["step"] for c in rows for f in c["adapter"]["files"])
    with recorded_statements(api.settings) as seen:
        api.client.get(path, headers=api.h("alice"), params={"limit": 2})
    # The artifacts read is only for the page's steps, never the job's whole file list.
    artifact_reads = [s for s in seen if "FROM artifacts" in s]
    assert artifact_reads and all(" IN " in s for s in artifact_reads), artifact_reads


def test_artifacts_page_in_a_stable_order(api: Api) -> None:
    job_id = _seed(api)
    path = f"/v1/jobs/{job_id}/artifacts"
    whole = api.client.get(path, headers=api.h("alice")).json()
    assert len(whole["data"]) == 12 and whole["has_more"] is False
    order = [(a["kind"], a["step"] is None, a["step"] or 0, a["name"]) for a in whole["data"]]
    assert order == sorted(order)  # by kind, checkpoints before the final files, by step, name
    for limit in (1, 5):
        rows, pages = _walk(api, path, limit=limit)
        assert rows == whole["data"] and pages == -(-12 // limit)
    other = _seed(api)
    foreign = api.client.get(f"/v1/jobs/{other}/artifacts", headers=api.h("alice")).json()
    for cursor in ("art_missing", foreign["data"][0]["id"]):
        bad = api.client.get(path, headers=api.h("alice"), params={"after": cursor})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "after"
    with recorded_statements(api.settings) as seen:
        api.client.get(path, headers=api.h("alice"), params={"limit": 2, "after": rows[3]["id"]})
    reads = [s for s in seen if "FROM artifacts" in s and "ORDER BY" in s]
    assert reads and all("LIMIT" in s for s in reads), reads


def test_openai_checkpoints_page_newest_first(api: Api) -> None:
    job_id = _seed(api)
    path = f"/openai/v1/fine_tuning/jobs/{job_id}/checkpoints"
    seen: list[int] = []
    params: dict[str, Any] = {"limit": 3}
    while True:
        body = api.client.get(path, headers=api.h("alice"), params=params).json()
        seen += [c["step_number"] for c in body["data"]]
        if not body["has_more"]:
            break
        params["after"] = body["last_id"]
    assert seen == sorted(STEPS, reverse=True)
    default = api.client.get(path, headers=api.h("alice")).json()
    assert len(default["data"]) == len(STEPS) and default["has_more"] is False
    for cursor in ("ftckpt-job_other-4", "nonsense", f"ftckpt-{job_id}-²", f"ftckpt-{job_id}-"):
        bad = api.client.get(path, headers=api.h("alice"), params={"after": cursor})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "after", cursor


def test_openai_events_cursor_that_is_not_ascii_digits(api: Api) -> None:
    job_id = api.job("alice", api.dataset("alice"))["id"]
    path = f"/openai/v1/fine_tuning/jobs/{job_id}/events"
    for cursor in ("ftevent-²", "ftevent-" + "9" * 5000):
        bad = api.client.get(path, headers=api.h("alice"), params={"after": cursor})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "after", cursor
