"""The adapter a job continues from (`spec.init_from`, core/lineage.py), fetched onto this node.

    <job scratch>/init-adapter/   adapter_config.json, adapter_model.safetensors, ...

Its files are the parent's `adapter` artifact rows (the final adapter: step NULL; a
checkpoint's: its step), each fetched from the store with `store.get_file` and checked
against the sha256 recorded with the row, so a corrupt or swapped file never seeds a run.
"""

from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from lora_core.model_files.manifest import verify_files
from lorajobs.core.storage import ArtifactStore
from lorajobs.core.tables import Artifact, Job

__all__ = ["INIT_ADAPTER_DIR", "InitAdapterError", "fetch_init_adapter"]

INIT_ADAPTER_DIR = "init-adapter"


class InitAdapterError(Exception):
    """The adapter cannot be fetched: a message for the job's error (param base_model)."""


def fetch_init_adapter(session: Session, store: ArtifactStore, job: Job,
                       job_dir: Path) -> Path | None:
    """The parent's adapter as a local PEFT dir, or None when the job starts fresh."""
    init: dict[str, Any] | None = (job.spec or {}).get("init_from")
    if not init:
        return None
    step = init.get("step")
    rows = list(session.scalars(select(Artifact).where(
        Artifact.job_id == init["job"], Artifact.kind == "adapter",
        Artifact.step.is_(None) if step is None else Artifact.step == step)))
    names = {r.name for r in rows}
    if "adapter_config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        raise InitAdapterError(f"{init.get('model')}: the adapter's files are gone (deleted "
                               "since the job was created?)")
    dest = job_dir / INIT_ADAPTER_DIR
    shutil.rmtree(dest, ignore_errors=True)  # an earlier attempt's copy: fetch afresh
    for row in rows:
        relative = PurePosixPath(row.name)
        if relative.is_absolute() or ".." in relative.parts:
            raise InitAdapterError(f"unsafe artifact name {row.name!r}")
        store.get_file(row.storage_key, dest.joinpath(*relative.parts))
    problems = verify_files(dest, [{"path": r.name, "size": r.size, "sha256": r.sha256}
                                   for r in rows])
    if problems:
        raise InitAdapterError(f"{init.get('model')}: the fetched adapter does not match its "
                               f"recorded files: {'; '.join(problems[:3])}")
    return dest
