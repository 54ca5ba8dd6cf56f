"""`/v1/models`: registered base models (shared by every tenant; registration is admin-only)."""

from __future__ import annotations

from fastapi import APIRouter

from lorajobs.api.deps import AdminDep, PrincipalDep, SessionDep, SettingsDep
from lorajobs.api.schemas import ModelCreate, ModelPublic, ModelsPublic
from lorajobs.core import registry

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelsPublic)
def list_models(session: SessionDep, _: PrincipalDep) -> ModelsPublic:
    """Every registered base model."""
    return ModelsPublic(data=[ModelPublic.from_row(m) for m in registry.list_models(session)])


@router.get("/{name}", response_model=ModelPublic)
def get_model(name: str, session: SessionDep, _: PrincipalDep) -> ModelPublic:
    """One registered model by name."""
    return ModelPublic.from_row(registry.get_model(session, name=name))


@router.post("", status_code=201, response_model=ModelPublic)
def register_model(body: ModelCreate, session: SessionDep, settings: SettingsDep,
                   _: AdminDep) -> ModelPublic:
    """Register a directory under the model root (admin only)."""
    row = registry.register_model(session, name=body.name, path_under_model_root=body.path,
                                  settings=settings)
    return ModelPublic.from_row(row)
