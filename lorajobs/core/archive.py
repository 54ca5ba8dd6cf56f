"""A tar stream of a set of stored objects, built block by block: no temp file, exact
Content-Length. Members are read from the artifact store one after another (the S3 store: one
GET each), never from a local path.

    [512-byte header (PAX for long names)][data][zero pad to 512] ... [two 512-byte zero blocks]

Headers are built up front (they are small), so the total size is known before the first byte
and a client gets a real Content-Length and progress bar. Member names are checked with
`safe_key`, so extracting the archive cannot write outside the target directory. An object whose
size differs from its recorded one aborts the stream rather than emit a corrupt archive (so does
a store failing mid-stream: the client sees a body shorter than its Content-Length).
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from lorajobs.core.storage import ArtifactStore, safe_key

__all__ = ["TarEntry", "TarStream", "BLOCK"]

BLOCK = 512  # tar's block size (POSIX.1-1988 ustar)
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
READ_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class TarEntry:
    """One member: `name` inside the archive, `key` in the store, the expected `size`."""

    name: str
    key: str
    size: int
    mtime: float = 0.0


def _padding(size: int) -> int:
    return -size % BLOCK


class TarStream:
    """Iterate for the bytes; `content_length` is exact."""

    def __init__(self, entries: list[TarEntry], store: ArtifactStore, *,
                 prefix: str = "") -> None:
        self._store = store
        self._members: list[tuple[bytes, TarEntry]] = []
        for entry in entries:
            name = safe_key(f"{prefix}/{entry.name}" if prefix else entry.name)
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = entry.size, int(entry.mtime), 0o644
            header = info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8",
                                errors="surrogateescape")
            self._members.append((header, entry))

    @property
    def content_length(self) -> int:
        return sum(len(h) + e.size + _padding(e.size) for h, e in self._members) + len(
            END_OF_ARCHIVE)

    def __iter__(self) -> Iterator[bytes]:
        for header, entry in self._members:
            yield header
            sent = 0
            with self._store.open(entry.key) as fh:
                while sent < entry.size and (chunk := fh.read(min(READ_CHUNK, entry.size - sent))):
                    sent += len(chunk)
                    yield chunk
            if sent != entry.size:
                raise OSError(f"{entry.name} shrank while streaming ({sent} of {entry.size} bytes)")
            yield b"\0" * _padding(entry.size)
        yield END_OF_ARCHIVE
