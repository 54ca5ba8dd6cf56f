"""A sha256 manifest for an artifact directory (adapter or merged model).

`manifest.json` = {"files": [{"path": "model-00001-of-00002.safetensors", "size": 123,
"sha256": "ab..."}, ...]}: relative POSIX paths, sorted, manifest.json itself excluded. The
service serves these digests with downloads so a client can check what it got. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from lora_core.errors import StorageError

__all__ = ["MANIFEST_NAME", "sha256_file", "list_files", "write_manifest", "verify_files",
           "verify_manifest"]

MANIFEST_NAME = "manifest.json"
CHUNK_BYTES = 4 * 1024 * 1024  # hashing chunk: big enough to be I/O-bound, small in memory


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks (shards are GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """`[{path, size, sha256}]` for every regular file under `directory`, sorted by path."""
    root = Path(directory)
    entries = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST_NAME:
            entries.append({"path": rel, "size": p.stat().st_size, "sha256": sha256_file(p)})
    return entries


def write_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Hash every file and write `manifest.json`; returns the manifest dict."""
    manifest = {"files": list_files(directory)}
    try:
        (Path(directory) / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    except OSError as exc:
        raise StorageError(f"cannot write {MANIFEST_NAME} in {directory}: {exc}") from exc
    return manifest


def verify_files(directory: str | os.PathLike[str], entries: list[dict[str, Any]]) -> list[str]:
    """Problems comparing the files under `directory` with manifest `entries` ([{path, size,
    sha256}]); an empty list means they match exactly.

    Reports missing files, files the entries do not list, and size/sha256 mismatches. The size
    is compared first, so a truncated file is never hashed. The one check of bytes fetched from
    a store (checkpoints, base models, parent adapters) and of a written artifact dir."""
    root = Path(directory)
    expected = {e["path"]: e for e in entries}
    actual = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
    problems = [f"{p}: missing" for p in sorted(expected.keys() - actual.keys())]
    problems += [f"{p}: not in manifest" for p in sorted(actual.keys() - expected.keys())]
    for p in sorted(expected.keys() & actual.keys()):
        size, want = actual[p].stat().st_size, expected[p]
        if size != int(want["size"]):
            problems.append(f"{p}: size {size} != manifest {want['size']}")
        elif (digest := sha256_file(actual[p])) != want["sha256"]:
            problems.append(f"{p}: sha256 {digest} != manifest {want['sha256']}")
    return problems


def verify_manifest(directory: str | os.PathLike[str]) -> list[str]:
    """Problems found comparing the directory with its own `manifest.json` (`verify_files`,
    the manifest itself excepted); an empty list means intact."""
    root = Path(directory)
    path = root / MANIFEST_NAME
    if not path.is_file():
        return [f"{MANIFEST_NAME} missing"]
    entries = json.loads(path.read_text("utf-8"))["files"]
    return [p for p in verify_files(root, entries) if not p.startswith(f"{MANIFEST_NAME}: ")]
