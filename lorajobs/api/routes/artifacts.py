"""Downloads: the adapter / merged model as a tar stream, and single files with Range + sha256.

Both read the artifact store through its interface (lorajobs/core/storage.py). A single file is
streamed with Range, or, with `store_presign_downloads` on an S3 store, answered 307 to a
presigned URL (lorajobs/api/downloads.py). A tar is always streamed by the API: it is assembled
from several objects, there is no one object to redirect to."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse

from lorajobs.api import queries
from lorajobs.api.deps import PrincipalDep, SessionDep, SettingsDep, StoreDep
from lorajobs.api.downloads import object_response
from lorajobs.api.schemas import MAX_STEP, ArtifactPublic, ArtifactsDeleted, ArtifactsPublic
from lorajobs.core import usage
from lorajobs.core.archive import TarEntry, TarStream

StepQuery = Annotated[int | None, Query(ge=0, le=MAX_STEP)]
router = APIRouter(prefix="/v1/jobs", tags=["artifacts"])
# A job's files: a few per adapter or merged model, per kept checkpoint. One page is all of
# them for any usual job (the dashboard reads one page); the SDK follows `next_cursor`.
ARTIFACTS_PAGE_MAX = 1000


def _tar_download(session: SessionDep, store: StoreDep, tenant_id: str, job_id: str,
                  kind: str, step: int | None) -> StreamingResponse:
    queries.get_job(session, tenant_id=tenant_id, job_id=job_id)
    rows = queries.artifact_set(session, job_id=job_id, kind=kind, step=step)
    store.size(rows[0].storage_key)  # a store that is down: 503 now, not a truncated tar
    entries = [TarEntry(name=r.name, key=r.storage_key, size=r.size,
                        mtime=r.created_at.timestamp()) for r in rows]
    label = f"{job_id}-{kind}" + (f"-step{rows[0].step}" if rows[0].step is not None else "")
    tar = TarStream(entries, store, prefix=label)
    return StreamingResponse(iter(tar), media_type="application/x-tar", headers={
        "Content-Length": str(tar.content_length),
        "Content-Disposition": f'attachment; filename="{label}.tar"',
    })


@router.get("/{job_id}/adapter")
def download_adapter(job_id: str, session: SessionDep, store: StoreDep, principal: PrincipalDep,
                     step: StepQuery = None) -> StreamingResponse:
    """The PEFT adapter directory as a tar (default: the final adapter)."""
    return _tar_download(session, store, principal.tenant_id, job_id, "adapter", step)


@router.get("/{job_id}/merged")
def download_merged(job_id: str, session: SessionDep, store: StoreDep, principal: PrincipalDep,
                    step: StepQuery = None) -> StreamingResponse:
    """The merged model (safetensors shards + config + tokenizer) as a tar."""
    return _tar_download(session, store, principal.tenant_id, job_id, "merged", step)


@router.get("/{job_id}/artifacts", response_model=ArtifactsPublic)
def list_artifacts(job_id: str, session: SessionDep, principal: PrincipalDep,
                   after: Annotated[str | None, Query(max_length=40,
                                                      description="the last artifact id seen")]
                   = None,
                   limit: Annotated[int, Query(ge=1, le=ARTIFACTS_PAGE_MAX)] = ARTIFACTS_PAGE_MAX,
                   ) -> ArtifactsPublic:
    """Every file of the job with its size and sha256."""
    queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    rows, has_more = queries.list_artifacts(session, job_id=job_id, after=after, limit=limit)
    return ArtifactsPublic(data=[ArtifactPublic.from_row(a) for a in rows], has_more=has_more,
                           next_cursor=rows[-1].id if rows else after)


@router.get("/{job_id}/artifacts/{artifact_id}")
def download_artifact(job_id: str, artifact_id: str, request: Request, session: SessionDep,
                      store: StoreDep, settings: SettingsDep,
                      principal: PrincipalDep) -> Response:
    """One file; supports Range (206), or 307 to a presigned URL of the store. ETag and
    digest headers carry its sha256."""
    queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    row = queries.get_artifact(session, job_id=job_id, artifact_id=artifact_id)
    presign = settings.store_presign_seconds if settings.store_presign_downloads else None
    return object_response(store, row.storage_key, size=row.size, sha256=row.sha256,
                           filename=PurePosixPath(row.name).name,
                           range_header=request.headers.get("range"),
                           if_range=request.headers.get("if-range"), presign_seconds=presign)


@router.delete("/{job_id}/artifacts", response_model=ArtifactsDeleted)
def delete_artifacts(job_id: str, session: SessionDep, store: StoreDep,
                     principal: PrincipalDep) -> ArtifactsDeleted:
    """Delete every file of a finished job (adapters, merged models, checkpoints, logs)."""
    job = queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    return ArtifactsDeleted(**usage.delete_job_artifacts(session, store, job))
