"""`/v1/jobs/{id}/metrics`: the loss curve, one row per logged step."""

from __future__ import annotations

from fastapi import APIRouter

from lorajobs.api import queries
from lorajobs.api.deps import PrincipalDep, SessionDep
from lorajobs.api.schemas import MetricRow, MetricsPublic

router = APIRouter(prefix="/v1/jobs", tags=["metrics"])


@router.get("/{job_id}/metrics", response_model=MetricsPublic)
def job_metrics(job_id: str, session: SessionDep, principal: PrincipalDep) -> MetricsPublic:
    """Rows of {step, epoch, train_loss, eval_loss, learning_rate, grad_norm, tokens/s}."""
    queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    return MetricsPublic(data=[MetricRow.from_row(m)
                               for m in queries.list_metrics(session, job_id=job_id)])
