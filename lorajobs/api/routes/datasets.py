"""`/v1/datasets`: upload (every line validated as it streams, nothing stored if one is bad),
list, get."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from lora_core.spec import DATA_FORMATS
from lorajobs.api.deps import PrincipalDep, SessionDep, SettingsDep, StoreDep
from lorajobs.api.schemas import DatasetDeleted, DatasetPublic, DatasetsPublic
from lorajobs.api.uploads import receive_upload
from lorajobs.core import datasets

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "JSONL (or one JSON list) of records; a record (line) may "
                                "be at most max_record_bytes (1 MiB)"},
        "format": {"type": "string", "enum": list(DATA_FORMATS)}}}}}}}


@router.post("", status_code=201, response_model=DatasetPublic, openapi_extra=UPLOAD_SCHEMA)
async def upload_dataset(request: Request, session: SessionDep, settings: SettingsDep,
                         store: StoreDep, principal: PrincipalDep) -> DatasetPublic:
    """Validate every line while the file streams in and store it; 422 lists the bad lines.

    The body is read here, after authentication (see api/uploads.py). A `format` field sent
    after the file part is honoured too (the staged file is validated again).
    """
    def make_upload(fields: dict[str, str]) -> datasets.Upload:
        return datasets.Upload(settings, fields.get("format") or None,
                               format_final="format" in fields)

    form = await receive_upload(request, make_upload)
    with form.upload:
        row = await run_in_threadpool(
            datasets.store_upload, session, form.upload, tenant_id=principal.tenant_id,
            filename=form.filename, store=store, data_format=form.fields.get("format") or None)
    return DatasetPublic.from_row(row)


@router.get("", response_model=DatasetsPublic)
def list_datasets(
    session: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> DatasetsPublic:
    """The tenant's datasets, newest first."""
    rows, has_more = datasets.list_datasets(session, tenant_id=principal.tenant_id, limit=limit,
                                            after=after)
    return DatasetsPublic(data=[DatasetPublic.from_row(r) for r in rows], has_more=has_more,
                          next_cursor=rows[-1].id if has_more else None)


@router.get("/{dataset_id}", response_model=DatasetPublic)
def get_dataset(dataset_id: str, session: SessionDep, principal: PrincipalDep) -> DatasetPublic:
    """One dataset of the tenant."""
    row = datasets.get_dataset(session, tenant_id=principal.tenant_id, dataset_id=dataset_id)
    return DatasetPublic.from_row(row)


@router.delete("/{dataset_id}", response_model=DatasetDeleted)
def delete_dataset(dataset_id: str, session: SessionDep, store: StoreDep,
                   principal: PrincipalDep) -> DatasetDeleted:
    """Delete a dataset and its file (freeing quota); 409 while an active job uses it."""
    row = datasets.delete_dataset(session, tenant_id=principal.tenant_id,
                                  dataset_id=dataset_id, store=store)
    return DatasetDeleted(id=row.id, freed_bytes=row.size_bytes)
