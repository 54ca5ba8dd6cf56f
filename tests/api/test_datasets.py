"""POST/GET /v1/datasets: every line validated, nothing stored on failure, size limits."""

from __future__ import annotations

import json

from sqlalchemy import func, select

from lorajobs.core.tables import Dataset
from tests.api.conftest import Api, alpaca_lines, jsonl


def _stored_files(api: Api) -> list[str]:
    root = api.settings.resolved_artifact_root / "datasets"
    return [p.name for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_upload_good_file_then_get_and_list(api: Api) -> None:
    resp = api.upload("alice", jsonl(alpaca_lines(7)), filename="../../etc/passwd")
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["format"] == "alpaca" and body["num_examples"] == 7
    assert len(body["sha256"]) == 64 and body["stats"]["max"] > 0
    assert body["filename"] == "passwd" and body["id"].startswith("ds_")
    assert api.client.get(f"/v1/datasets/{body['id']}", headers=api.h("alice")).json() == body
    second = api.dataset("alice", 3)
    page = api.client.get("/v1/datasets?limit=1", headers=api.h("alice")).json()
    assert [d["id"] for d in page["data"]] == [second] and page["has_more"]
    rest = api.client.get(f"/v1/datasets?after={page['next_cursor']}",
                          headers=api.h("alice")).json()
    assert [d["id"] for d in rest["data"]] == [body["id"]] and not rest["has_more"]
    assert api.client.get("/v1/datasets", headers=api.h("bob")).json()["data"] == []
    assert api.client.get(f"/v1/datasets/{body['id']}", headers=api.h("bob")).status_code == 404


def test_bad_lines_are_all_reported_and_nothing_is_stored(api: Api) -> None:
    records: list = alpaca_lines(5)
    records[1] = {"instruction": "x", "output": 3}
    records[3] = {"instruction": "", "output": "y"}
    data = jsonl(records) + b"{not json\n"
    resp = api.upload("alice", data)
    assert resp.status_code == 422
    body = resp.json()
    assert body["error"]["code"] == "invalid_dataset" and body["error"]["param"] == "file"
    assert [(e["line"], e["field"]) for e in body["errors"]] == [
        (2, "output"), (4, "instruction"), (6, "")]
    with api.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == 0
    assert _stored_files(api) == []


def test_format_param(api: Api) -> None:
    chat = [{"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]}]
    ok = api.upload("alice", jsonl(chat), fmt="chat")
    assert ok.status_code == 201 and ok.json()["format"] == "chat"
    wrong = api.upload("alice", jsonl(chat), fmt="alpaca")
    assert wrong.status_code == 422 and wrong.json()["errors"][0]["field"] == "instruction"
    unknown = api.upload("alice", jsonl(chat), fmt="parquet")
    assert unknown.status_code == 422 and unknown.json()["error"]["param"] == "format"


def test_upload_limits(api: Api) -> None:
    api.client.app.state.settings.max_upload_bytes = 2000
    big = jsonl(alpaca_lines(200))
    # Over the file cap but under the framing allowance: caught while copying the stream.
    resp = api.upload("alice", big[:4000])
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"
    # Declared Content-Length over the cap: refused before the body is read.
    huge = b"x" * (2000 + 64 * 1024 + 10)
    resp = api.upload("alice", huge)
    assert resp.status_code == 413

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(100):
            yield b"y" * 1024

    resp = api.client.post("/v1/datasets", headers={**api.h("alice"),
                           "Content-Type": "multipart/form-data; boundary=zz"}, content=chunks())
    assert resp.status_code == 413
    assert _stored_files(api) == []


def test_too_many_examples(api: Api) -> None:
    api.client.app.state.settings.max_examples_per_dataset = 3
    resp = api.upload("alice", jsonl(alpaca_lines(4)))
    assert resp.status_code == 422
    assert "too many examples" in json.dumps(resp.json()["errors"])


def test_upload_needs_auth_and_a_file(api: Api) -> None:
    resp = api.client.post("/v1/datasets", files={"file": ("d.jsonl", jsonl(alpaca_lines(2)))})
    assert resp.status_code == 401
    resp = api.client.post("/v1/datasets", headers=api.h("alice"), data={"format": "chat"})
    assert resp.status_code == 422 and resp.json()["error"]["param"] == "file"
    assert _stored_files(api) == []


def _staged_and_stored(api: Api) -> list[str]:
    """Every file under the artifact root: stored datasets and staging leftovers alike."""
    root = api.settings.resolved_artifact_root
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_deeply_nested_json_is_a_line_error(api: Api) -> None:
    data = jsonl(alpaca_lines(1)) + b"[" * 100_000 + b"\n" + jsonl(alpaca_lines(1))
    resp = api.upload("alice", data)
    assert resp.status_code == 422, resp.text
    assert resp.json()["errors"] == [{"line": 2, "field": "",
                                      "message": "invalid JSON: nested too deeply"}]
    resp = api.upload("alice", b"[" * 100_000)  # a JSON list whose first record is that deep
    assert resp.status_code == 422 and resp.json()["errors"][0]["line"] == 1
    assert _staged_and_stored(api) == []


def test_json_list_is_streamed_record_by_record(api: Api) -> None:
    records = alpaca_lines(30)
    resp = api.upload("alice", json.dumps(records, indent=4).encode(), filename="alpaca.json")
    assert resp.status_code == 201, resp.text
    assert resp.json()["num_examples"] == 30 and resp.json()["format"] == "alpaca"
    broken = json.dumps(records[:3]).encode()[:-1] + b', {"instruction": "x", "output": [[[' \
        + b"]]]} {}]"
    body = api.upload("alice", broken).json()
    assert body["errors"] == [
        {"line": 4, "field": "output", "message": "must be a string, got list"},
        {"line": 5, "field": "",
         "message": "invalid JSON: expected ',' or ']' after record, got '{'"}]
    hostile = b"[" + b"{}," * 50_000 + b"{}]"  # the issue's `[{},{},...]`, 150 KB of it
    resp = api.upload("alice", hostile)
    assert resp.status_code == 422
    body = resp.json()
    assert body["error"]["num_errors"] == 10_000
    assert "reading stopped here" in body["error"]["message"]
    assert body["errors"][-1]["message"] == "10000 invalid records: reading stopped here"


def test_line_longer_than_the_bound(api: Api) -> None:
    api.client.app.state.settings.max_record_bytes = 2048
    long = {"instruction": "x" * 3000, "output": "y"}
    resp = api.upload("alice", jsonl([*alpaca_lines(2), long, *alpaca_lines(2)]))
    assert resp.status_code == 422
    assert resp.json()["errors"] == [{"line": 3, "field": "",
                                      "message": "line longer than 2048 bytes"}]
    assert _staged_and_stored(api) == []


def test_example_cap_names_the_first_record_over_it(api: Api) -> None:
    api.client.app.state.settings.max_examples_per_dataset = 5
    resp = api.upload("alice", jsonl(alpaca_lines(5000)))
    assert resp.status_code == 422
    assert resp.json()["errors"] == [{"line": 6, "field": "", "message":
                                      "too many examples: the limit is 5; reading stopped here"}]
    assert _staged_and_stored(api) == []


def _multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    boundary = "b0undary42"
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename
                                                     else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data \
            + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_format_field_after_the_file_and_malformed_bodies(api: Api) -> None:
    chat = [{"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]}]
    body, ctype = _multipart([("file", "d.jsonl", jsonl(chat)), ("format", None, b"alpaca")])
    resp = api.client.post("/v1/datasets", content=body,
                           headers={**api.h("alice"), "Content-Type": ctype})
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "instruction"
    bad = [("garbage", "multipart/form-data; boundary=zz"),
           (body[:40], ctype),  # cut inside the part headers
           (_multipart([("file", "a", b"x"), ("file", "b", b"y")])[0], ctype),
           (_multipart([("format", None, b"x" * 5000), ("file", "a", b"x")])[0], ctype)]
    for content, content_type in bad:
        resp = api.client.post("/v1/datasets", content=content,
                               headers={**api.h("alice"), "Content-Type": content_type})
        assert resp.status_code == 422, (content[:60], resp.text)
    assert _staged_and_stored(api) == []


def test_preference_file_is_detected_and_its_bad_lines_named(api: Api) -> None:
    """OpenAI's DPO format (method "dpo"), validated at upload like the others."""
    from lora_core.data.synthetic import make_preference_pairs

    pairs: list = make_preference_pairs(4, seed=0)
    ok = api.upload("alice", jsonl(pairs))
    assert ok.status_code == 201, ok.text
    assert ok.json()["format"] == "preference" and ok.json()["num_examples"] == 4
    pairs[2] = {**pairs[2], "non_preferred_output": [{"role": "user", "content": "x"}]}
    bad = api.upload("alice", jsonl(pairs), fmt="preference")
    assert bad.status_code == 422
    assert [(e["line"], e["field"]) for e in bad.json()["errors"]] == [
        (3, "non_preferred_output"), (3, "non_preferred_output[0].role")]
