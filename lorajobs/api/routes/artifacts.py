"""Downloads: the adapter / merged model as a tar stream, and single files with Range + sha256."""

from __future__ import annotations

import base64
from pathlib import PurePosixPath
from typing import Annotated, cast

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, StreamingResponse

from lorajobs.api import queries
from lorajobs.api.deps import PrincipalDep, SessionDep, StoreDep
from lorajobs.api.schemas import MAX_STEP, ArtifactPublic, ArtifactsDeleted, ArtifactsPublic
from lorajobs.core import usage
from lorajobs.core.archive import TarEntry, TarStream
from lorajobs.core.storage import LocalArtifactStore

StepQuery = Annotated[int | None, Query(ge=0, le=MAX_STEP)]
router = APIRouter(prefix="/v1/jobs", tags=["artifacts"])
# A job's files: a few per adapter or merged model, per kept checkpoint. One page is all of
# them for any usual job (the dashboard reads one page); the SDK follows `next_cursor`.
ARTIFACTS_PAGE_MAX = 1000


def _tar_download(session: SessionDep, store: StoreDep, tenant_id: str, job_id: str,
                  kind: str, step: int | None) -> StreamingResponse:
    queries.get_job(session, tenant_id=tenant_id, job_id=job_id)
    rows = queries.artifact_set(session, job_id=job_id, kind=kind, step=step)
    local = cast(LocalArtifactStore, store)  # TODO(#12): stream from the store interface
    entries = [TarEntry(name=r.name, path=local.local_path(r.storage_key), size=r.size,
                        mtime=r.created_at.timestamp()) for r in rows]
    label = f"{job_id}-{kind}" + (f"-step{rows[0].step}" if rows[0].step is not None else "")
    tar = TarStream(entries, prefix=label)
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
def download_artifact(job_id: str, artifact_id: str, session: SessionDep, store: StoreDep,
                      principal: PrincipalDep) -> FileResponse:
    """One file; supports Range (206). ETag and digest headers carry its sha256."""
    queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    row = queries.get_artifact(session, job_id=job_id, artifact_id=artifact_id)
    digest_b64 = base64.b64encode(bytes.fromhex(row.sha256)).decode()
    return FileResponse(
        cast(LocalArtifactStore, store).local_path(row.storage_key),
        filename=PurePosixPath(row.name).name,
        headers={"ETag": f'"{row.sha256}"', "Digest": f"sha-256={digest_b64}",
                 "Repr-Digest": f"sha-256=:{digest_b64}:", "X-Checksum-SHA256": row.sha256},
    )


@router.delete("/{job_id}/artifacts", response_model=ArtifactsDeleted)
def delete_artifacts(job_id: str, session: SessionDep, store: StoreDep,
                     principal: PrincipalDep) -> ArtifactsDeleted:
    """Delete every file of a finished job (adapters, merged models, checkpoints, logs)."""
    job = queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    return ArtifactsDeleted(**usage.delete_job_artifacts(session, store, job))
