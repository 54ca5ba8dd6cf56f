"""SDK downloads when the server keeps artifacts in S3: it follows a 307 to a presigned URL or
reads the API's stream, verifies sha256 either way, resumes with Range either way, and never
sends the API key to the store's host."""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from lorajobs.client import AsyncClient, ChecksumError, Client
from lorajobs.client.types import Artifact
from lorajobs.core.storage import get_store
from tests.api.conftest import Api, s3_api  # noqa: F401 - the S3-backed API fixture
from tests.api.test_artifacts import FILES, add_artifacts

DATA = FILES["adapter_model.safetensors"]
KEY = "lj_test_key_that_must_stay_home"


class _InProcess(httpx.BaseTransport):
    """The SDK's requests to the API through the in-process TestClient (bodies buffered); the
    store's presigned URLs go over real HTTP to the moto server."""

    def __init__(self, api: Api) -> None:
        self.api = api

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = self.api.client.request(request.method, str(request.url),
                                    headers=dict(request.headers), content=request.read(),
                                    follow_redirects=False)
        return httpx.Response(r.status_code, headers=list(r.headers.multi_items()),
                              stream=httpx.ByteStream(r.content))


class _AsyncInProcess(httpx.AsyncBaseTransport):
    """The same for the AsyncClient: the sync TestClient in a thread."""

    def __init__(self, api: Api) -> None:
        self.sync = _InProcess(api)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        inner = httpx.Request(request.method, request.url, headers=request.headers, content=body)
        r = await asyncio.to_thread(self.sync.handle_request, inner)
        return httpx.Response(r.status_code, headers=r.headers, stream=httpx.ByteStream(r.read()))


def _client(api: Api, who: str = "alice") -> Client:
    return Client("http://testserver", api.keys[who], transport=_InProcess(api), max_retries=1)


def _adapter_weights(client: Client, job_id: str) -> Artifact:
    return next(a for a in client.jobs.artifacts(job_id)
                if a.name == "adapter_model.safetensors")


def _job_with_adapter(api: Api) -> str:
    job_id = api.job("alice", api.dataset("alice"))["id"]
    add_artifacts(api, job_id, "adapter", None)
    return str(job_id)


def test_download_verified_and_resumed(s3_api: Api, tmp_path: Path) -> None:  # noqa: F811
    job_id = _job_with_adapter(s3_api)
    with _client(s3_api) as client:
        files = client.jobs.download(job_id, tmp_path / "out")
        assert {p.name: p.read_bytes() for p in files} == FILES
        art = _adapter_weights(client, job_id)
        dest = tmp_path / "resume" / art.name
        dest.parent.mkdir()
        dest.with_name(dest.name + ".part").write_bytes(DATA[:1000])  # a broken transfer's part
        assert client.jobs.download_artifact(job_id, art, dest).read_bytes() == DATA
        done = tmp_path / "done" / art.name  # a complete part: the server answers 416
        done.parent.mkdir()
        done.with_name(done.name + ".part").write_bytes(DATA)
        assert client.jobs.download_artifact(job_id, art, done).read_bytes() == DATA


def test_async_download_follows_either(s3_api: Api, tmp_path: Path) -> None:  # noqa: F811
    job_id = _job_with_adapter(s3_api)

    async def main() -> list[Path]:
        async with AsyncClient("http://testserver", s3_api.keys["alice"],
                               transport=_AsyncInProcess(s3_api), max_retries=1) as client:
            files = await client.download(job_id, tmp_path / "out")
            [art] = [a for a in await client.artifacts(job_id) if a.name == "adapter_config.json"]
            get_store(s3_api.settings).put_stream(f"jobs/{job_id}/adapter/None/{art.name}",
                                                  io.BytesIO(b"changed"))
            with pytest.raises(ChecksumError):
                await client.download_artifact(job_id, art, tmp_path / "bad" / art.name)
            return files

    files = asyncio.run(main())
    assert {p.name: p.read_bytes() for p in files} == FILES
    assert list((tmp_path / "bad").iterdir()) == []  # no file, no part


def test_checksum_mismatch_leaves_nothing(s3_api: Api, tmp_path: Path) -> None:  # noqa: F811
    job_id = _job_with_adapter(s3_api)
    with _client(s3_api) as client:
        art = _adapter_weights(client, job_id)
        # the stored object changed behind the recorded sha256 (corruption, a late writer)
        get_store(s3_api.settings).put_stream(f"jobs/{job_id}/adapter/None/{art.name}",
                                              io.BytesIO(DATA[::-1]))
        out = tmp_path / "out"
        with pytest.raises(ChecksumError):
            client.jobs.download(job_id, out)
        assert [p.name for p in out.rglob("*") if p.is_file()] == ["adapter_config.json"]


class _Recorder(BaseHTTPRequestHandler):
    """A stand-in store host: records each request's headers, serves DATA (or redirects)."""

    seen: list[dict[str, str]] = []
    redirect_to: str | None = None

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).seen.append(dict(self.headers))
        if self.redirect_to:
            self.send_response(307)
            self.send_header("Location", self.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(DATA)))
        self.end_headers()
        self.wfile.write(DATA)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def store_host() -> Iterator[tuple[str, type[_Recorder]]]:
    handler = type("Store", (_Recorder,), {"seen": [], "redirect_to": None})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_api_key_never_reaches_the_store(store_host: tuple[str, type[_Recorder]],
                                         tmp_path: Path) -> None:
    url, recorder = store_host
    sha = hashlib.sha256(DATA).hexdigest()

    def api(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == f"Bearer {KEY}"
        if request.url.path.endswith("/artifacts"):
            return httpx.Response(200, json={"object": "list", "has_more": False, "data": [{
                "id": "art_1", "kind": "adapter", "step": None, "name": "a.safetensors",
                "size": len(DATA), "sha256": sha}]})
        return httpx.Response(307, headers={"Location": f"{url}/bucket/a?X-Amz-Signature=s",
                                            "X-Checksum-SHA256": sha})

    with Client("http://api.test", KEY, transport=httpx.MockTransport(api)) as client:
        [path] = client.jobs.download("job_1", tmp_path)
    assert path.read_bytes() == DATA
    assert len(recorder.seen) == 1
    assert not any(k.lower() == "authorization" for k in recorder.seen[0])
    assert KEY not in str(recorder.seen[0])


def test_httpx_drops_authorization_on_cross_origin_redirects(
        store_host: tuple[str, type[_Recorder]]) -> None:
    """What a user's own httpx (or the SDK's pool, were it to follow) does with a 307 from the
    API to another origin: the Authorization header is not forwarded (httpx's _redirect_headers)."""
    url, recorder = store_host
    other = ThreadingHTTPServer(("127.0.0.1", 0), type("Api", (_Recorder,), {
        "seen": [], "redirect_to": f"{url}/bucket/a"}))
    thread = threading.Thread(target=other.serve_forever, daemon=True)
    thread.start()
    try:
        api_url = f"http://127.0.0.1:{other.server_address[1]}/v1/jobs/j/artifacts/a"
        resp = httpx.get(api_url, headers={"Authorization": f"Bearer {KEY}"},
                         follow_redirects=True)
    finally:
        other.shutdown()
        other.server_close()
    assert resp.status_code == 200 and resp.content == DATA
    assert not any(k.lower() == "authorization" for k in recorder.seen[0])
