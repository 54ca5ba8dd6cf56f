"""Registered base models: jobs name a model, never a path.

Two kinds of rows. Legacy (`source` "path", the embedded default): an admin registers
`name -> path`, where the path is relative to `settings.model_root` (a directory the operator
fills on the server's machine). Stored (`source` "upload" | "s3" | "hf"): the files were staged
and put in the artifact store under `models/<content_sha256>/` (lorajobs/core/model_import.py);
the row keeps their manifest and the header facts (`info`), so the API checks job specs
without the files and workers fetch them into their node-local cache. Registration reads
the model the torch-free way (`lora_core.model_files`: config.json + safetensors headers),
refuses pickle-only directories, and records the sha256 of every weight file so a later
swap of the files is detectable. This module is the only writer of the `models` table.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lora_core.errors import ModelError
from lora_core.model_files import ModelInfo, inspect_model_dir
from lora_core.model_files.manifest import list_files, sha256_file
from lorajobs.core import model_import
from lorajobs.core.errors import Conflict, InvalidRequest, NotFound
from lorajobs.core.settings import Settings
from lorajobs.core.storage import ArtifactStore
from lorajobs.core.tables import RegisteredModel, new_id

__all__ = [
    "MODEL_NAME_PATTERN",
    "SOURCES",
    "check_name_free",
    "register_model",
    "register_stored_model",
    "store_model_files",
    "insert_stored_model",
    "get_model",
    "list_models",
    "resolve_model_path",
    "model_dir",
    "inspect_registered",
]

# No '/' so a name is one URL path segment; letters first so it never looks like an option.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
SOURCES = ("path", "upload", "s3", "hf")
# Linux NAME_MAX (bytes per path component) and a path length no model layout needs: longer
# inputs are refused as invalid, not passed to stat() to fail with ENAMETOOLONG (was a 500).
NAME_MAX_BYTES = 255
MAX_PATH_CHARS = 1024


def resolve_model_path(settings: Settings, path: str) -> Path:
    """`path` under the model root, or InvalidRequest: no '..', absolute, NUL or escape."""
    bad = InvalidRequest(f"invalid model path {path!r}: must be a relative path inside the "
                         "model root, without '..'", param="path", code="invalid_path")
    if not isinstance(path, str) or not path.strip() or "\x00" in path or "\\" in path:
        raise bad
    pure = PurePosixPath(path)
    if (not pure.parts or pure.is_absolute() or path.startswith("~") or ".." in pure.parts
            or ":" in pure.parts[0] or len(path) > MAX_PATH_CHARS
            or any(len(part.encode()) > NAME_MAX_BYTES for part in pure.parts)):
        raise bad
    root = settings.resolved_model_root.resolve()
    try:
        full = (root / pure).resolve()  # follows symlinks: a link out of the root fails below
    except OSError as exc:  # a symlink loop, an unreadable component
        raise bad from exc
    if full == root or not full.is_relative_to(root):
        raise bad
    return full


def check_name_free(session: Session, name: str) -> None:
    """InvalidRequest for a malformed name, Conflict for a taken one (checked again, by the
    unique index, when the row is inserted)."""
    if not isinstance(name, str) or not re.match(MODEL_NAME_PATTERN, name):
        raise InvalidRequest(f"invalid model name {name!r}: letters, digits, '.', '_', '-'",
                             param="name")
    if session.scalar(select(RegisteredModel.id).where(RegisteredModel.name == name)):
        raise Conflict(f"model {name!r} is already registered", param="name",
                       code="model_exists")


def register_model(session: Session, *, name: str, path_under_model_root: str,
                   settings: Settings) -> RegisteredModel:
    """Inspect and register a model directory; commits. Conflict if the name is taken."""
    check_name_free(session, name)
    full = resolve_model_path(settings, path_under_model_root)
    root = settings.resolved_model_root.resolve()
    try:
        info = inspect_model_dir(full)
    except ModelError as exc:
        # The message names server paths; show them relative to the model root.
        raise InvalidRequest(exc.message.replace(str(root), "<model_root>"), param="path",
                             code=exc.code) from exc
    except OSError as exc:  # unreadable or vanished while we looked: the path is unusable
        raise InvalidRequest(f"cannot read model directory {path_under_model_root!r}: "
                             f"{exc.strerror}", param="path", code="invalid_path") from exc
    row = RegisteredModel(
        id=new_id("mdl"), name=name,
        architecture=info.architecture or info.model_type or "unknown",
        num_parameters=info.num_parameters, dtype=info.dtype or "unknown",
        linear_modules=info.linear_names, path=full.relative_to(root).as_posix(),
        weights_sha256={f: sha256_file(full / f) for f in info.weight_files},
    )
    _insert(session, row)
    return row


def _insert(session: Session, row: RegisteredModel) -> None:
    session.add(row)
    try:
        session.commit()
    except IntegrityError as exc:  # a concurrent registration of the same name won
        session.rollback()
        raise Conflict(f"model {row.name!r} is already registered", param="name",
                       code="model_exists") from exc


def store_model_files(staged: Path, *, store: ArtifactStore, param: str = "files"
                      ) -> RegisteredModel:
    """Validate a staged model directory (safetensors only, headers readable) and put its
    files in the store under `models/<content_sha256>/`; no database work (a model's bytes
    move without a connection held). Returns the row to insert (`insert_stored_model`),
    without its name, source and revision.

    Nothing is stored for a model that fails validation. Objects are keyed by content, so
    bytes already stored by an earlier registration are not sent again, and a registration
    that loses a race for its name leaves them for the next one that has the same files."""
    try:
        info = inspect_model_dir(staged)
    except ModelError as exc:
        message = exc.message.replace(str(staged), "<upload>")
        raise InvalidRequest(message, param=param, code=exc.code) from exc
    manifest = list_files(staged)
    digest = model_import.content_sha256(manifest)
    prefix = f"{model_import.MODELS_PREFIX}/{digest}"
    model_import.store_files(store, prefix, staged, manifest)
    by_path = {e["path"]: e["sha256"] for e in manifest}
    return RegisteredModel(
        id=new_id("mdl"), architecture=info.architecture or info.model_type or "unknown",
        num_parameters=info.num_parameters, dtype=info.dtype or "unknown",
        linear_modules=info.linear_names, path=None,
        weights_sha256={f: by_path[f] for f in info.weight_files},
        storage_prefix=prefix, content_sha256=digest, files=manifest, info=_info_dict(info),
    )


def insert_stored_model(session: Session, row: RegisteredModel, *, name: str, source: str,
                        revision: str | None) -> RegisteredModel:
    """Register what `store_model_files` stored under `name`; commits. Conflict if taken."""
    check_name_free(session, name)
    row.name, row.source, row.revision = name, source, revision
    _insert(session, row)
    return row


def register_stored_model(session: Session, *, name: str, staged: Path, source: str,
                          revision: str | None, store: ArtifactStore,
                          param: str = "files") -> RegisteredModel:
    """`check_name_free`, `store_model_files`, `insert_stored_model` in one session (tests,
    scripts; the API holds no session while the files move)."""
    check_name_free(session, name)
    row = store_model_files(staged, store=store, param=param)
    return insert_stored_model(session, row, name=name, source=source, revision=revision)


def _info_dict(info: ModelInfo) -> dict[str, Any]:
    """What `inspect_registered` needs of a stored model, as JSON (its `info` column)."""
    return {**info.to_dict(), "weight_modules": info.weight_modules,
            "linear_shapes": {k: list(v) for k, v in info.linear_shapes.items()},
            "module_names": info.module_names, "config": info.config}


def _info_from_row(model: RegisteredModel) -> ModelInfo:
    data = model.info or {}
    return ModelInfo(
        model_dir=Path(model.storage_prefix or model.name),
        architecture=data.get("architecture"), model_type=data.get("model_type"),
        num_parameters=int(data.get("num_parameters") or 0), dtype=data.get("dtype"),
        weight_modules=list(data.get("weight_modules", [])),
        linear_names=list(data.get("linear_names", [])),
        weight_files=list(data.get("weight_files", [])),
        total_bytes=int(data.get("total_bytes") or 0),
        linear_shapes={k: (int(v[0]), int(v[1]))
                       for k, v in data.get("linear_shapes", {}).items()},
        module_names=list(data.get("module_names", [])), config=dict(data.get("config", {})),
    )


def get_model(session: Session, *, name: str, param: str = "name") -> RegisteredModel:
    row = session.scalar(select(RegisteredModel).where(RegisteredModel.name == name))
    if row is None:
        raise NotFound(f"no registered model {name!r}", param=param)
    return row


def list_models(session: Session) -> list[RegisteredModel]:
    """Models are shared by every tenant (the operator curates them): no tenant filter."""
    return list(session.scalars(select(RegisteredModel).order_by(RegisteredModel.name)))


def model_dir(settings: Settings, model: RegisteredModel) -> Path:
    """A legacy model's directory under the model root (a stored model has none here: the
    worker's lorajobs.worker.model_cache gives it a local one)."""
    if model.path is None:
        raise InvalidRequest(f"model {model.name!r} lives in the store, not the model root",
                             param="base_model")
    return resolve_model_path(settings, model.path)


def inspect_registered(settings: Settings, model: RegisteredModel) -> ModelInfo:
    """Headers of a registered model: a legacy one's read again (cheap: no tensor byte is
    loaded), a stored one's from its row (its files are in the store)."""
    if model.path is None:
        return _info_from_row(model)
    try:
        return inspect_model_dir(model_dir(settings, model))
    except ModelError as exc:
        root = str(settings.resolved_model_root.resolve())
        message = exc.message.replace(root, "<model_root>")
        raise InvalidRequest(f"registered model {model.name!r} is unusable: {message}",
                             param="base_model", code=exc.code) from exc
