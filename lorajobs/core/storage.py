"""The artifact store: where datasets, checkpoints, adapters and merged models live.

Keys are built by the service (`jobs/<job_id>/...`, `datasets/<id>.jsonl`), never taken from a
client; `safe_key` refuses anything that could escape the root anyway (`..`, absolute paths, NUL,
backslashes). `LocalArtifactStore` is a directory (a shared volume in production); an
S3-compatible store implements the same `ArtifactStore` interface.

Everything stored is a tenant's data (datasets, checkpoints, adapters, merged models), as are
the database and the admin key beside it: the service's user alone reads them. Files are created
0600 and directories 0700 whatever the umask, and the service's processes run under umask 077
(`use_private_umask`) so that what a trainer child writes is private too.
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from lorajobs.core.errors import InvalidRequest

__all__ = ["ArtifactStore", "LocalArtifactStore", "safe_key", "get_store", "use_private_umask",
           "private_dir", "private_file", "PRIVATE_FILE_MODE", "PRIVATE_DIR_MODE"]

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


class ArtifactStore(ABC):
    """Put, read and list files by key. Implementations must make `put_*` atomic."""

    @abstractmethod
    def put_file(self, key: str, src: Path) -> None: ...

    @abstractmethod
    def put_stream(self, key: str, stream: BinaryIO) -> int: ...

    @abstractmethod
    def open(self, key: str) -> BinaryIO: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None: ...

    @abstractmethod
    def local_path(self, key: str) -> Path:
        """A filesystem path for the trainer (a local store returns the file itself)."""


class LocalArtifactStore(ArtifactStore):
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        _make_dirs(self.root)

    def local_path(self, key: str) -> Path:
        path = (self.root / safe_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidRequest(f"invalid artifact key {key!r}", param="key")
        return path

    def put_file(self, key: str, src: Path) -> None:
        with open(src, "rb") as stream:
            self.put_stream(key, stream)

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

    def open(self, key: str) -> BinaryIO:
        return open(self.local_path(key), "rb")

    def size(self, key: str) -> int:
        return self.local_path(key).stat().st_size

    def exists(self, key: str) -> bool:
        return self.local_path(key).exists()

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


def get_store(settings=None) -> LocalArtifactStore:  # type: ignore[no-untyped-def]
    from lorajobs.core.settings import get_settings

    settings = settings or get_settings()
    return LocalArtifactStore(settings.resolved_artifact_root)
