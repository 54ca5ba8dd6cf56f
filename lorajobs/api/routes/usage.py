"""`GET /v1/usage`: the caller's tenant's storage against its quota, active jobs, job limits."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import func, select

from lorajobs.api.deps import PrincipalDep, SessionDep, SettingsDep
from lorajobs.api.schemas import StorageUsagePublic, UsagePublic
from lorajobs.core.tables import Job, JobStatus
from lorajobs.core.usage import storage_usage

router = APIRouter(prefix="/v1/usage", tags=["usage"])

# The settings a job spec is checked against at submit (lorajobs/core/bounds.py).
SPEC_LIMITS = ("max_total_steps", "max_seq_length", "max_batch_size",
               "max_gradient_accumulation_steps", "max_batch_tokens", "max_processes_per_job",
               "max_checkpoints_per_job", "max_merges_per_job", "max_job_runtime_seconds")


@router.get("", response_model=UsagePublic)
def get_usage(session: SessionDep, settings: SettingsDep, principal: PrincipalDep) -> UsagePublic:
    """Bytes stored (datasets + artifacts) against the quota; active jobs; the spec limits."""
    used = storage_usage(session, principal.tenant_id)
    quota = settings.storage_quota_bytes_per_tenant
    active = session.scalar(select(func.count()).select_from(Job).where(
        Job.tenant_id == principal.tenant_id,
        Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])))
    return UsagePublic(
        storage=StorageUsagePublic(datasets_bytes=used.datasets_bytes,
                                   artifacts_bytes=used.artifacts_bytes,
                                   used_bytes=used.total_bytes, quota_bytes=quota,
                                   remaining_bytes=max(0, quota - used.total_bytes)),
        active_jobs=int(active or 0), max_active_jobs=settings.max_active_jobs_per_tenant,
        limits={name: getattr(settings, name) for name in SPEC_LIMITS})
