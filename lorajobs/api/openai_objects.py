"""Our rows as OpenAI's objects: `fine_tuning.job`, `file`, `fine_tuning.job.checkpoint`, and the
result file (a CSV of per-step metrics), so `/openai/v1` answers what the official client reads.

Mapping decisions (docs/OPENAI_COMPAT.md lists every attribute):
- status: ours, except a running job with a pause requested shows `pausing` (OpenAI's API
  reference lists `pausing` and `paused`; the python client's Literal predates them, and its
  models do not validate, so the value passes through as a plain string).
- `learning_rate_multiplier` = learning_rate / BASE_LEARNING_RATE; "auto" resolves to our
  defaults and the resolved numbers are what the job reports (as OpenAI does).
- checkpoint metrics: our eval runs on the whole validation file, so `valid_loss` and
  `full_valid_loss` are the same number; token accuracies are not computed (null).
- `result_files`: a succeeded job has one, `ftresults-<job id>`, whose content is the CSV
  OpenAI documents (`step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy`),
  built from the job's metric rows when it is read (they are the truth; nothing to keep in
  sync).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from lora_core.spec import DpoSpec
from lorajobs.api.schemas import fine_tuned_model_name
from lorajobs.core.tables import Checkpoint, Dataset, Job, JobMetric, JobStatus, utcnow

__all__ = ["BASE_LEARNING_RATE", "RESULT_FILE_PREFIX", "RESULT_COLUMNS", "job_object",
           "file_object", "result_file_object", "result_csv", "checkpoint_object",
           "checkpoint_model_name", "openai_status", "ts"]

BASE_LEARNING_RATE = 1e-4  # what learning_rate_multiplier=1 means here (our default lr)
DEFAULT_DPO_BETA = DpoSpec().beta  # what beta "auto" resolves to (TRL's and OpenAI's default)
RESULT_FILE_PREFIX = "ftresults-"  # + job id: the result file of a succeeded job
# OpenAI's result file columns (fine-tuning guide, "Analyzing your fine-tuned model").
RESULT_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss",
                  "valid_mean_token_accuracy")


def ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value else None


def openai_status(job: Job) -> str:
    if job.status == JobStatus.RUNNING and getattr(job, "pause_requested", False):
        return "pausing"
    return str(job.status)


def _hyperparameters(job: Job) -> dict[str, Any]:
    training = (job.spec or {}).get("training", {})
    return {"n_epochs": training.get("epochs"), "batch_size": training.get("batch_size"),
            "learning_rate_multiplier": (training.get("learning_rate") or BASE_LEARNING_RATE)
            / BASE_LEARNING_RATE}


def _method(job: Job, hp: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's `method` from our spec's `method` ("sft" | "dpo") and `dpo.beta`."""
    spec = job.spec or {}
    if spec.get("method") == "dpo":
        beta = (spec.get("dpo") or {}).get("beta", DEFAULT_DPO_BETA)
        return {"type": "dpo", "dpo": {"hyperparameters": {**hp, "beta": beta}}}
    return {"type": "supervised", "supervised": {"hyperparameters": hp}}


def _estimated_finish(job: Job) -> int | None:
    eta = (job.progress or {}).get("eta_seconds")
    if job.status != JobStatus.RUNNING or eta is None:
        return None
    return int(utcnow().timestamp() + float(eta))


def _model(job: Job) -> str:
    """The name the job was created with: a base model, or the fine-tuned model or checkpoint
    it continues (core/lineage.py), as OpenAI shows it."""
    init = (job.spec or {}).get("init_from") or {}
    return str(init.get("model") or job.base_model)


def job_object(job: Job) -> dict[str, Any]:
    hp = _hyperparameters(job)
    error = None
    if job.error and job.status == JobStatus.FAILED:
        error = {"code": job.error.get("code") or "error",
                 "message": job.error.get("message") or "", "param": job.error.get("param")}
    succeeded = job.status == JobStatus.SUCCEEDED
    return {
        "id": job.id, "object": "fine_tuning.job", "created_at": ts(job.created_at),
        "finished_at": ts(job.finished_at), "model": _model(job),
        "fine_tuned_model": fine_tuned_model_name(job), "organization_id": job.tenant_id,
        "result_files": [f"{RESULT_FILE_PREFIX}{job.id}"] if succeeded else [],
        "status": openai_status(job), "training_file": job.training_file,
        "validation_file": job.validation_file,
        "hyperparameters": hp,
        "trained_tokens": (job.estimate or {}).get("num_tokens") if succeeded else None,
        "error": error, "seed": (job.spec or {}).get("training", {}).get("seed"),
        "estimated_finish": _estimated_finish(job), "integrations": [],
        "metadata": job.metadata_ or None, "user_provided_suffix": job.suffix,
        "method": _method(job, hp),
    }


def file_object(row: Dataset) -> dict[str, Any]:
    return {"id": row.id, "object": "file", "bytes": row.size_bytes,
            "created_at": ts(row.created_at), "filename": row.filename,
            "purpose": row.purpose, "status": "processed", "status_details": None}


def result_csv(rows: Iterable[JobMetric]) -> bytes:
    """OpenAI's result file: one row per step; a metric we do not compute is left empty."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    for m in rows:
        writer.writerow([m.step, _num(m.train_loss), "", _num(m.eval_loss), ""])
    return out.getvalue().encode()


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def result_file_object(job: Job, size: int) -> dict[str, Any]:
    return {"id": f"{RESULT_FILE_PREFIX}{job.id}", "object": "file", "bytes": size,
            "created_at": ts(job.finished_at or job.created_at),
            "filename": f"{job.id}_results.csv", "purpose": "fine-tune-results",
            "status": "processed", "status_details": None}


def checkpoint_model_name(job: Job, step: int) -> str:
    """`ft:<base>:<suffix>:<job>:ckpt-step-<N>`: accepted as `model` of a new job."""
    return f"ft:{job.base_model}:{job.suffix or 'lorajobs'}:{job.id}:ckpt-step-{step}"


def checkpoint_object(job: Job, row: Checkpoint, object_id: str,
                      scores: dict[str, Any] | None = None) -> dict[str, Any]:
    """`scores`: the step's grader scores (lorajobs.core.evaluations), under metrics.scores."""
    metrics = row.metrics or {}
    valid = metrics.get("eval_loss")
    return {"object": "fine_tuning.job.checkpoint", "id": object_id,
            "created_at": ts(row.created_at), "fine_tuning_job_id": job.id,
            "fine_tuned_model_checkpoint": checkpoint_model_name(job, row.step),
            "metrics": {"step": row.step, "train_loss": metrics.get("train_loss"),
                        "train_mean_token_accuracy": None, "valid_loss": valid,
                        "valid_mean_token_accuracy": None, "full_valid_loss": valid,
                        "full_valid_mean_token_accuracy": None,
                        **({"scores": scores} if scores else {})},
            "step_number": row.step}
