"""A tenant's storage: what it uses, the quota check, and freeing a finished job's files.

    used bytes = its datasets (size_bytes) + its jobs' registered artifacts (adapters, merged
                 models, checkpoint adapters, logs, manifests: Artifact.size)

The quota (`storage_quota_bytes_per_tenant`) is checked where bytes are added on a tenant's
request: before a dataset upload is stored and before a job is created (a job writes files),
each under the tenant's row lock so concurrent requests cannot all squeeze under it. A running
job's files are not stopped at the quota: they count once registered, and the next upload or
job is refused (413 `storage_quota_exceeded`) until DELETEs free space. Not counted: the
optimizer state inside resumable checkpoints (no row records its size).

This module owns deleting a finished job's `artifacts` and `checkpoints` rows (the worker's
EventRecorder writes them while the job runs; nothing writes them after it finished).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import BindParameter, Select, delete, func, select, update
from sqlalchemy.orm import Session

from lorajobs.core import jobs
from lorajobs.core.errors import Conflict, PayloadTooLarge
from lorajobs.core.settings import Settings
from lorajobs.core.storage import ArtifactStore
from lorajobs.core.tables import Artifact, Checkpoint, Dataset, Job, JobStatus, Tenant

__all__ = ["StorageUsage", "storage_usage", "usage_queries", "check_storage_room", "check_room",
           "delete_job_artifacts", "job_dir_key"]


@dataclass(frozen=True)
class StorageUsage:
    datasets_bytes: int
    artifacts_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.datasets_bytes + self.artifacts_bytes


def job_dir_key(job_id: str) -> str:
    """Storage prefix of everything a job's attempts wrote (runspec.RunPaths)."""
    return f"jobs/{job_id}"


def usage_queries(tenant_id: str | BindParameter[str]) -> tuple[Select[Any], Select[Any]]:
    """(datasets bytes, artifacts bytes) of a tenant: aggregates over indexed columns, which a
    caller may also embed as scalar subqueries (submit reads them with its tenant lock, built
    once with a `bindparam` for the tenant)."""
    datasets = (select(func.coalesce(func.sum(Dataset.size_bytes), 0))
                .where(Dataset.tenant_id == tenant_id))
    # IN, not a join: embedded in an UPDATE ... RETURNING, SQLite's columns lose their table
    # names, and a join of artifacts and jobs then has two `id`s.
    artifacts = (select(func.coalesce(func.sum(Artifact.size), 0))
                 .where(Artifact.job_id.in_(select(Job.id).where(Job.tenant_id == tenant_id))))
    return datasets, artifacts


def storage_usage(session: Session, tenant_id: str) -> StorageUsage:
    """Two aggregate queries over indexed tenant/job columns."""
    datasets, artifacts = usage_queries(tenant_id)
    return StorageUsage(datasets_bytes=int(session.scalar(datasets)),
                        artifacts_bytes=int(session.scalar(artifacts)))


def check_storage_room(session: Session, *, tenant_id: str, settings: Settings,
                       incoming: int = 0, param: str | None = None) -> StorageUsage:
    """Raise PayloadTooLarge (413, `storage_quota_exceeded`) unless `incoming` more bytes fit.

    A job (`incoming=0`) still needs one byte of room: it will write files. Write-locks the
    tenant row first (a no-op UPDATE, held until the caller commits), as submit's active-job
    quota does, so racing uploads and submits of one tenant see each other's bytes.
    """
    session.execute(update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name))
    used = storage_usage(session, tenant_id)
    check_room(used, settings=settings, incoming=incoming, param=param)
    return used


def check_room(used: StorageUsage, *, settings: Settings, incoming: int = 0,
               param: str | None = None) -> None:
    """The quota check alone, for a caller that read `used` under the tenant's lock."""
    quota = settings.storage_quota_bytes_per_tenant
    if used.total_bytes + max(incoming, 1) > quota:
        adding = f" + {incoming} bytes of this upload" if incoming else ""
        raise PayloadTooLarge(
            f"storage quota exceeded: {used.total_bytes} bytes stored{adding}, the quota is "
            f"{quota} bytes; free space with DELETE /v1/datasets/{{id}} or DELETE "
            "/v1/jobs/{id}/artifacts (GET /v1/usage shows what is used)",
            param=param, code="storage_quota_exceeded",
            details={"used_bytes": used.total_bytes, "quota_bytes": quota})


def delete_job_artifacts(session: Session, store: ArtifactStore, job: Job) -> dict[str, Any]:
    """Delete every file of a finished job and its artifact/checkpoint rows; commits.

    The job row, its events and its loss curve stay. 409 while the job is queued or running (its
    worker may still write). Rows go first, then the files: a failure in between leaves files
    nobody lists (swept by the next delete), never a listed file that is gone.
    """
    if job.status not in JobStatus.TERMINAL:
        raise Conflict(f"job {job.id} is {job.status}: cancel it or wait for it to finish "
                       "before deleting its artifacts", param="job_id", code="job_not_finished")
    files, freed = session.execute(
        select(func.count(), func.coalesce(func.sum(Artifact.size), 0))
        .where(Artifact.job_id == job.id)).one()
    session.execute(delete(Artifact).where(Artifact.job_id == job.id))
    session.execute(delete(Checkpoint).where(Checkpoint.job_id == job.id))
    jobs.add_event(session, job.id, "artifacts_deleted",
                   f"{files} artifact file(s) deleted, {freed} bytes freed",
                   data={"files": int(files), "freed_bytes": int(freed)})
    session.commit()
    store.delete_prefix(job_dir_key(job.id))
    return {"id": job.id, "object": "job.artifacts", "deleted": True, "files": int(files),
            "freed_bytes": int(freed)}
