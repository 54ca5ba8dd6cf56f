"""The artifact store: where datasets, checkpoints, adapters and merged models live.

Keys are built by the service (`jobs/<job_id>/...`, `datasets/<id>.jsonl`), never taken from a
client; `safe_key` refuses anything that could escape the root anyway (`..`, absolute paths, NUL,
backslashes). `LocalArtifactStore` is a directory (a shared volume in production); an
S3-compatible store implements the same `ArtifactStore` interface.
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from lorajobs.service.errors import InvalidRequest

__all__ = ["ArtifactStore", "LocalArtifactStore", "safe_key", "get_store"]

COPY_CHUNK = 1024 * 1024


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
        self.root.mkdir(parents=True, exist_ok=True)

    def local_path(self, key: str) -> Path:
        path = (self.root / safe_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidRequest(f"invalid artifact key {key!r}", param="key")
        return path

    def put_file(self, key: str, src: Path) -> None:
        dest = self.local_path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)

    def put_stream(self, key: str, stream: BinaryIO) -> int:
        dest = self.local_path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        written = 0
        try:
            with open(tmp, "wb") as out:
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
    from lorajobs.service.settings import get_settings

    settings = settings or get_settings()
    return LocalArtifactStore(settings.resolved_artifact_root)
