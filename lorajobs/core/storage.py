"""The artifact store: where datasets, checkpoints, adapters and merged models live.

Keys are built by the service (`jobs/<job_id>/...`, `datasets/<id>.jsonl`), never taken from a
client; `safe_key` refuses anything that could escape the root anyway (`..`, absolute paths, NUL,
backslashes). `LocalArtifactStore` is a directory (a shared volume in production); an
S3-compatible store (`lorajobs.core.s3store.S3ArtifactStore`) implements the same
`ArtifactStore` interface. A missing object is `FileNotFoundError` in both; an S3 store that
fails is `StorageUnavailable` (503 at the API).

Everything stored is a tenant's data (datasets, checkpoints, adapters, merged models), as are
the database and the admin key beside it: the service's user alone reads them. Files are created
0600 and directories 0700 whatever the umask, and the service's processes run under umask 077
(`use_private_umask`) so that what a trainer child writes is private too.
"""

from __future__ import annotations

import io
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO, cast

from lorajobs.core.errors import InvalidRequest

if TYPE_CHECKING:
    from lorajobs.core.settings import Settings

__all__ = ["ArtifactStore", "LocalArtifactStore", "StoredObject", "safe_key", "get_store",
           "use_private_umask", "private_dir", "private_file", "PRIVATE_FILE_MODE",
           "PRIVATE_DIR_MODE"]

COPY_CHUNK = 1024 * 1024
PRIVATE_UMASK = 0o077  # new files rw-------, directories rwx------
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def use_private_umask() -> None:
    """Files this process and its children create are the service user's alone."""
    os.umask(PRIVATE_UMASK)


def _make_dirs(path: Path) -> None:
    """`mkdir -p` with every directory it creates 0700 (`Path.mkdir` gives parents the umask's
    default)."""
    missing: list[Path] = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) 0700; an existing one we own is tightened to 0700."""
    _make_dirs(path)
    try:
        path.chmod(PRIVATE_DIR_MODE)
    except PermissionError:  # a mount point owned by someone else: its owner decides
        pass
    return path


def private_file(path: Path) -> Path:
    """Create `path` empty and 0600 unless it exists. SQLite keeps the mode of a database file
    it finds, and gives it to the file's -wal and -shm companions."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE))
    except FileExistsError:
        pass
    return path


def _create_private(path: Path) -> BinaryIO:
    """Open a new file for writing, 0600 from its creation (a stale one is replaced)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    return os.fdopen(fd, "wb")


def safe_key(key: str) -> str:
    """Return `key` if it is a plain relative posix path inside the store, else raise."""
    if not key or "\x00" in key or "\\" in key or key.startswith("/"):
        raise InvalidRequest(f"invalid artifact key {key!r}", param="key")
    parts = PurePosixPath(key).parts
    if any(p in ("..", ".", "") for p in parts) or ":" in parts[0]:
        raise InvalidRequest(f"invalid artifact key {key!r}", param="key")
    return key


@dataclass(frozen=True)
class StoredObject:
    """One object under a prefix (`ArtifactStore.list`)."""

    key: str
    size: int


class ArtifactStore(ABC):
    """Put, read and list immutable objects by key; nothing outside the implementations knows
    where an object lives. `put_*` are atomic: a reader sees the whole object or none.

    Keys are written once and never rewritten in place (a worker writes only under its run's
    prefix, `jobs/<job>/attempt-<N>/run-<token>/`: worker/checkpoint_sync.run_prefix), so an
    S3 store needs no locking.
    """

    @abstractmethod
    def put_file(self, key: str, src: Path, *, immutable: bool = False) -> None:
        """Store a local file (large files in parts). `immutable`: the caller promises nobody
        rewrites `src` in place from now on (a sealed checkpoint, a final adapter), so the
        local store may hard-link it instead of copying (deleting `src` later is fine)."""

    @abstractmethod
    def put_stream(self, key: str, stream: BinaryIO) -> int:
        """Store what `stream` yields until EOF; returns the byte count."""

    @abstractmethod
    def get_file(self, key: str, dest: Path) -> None:
        """Download to `dest` atomically (a `.part` file renamed into place), 0600."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A streaming reader of the whole object."""

    @abstractmethod
    def open_range(self, key: str, start: int, end: int) -> BinaryIO:
        """A streaming reader of bytes [start, end] inclusive (HTTP Range semantics)."""

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> Iterator[StoredObject]:
        """Every object whose key starts with `prefix` + "/" (or equals it), sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; a missing one is not an error."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under `prefix` (a directory-like prefix, or one key)."""

    def presigned_url(self, key: str, *, expires_seconds: int,
                      filename: str | None = None) -> str | None:
        """A short-lived URL a client may GET the object from directly, or None where the
        store has none (the local directory): the API then streams the object itself."""
        return None

    @property
    def is_local(self) -> bool:
        """True for the embedded local directory (one node)."""
        return False

    def reachable(self) -> bool:
        """A quick check (seconds at most) that the store answers, for /readyz; never raises."""
        return True


class LocalArtifactStore(ArtifactStore):
    """A directory: the embedded default (one node), or a shared volume."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        _make_dirs(self.root)

    @property
    def is_local(self) -> bool:
        return True

    def local_path(self, key: str) -> Path:
        """The file behind a key. Not part of `ArtifactStore`: only this implementation and its
        tests may use it (callers go through the interface, so an S3 store works the same)."""
        path = (self.root / safe_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidRequest(f"invalid artifact key {key!r}", param="key")
        return path

    def put_file(self, key: str, src: Path, *, immutable: bool = False) -> None:
        dest = self.local_path(key)
        if not immutable:
            with open(src, "rb") as stream:
                self.put_stream(key, stream)
            return
        _make_dirs(dest.parent)
        tmp = dest.with_name(dest.name + ".part")
        tmp.unlink(missing_ok=True)
        try:  # same filesystem (scratch beside the store): no copy of a file nobody rewrites
            os.link(src, tmp)
        except OSError:
            with open(src, "rb") as stream:
                self.put_stream(key, stream)
            return
        try:
            os.chmod(tmp, PRIVATE_FILE_MODE)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_stream(self, key: str, stream: BinaryIO) -> int:
        dest = self.local_path(key)
        _make_dirs(dest.parent)
        tmp = dest.with_name(dest.name + ".part")
        written = 0
        try:
            with _create_private(tmp) as out:
                while chunk := stream.read(COPY_CHUNK):
                    out.write(chunk)
                    written += len(chunk)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return written

    def get_file(self, key: str, dest: Path) -> None:
        _make_dirs(Path(dest).parent)
        tmp = Path(dest).with_name(Path(dest).name + ".part")
        try:
            with self.open(key) as src, _create_private(tmp) as out:
                shutil.copyfileobj(src, out, COPY_CHUNK)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def open(self, key: str) -> BinaryIO:
        return open(self.local_path(key), "rb")

    def open_range(self, key: str, start: int, end: int) -> BinaryIO:
        fh = open(self.local_path(key), "rb")
        fh.seek(start)
        return cast(BinaryIO, io.BufferedReader(_BoundedReader(fh, end - start + 1)))

    def size(self, key: str) -> int:
        return self.local_path(key).stat().st_size

    def exists(self, key: str) -> bool:
        return self.local_path(key).is_file()

    def list(self, prefix: str) -> Iterator[StoredObject]:
        base = self.local_path(prefix)
        if base.is_file():
            yield StoredObject(key=prefix, size=base.stat().st_size)
            return
        for p in sorted(base.rglob("*")):
            if p.is_file() and not p.name.endswith(".part"):
                yield StoredObject(key=p.relative_to(self.root).as_posix(), size=p.stat().st_size)

    def delete(self, key: str) -> None:
        self.local_path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        path = self.local_path(prefix)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def iter_files(self, prefix: str) -> Iterator[tuple[str, Path]]:
        """(key, path) of every file under a prefix, sorted."""
        base = self.local_path(prefix)
        for p in sorted(base.rglob("*")):
            if p.is_file():
                yield p.relative_to(self.root).as_posix(), p


class _BoundedReader(io.RawIOBase):
    """At most `remaining` bytes of a file, then EOF (a Range read of the local store)."""

    def __init__(self, fh: BinaryIO, remaining: int) -> None:
        self._fh = fh
        self._remaining = max(0, remaining)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        if self._remaining <= 0:
            return 0
        view = memoryview(buffer)[: self._remaining]
        n = self._fh.readinto(view)  # type: ignore[attr-defined]
        self._remaining -= n or 0
        return n or 0

    def close(self) -> None:
        self._fh.close()
        super().close()


def get_store(settings: Settings | None = None) -> ArtifactStore:
    """The store the settings name: `store_url = s3://bucket/prefix` the S3 store
    (lorajobs/core/s3store.py), unset the local directory `artifact_root`."""
    from lorajobs.core.settings import get_settings

    settings = settings or get_settings()
    if settings.store_url:
        from lorajobs.core.s3store import S3ArtifactStore

        return S3ArtifactStore(settings.store_url, endpoint_url=settings.store_endpoint_url,
                               region=settings.store_region,
                               public_endpoint_url=settings.store_public_endpoint_url)
    return LocalArtifactStore(settings.resolved_artifact_root)
