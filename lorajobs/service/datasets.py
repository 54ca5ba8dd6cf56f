"""Dataset writes: validate every line of an upload, then store the file and its row together.

    upload stream ──copy (size-capped)──▶ staging temp file ──validate_file──▶ report
        report.ok ──▶ store.put_file(datasets/<tenant>/<id>.jsonl) ──▶ INSERT + COMMIT
        commit fails ──▶ the stored file is deleted again

So there is never a row without a file, and a file without a row only if the process dies
between the two steps (the staging area and that window are both tiny). A rejected upload
stores nothing. This module is the only writer of the `datasets` table.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from lora_core.data.formats import validate_file
from lora_core.errors import DatasetError
from lorajobs.service.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from lorajobs.service.models import Dataset, Job, JobStatus, new_id
from lorajobs.service.settings import Settings
from lorajobs.service.storage import ArtifactStore
from lorajobs.service.usage import check_storage_room

__all__ = ["create_dataset", "get_dataset", "list_datasets", "delete_dataset", "dataset_key",
           "clean_filename"]

COPY_CHUNK = 1024 * 1024  # 1 MiB: the upload never sits in memory as a whole while copying
MAX_FILENAME = 255
_UNSAFE_NAME_CHARS = re.compile(r"[\x00-\x1f\x7f/\\]")


def dataset_key(tenant_id: str, dataset_id: str) -> str:
    """Storage key of a dataset file: built by us, never from the client's filename."""
    return f"datasets/{tenant_id}/{dataset_id}.jsonl"


def clean_filename(name: str | None) -> str:
    """The client's filename, for display only: last path part, no control characters."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    return _UNSAFE_NAME_CHARS.sub("_", base)[:MAX_FILENAME] or "upload.jsonl"


def _copy_capped(stream: BinaryIO, dest: BinaryIO, limit: int) -> int:
    """Copy `stream` to `dest`; PayloadTooLarge as soon as more than `limit` bytes arrive."""
    written = 0
    while chunk := stream.read(COPY_CHUNK):
        written += len(chunk)
        if written > limit:
            raise PayloadTooLarge(f"upload exceeds the limit of {limit} bytes", param="file")
        dest.write(chunk)
    return written


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
    """Validate and store an upload; commits. InvalidRequest(code=invalid_dataset) if bad.

    The 422 carries `details["errors"] = [{line, field, message}]` (the first 20 bad lines)
    and `details["num_errors"]` (all of them): every line is read, not just the first error.
    """
    staging = settings.data_dir / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix="upload-", suffix=".jsonl", dir=staging)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            size = _copy_capped(stream, out, settings.max_upload_bytes)
        try:
            report = validate_file(tmp, data_format,
                                   max_examples=settings.max_examples_per_dataset)
        except DatasetError as exc:  # unknown `format`: the only thing validate_file raises for
            raise InvalidRequest(exc.message, param=exc.param or "format") from exc
        if not report.ok:
            raise InvalidRequest(
                f"{report.num_errors} invalid line(s) in the upload; nothing was stored",
                param="file", code="invalid_dataset",
                details={"errors": report.errors, "num_errors": report.num_errors},
            )
        check_storage_room(session, tenant_id=tenant_id, settings=settings, incoming=size,
                           param="file")
        dataset_id = new_id("ds")
        key = dataset_key(tenant_id, dataset_id)
        store.put_file(key, tmp)
    finally:
        tmp.unlink(missing_ok=True)
    row = Dataset(
        id=dataset_id, tenant_id=tenant_id, filename=clean_filename(filename),
        format=report.format or "", num_examples=report.num_examples,
        num_tokens=report.num_tokens, size_bytes=size, sha256=report.sha256,
        stats=dict(report.stats), storage_key=key,
    )
    try:
        session.add(row)
        session.commit()
    except BaseException:
        session.rollback()
        store.delete_prefix(key)
        raise
    return row


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

    409 `dataset_in_use` while a queued or running job trains on it; finished jobs keep the
    id in their spec. Row first: a failure in between leaves an unlisted file, never a listed
    dataset without its file.
    """
    row = get_dataset(session, tenant_id=tenant_id, dataset_id=dataset_id)
    users = list(session.scalars(select(Job.id).where(
        Job.tenant_id == tenant_id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
        or_(Job.training_file == dataset_id, Job.validation_file == dataset_id)).limit(3)))
    if users:
        raise Conflict(f"dataset {dataset_id} is used by active job(s) {', '.join(users)}: "
                       "cancel them or wait for them to finish", param="dataset_id",
                       code="dataset_in_use")
    session.delete(row)
    session.commit()
    store.delete_prefix(row.storage_key)
    return row
