"""`/v1/jobs/{id}/metrics`: the loss curve, one row per logged step, paged by step."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from lorajobs.api import queries
from lorajobs.api.deps import PrincipalDep, SessionDep
from lorajobs.api.schemas import MAX_STEP, MetricRow, MetricsPublic

router = APIRouter(prefix="/v1/jobs", tags=["metrics"])

# One page holds the whole curve of any usual job (a row per logged step; ~150 bytes each):
# the dashboard reads one page, the SDK follows `next_cursor`.
METRICS_PAGE_MAX = 10_000


@router.get("/{job_id}/metrics", response_model=MetricsPublic)
def job_metrics(job_id: str, session: SessionDep, principal: PrincipalDep,
                after: Annotated[int | None, Query(ge=0, le=MAX_STEP,
                                                   description="the last step already seen")]
                = None,
                limit: Annotated[int, Query(ge=1, le=METRICS_PAGE_MAX)] = METRICS_PAGE_MAX,
                ) -> MetricsPublic:
    """Rows of {step, epoch, train_loss, eval_loss, learning_rate, grad_norm, tokens/s}."""
    queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    rows, has_more = queries.list_metrics(session, job_id=job_id, after=after, limit=limit)
    return MetricsPublic(data=[MetricRow.from_row(m) for m in rows], has_more=has_more,
                         next_cursor=rows[-1].step if rows else after)
