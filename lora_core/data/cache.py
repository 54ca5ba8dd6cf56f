"""Tokenised-dataset cache: a dataset is validated and tokenised once per (data, tokenizer, length).

A retried, resumed or re-submitted job with the same file re-reads its features from one
safetensors file instead of re-validating and re-tokenising every line (seconds to minutes for
large files; the trainer child pays it before the first step). The key is

    sha256(CACHE_VERSION, sha256(file bytes), format, max_seq_length, tokenizer files' bytes)

so any change to the data, the tokenizer or the truncation length misses. Bump CACHE_VERSION
when tokenize.py changes what it emits. Only valid data is ever cached (tokenising raises on
bad data before a save), so a hit may skip validation.

Layout of one entry, `<dir>/<key>.safetensors` (written atomically: tmp + rename):

    input_ids  int32 (T,)      all examples concatenated
    labels     int32 (T,)      IGNORE_INDEX kept as -100
    offsets    int64 (E + 1,)  example i = [offsets[i], offsets[i+1])
    metadata   {"format", "stats" (TokenizeStats as JSON)}

`attention_mask` is all ones by construction (tokenize.py), so it is rebuilt, not stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from lora_core.data.tokenize import TokenizeStats

__all__ = ["CACHE_ENV", "CACHE_VERSION", "cache_dir", "cache_key", "load", "save"]

CACHE_ENV = "LORAJOBS_TOKEN_CACHE"  # a directory; "off" disables the cache
CACHE_VERSION = 1
MAX_ENTRIES = 64  # oldest (by mtime) removed beyond this: a bound, not a policy
# Files that define a HF tokenizer's behaviour (tokenizer.json, vocab/merges, sentencepiece
# models, special tokens, chat templates)
TOKENIZER_GLOBS = ("tokenizer*", "vocab*", "merges*", "special_tokens_map.json",
                   "added_tokens.json", "*.model", "chat_template*")


def cache_dir() -> Path | None:
    """The cache directory, or None when disabled (LORAJOBS_TOKEN_CACHE=off)."""
    value = os.environ.get(CACHE_ENV)
    if value == "off":
        return None
    if value:
        return Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lorajobs" / "tokenized"


def cache_key(data: bytes, fmt: str | None, max_seq_length: int, tokenizer_dir: Path) -> str:
    """Hex sha256 of everything the features depend on (see the module docstring)."""
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{fmt}|{max_seq_length}|".encode())
    h.update(hashlib.sha256(data).digest())
    files = sorted({p for g in TOKENIZER_GLOBS for p in Path(tokenizer_dir).glob(g)
                    if p.is_file()})
    for path in files:
        h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def save(key: str, fmt: str, features: list[dict[str, list[int]]], stats: TokenizeStats) -> None:
    """Write one entry atomically; errors (full disk, read-only dir) only cost the cache."""
    import torch
    from safetensors.torch import save_file

    root = cache_dir()
    if root is None:
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        lengths = torch.tensor([0] + [len(f["input_ids"]) for f in features], dtype=torch.int64)
        tensors = {
            "input_ids": torch.tensor([t for f in features for t in f["input_ids"]],
                                      dtype=torch.int32),
            "labels": torch.tensor([t for f in features for t in f["labels"]], dtype=torch.int32),
            "offsets": lengths.cumsum(0),
        }
        meta = {"format": fmt, "stats": json.dumps(asdict(stats))}
        fd, tmp = tempfile.mkstemp(dir=root, suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, root / f"{key}.safetensors")
        _evict(root)
    except OSError:
        return


def load(key: str) -> tuple[str, list[dict[str, list[int]]], TokenizeStats] | None:
    """(format, features, stats) of a cached entry, or None on a miss or unreadable entry."""
    from safetensors import SafetensorError, safe_open

    root = cache_dir()
    path = root / f"{key}.safetensors" if root is not None else None
    if path is None or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            ids, labels = f.get_tensor("input_ids").tolist(), f.get_tensor("labels").tolist()
            offsets = f.get_tensor("offsets").tolist()
        os.utime(path)  # recently used: evicted last
    except (OSError, SafetensorError, KeyError):
        return None
    features = []
    for a, b in zip(offsets[:-1], offsets[1:], strict=True):
        features.append({"input_ids": ids[a:b], "labels": labels[a:b],
                         "attention_mask": [1] * (b - a)})
    return meta["format"], features, TokenizeStats(**json.loads(meta["stats"]))


def _evict(root: Path) -> None:
    entries = sorted(root.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    for path in entries[:-MAX_ENTRIES]:
        path.unlink(missing_ok=True)
