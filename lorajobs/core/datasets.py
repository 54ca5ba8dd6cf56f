"""Dataset writes: validate an upload while it streams, then store the file and its row together.

    upload chunks ─▶ Upload.write: size cap, staging file (<artifact root>/.staging, on the API's
                     node), sha256 and DatasetValidator (lora_core), record by record as the
                     bytes arrive
    Upload.finish ─▶ report.ok ─▶ store.put_file(datasets/<tenant>/<id>.jsonl, staged file)
                                  ─▶ INSERT + COMMIT (commit fails: the object is deleted again)
                     not ok ─▶ 422 listing the bad lines; the staging file is removed

Memory is bounded by one record (`max_record_bytes`) and a 1 MiB buffer, whatever the file's
size. A rejected upload stores nothing. `put_file` is atomic in every store: the local directory
hard-links the staged file into place (the staging directory is on the same filesystem), the
S3 store uploads it (in parts past 16 MiB) and the object appears only once complete; the
staging file is removed either way, and one left by a process that died mid-upload is swept by
the next upload. So there is never a row without a stored file, and a file without a row only
if the process dies between the put and the commit. This module is the only writer of the
`datasets` table.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from lora_core.data.formats import DatasetValidator, ValidationReport
from lora_core.errors import DatasetError
from lorajobs.core.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    StorageUnavailable,
)
from lorajobs.core.settings import Settings
from lorajobs.core.storage import ArtifactStore
from lorajobs.core.tables import Dataset, Job, JobStatus, Tenant, new_id
from lorajobs.core.usage import check_storage_room

__all__ = ["Upload", "create_dataset", "store_upload", "get_dataset", "list_datasets",
           "delete_dataset", "dataset_key", "clean_filename", "staging_dir"]

log = logging.getLogger(__name__)

COPY_CHUNK = 1024 * 1024  # 1 MiB: the upload never sits in memory as a whole while copying
MAX_FILENAME = 255
# Under the artifact root: the local store's own filesystem (its put_file links, not copies);
# with an S3 store, the API node's disk.
STAGING = ".staging"
# A staging file nobody wrote to for this long belongs to a process that died mid-upload (an
# upload that slow was cut off long before: BodyTimeoutMiddleware's rate floor).
STAGING_MAX_AGE_SECONDS = 6 * 3600
_UNSAFE_NAME_CHARS = re.compile(r"[\x00-\x1f\x7f/\\]")


def dataset_key(tenant_id: str, dataset_id: str) -> str:
    """Storage key of a dataset file: built by us, never from the client's filename."""
    return f"datasets/{tenant_id}/{dataset_id}.jsonl"


def clean_filename(name: str | None) -> str:
    """The client's filename, for display only: last path part, no control characters."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    return _UNSAFE_NAME_CHARS.sub("_", base)[:MAX_FILENAME] or "upload.jsonl"


def staging_dir(settings: Settings) -> Path:
    return settings.resolved_artifact_root / STAGING


def _sweep(staging: Path) -> None:
    """Remove staging files of uploads whose process died (no writes for a long time)."""
    cutoff = time.time() - STAGING_MAX_AGE_SECONDS
    for entry in os.scandir(staging):
        try:
            if entry.is_file() and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
        except OSError:  # another process swept it first
            continue


class Upload:
    """One upload as it arrives: `write(chunk)` ... `finish()`, then `store_upload` or `discard`.

    Every chunk is counted against max_upload_bytes (413 the moment it is passed), appended to a
    staging file (0600) and fed to the validator. Once the validator has stopped (more records
    than max_examples_per_dataset, or too many bad ones) nothing more is parsed; if the format
    is final (`format_final`: given before the file, or never to be given), nothing more is
    written either. A format given only after the file (a multipart field after the file part)
    is applied by `finish(data_format)`, which validates the staged file again.

    A context manager: leaving it discards the staging file unless `store_upload` moved it.
    """

    def __init__(self, settings: Settings, data_format: str | None = None, *,
                 format_final: bool = True) -> None:
        self.settings = settings
        self.data_format = data_format
        self.format_final = format_final
        self.validator = self._validator(data_format)
        self.size = 0
        self.report: ValidationReport | None = None
        staging = staging_dir(settings)
        staging.mkdir(parents=True, exist_ok=True, mode=0o700)
        _sweep(staging)
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=staging)  # 0600
        self.path: Path | None = Path(name)
        self._file: BinaryIO | None = os.fdopen(fd, "wb")

    def _validator(self, data_format: str | None) -> DatasetValidator:
        try:
            return DatasetValidator(data_format,
                                    max_examples=self.settings.max_examples_per_dataset,
                                    max_record_bytes=self.settings.max_record_bytes)
        except DatasetError as exc:  # an unknown format: the only thing it raises for
            raise InvalidRequest(exc.message, param=exc.param or "format") from exc

    @property
    def done(self) -> bool:
        """The verdict is known and the rest of the upload changes nothing (the caller may stop
        reading its source)."""
        return bool(self.validator.stopped) and self.format_final

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        limit = self.settings.max_upload_bytes
        if self.size > limit:
            raise PayloadTooLarge(f"upload exceeds the limit of {limit} bytes", param="file")
        if self.done or self._file is None:
            return
        self._file.write(chunk)
        self.validator.feed(chunk)

    def finish(self, data_format: str | None = None) -> ValidationReport:
        """The report; with a `data_format` other than the one validated with, the staged file
        is validated again (streaming, from disk)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if data_format is not None and data_format != self.data_format and self.path:
            self.validator = self._validator(data_format)
            self.data_format = data_format
            for chunk in _read_chunks(self.path):
                self.validator.feed(chunk)
                if self.validator.stopped:
                    break
        self.report = self.validator.finish()
        return self.report

    def take(self) -> Path:
        """The staged file, now the caller's (it is no longer discarded)."""
        assert self.path is not None
        path, self.path = self.path, None
        return path

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.discard()


def _read_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(COPY_CHUNK):
            yield chunk


def store_upload(session: Session, upload: Upload, *, tenant_id: str, filename: str | None,
                 store: ArtifactStore, data_format: str | None = None) -> Dataset:
    """Finish a received upload and store it with its row; commits. InvalidRequest
    (code=invalid_dataset) if bad: `details["errors"] = [{line, field, message}]` (the first
    20 bad lines, and why reading stopped if it did) and `details["num_errors"]`."""
    report = upload.finish(data_format)
    if not report.ok:
        stopped = f" ({report.stopped})" if report.stopped else ""
        raise InvalidRequest(
            f"{report.num_errors} invalid line(s) in the upload{stopped}; nothing was stored",
            param="file", code="invalid_dataset",
            details={"errors": report.errors, "num_errors": report.num_errors},
        )
    check_storage_room(session, tenant_id=tenant_id, settings=upload.settings,
                       incoming=upload.size, param="file")
    dataset_id = new_id("ds")
    key = dataset_key(tenant_id, dataset_id)
    path = upload.take()
    try:  # nobody writes the staged file again: the local store may link it
        store.put_file(key, path, immutable=True)
    finally:
        path.unlink(missing_ok=True)
    row = Dataset(
        id=dataset_id, tenant_id=tenant_id, filename=clean_filename(filename),
        format=report.format or "", num_examples=report.num_examples,
        num_tokens=report.num_tokens, size_bytes=upload.size, sha256=report.sha256,
        stats=dict(report.stats), storage_key=key,
    )
    try:
        session.add(row)
        session.commit()
    except BaseException:
        session.rollback()
        store.delete(key)
        raise
    return row


def create_dataset(
    session: Session,
    *,
    tenant_id: str,
    filename: str | None,
    stream: BinaryIO,
    data_format: str | None,
    settings: Settings,
    store: ArtifactStore,
) -> Dataset:
    """Validate and store a file read from `stream`; commits (see `store_upload`). Stops
    reading as soon as the verdict is known (e.g. more records than the cap)."""
    with Upload(settings, data_format) as upload:
        while not upload.done and (chunk := stream.read(COPY_CHUNK)):
            upload.write(chunk)
        return store_upload(session, upload, tenant_id=tenant_id, filename=filename,
                            store=store)


def get_dataset(session: Session, *, tenant_id: str, dataset_id: str,
                param: str = "id") -> Dataset:
    """The tenant's dataset, or NotFound: another tenant's id looks exactly like a missing one."""
    row = session.get(Dataset, dataset_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"no dataset {dataset_id!r}", param=param)
    return row


def list_datasets(session: Session, *, tenant_id: str, limit: int,
                  after: str | None = None) -> tuple[list[Dataset], bool]:
    """Newest first; `after` is the id of the last dataset of the previous page."""
    stmt = select(Dataset).where(Dataset.tenant_id == tenant_id)
    if after:
        anchor = get_dataset(session, tenant_id=tenant_id, dataset_id=after, param="after")
        stmt = stmt.where(or_(
            Dataset.created_at < anchor.created_at,
            and_(Dataset.created_at == anchor.created_at, Dataset.id < anchor.id),
        ))
    rows = list(session.scalars(
        stmt.order_by(Dataset.created_at.desc(), Dataset.id.desc()).limit(limit + 1)
    ))
    return rows[:limit], len(rows) > limit


def delete_dataset(session: Session, *, tenant_id: str, dataset_id: str,
                   store: ArtifactStore) -> Dataset:
    """Delete the tenant's dataset, row then file (its bytes leave the quota); commits.

    409 `dataset_in_use` while a queued, running or paused job uses it; finished jobs keep the
    id in their spec. Row first: a failure in between leaves an unlisted file, never a listed
    dataset without its file.

    Against a racing submit: the check runs under the tenant's row lock, the one a submit holds
    from its active-job count to its commit (submit._lock_tenant), and the submit re-checks the
    dataset under that lock: either we see its job (409) or it sees the dataset gone (422).
    """
    session.execute(update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name)
                    .execution_options(synchronize_session=False))
    row = get_dataset(session, tenant_id=tenant_id, dataset_id=dataset_id)
    users = list(session.scalars(select(Job.id).where(
        Job.tenant_id == tenant_id,
        Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PAUSED]),
        or_(Job.training_file == dataset_id, Job.validation_file == dataset_id)).limit(3)))
    if users:
        raise Conflict(f"dataset {dataset_id} is used by active job(s) {', '.join(users)}: "
                       "cancel them or wait for them to finish", param="dataset_id",
                       code="dataset_in_use")
    session.delete(row)
    session.commit()
    try:
        store.delete(row.storage_key)
    except StorageUnavailable as exc:  # the dataset is gone for its tenant (and its quota):
        log.warning("dataset %s deleted, its object %s left in the store: %s",  # a retry would
                    dataset_id, row.storage_key, exc.message)  # answer 404, so no 503 here
    return row
