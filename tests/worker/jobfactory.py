"""Rows a worker needs, written straight to the database (the API's job creation is not under
test here): a tenant, a registered model directory, a dataset file, and the job itself."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import select

from lorajobs.core.db import get_sessionmaker
from lorajobs.core.keys import get_or_create_tenant
from lorajobs.core.settings import Settings
from lorajobs.core.storage import get_store
from lorajobs.core.tables import Dataset, Job, JobEvent, RegisteredModel, new_id

MODEL_NAME = "fake-tiny"
DATA = b'{"instruction": "say hi", "output": "hi"}\n' * 4


def ensure_model_and_dataset(settings: Settings, model_src: Path | None = None
                             ) -> tuple[str, str]:
    """(tenant_id, dataset_id). The model is a copy of `model_src` (a real tiny model, which
    the API's checks need), or a fake safetensors file (enough for the fake trainer)."""
    store = get_store(settings)
    with get_sessionmaker(settings)() as session:
        tenant = get_or_create_tenant(session, name="local")  # the admin key's tenant
        if session.scalar(select(RegisteredModel).where(RegisteredModel.name == MODEL_NAME)) \
                is None:
            model_dir = settings.resolved_model_root / MODEL_NAME
            if model_src is not None:
                shutil.copytree(model_src, model_dir, dirs_exist_ok=True)
            else:
                model_dir.mkdir(parents=True, exist_ok=True)
                (model_dir / "config.json").write_text("{}")
                (model_dir / "model.safetensors").write_bytes(b"\0" * 64)
            session.add(RegisteredModel(id=new_id("mdl"), name=MODEL_NAME, architecture="fake",
                                        num_parameters=16, dtype="float32",
                                        linear_modules=["q_proj"], path=MODEL_NAME))
        dataset_id = new_id("ds")
        key = f"datasets/{dataset_id}.jsonl"
        store.put_stream(key, io.BytesIO(DATA))
        session.add(Dataset(id=dataset_id, tenant_id=tenant.id, filename="train.jsonl",
                            format="alpaca", num_examples=4, size_bytes=len(DATA),
                            sha256=hashlib.sha256(DATA).hexdigest(), storage_key=key))
        session.commit()
        return tenant.id, dataset_id


def make_job(settings: Settings, *, max_steps: int = 10, save_steps: int = 2,
             max_attempts: int = 3, control: dict[str, Any] | None = None,
             merge: str = "final") -> str:
    """A queued job (not yet sent). `control` configures the fake trainer for this job."""
    tenant_id, dataset_id = ensure_model_and_dataset(settings)
    job_id = new_id("job")
    spec = {"base_model": MODEL_NAME, "training_file": dataset_id, "validation_file": None,
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj"]},
            "training": {"max_steps": max_steps, "save_steps": save_steps, "seed": 7},
            "distributed": {"num_processes": 1, "zero_stage": 0}, "merge": merge}
    if control:
        fake_dir(settings).mkdir(parents=True, exist_ok=True)
        (fake_dir(settings) / f"{job_id}.control.json").write_text(json.dumps(control))
    with get_sessionmaker(settings)() as session:
        session.add(Job(id=job_id, tenant_id=tenant_id, base_model=MODEL_NAME,
                        training_file=dataset_id, spec=spec, max_attempts=max_attempts))
        session.commit()
    return job_id


def fake_dir(settings: Settings) -> Path:
    """Where the fake trainer keeps its control and starts files (tests/worker/fake_trainer.py:
    outside the job's scratch directory, which the worker removes when the job settles)."""
    return settings.data_dir / "fake-trainer"


def node_settings(settings: Settings, tmp_path: Path, name: str) -> Settings:
    """A worker node's settings for a Supervisor run in the test process: the database and
    store of `settings`, its own scratch dir `tmp_path/name`, the fake trainer, the test
    service's poll and lease timings."""
    import sys

    from tests.servicefixtures import FAKE_TRAINER, TEST_SETTINGS

    wrapper = tmp_path / "trainer-python"
    if not wrapper.exists():
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_TRAINER}" "$@"\n')
        wrapper.chmod(0o755)
    return settings.model_copy(update={**TEST_SETTINGS, "scratch_dir": tmp_path / name,
                                       "trainer_python": str(wrapper)})


def run_dir(settings: Settings, job_id: str) -> Path:
    """The trainer's output dir on the (one) worker's node-local scratch."""
    from lorajobs.worker.runspec import job_scratch_dir

    return job_scratch_dir(settings, job_id) / "run"


def get_job(settings: Settings, job_id: str) -> Job:
    with get_sessionmaker(settings)() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def events(settings: Settings, job_id: str, type_: str | None = None) -> list[JobEvent]:
    with get_sessionmaker(settings)() as session:
        stmt = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        if type_:
            stmt = stmt.where(JobEvent.type == type_)
        return list(session.scalars(stmt).all())


def fake_starts(settings: Settings, job_id: str) -> list[tuple[int, int]]:
    """(pid, resume step) of every fake-trainer start for this job, in order."""
    path = fake_dir(settings) / f"{job_id}.starts"
    if not path.exists():
        return []
    return [(int(pid), int(step)) for pid, step in
            (line.split()[:2] for line in path.read_text().splitlines() if line.strip())]


def trainer_starts(settings: Settings, job_id: str) -> list[int]:
    """The resume step of every fake-trainer start for this job (one entry per start)."""
    return [step for _, step in fake_starts(settings, job_id)]


def trainer_pids(settings: Settings, job_id: str) -> list[int]:
    """The pid of every fake-trainer start for this job, in order."""
    return [pid for pid, _ in fake_starts(settings, job_id)]


def trainer_steps(settings: Settings, job_id: str, attempt: int) -> list[int]:
    """Steps the trainer reached in one attempt, from its own events file in scratch (not the
    database, which lags a killed worker or a database outage); empty once the job settled."""
    path = run_dir(settings, job_id) / f"events-attempt{attempt}.jsonl"
    if not path.exists():
        return []
    return [int(e["step"]) for e in map(json.loads, path.read_text().splitlines())
            if e.get("type") == "progress"]


def trainer_checkpoints(settings: Settings, job_id: str, attempt: int) -> list[int]:
    """Steps of the checkpoints the trainer reported in one attempt (its events file)."""
    path = run_dir(settings, job_id) / f"events-attempt{attempt}.jsonl"
    if not path.exists():
        return []
    return [int(e["step"]) for e in map(json.loads, path.read_text().splitlines())
            if e.get("type") == "checkpoint"]


def status_history(settings: Settings, job_id: str) -> list[str]:
    return [e.data.get("to") for e in events(settings, job_id, "status")]
