"""A job's inputs on this node: datasets fetched from the store into node-local scratch.

    <scratch>/datasets/<sha256><suffix>     one file per dataset content, shared by every job
                                            of this node that trains on it

A dataset is immutable and named by its sha256 (recorded by the API when it validated the
upload), so the cache needs no invalidation: a file present under its digest is the dataset.
A download goes to a private `.part` file, is hashed as it lands and renamed into place only
if the digest matches; two jobs of one node wanting the same dataset at once download it once
(an flock on `<sha256>.lock`). A store hiccup is retried with backoff (tenacity) before the
job gives up.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from pathlib import Path, PurePosixPath

from tenacity import retry, retry_if_not_exception_type, stop_after_attempt, wait_exponential

from lorajobs.core.settings import Settings
from lorajobs.core.storage import ArtifactStore, private_dir
from lorajobs.core.tables import Dataset

__all__ = ["DatasetUnavailable", "fetch_dataset", "dataset_cache_dir"]

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
# A store outage shorter than ~30 s (1+2+4+8+15 s of backoff) does not fail a job at start.
FETCH_ATTEMPTS = 6


class DatasetUnavailable(Exception):
    """The dataset cannot be fetched (gone from the store, corrupt, store unreachable)."""


class _Corrupt(DatasetUnavailable):
    pass


def dataset_cache_dir(settings: Settings) -> Path:
    return settings.resolved_scratch_dir / "datasets"


def _cache_name(dataset: Dataset) -> str:
    return dataset.sha256 + PurePosixPath(dataset.storage_key).suffix


def fetch_dataset(settings: Settings, store: ArtifactStore, dataset: Dataset) -> Path:
    """The dataset's file on this node, downloaded and verified on first use."""
    cache = private_dir(dataset_cache_dir(settings))
    path = cache / _cache_name(dataset)
    if path.is_file():
        return path
    with open(cache / f"{dataset.sha256}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second job of this node waits for the first
        if path.is_file():
            return path
        try:
            _download(store, dataset, path)
        except DatasetUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - the store's errors are its implementation's
            raise DatasetUnavailable(f"fetching {dataset.storage_key!r} from the store failed: "
                                     f"{exc}") from exc
    return path


@retry(stop=stop_after_attempt(FETCH_ATTEMPTS), wait=wait_exponential(multiplier=1, max=15),
       retry=retry_if_not_exception_type((_Corrupt, FileNotFoundError)), reraise=True)
def _download(store: ArtifactStore, dataset: Dataset, path: Path) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out, store.open(dataset.storage_key) as src:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != dataset.sha256:
            raise _Corrupt(f"{dataset.storage_key!r} in the store has sha256 "
                           f"{digest.hexdigest()}, not the {dataset.sha256} recorded at upload")
        os.replace(tmp, path)
        log.info("dataset %s fetched into %s", dataset.id, path)
    finally:
        tmp.unlink(missing_ok=True)
