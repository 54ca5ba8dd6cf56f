"""Base models into the object store: staged, validated, stored by content.

    upload (multipart files or a tar) ─┐
    s3://bucket/prefix (boto3)  ───────┼─▶ staging dir ─▶ inspect (safetensors headers, no
    hf_repo + revision (huggingface_hub)┘   (API node)     pickle) ─▶ manifest ─▶ store:
                                                             models/<content_sha256>/<file>

A model's files are flat (`config.json`, `model-00001-of-00002.safetensors`, `tokenizer.json`,
...): ALLOWED_SUFFIXES only, everything else in a source is not copied (an upload naming one is
refused). `content_sha256` hashes the sorted manifest, one line per file
(`path<TAB>size<TAB>sha256`): equal files give one key, so registering the same weights twice
stores them once, and a worker's cache (lorajobs/worker/model_cache.py) is keyed by it.
Registration is synchronous: the model is in the store when POST /v1/models answers 201.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tarfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lora_core.model_files.headers import PICKLE_SUFFIXES
from lorajobs.core.errors import InvalidRequest, PayloadTooLarge
from lorajobs.core.settings import Settings
from lorajobs.core.storage import ArtifactStore, private_dir

__all__ = ["ALLOWED_SUFFIXES", "HF_ALLOW_PATTERNS", "MODELS_PREFIX", "check_file_name",
           "content_sha256", "staging", "extract_tar", "fetch_s3", "fetch_hf", "store_files",
           "stored_complete", "parse_s3_url"]

MODELS_PREFIX = "models"
# Weights (safetensors only), configs and tokenizer files: what a causal LM needs to train.
ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".tiktoken", ".jinja")
# The same set as huggingface_hub allow_patterns (fnmatch): a hub snapshot copies nothing else.
HF_ALLOW_PATTERNS = [f"*{suffix}" for suffix in ALLOWED_SUFFIXES]
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
MAX_FILES = 1000  # a 400B model in 5 GB shards is ~200 files
S3_URL = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,62})/?(.*)$")
HF_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


def check_file_name(name: str, *, param: str = "files") -> str:
    """`name` if a model directory may hold it (flat, allowed suffix), else InvalidRequest."""
    if name.endswith(PICKLE_SUFFIXES):
        raise InvalidRequest(f"refusing pickle file {name!r}: only safetensors weights are "
                             "accepted (pickle files can run arbitrary code when loaded)",
                             param=param, code="pickle_refused")
    if not FILE_NAME.match(name) or ".." in name:
        raise InvalidRequest(f"invalid model file name {name!r}: a plain file name (letters, "
                             "digits, '.', '_', '-'), no directories", param=param)
    if not name.endswith(ALLOWED_SUFFIXES):
        raise InvalidRequest(f"unexpected model file {name!r}: accepted are "
                             f"{', '.join(ALLOWED_SUFFIXES)} (weights, configs, tokenizer)",
                             param=param)
    return name


def content_sha256(manifest: list[dict[str, Any]]) -> str:
    """sha256 over the sorted manifest, one `path\\tsize\\tsha256\\n` line per file."""
    digest = hashlib.sha256()
    for entry in sorted(manifest, key=lambda e: e["path"]):
        digest.update(f"{entry['path']}\t{entry['size']}\t{entry['sha256']}\n".encode())
    return digest.hexdigest()


@contextmanager
def staging(settings: Settings) -> Iterator[Path]:
    """A fresh private directory under model_staging_dir, removed on exit whatever happens."""
    path = private_dir(settings.resolved_model_staging_dir / uuid.uuid4().hex)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def extract_tar(tar_path: Path, dest: Path, *, max_bytes: int) -> None:
    """Unpack a model tar (plain or compressed) into `dest`: regular files only, at the top
    level or under one common directory (`tar -C parent -cf m.tar model/`), names checked,
    sizes from the headers counted against `max_bytes` before a byte is written."""
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = [m for m in tar.getmembers() if not m.isdir()]
            names = _flat_names(members)
            total = sum(m.size for m in members)
            if total > max_bytes:
                raise PayloadTooLarge(f"the model's files hold {total} bytes, over the limit "
                                      f"of {max_bytes}", param="files")
            for member, name in zip(members, names, strict=True):
                src = tar.extractfile(member)
                if src is None:  # pragma: no cover - _flat_names refused non-regular members
                    raise InvalidRequest(f"tar member {member.name!r} is not a file",
                                         param="files")
                with src, open(dest / name, "xb") as out:
                    shutil.copyfileobj(src, out, 1024 * 1024)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InvalidRequest(f"not a readable tar archive: {exc}", param="files") from exc


def _flat_names(members: list[tarfile.TarInfo]) -> list[str]:
    if not members:
        raise InvalidRequest("the tar archive holds no files", param="files")
    if len(members) > MAX_FILES:
        raise InvalidRequest(f"more than {MAX_FILES} files in the tar archive", param="files")
    names = []
    for m in members:
        if not m.isfile():
            raise InvalidRequest(f"tar member {m.name!r} is not a regular file (links and "
                                 "devices are refused)", param="files")
        parts = [p for p in m.name.split("/") if p not in ("", ".")]
        names.append(parts)
    tops = {tuple(p[:-1]) for p in names}
    if len(tops) != 1 or len(next(iter(tops))) > 1:
        raise InvalidRequest("the tar archive must hold the model's files at its top level or "
                             "in one directory", param="files")
    flat = [check_file_name(p[-1]) for p in names]
    if len(set(flat)) != len(flat):
        raise InvalidRequest("the tar archive names a file twice", param="files")
    return flat


def _unavailable(message: str, param: str) -> InvalidRequest:
    """The source the request names cannot be read now (unreachable, failing, not cached
    offline): 422 naming the field, like any source we cannot use. Not a 503: that status
    says *our* store is down, and this server is healthy; the client decides whether to retry
    (the message says it may be transient)."""
    return InvalidRequest(f"{message}; it may be temporary: retry later or use another source",
                          param=param, code="model_source_unavailable")


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix without trailing '/')."""
    match = S3_URL.match(url) if isinstance(url, str) else None
    if match is None or ".." in match.group(2).split("/"):
        raise InvalidRequest(f"invalid S3 URL {url!r}: expected s3://bucket/prefix",
                             param="source.s3")
    return match.group(1), match.group(2).strip("/")


def fetch_s3(settings: Settings, url: str, dest: Path) -> str:
    """Copy the model files directly under `s3://bucket/prefix` into `dest` with boto3
    (credentials from the standard AWS chain; the endpoint and region of the store's
    settings). Returns the URL as the revision."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3_url(url)
    client = boto3.client("s3", endpoint_url=settings.store_endpoint_url,
                          region_name=settings.store_region,
                          config=Config(retries={"mode": "standard", "max_attempts": 5}))
    base = f"{prefix}/" if prefix else ""
    try:
        objects = [obj for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=base, Delimiter="/") for obj in page.get("Contents", [])]
        wanted = _select(((o["Key"][len(base):], int(o["Size"])) for o in objects),
                         settings.max_model_bytes, url)
        for name in wanted:
            client.download_file(bucket, base + name, str(dest / name))
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "AccessDenied", "403", "404", "NoSuchKey"):
            raise InvalidRequest(f"cannot read {url}: {code}", param="source.s3") from exc
        raise _unavailable(f"the S3 source {url} failed: {exc}", "source.s3") from exc
    except BotoCoreError as exc:
        raise _unavailable(f"the S3 source {url} is unreachable: {exc}", "source.s3") from exc
    return url


def _select(entries: Iterator[tuple[str, int]], max_bytes: int, where: str) -> list[str]:
    """The allowed files among a source's (name, size); pickle-only or empty: 422; too big:
    413 (before anything is fetched)."""
    wanted, pickles, total = [], [], 0
    for name, size in entries:
        if not name or "/" in name:
            continue
        if name.endswith(PICKLE_SUFFIXES):
            pickles.append(name)
        elif name.endswith(ALLOWED_SUFFIXES) and FILE_NAME.match(name):
            wanted.append(name)
            total += size
    if not any(n.endswith(".safetensors") for n in wanted):
        detail = (f"only pickle weights {sorted(pickles)}: convert the model to safetensors"
                  if pickles else "no safetensors weights")
        raise InvalidRequest(f"{where}: {detail}", param="source", code="invalid_model")
    if total > max_bytes:
        raise PayloadTooLarge(f"{where}: the model's files hold {total} bytes, over the limit "
                              f"of {max_bytes}", param="source")
    return sorted(wanted)


def fetch_hf(settings: Settings, repo: str, revision: str | None, dest: Path) -> str:
    """A Hugging Face snapshot through `huggingface_hub.snapshot_download` (HF_ENDPOINT, a
    mirror, HF_TOKEN, HF_HUB_OFFLINE and the cache under HF_HOME all apply), linked into
    `dest`. Returns the commit hash the revision resolved to."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        DryRunError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if (not isinstance(repo, str) or not HF_REPO.match(repo) or ".." in repo or "--" in repo
            or any(part[-1] in ".-" for part in repo.split("/"))):
        raise InvalidRequest(f"invalid Hugging Face repo id {repo!r}: 'org/name'",
                             param="source.hf_repo")
    if revision is not None and (not HF_REVISION.match(revision) or ".." in revision):
        raise InvalidRequest(f"invalid revision {revision!r}: a branch, tag or commit",
                             param="source.revision")
    where = f"hf://{repo}@{revision or 'main'}"
    try:
        try:  # sizes first (one tree listing): refuse an oversized repo before downloading
            planned = snapshot_download(repo, revision=revision, allow_patterns=HF_ALLOW_PATTERNS,
                                        dry_run=True)
        except DryRunError:  # the hub is unreachable or HF_HUB_OFFLINE: the cache decides
            planned = []
        if planned:
            _select(((f.filename, f.file_size or 0) for f in planned),
                    settings.max_model_bytes, where)
        snapshot = Path(snapshot_download(repo, revision=revision,
                                          allow_patterns=HF_ALLOW_PATTERNS))
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise InvalidRequest(f"{where}: no such repository, or it needs a token this server "
                             "lacks", param="source.hf_repo", code="model_not_found") from exc
    except HFValidationError as exc:  # what our patterns let through and the client refuses
        raise InvalidRequest(f"{where}: {exc}", param="source.hf_repo") from exc
    except RevisionNotFoundError as exc:
        raise InvalidRequest(f"{where}: no such revision", param="source.revision",
                             code="model_not_found") from exc
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise _unavailable(f"{where}: the hub is unreachable and the snapshot is not in the "
                           f"local cache ({type(exc).__name__})", "source.hf_repo") from exc
    files = [(p.name, p.stat().st_size) for p in snapshot.iterdir() if p.is_file()]
    for name in _select(iter(files), settings.max_model_bytes, where):
        (dest / name).symlink_to((snapshot / name).resolve())
    return snapshot.name  # snapshots/<commit hash>


def stored_complete(store: ArtifactStore, prefix: str, manifest: list[dict[str, Any]]) -> bool:
    """Every manifest file is already under `prefix` with its size (content-addressed: same
    key, same bytes)."""
    have = {obj.key: obj.size for obj in store.list(prefix)}
    return all(have.get(f"{prefix}/{e['path']}") == e["size"] for e in manifest)


def store_files(store: ArtifactStore, prefix: str, src: Path,
                manifest: list[dict[str, Any]]) -> None:
    """Put each manifest file under `prefix` (config.json last: a reader that finds it finds
    the weights too), skipping what a previous registration of the same bytes stored."""
    if stored_complete(store, prefix, manifest):
        return
    ordered = sorted(manifest, key=lambda e: (e["path"] == "config.json", e["path"]))
    for entry in ordered:
        store.put_file(f"{prefix}/{entry['path']}", (src / entry["path"]).resolve())
