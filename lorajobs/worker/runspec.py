"""From a claimed job row to what the trainer child runs: RunSpec, paths, command, environment.

The trainer works on node-local scratch, never in the store (`settings.resolved_scratch_dir`):

    jobs/<job_id>/spec.json                      the RunSpec the child reads (every attempt)
    jobs/<job_id>/run/                           the trainer's output_dir: checkpoints/,
                                                 adapter/, merged/
    jobs/<job_id>/run/STOP                       the worker's cooperative stop request
    jobs/<job_id>/run/events-attempt<N>.jsonl    the child's JSON-lines report channel
    jobs/<job_id>/run/trainer-attempt<N>.log     the child's stdout + stderr
    jobs/<job_id>/upload/run-<token>/            hard-linked snapshots of sealed checkpoints
                                                 being uploaded (checkpoint_sync.py)
    datasets/<sha256><suffix>                    the node's dataset cache (inputs.py)

What is uploaded goes to the store under the run's own prefix
`jobs/<job_id>/attempt-<N>/run-<token>/` (checkpoint_sync.run_prefix; settle.py lists what is
under it); a job's scratch directory is removed once it settles terminally (settle.py). Paths
never come from the client: the model is a registered name, datasets are store keys the API
wrote.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from lora_core.errors import validation_problems
from lora_core.events import JobError
from lora_core.spec import RunSpec
from lorajobs.core.settings import Settings
from lorajobs.core.storage import ArtifactStore
from lorajobs.core.tables import Dataset, Job, RegisteredModel
from lorajobs.worker.init_adapter import InitAdapterError, fetch_init_adapter

__all__ = ["RunPaths", "PrepareError", "build_run_spec", "job_scratch_dir", "model_dir_for",
           "trainer_args", "trainer_command", "trainer_env", "visible_gpus", "worker_capacity"]

STOP_FILE_NAME = "STOP"
# One entry per GPU the NVIDIA driver has bound (Linux): counted without importing torch. A
# container may not see /proc/driver/nvidia; it sees the device nodes it was given (/dev/nvidiaN).
NVIDIA_GPUS_DIR = Path("/proc/driver/nvidia/gpus")
DEV_DIR = Path("/dev")
# Thread-count variables honoured by torch, OpenMP, MKL and the HF tokenizers.
THREAD_TUNING_ENV = "LORAJOBS_THREAD_TUNING"  # lora_core.training.thread_tuner's switch
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                   "LORAJOBS_TRAINER_THREADS")
FORK_SAFE_ENV = {"OPENBLAS_NUM_THREADS": "1", "JE_ARROW_MALLOC_CONF": "background_thread:false"}


class PrepareError(Exception):
    """The job cannot start: `error` becomes the job's error (`failed`)."""

    def __init__(self, code: str, message: str, *, param: str | None = None,
                 user_fault: bool = False) -> None:
        super().__init__(message)
        self.error = JobError(code=code, message=message, param=param, user_fault=user_fault)


def job_scratch_dir(settings: Settings, job_id: str) -> Path:
    """This node's working directory for one job."""
    return settings.resolved_scratch_dir / "jobs" / job_id


@dataclass(frozen=True)
class RunPaths:
    job_dir: Path
    run_dir: Path
    spec_file: Path
    stop_file: Path
    events_file: Path
    log_file: Path

    @classmethod
    def for_attempt(cls, settings: Settings, job_id: str, attempt: int) -> RunPaths:
        job_dir = job_scratch_dir(settings, job_id)
        run_dir = job_dir / "run"
        return cls(job_dir=job_dir, run_dir=run_dir, spec_file=job_dir / "spec.json",
                   stop_file=run_dir / STOP_FILE_NAME,
                   events_file=run_dir / f"events-attempt{attempt}.jsonl",
                   log_file=run_dir / f"trainer-attempt{attempt}.log")

    @property
    def checkpoints_dir(self) -> Path:
        """Where the trainer writes checkpoint-<step>/ (lora_core.training.trainer)."""
        return self.run_dir / "checkpoints"

    @property
    def upload_dir(self) -> Path:
        """Private hard-linked snapshots of sealed checkpoints while they upload."""
        return self.job_dir / "upload"

    def log_files(self) -> list[Path]:
        """Every attempt's events and trainer log on this node (kind "log" artifacts)."""
        return sorted([*self.run_dir.glob("events-attempt*.jsonl"),
                       *self.run_dir.glob("trainer-attempt*.log")])


def model_dir_for(settings: Settings, store: ArtifactStore, model: RegisteredModel) -> Path:
    """A ready node-local directory of the model's files.

    A stored model comes through the node's model cache (`model_cache.local_model_dir`:
    downloaded once, verified by sha256, held until `model_cache.release`); a legacy model
    registered by path lives under `model_root` on this machine.
    """
    if model.path is None:
        from lorajobs.worker.model_cache import local_model_dir

        try:
            return Path(local_model_dir(settings, store, model))
        except Exception as exc:  # noqa: BLE001 - a store outage, a corrupt download
            raise PrepareError("model_unavailable", f"base model {model.name!r} could not be "
                               f"fetched from the store: {exc}", param="base_model") from exc
    model_root = settings.resolved_model_root.resolve()
    model_dir = (model_root / model.path).resolve()
    if not model_dir.is_relative_to(model_root) or not model_dir.is_dir():
        raise PrepareError("model_missing", f"base model {model.name!r}'s files are missing "
                           "under the model root", param="base_model")
    return model_dir


def _dataset_file(session: Session, settings: Settings, store: ArtifactStore, dataset_id: str,
                  param: str) -> tuple[Dataset, Path]:
    from lorajobs.worker.inputs import DatasetUnavailable, fetch_dataset

    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise PrepareError("dataset_missing", f"dataset {dataset_id} no longer exists",
                           param=param, user_fault=True)
    try:
        return dataset, fetch_dataset(settings, store, dataset)
    except DatasetUnavailable as exc:
        raise PrepareError("dataset_missing", f"dataset {dataset_id}: {exc}",
                           param=param) from exc


def _evaluation(session: Session, settings: Settings, store: ArtifactStore, job: Job,
                evaluation: dict[str, Any] | None) -> dict[str, Any] | None:
    """The job's `evaluation` with its `file` (a dataset id of the job's tenant) as a
    node-local path."""
    if not evaluation or not evaluation.get("file"):
        return evaluation
    dataset = session.get(Dataset, evaluation["file"])
    if dataset is None or dataset.tenant_id != job.tenant_id:
        raise PrepareError("dataset_missing", f"dataset {evaluation['file']} no longer exists",
                           param="evaluation.file", user_fault=True)
    _, path = _dataset_file(session, settings, store, dataset.id, "evaluation.file")
    return {**evaluation, "file": str(path)}


def build_run_spec(session: Session, job: Job, settings: Settings, store: ArtifactStore,
                   paths: RunPaths) -> tuple[RunSpec, RegisteredModel, Dataset]:
    """Resolve names to node-local paths (fetching inputs from the store) and validate;
    raises PrepareError naming the bad field."""
    model = session.query(RegisteredModel).filter_by(name=job.base_model).one_or_none()
    if model is None:
        raise PrepareError("model_missing", f"base model {job.base_model!r} is not registered",
                           param="base_model", user_fault=True)
    model_dir = model_dir_for(settings, store, model)
    dataset, train_file = _dataset_file(session, settings, store, job.training_file,
                                        "training_file")
    validation_file = None
    if job.validation_file:
        _, validation_file = _dataset_file(session, settings, store, job.validation_file,
                                           "validation_file")
    spec: dict[str, Any] = job.spec or {}
    try:  # a job continuing an earlier adapter (core/lineage.py)
        init_adapter = fetch_init_adapter(session, store, job, paths.job_dir)
    except InitAdapterError as exc:
        raise PrepareError("init_adapter_missing", str(exc), param="base_model",
                           user_fault=True) from exc
    evaluation = _evaluation(session, settings, store, job, spec.get("evaluation"))
    try:
        run_spec = RunSpec.model_validate({
            "model_dir": model_dir, "train_file": train_file, "validation_file": validation_file,
            "data_format": dataset.format, "output_dir": paths.run_dir,
            "lora": spec.get("lora") or {}, "training": spec.get("training") or {},
            "distributed": spec.get("distributed") or {}, "merge": spec.get("merge") or "final",
            "resume": True, "init_adapter": init_adapter,
            "method": spec.get("method") or "sft", "dpo": spec.get("dpo") or {},
            **({"evaluation": evaluation} if evaluation is not None else {}),
        })
    except ValidationError as exc:
        param, problems = validation_problems(exc.errors())
        raise PrepareError("invalid_spec", problems, param=param, user_fault=True) from exc
    _check_capacity(run_spec, settings)
    return run_spec, model, dataset


def visible_gpus(gpus_dir: Path = NVIDIA_GPUS_DIR, dev_dir: Path = DEV_DIR) -> int:
    """GPUs this worker's trainers can use: the driver's count (else the /dev/nvidiaN nodes),
    narrowed by CUDA_VISIBLE_DEVICES (CUDA stops at the first invalid entry, e.g. "-1").
    0 on a CPU node."""
    try:
        present = sum(1 for _ in gpus_dir.iterdir())
    except OSError:
        try:
            present = sum(1 for p in dev_dir.glob("nvidia*") if p.name[6:].isdigit())
        except OSError:
            present = 0
    if not present:
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return present
    count = 0
    for entry in visible.split(","):
        if not entry.strip() or entry.strip().startswith("-"):
            break
        count += 1
    return min(count, present)


def worker_capacity(settings: Settings) -> int:
    """Processes one job may run on this worker: one per visible GPU, and at most
    `max_processes_per_job` (on a CPU node, that setting alone: ranks share the cores)."""
    gpus = visible_gpus()
    return min(gpus, settings.max_processes_per_job) if gpus else settings.max_processes_per_job


def _check_capacity(run_spec: RunSpec, settings: Settings) -> None:
    """A job wider than this worker: a clear user error at claim, not a crashed trainer (the
    API refuses more than `max_processes_per_job`; a smaller node of the fleet lands here)."""
    wanted, capacity = run_spec.distributed.num_processes, worker_capacity(settings)
    if wanted > capacity:
        raise PrepareError("too_many_processes",
                           f"distributed.num_processes={wanted}, but the worker that claimed "
                           f"the job runs at most {capacity} process(es) per job; resubmit with "
                           f"num_processes <= {capacity}",
                           param="distributed.num_processes", user_fault=True)


def write_spec(run_spec: RunSpec, paths: RunPaths) -> None:
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = paths.spec_file.with_name(paths.spec_file.name + ".part")
    tmp.write_text(run_spec.model_dump_json(indent=2) + "\n")
    os.replace(tmp, paths.spec_file)


def trainer_args(paths: RunPaths) -> list[str]:
    """The arguments after `python -m lora_core` (the pre-warmed zygote runs these too)."""
    return ["run", "--spec", str(paths.spec_file), "--events-file", str(paths.events_file),
            "--stop-file", str(paths.stop_file)]


def trainer_command(settings: Settings, run_spec: RunSpec, paths: RunPaths) -> list[str]:
    """`python -m lora_core run ...`, or under torchrun for more than one process."""
    args = ["-m", "lora_core", *trainer_args(paths)]
    nproc = run_spec.distributed.num_processes
    if nproc > 1:
        torchrun = settings.torchrun or str(Path(sys.executable).with_name("torchrun"))
        return [torchrun, "--standalone", "--nproc_per_node", str(nproc), *args]
    return [settings.trainer_python or sys.executable, *args]


def trainer_env(settings: Settings) -> dict[str, str]:
    """The worker's environment plus thread limits and unbuffered output for the child."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # Libraries that start a thread when imported make the pre-warmed zygote unsafe to fork
    # (prewarm.py refuses, and every trainer starts cold): numpy's OpenBLAS pool (torch's
    # GEMMs use MKL/oneDNN, not it) and pyarrow's jemalloc background thread (pyarrow comes
    # with `datasets`, which transformers.trainer and TRL import).
    for name, value in FORK_SAFE_ENV.items():
        env.setdefault(name, value)
    if settings.trainer_threads:
        for name in THREAD_ENV_VARS:
            env[name] = str(settings.trainer_threads)
    elif settings.trainer_thread_tuning:
        env[THREAD_TUNING_ENV] = "on"  # read by lora_core/training/thread_tuner.py
    return env
