"""`/v1/serving-targets` (admin) and `/v1/jobs/{id}/deploy`: publish adapters to vLLM.

The work is in lorajobs/core/serving.py; these routes only orchestrate.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from lorajobs.api import queries
from lorajobs.api.deps import AdminDep, PrincipalDep, SessionDep, SettingsDep, StoreDep
from lorajobs.api.openai_serving import forget_routes
from lorajobs.api.schemas import MAX_STEP
from lorajobs.core import serving
from lorajobs.core.tables import Deployment

router = APIRouter(tags=["serving"])


@router.post("/v1/serving-targets", status_code=201)
def create_target(body: serving.TargetSpec, session: SessionDep, settings: SettingsDep,
                  admin: AdminDep) -> dict[str, Any]:
    """Register a group of vLLM servers (admin)."""
    return serving.create_target(session, settings, body.model_dump()).public()


@router.get("/v1/serving-targets")
def list_targets(session: SessionDep, settings: SettingsDep,
                 principal: PrincipalDep) -> dict[str, Any]:
    """The targets a job may be deployed to (API keys are never shown)."""
    return {"data": [t.public() for t in serving.list_targets(session, settings)]}


@router.delete("/v1/serving-targets/{name}", status_code=204)
def delete_target(name: str, session: SessionDep, admin: AdminDep) -> Response:
    """Remove a target registered through the API (admin); 409 while it has deployments."""
    serving.delete_target(session, name)
    return Response(status_code=204)


class DeployRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: str = Field(min_length=1, max_length=100)
    checkpoint: int | None = Field(None, ge=0, le=MAX_STEP,
                                   description="a checkpoint's step; absent: the final adapter")


def deployment_object(row: Deployment) -> dict[str, Any]:
    servers = [{"url": url, **state} for url, state in sorted(row.servers.items())]
    return {"id": row.id, "object": "deployment", "job_id": row.job_id, "target": row.target,
            "checkpoint": row.step, "model": row.model_name,
            "live": any(s.get("loaded") for s in servers), "servers": servers,
            "created_at": row.created_at.isoformat(), "updated_at": row.updated_at.isoformat()}


@router.post("/v1/jobs/{job_id}/deploy", responses={502: {
    "description": "the target's adapter directory cannot be written (serving_unavailable)"}})
def deploy_job(job_id: str, body: DeployRequest, request: Request, session: SessionDep,
               settings: SettingsDep, store: StoreDep, principal: PrincipalDep
               ) -> dict[str, Any]:
    """Load the job's adapter on every server of the target as its `ft:` model (idempotent)."""
    job = queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    row = serving.deploy(session, job=job, target_name=body.target, step=body.checkpoint,
                         settings=settings, store=store)
    forget_routes(request.app)
    return deployment_object(row)


@router.get("/v1/jobs/{job_id}/deployments")
def list_deployments(job_id: str, session: SessionDep,
                     principal: PrincipalDep) -> dict[str, Any]:
    """Where the job's adapters are published, as last seen."""
    job = queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    return {"data": [deployment_object(r)
                     for r in serving.list_deployments(session, job_id=job.id)]}


@router.delete("/v1/jobs/{job_id}/deploy", status_code=204)
def undeploy_job(job_id: str, request: Request, session: SessionDep, settings: SettingsDep,
                 principal: PrincipalDep, target: Annotated[str, Query(max_length=100)],
                 checkpoint: Annotated[int | None, Query(ge=0, le=MAX_STEP)] = None
                 ) -> Response:
    """Unload the adapter from the target's servers and forget the deployment."""
    job = queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    serving.undeploy(session, job=job, target_name=target, step=checkpoint, settings=settings)
    forget_routes(request.app)
    return Response(status_code=204)
