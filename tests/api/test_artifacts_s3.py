"""Downloads and dataset uploads with the artifact store in S3 (a real S3 API server, moto's):
streamed by the API with Range, or redirected to a presigned URL; a store outage is a 503."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from lorajobs.core.settings import Settings
from tests.api.conftest import Api, _serve, alpaca_lines, jsonl
from tests.api.test_artifacts import FILES, add_artifacts
from tests.s3fixtures import S3Target

DATA = FILES["adapter_model.safetensors"]


def _artifact(api: Api) -> tuple[str, dict]:  # type: ignore[type-arg]
    job_id = api.job("alice", api.dataset("alice"))["id"]
    add_artifacts(api, job_id, "adapter", None)
    listed = api.client.get(f"/v1/jobs/{job_id}/artifacts", headers=api.h("alice")).json()
    return job_id, next(a for a in listed["data"] if a["name"] == "adapter_model.safetensors")


def _digests_match(headers: httpx.Headers, sha256: str) -> None:
    assert headers["etag"] == f'"{sha256}"' and headers["x-checksum-sha256"] == sha256
    assert headers["digest"].startswith("sha-256=") and headers["repr-digest"].startswith(
        "sha-256=:")


def test_single_file(s3_api: Api) -> None:
    _, art = _artifact(s3_api)
    get = s3_api.client.get
    full = get(art["url"], headers=s3_api.h("alice"), follow_redirects=False)
    _digests_match(full.headers, art["sha256"])
    if s3_api.settings.store_presign_downloads:
        assert full.status_code == 307 and full.headers["cache-control"] == "no-store"
        location = full.headers["location"]
        assert location.startswith(s3_api.settings.store_endpoint_url or "")
        # the store answers the URL alone: no API key, the signature is the grant
        fetched = httpx.get(location)
        assert fetched.status_code == 200 and fetched.content == DATA
        part = httpx.get(location, headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == DATA[100:200]
        assert httpx.get(location, headers={"Range": f"bytes={len(DATA)}-"}).status_code == 416
        return
    assert full.status_code == 200 and full.content == DATA
    assert full.headers["content-length"] == str(len(DATA))
    assert full.headers["accept-ranges"] == "bytes"
    part = get(art["url"], headers={**s3_api.h("alice"), "Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == DATA[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(DATA)}"
    _digests_match(part.headers, art["sha256"])
    tail = get(art["url"], headers={**s3_api.h("alice"), "Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == DATA[-10:]
    past = get(art["url"], headers={**s3_api.h("alice"), "Range": f"bytes={len(DATA)}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(DATA)}"
    stale = get(art["url"], headers={**s3_api.h("alice"), "Range": "bytes=10-",
                                     "If-Range": '"0000"'})
    assert stale.status_code == 200 and stale.content == DATA  # another object: all of it
    other = get(art["url"], headers=s3_api.h("bob"), follow_redirects=False)
    assert other.status_code == 404


def test_tar_is_streamed_in_both_modes(s3_api: Api) -> None:
    job_id, _ = _artifact(s3_api)
    resp = s3_api.client.get(f"/v1/jobs/{job_id}/adapter", headers=s3_api.h("alice"),
                             follow_redirects=False)
    assert resp.status_code == 200 and int(resp.headers["content-length"]) == len(resp.content)
    with tarfile.open(fileobj=io.BytesIO(resp.content)) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert got == {f"{job_id}-adapter/{k}": v for k, v in FILES.items()}


def test_dataset_upload_and_delete(s3_api: Api, s3_bucket: S3Target) -> None:
    staging = s3_api.settings.resolved_artifact_root / ".staging"
    bad = s3_api.upload("alice", jsonl(alpaca_lines(3)) + b'{"nope": 1}\n')
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_dataset"
    assert s3_bucket.keys() == [] and list(staging.iterdir()) == []
    ds = s3_api.dataset("alice")
    [key] = s3_bucket.keys()
    assert key.startswith("lorajobs/datasets/") and key.endswith(f"/{ds}.jsonl")
    assert list(staging.iterdir()) == []
    assert s3_api.client.delete(f"/v1/datasets/{ds}", headers=s3_api.h("alice")).status_code \
        == 200
    assert s3_bucket.keys() == []


@contextmanager
def _api_on(target: S3Target, tmp_path: Path, tiny_model_dir: Path) -> Iterator[Api]:
    import shutil

    from lorajobs.core.migrate import upgrade

    settings = Settings(data_dir=tmp_path / "data", model_root=tmp_path / "models",
                        **target.settings())
    upgrade(settings)
    shutil.copytree(tiny_model_dir, settings.resolved_model_root / "tiny")
    gen = _serve(settings)
    try:
        yield next(gen)
    finally:
        gen.close()


def test_store_outage_is_503(private_s3: S3Target, tmp_path: Path, tiny_model_dir: Path) -> None:
    """The store down: downloads and uploads answer 503 storage_unavailable + Retry-After (the
    SDK retries those), nothing staged is left; once it is back, the same requests work."""
    with _api_on(private_s3, tmp_path, tiny_model_dir) as api:
        job_id, art = _artifact(api)
        assert api.client.get("/readyz").json()["checks"]["store"] == "ok"
        private_s3.server.stop()  # refused connections, as from a dead store node
        ready = api.client.get("/readyz")  # reported, still in rotation: the rest works
        assert ready.status_code == 200 and ready.json()["checks"]["store"] == "unreachable"
        for url in (art["url"], f"/v1/jobs/{job_id}/adapter"):
            resp = api.client.get(url, headers=api.h("alice"))
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"]["code"] == "storage_unavailable"
            assert resp.headers["retry-after"].isdigit()
        up = api.upload("alice", jsonl(alpaca_lines(3)))
        assert up.status_code == 503 and up.json()["error"]["code"] == "storage_unavailable"
        assert list((api.settings.resolved_artifact_root / ".staging").iterdir()) == []
        listed = api.client.get("/v1/datasets", headers=api.h("alice")).json()["data"]
        private_s3.server.start()  # empty again (moto keeps objects in memory)
        assert api.upload("alice", jsonl(alpaca_lines(3))).status_code == 201
        now = api.client.get("/v1/datasets", headers=api.h("alice")).json()["data"]
        assert len(now) == len(listed) + 1  # the failed upload left no row


def test_delete_artifacts_empties_the_prefix(s3_api: Api, s3_bucket: S3Target) -> None:
    job_id, _ = _artifact(s3_api)
    assert any(k.startswith(f"lorajobs/jobs/{job_id}/") for k in s3_bucket.keys())
    assert s3_api.client.post(f"/v1/jobs/{job_id}/cancel",
                              headers=s3_api.h("alice")).status_code == 200
    resp = s3_api.client.delete(f"/v1/jobs/{job_id}/artifacts", headers=s3_api.h("alice"))
    assert resp.status_code == 200 and resp.json()["files"] == len(FILES)
    assert not any(k.startswith(f"lorajobs/jobs/{job_id}/") for k in s3_bucket.keys())
