"""A worker node's cache of base models fetched from the store, keyed by content hash.

    model_cache_dir/
      <content_sha256>/           a complete copy, verified against the model's manifest
      <content_sha256>.partial/   a download in progress (only under the fetch lock)
      .locks/<sha>.use            shared (flock) by every job on this node using the model;
                                  the evictor needs it exclusive, non-blocking: a model in
                                  use is never evicted
      .locks/<sha>.fetch          exclusive while one process checks or downloads the model:
                                  a second job wanting it waits, then finds it complete
      .locks/evict                one eviction pass at a time

Before every use the files are checked against the row's manifest (size and sha256): a
corrupted or truncated cached file is detected and the model fetched again. With
model_cache_verify_every_use off, a use after a full check re-hashes only when a file's
(size, mtime, inode) differs from that check's stamp (`.locks/<sha>.verified`). A download goes
into `.partial`, is verified, then renamed into place, so a crash leaves no half model that
looks complete. Least recently used models (their directory's mtime, touched at each use) are
evicted while the cache holds more than model_cache_bytes; models in use are skipped, so the
cache may exceed its bound while they run. Lock files are never deleted: a process waiting on
a lock must hold the same inode as the next one to take it.

A legacy model (registered by path under the model root) is used where it is, as before.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_core.model_files.manifest import verify_files
from lorajobs.core.registry import model_dir as legacy_model_dir
from lorajobs.core.settings import Settings
from lorajobs.core.storage import ArtifactStore, private_dir
from lorajobs.core.tables import RegisteredModel

__all__ = ["ModelCacheError", "local_model_dir", "model_in_use", "release", "release_all"]

log = logging.getLogger(__name__)
LOCKS = ".locks"
# Use locks this process holds: content_sha256 -> fd (closing it releases the lock).
_HELD: dict[str, int] = {}


class ModelCacheError(RuntimeError):
    """A stored model cannot be made usable on this node (its stored bytes do not match its
    manifest, or the row has no manifest)."""


def local_model_dir(settings: Settings, store: ArtifactStore, model: RegisteredModel) -> Path:
    """The directory a trainer on this node loads `model` from.

    A stored model is fetched into the cache unless a verified copy is there, and stays
    locked in use by this process until `release(model)`, `release_all()` or the process ends
    (the worker runs one job per process)."""
    if model.path is not None:
        return legacy_model_dir(settings, model)
    if not model.content_sha256 or not model.storage_prefix or not model.files:
        raise ModelCacheError(f"model {model.name!r} has no stored files recorded")
    return _Cache(settings).acquire(store, model)


@contextmanager
def model_in_use(settings: Settings, store: ArtifactStore, model: RegisteredModel
                 ) -> Iterator[Path]:
    """`local_model_dir`, released when the block ends."""
    path = local_model_dir(settings, store, model)
    try:
        yield path
    finally:
        release(model)


def release(model: RegisteredModel) -> None:
    """This process no longer uses `model` (it may be evicted once no one else does)."""
    fd = _HELD.pop(model.content_sha256 or "", None)
    if fd is not None:
        os.close(fd)


def release_all() -> None:
    for sha in list(_HELD):
        os.close(_HELD.pop(sha))


@contextmanager
def _flock(path: Path, mode: int) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)


class _Cache:
    def __init__(self, settings: Settings) -> None:
        self.root = private_dir(settings.resolved_model_cache_dir)
        self.locks = private_dir(self.root / LOCKS)
        self.budget = settings.model_cache_bytes
        self.every_use = settings.model_cache_verify_every_use

    def acquire(self, store: ArtifactStore, model: RegisteredModel) -> Path:
        sha = model.content_sha256
        assert sha is not None and model.files is not None and model.storage_prefix
        target = self.root / sha
        if sha not in _HELD:
            use = os.open(self.locks / f"{sha}.use", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(use, fcntl.LOCK_SH)  # waits only for an evictor's short pass
            except BaseException:
                os.close(use)
                raise
            _HELD[sha] = use
        try:
            with _flock(self.locks / f"{sha}.fetch", fcntl.LOCK_EX):
                stamp = self.locks / f"{sha}.verified"
                if target.is_dir():
                    if not self.every_use and _read_stamp(stamp) == _stats(target):
                        os.utime(target)  # last use, for the LRU order
                        return target
                    problems = verify_files(target, model.files)
                    if not problems:
                        _write_stamp(stamp, _stats(target))
                        os.utime(target)
                        return target
                    log.warning("cached model %s (%s) is corrupt, fetching it again: %s",
                                model.name, sha[:12], "; ".join(problems[:5]))
                stamp.unlink(missing_ok=True)
                self._download(store, model, target)
                _write_stamp(stamp, _stats(target))
                return target
        except BaseException:
            release(model)
            raise

    def _download(self, store: ArtifactStore, model: RegisteredModel, target: Path) -> None:
        files = model.files or []
        self._evict_for(sum(int(e["size"]) for e in files), keep=target.name)
        partial = self.root / f"{target.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # a crashed download's leftovers
        private_dir(partial)
        try:
            for entry in files:
                store.get_file(f"{model.storage_prefix}/{entry['path']}", partial / entry["path"])
            problems = verify_files(partial, files)
            if problems:
                raise ModelCacheError(f"model {model.name!r} in the store does not match its "
                                      f"manifest: {'; '.join(problems[:5])}")
            stale = None
            if target.exists():
                stale = self.root / f"{target.name}.stale-{uuid.uuid4().hex[:8]}"
                os.rename(target, stale)  # jobs using the old copy keep their open files
            os.rename(partial, target)
            if stale is not None:
                shutil.rmtree(stale, ignore_errors=True)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        log.info("model %s (%s) fetched into the node cache", model.name, target.name[:12])

    def _evict_for(self, need: int, *, keep: str) -> None:
        """Evict least recently used, unused models until `need` more bytes fit the budget."""
        with _flock(self.locks / "evict", fcntl.LOCK_EX):
            self._sweep_leftovers()
            entries = []
            for entry in os.scandir(self.root):
                if entry.is_dir() and len(entry.name) == 64 and entry.name != keep:
                    entries.append((entry.stat().st_mtime_ns, entry.name,
                                    _dir_bytes(Path(entry.path))))
            total = sum(size for _, _, size in entries)
            for _, sha, size in sorted(entries):
                if total + need <= self.budget:
                    break
                if self._evict(sha):
                    total -= size

    def _sweep_leftovers(self) -> None:
        """Remove what a process killed mid-way left: `.stale-*` copies (renamed away; a job
        still reading one keeps its open files) and `.partial` downloads nobody is writing
        (their fetch lock is free)."""
        for entry in os.scandir(self.root):
            name = entry.name
            if not entry.is_dir() or name.startswith("."):
                continue
            if ".stale-" in name:
                shutil.rmtree(entry.path, ignore_errors=True)
            elif name.endswith(".partial"):
                fd = os.open(self.locks / f"{name.removesuffix('.partial')}.fetch",
                             os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    shutil.rmtree(entry.path, ignore_errors=True)
                except BlockingIOError:
                    pass  # a download in progress
                finally:
                    os.close(fd)

    def _evict(self, sha: str) -> bool:
        """Remove one model unless a job on this node uses it (its use lock is held)."""
        fd = os.open(self.locks / f"{sha}.use", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            shutil.rmtree(self.root / sha, ignore_errors=True)
            log.info("evicted model %s from the node cache", sha[:12])
            return True
        finally:
            os.close(fd)


def _stats(path: Path) -> dict[str, list[int]]:
    """{file: [size, mtime_ns, inode]}: what a rewrite, truncation or replacement changes."""
    return {e.name: [e.stat().st_size, e.stat().st_mtime_ns, e.stat().st_ino]
            for e in os.scandir(path)}


def _read_stamp(path: Path) -> dict[str, list[int]] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_stamp(path: Path, stats: dict[str, list[int]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(stats))
    os.replace(tmp, path)


def _dir_bytes(path: Path) -> int:
    try:
        return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
    except OSError:
        return 0
