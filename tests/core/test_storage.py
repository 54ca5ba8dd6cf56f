"""The `ArtifactStore` contract, run against both implementations: the local directory and the
S3 store on a real S3 API server (moto's, tests/s3fixtures.py)."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import time
from pathlib import Path

import httpx
import pytest

from lorajobs.core.errors import InvalidRequest, StorageUnavailable
from lorajobs.core.s3store import S3ArtifactStore
from lorajobs.core.storage import ArtifactStore, LocalArtifactStore, StoredObject, get_store
from tests.s3fixtures import S3Target

MiB = 1024 * 1024
# S3's smallest part is 5 MiB; a 1 MiB threshold makes an 11 MiB file three parts.
TEST_PART = 5 * MiB
TEST_THRESHOLD = 1 * MiB


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalArtifactStore(tmp_path / "artifacts")
    target: S3Target = request.getfixturevalue("s3_bucket")
    return target.store(part_bytes=TEST_PART, multipart_threshold=TEST_THRESHOLD)


def _data(n: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(f"seed{seed}".encode()).digest(n)


class _Failing(io.RawIOBase):
    """Yields `good` bytes, then raises: an upload whose client went away."""

    def __init__(self, good: int) -> None:
        self.left = good

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        if self.left <= 0:
            raise ConnectionResetError("client went away")
        n = min(len(buffer), self.left, 64 * 1024)
        buffer[:n] = b"x" * n
        self.left -= n
        return n


def test_put_and_read_back(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(_data(3000))
    store.put_file("jobs/j1/adapter/a.bin", src)
    assert store.put_stream("jobs/j1/adapter/b.bin", io.BytesIO(b"hello")) == 5
    assert store.exists("jobs/j1/adapter/a.bin") and store.size("jobs/j1/adapter/a.bin") == 3000
    with store.open("jobs/j1/adapter/a.bin") as fh:
        assert fh.read() == src.read_bytes()
    dest = tmp_path / "out" / "deep" / "a.bin"
    store.get_file("jobs/j1/adapter/a.bin", dest)
    assert dest.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert not dest.with_name("a.bin.part").exists()
    store.put_file("jobs/j1/adapter/c.bin", src, immutable=True)
    src.unlink()  # an immutable put may link the file: the stored copy outlives the source
    assert store.size("jobs/j1/adapter/c.bin") == 3000


def test_failing_stream_leaves_nothing(store: ArtifactStore, s3_or_none: S3Target | None) -> None:
    for good in (1000, 7 * MiB):  # a single PUT, and a multipart upload's first part
        with pytest.raises(ConnectionResetError):
            store.put_stream(f"datasets/t/{good}.jsonl", io.BufferedReader(_Failing(good)))
        assert not store.exists(f"datasets/t/{good}.jsonl")
    assert list(store.list("datasets")) == []
    if s3_or_none is not None:
        assert s3_or_none.keys() == [] and s3_or_none.multipart_uploads() == []


def test_multipart_file_and_stream(store: ArtifactStore, tmp_path: Path,
                                   s3_or_none: S3Target | None) -> None:
    data = _data(11 * MiB + 123)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    store.put_file("jobs/j1/merged/model.safetensors", src)
    assert store.put_stream("jobs/j1/merged/copy.safetensors", io.BytesIO(data)) == len(data)
    for key in ("jobs/j1/merged/model.safetensors", "jobs/j1/merged/copy.safetensors"):
        dest = tmp_path / key.rsplit("/", 1)[1]
        store.get_file(key, dest)
        assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(data).digest()
    if s3_or_none is not None:  # a multipart object's ETag is "<md5 of md5s>-<parts>"
        head = s3_or_none.server.client().head_object(
            Bucket=s3_or_none.bucket, Key=f"{s3_or_none.prefix}/jobs/j1/merged/model.safetensors")
        assert head["ETag"].strip('"').endswith("-3")


def test_ranges(store: ArtifactStore) -> None:
    data = _data(5000)
    store.put_stream("jobs/j1/f.bin", io.BytesIO(data))
    for start, end in ((0, 0), (0, 4999), (100, 199), (4990, 4999)):
        with store.open_range("jobs/j1/f.bin", start, end) as fh:
            assert fh.read() == data[start:end + 1]
    with store.open_range("jobs/j1/f.bin", 4000, 4999) as fh:  # read in small pieces
        pieces = iter(lambda: fh.read(333), b"")
        assert b"".join(pieces) == data[4000:]


def test_list_and_delete_prefix(store: ArtifactStore) -> None:
    for key in ("jobs/j1/adapter/b.bin", "jobs/j1/adapter/a.bin", "jobs/j1/log.txt",
                "jobs/j10/x.bin", "jobs/j2/y.bin"):
        store.put_stream(key, io.BytesIO(key.encode()))
    assert list(store.list("jobs/j1")) == [
        StoredObject("jobs/j1/adapter/a.bin", 21), StoredObject("jobs/j1/adapter/b.bin", 21),
        StoredObject("jobs/j1/log.txt", 15)]  # not j10's: a prefix is a directory
    assert list(store.list("jobs/j1/log.txt")) == [StoredObject("jobs/j1/log.txt", 15)]
    assert list(store.list("jobs/nope")) == []
    store.delete("jobs/j1/log.txt")
    store.delete("jobs/j1/log.txt")  # missing: fine
    assert not store.exists("jobs/j1/log.txt")
    store.delete_prefix("jobs/j1")
    assert [o.key for o in store.list("jobs")] == ["jobs/j10/x.bin", "jobs/j2/y.bin"]
    store.delete_prefix("jobs/j2/y.bin")  # one key
    store.delete_prefix("jobs/nope")
    assert [o.key for o in store.list("jobs")] == ["jobs/j10/x.bin"]


def test_missing_keys(store: ArtifactStore, tmp_path: Path) -> None:
    for read in (store.open, store.size, lambda k: store.open_range(k, 0, 1)):
        with pytest.raises(FileNotFoundError):
            read("jobs/nope/a.bin")
    dest = tmp_path / "dest.bin"
    with pytest.raises(FileNotFoundError):
        store.get_file("jobs/nope/a.bin", dest)
    assert not dest.exists() and not dest.with_name("dest.bin.part").exists()
    assert not store.exists("jobs/nope/a.bin")


@pytest.mark.parametrize("key", ["../x", "/abs", "a/../../b", "a\\b", "a\x00b", "", "c:/x"])
def test_unsafe_keys_refused(store: ArtifactStore, key: str) -> None:
    with pytest.raises(InvalidRequest):
        store.put_stream(key, io.BytesIO(b"x"))


def test_presigned_url(store: ArtifactStore) -> None:
    data = _data(2048)
    store.put_stream("jobs/j1/adapter/adapter_model.safetensors", io.BytesIO(data))
    url = store.presigned_url("jobs/j1/adapter/adapter_model.safetensors", expires_seconds=60,
                              filename="adapter_model.safetensors")
    if store.is_local:
        assert url is None  # the API streams it itself
        return
    assert url is not None
    resp = httpx.get(url)  # no credentials: the signature in the query string is the grant
    assert resp.status_code == 200 and resp.content == data
    assert "adapter_model.safetensors" in resp.headers["content-disposition"]
    ranged = httpx.get(url, headers={"Range": "bytes=10-19"})
    assert ranged.status_code == 206 and ranged.content == data[10:20]
    tampered = url.replace("adapter_model", "adapter_modex", 1)
    assert httpx.get(tampered).status_code == 403


def test_get_store_picks_the_implementation(tmp_path: Path, s3_bucket: S3Target) -> None:
    from lorajobs.core.settings import Settings

    local = get_store(Settings(data_dir=tmp_path))
    assert isinstance(local, LocalArtifactStore) and local.is_local
    s3 = get_store(Settings(data_dir=tmp_path, **s3_bucket.settings()))
    assert isinstance(s3, S3ArtifactStore) and not s3.is_local
    s3.put_stream("a/b", io.BytesIO(b"x"))
    assert s3_bucket.keys() == ["lorajobs/a/b"]


def test_outage_is_storage_unavailable(private_s3: S3Target) -> None:
    """A dead endpoint: StorageUnavailable within seconds (botocore's retries), never a
    botocore exception; after a restart on the same port the store works again (empty)."""
    store = private_s3.store()
    store.put_stream("a/b", io.BytesIO(b"x"))
    private_s3.server.stop()
    for call in (lambda: store.put_stream("a/c", io.BytesIO(b"y")), lambda: store.size("a/b"),
                 lambda: list(store.list("a")), lambda: store.open("a/b")):
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            call()
        assert time.monotonic() - started < 15
    private_s3.server.start()
    assert not store.exists("a/b")  # moto keeps objects in memory: a restart loses them
    store.put_stream("a/b", io.BytesIO(b"z"))
    with store.open("a/b") as fh:
        assert fh.read() == b"z"


def test_pause_keeps_objects(private_s3: S3Target) -> None:
    """SIGSTOP/SIGCONT (the outage the two-node test uses) keeps every object."""
    store = private_s3.store()
    store.put_stream("a/b", io.BytesIO(b"kept"))
    private_s3.server.pause()
    private_s3.server.resume()
    with store.open("a/b") as fh:
        assert fh.read() == b"kept"


@pytest.fixture
def s3_or_none(request: pytest.FixtureRequest) -> S3Target | None:
    """The bucket behind the `store` fixture when it is the S3 one (to inspect raw keys)."""
    if request.node.callspec.params.get("store") == "s3":
        return request.getfixturevalue("s3_bucket")  # type: ignore[no-any-return]
    return None


def test_local_store_files_private(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "a")
    store.put_stream("x/y", io.BytesIO(b"1"))
    assert stat.S_IMODE(os.stat(store.local_path("x/y")).st_mode) == 0o600
