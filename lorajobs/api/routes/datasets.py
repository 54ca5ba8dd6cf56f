"""`/v1/datasets`: upload (every line validated, nothing stored if one is bad), list, get."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile

from lorajobs.api.deps import PrincipalDep, SessionDep, SettingsDep, StoreDep
from lorajobs.api.schemas import DatasetPublic, DatasetsPublic
from lorajobs.service import datasets

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post("", status_code=201, response_model=DatasetPublic)
def upload_dataset(
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    principal: PrincipalDep,
    file: Annotated[UploadFile, File(description="JSONL (or one JSON list) of records")],
    format: Annotated[str | None, Form(description="alpaca|completion|chat|text")] = None,
) -> DatasetPublic:
    """Validate every line and store the file; 422 lists the bad lines."""
    row = datasets.create_dataset(
        session, tenant_id=principal.tenant_id, filename=file.filename, stream=file.file,
        data_format=format or None, settings=settings, store=store,
    )
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
