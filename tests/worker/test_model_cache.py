"""The node-local model cache: one download per node, verified, LRU-bounded, never evicting a
model in use; two processes contending for real (flock), against the local and the S3 store."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from lora_core.model_files import manifest
from lora_core.model_files.manifest import verify_files
from lorajobs.core import model_import
from lorajobs.core.settings import Settings
from lorajobs.core.storage import ArtifactStore, StoredObject, get_store
from lorajobs.core.tables import RegisteredModel
from lorajobs.worker import model_cache
from lorajobs.worker.model_cache import ModelCacheError, local_model_dir
from tests.servicefixtures import wait_for

CTX = mp.get_context("spawn")  # a fresh interpreter per process: a separate "job"
FILES = 3
FILE_BYTES = 64 * 1024


class CountingStore(ArtifactStore):
    """A store that appends each downloaded key to `log` (shared by processes), and waits for
    `gate` before the first one, so a test can line a second process up behind the lock."""

    def __init__(self, inner: ArtifactStore, log: Path, gate: Any = None) -> None:
        self.inner, self.log, self.gate = inner, log, gate

    def get_file(self, key: str, dest: Path) -> None:
        if self.gate is not None:
            assert self.gate.wait(60), "the gate never opened"
        with open(self.log, "a") as fh:
            fh.write(key + "\n")
        self.inner.get_file(key, dest)

    def put_file(self, key: str, src: Path, *, immutable: bool = False) -> None:
        self.inner.put_file(key, src, immutable=immutable)

    def put_stream(self, key: str, stream: BinaryIO) -> int:
        return self.inner.put_stream(key, stream)

    def open(self, key: str) -> BinaryIO:
        return self.inner.open(key)

    def open_range(self, key: str, start: int, end: int) -> BinaryIO:
        return self.inner.open_range(key, start, end)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str) -> Iterator[StoredObject]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def delete_prefix(self, prefix: str) -> None:
        self.inner.delete_prefix(prefix)


def downloads(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


@pytest.fixture(params=["local", "s3"])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Settings (as a dict a spawned process can rebuild) for each store; the cache is
    node-local (tmp_path/node), never inside the store."""
    base = {"data_dir": str(tmp_path / "node"), "artifact_root": str(tmp_path / "store"),
            "model_cache_bytes": 10 * FILES * FILE_BYTES}
    if request.param == "s3":
        target = request.getfixturevalue("s3_bucket")
        return {**base, **target.settings()}
    return base


def put_model(store: ArtifactStore, tmp_path: Path, name: str, seed: int) -> RegisteredModel:
    """A model's files in the store, as POST /v1/models leaves them, and its row (unsaved)."""
    src = tmp_path / f"src-{name}"
    src.mkdir()
    rng = secrets.SystemRandom(seed)
    for i in range(FILES):
        (src / f"model-{i}.safetensors").write_bytes(rng.randbytes(FILE_BYTES))
    from lora_core.model_files.manifest import list_files

    manifest = list_files(src)
    sha = model_import.content_sha256(manifest)
    model_import.store_files(store, f"models/{sha}", src, manifest)
    return RegisteredModel(name=name, source="upload", storage_prefix=f"models/{sha}",
                           content_sha256=sha, files=manifest, path=None)


def row_kwargs(model: RegisteredModel) -> dict[str, Any]:
    return {k: getattr(model, k) for k in ("name", "source", "storage_prefix",
                                           "content_sha256", "files", "path")}


def _job(settings_kw: dict[str, Any], model_kw: dict[str, Any], log: str, gate: Any,
         done: Any, results: Any) -> None:
    """A job on this node: take the model, report its directory, hold it until `done`."""
    settings = Settings(**settings_kw)
    store = CountingStore(get_store(settings), Path(log), gate)
    path = local_model_dir(settings, store, RegisteredModel(**model_kw))
    results.put(str(path))
    if done is not None:
        assert done.wait(60)


def blocked_on(lock_file: Path) -> bool:
    """A process waits for this flock right now (/proc/locks: '->' lines are waiters)."""
    try:
        inode = lock_file.stat().st_ino
    except FileNotFoundError:
        return False
    lines = Path("/proc/locks").read_text().splitlines()
    return any("->" in line and f":{inode} " in line for line in lines)


def test_two_jobs_one_download(store_settings: dict[str, Any], tmp_path: Path) -> None:
    settings = Settings(**store_settings)
    model = put_model(get_store(settings), tmp_path, "m", seed=1)
    log, gate, results = tmp_path / "gets.log", CTX.Event(), CTX.Queue()
    jobs = [CTX.Process(target=_job, args=(store_settings, row_kwargs(model), str(log), gate,
                                           None, results)) for _ in range(2)]
    for job in jobs:
        job.start()
    fetch_lock = settings.resolved_model_cache_dir / ".locks" / f"{model.content_sha256}.fetch"
    wait_for(lambda: blocked_on(fetch_lock), timeout=60)  # one downloads, the other waits
    gate.set()
    paths = {results.get(timeout=60) for _ in jobs}
    for job in jobs:
        job.join(60)
        assert job.exitcode == 0
    assert paths == {str(settings.resolved_model_cache_dir / model.content_sha256)}
    assert sorted(downloads(log)) == sorted(f"{model.storage_prefix}/{e['path']}"
                                            for e in model.files or [])
    assert verify_files(Path(paths.pop()), model.files or []) == []

    # Cached: a third job starts without a single GET.
    third = CTX.Process(target=_job, args=(store_settings, row_kwargs(model), str(log), None,
                                           None, results))
    third.start()
    results.get(timeout=60)
    third.join(60)
    assert third.exitcode == 0 and len(downloads(log)) == FILES


def test_corrupted_cache_is_fetched_again(store_settings: dict[str, Any],
                                          tmp_path: Path) -> None:
    settings = Settings(**store_settings)
    log = tmp_path / "gets.log"
    store = CountingStore(get_store(settings), log)
    model = put_model(store, tmp_path, "m", seed=2)
    with model_cache.model_in_use(settings, store, model) as path:
        assert len(downloads(log)) == FILES
    victim = path / "model-1.safetensors"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF  # a flipped bit, same size
    victim.write_bytes(bytes(data))
    with model_cache.model_in_use(settings, store, model) as again:
        assert again == path and verify_files(path, model.files or []) == []
    assert len(downloads(log)) == 2 * FILES
    (path / "model-2.safetensors").unlink()  # a file gone
    (path / "stray.bin").write_bytes(b"x")  # and one that is not the model's
    with model_cache.model_in_use(settings, store, model):
        assert verify_files(path, model.files or []) == []
    assert not list(settings.resolved_model_cache_dir.glob("*.partial"))
    assert not list(settings.resolved_model_cache_dir.glob("*.stale-*"))


def test_lru_eviction_skips_a_model_in_use(store_settings: dict[str, Any],
                                           tmp_path: Path) -> None:
    one_model = FILES * FILE_BYTES
    kw = {**store_settings, "model_cache_bytes": one_model + one_model // 2}
    settings = Settings(**kw)
    store = get_store(settings)
    a, b, c = (put_model(store, tmp_path, n, seed=s) for n, s in (("a", 3), ("b", 4), ("c", 5)))
    cache = settings.resolved_model_cache_dir
    # Job 1 (another process) holds A in use while this node needs B: A stays.
    log, done, results = tmp_path / "gets.log", CTX.Event(), CTX.Queue()
    holder = CTX.Process(target=_job, args=(kw, row_kwargs(a), str(log), None, done, results))
    holder.start()
    results.get(timeout=60)
    with model_cache.model_in_use(settings, store, b):
        assert (cache / str(a.content_sha256)).is_dir()  # over budget while both run
    done.set()
    holder.join(60)
    assert holder.exitcode == 0
    # A's job ended. Room for two and a half: C pushes out the least recently used (A), not B.
    os.utime(cache / str(b.content_sha256))  # B used after A
    roomier = Settings(**{**kw, "model_cache_bytes": 2 * one_model + one_model // 2})
    crashed = [cache / f"{'d' * 64}.partial", cache / f"{b.content_sha256}.stale-0badc0de"]
    for leftover in crashed:  # what a process killed mid-download or mid-swap leaves
        leftover.mkdir()
        (leftover / "model-0.safetensors").write_bytes(b"half")
    with model_cache.model_in_use(roomier, store, c):
        pass
    assert not any(p.exists() for p in crashed)
    present = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
    assert present == sorted([str(b.content_sha256), str(c.content_sha256)])


def test_store_bytes_not_matching_the_manifest_are_refused(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "node", artifact_root=tmp_path / "store")
    store = get_store(settings)
    model = put_model(store, tmp_path, "m", seed=6)
    key = f"{model.storage_prefix}/model-0.safetensors"
    store.delete(key)
    store.put_stream(key, io.BytesIO(b"\0" * FILE_BYTES))  # same size, other bytes
    with pytest.raises(ModelCacheError, match="sha256 [0-9a-f]+ != manifest"):
        local_model_dir(settings, store, model)
    cache = settings.resolved_model_cache_dir
    assert [p.name for p in cache.iterdir()] == [".locks"]
    assert model.content_sha256 not in model_cache._HELD  # released on failure


def test_legacy_path_model_is_used_in_place(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, model_root=tmp_path / "models")
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    model = RegisteredModel(name="tiny", source="path", path="tiny")
    path = local_model_dir(settings, get_store(settings), model)
    assert path == (tmp_path / "models" / "tiny").resolve()
    assert not settings.resolved_model_cache_dir.exists()


def test_verify_only_when_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """model_cache_verify_every_use off: a use after a full check hashes nothing while the
    files' (size, mtime, inode) are unchanged; a rewritten file is still caught."""
    settings = Settings(data_dir=tmp_path / "node", artifact_root=tmp_path / "store",
                        model_cache_verify_every_use=False)
    log = tmp_path / "gets.log"
    store = CountingStore(get_store(settings), log)
    model = put_model(store, tmp_path, "m", seed=7)
    hashed: list[str] = []
    real = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    with model_cache.model_in_use(settings, store, model) as path:
        assert len(hashed) == FILES  # the download, checked once
    with model_cache.model_in_use(settings, store, model):
        assert len(hashed) == FILES and len(downloads(log)) == FILES
    victim = path / "model-0.safetensors"
    old = victim.stat()
    data = bytearray(victim.read_bytes())
    data[7] ^= 1
    victim.write_bytes(bytes(data))
    if victim.stat().st_mtime_ns == old.st_mtime_ns:  # within one kernel timestamp tick
        os.utime(victim, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000))
    with model_cache.model_in_use(settings, store, model):
        assert verify_files(path, model.files or []) == []
    assert len(downloads(log)) == 2 * FILES
    every = settings.model_copy(update={"model_cache_verify_every_use": True})
    before = len(hashed)
    with model_cache.model_in_use(every, store, model):
        assert len(hashed) == before + FILES  # the default: every use hashes every file
