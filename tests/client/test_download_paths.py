"""`Client.jobs.download` against a hostile server: artifact names that would escape `out`.

The server is an `httpx.MockTransport`, the true boundary here: the SDK trusts nothing but
what comes over the wire, so a server that lies about names is simulated exactly there.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from lorajobs.client import Client, UnsafePathError

JOB = "job_000000000000000000000001"
PAYLOAD = b"owned\n"


class HostileServer:
    """Lists one adapter artifact named `name`; serves PAYLOAD for it; records requests."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == f"/v1/jobs/{JOB}/artifacts":
            return httpx.Response(200, json={"object": "list", "has_more": False, "data": [{
                "id": "art_1", "kind": "adapter", "step": None, "name": self.name,
                "size": len(PAYLOAD), "sha256": hashlib.sha256(PAYLOAD).hexdigest()}]})
        if request.url.path == f"/v1/jobs/{JOB}/artifacts/art_1":
            return httpx.Response(200, stream=httpx.ByteStream(PAYLOAD))
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no"}})

    @property
    def file_requests(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path.endswith("/art_1")]


def _download(server: HostileServer, out: Path) -> list[Path]:
    with Client("http://hostile.test", "lj_x", transport=httpx.MockTransport(server),
                max_retries=0) as client:
        return client.jobs.download(JOB, out)


@pytest.mark.parametrize("name", [
    "../escaped.txt", "sub/../../escaped.txt", "..", "/ABS/escaped.txt", "C:escaped.txt",
    "..\\escaped.txt", "sub//x", "./x", "", "x\x00y",
])
def test_names_that_escape_are_refused_before_any_write(tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    server = HostileServer(name.replace("/ABS", str(tmp_path)))
    with pytest.raises(UnsafePathError, match="refusing to download artifact"):
        _download(server, out)
    assert server.file_requests == []  # refused before fetching a byte
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written anywhere


def test_symlinks_inside_the_target_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="symlink"):
        _download(HostileServer("link/escaped.txt"), out)
    # A planted `.part` symlink would receive the bytes through the resume path.
    (out / "weights.bin.part").symlink_to(outside / "victim")
    with pytest.raises(UnsafePathError, match="symlink"):
        _download(HostileServer("weights.bin"), out)
    assert list(outside.iterdir()) == []


def test_a_nested_relative_name_is_downloaded(tmp_path: Path) -> None:
    server = HostileServer("tokenizer/vocab.json")
    files = _download(server, tmp_path / "out")
    assert files == [tmp_path / "out" / "tokenizer" / "vocab.json"]
    assert files[0].read_bytes() == PAYLOAD
