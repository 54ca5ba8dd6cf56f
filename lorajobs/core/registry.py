"""Registered base models: jobs name a model, never a path.

An admin registers `name -> path`, where the path is relative to `settings.model_root` (a
directory the operator fills). Registration reads the model the torch-free way
(`lora_core.model_files`: config.json + safetensors headers), refuses pickle-only directories, and
records the sha256 of every weight file so a later swap of the files is detectable. This module
is the only writer of the `models` table.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lora_core.errors import ModelError
from lora_core.model_files import ModelInfo, inspect_model_dir
from lora_core.model_files.manifest import sha256_file
from lorajobs.core.errors import Conflict, InvalidRequest, NotFound
from lorajobs.core.settings import Settings
from lorajobs.core.tables import RegisteredModel, new_id

__all__ = [
    "MODEL_NAME_PATTERN",
    "register_model",
    "get_model",
    "list_models",
    "resolve_model_path",
    "model_dir",
    "inspect_registered",
]

# No '/' so a name is one URL path segment; letters first so it never looks like an option.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
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


def register_model(session: Session, *, name: str, path_under_model_root: str,
                   settings: Settings) -> RegisteredModel:
    """Inspect and register a model directory; commits. Conflict if the name is taken."""
    if not isinstance(name, str) or not re.match(MODEL_NAME_PATTERN, name):
        raise InvalidRequest(f"invalid model name {name!r}: letters, digits, '.', '_', '-'",
                             param="name")
    if session.scalar(select(RegisteredModel.id).where(RegisteredModel.name == name)):
        raise Conflict(f"model {name!r} is already registered", param="name",
                       code="model_exists")
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
    session.add(row)
    try:
        session.commit()
    except IntegrityError as exc:  # a concurrent registration of the same name won
        session.rollback()
        raise Conflict(f"model {name!r} is already registered", param="name",
                       code="model_exists") from exc
    return row


def get_model(session: Session, *, name: str, param: str = "name") -> RegisteredModel:
    row = session.scalar(select(RegisteredModel).where(RegisteredModel.name == name))
    if row is None:
        raise NotFound(f"no registered model {name!r}", param=param)
    return row


def list_models(session: Session) -> list[RegisteredModel]:
    """Models are shared by every tenant (the operator curates them): no tenant filter."""
    return list(session.scalars(select(RegisteredModel).order_by(RegisteredModel.name)))


def model_dir(settings: Settings, model: RegisteredModel) -> Path:
    return resolve_model_path(settings, model.path)


def inspect_registered(settings: Settings, model: RegisteredModel) -> ModelInfo:
    """Headers of a registered model, read again (cheap: no tensor byte is loaded)."""
    try:
        return inspect_model_dir(model_dir(settings, model))
    except ModelError as exc:
        root = str(settings.resolved_model_root.resolve())
        message = exc.message.replace(root, "<model_root>")
        raise InvalidRequest(f"registered model {model.name!r} is unusable: {message}",
                             param="base_model", code=exc.code) from exc
