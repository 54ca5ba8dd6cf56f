"""Jobs that continue from an earlier job's adapter: `base_model` (OpenAI's `model`) may name a
fine-tuned model or one of its checkpoints instead of a registered base model.

    ft:<base>:<suffix>:<job id>                 a succeeded job's final adapter
    ft:<base>:<suffix>:<job id>:ckpt-step-<N>   a recorded checkpoint's adapter (any job)
    <job id>  |  <job id>:ckpt-step-<N>         the same, natively

The new job trains the same registered base model, starting from that adapter's weights (the
worker fetches its files: worker/init_adapter.py; lora_core's `RunSpec.init_adapter`). Its LoRA
config is the parent's: a request that sets a `lora` field to another value is refused with
the field named (the weights would not fit); the `lora` section may be omitted.

`resolve_parent` returns the request to check and store (base model and lora replaced) and the
`init_from` record kept in the job's spec: `{"job", "step", "model"}` (step None: the final
adapter; model: the name the client sent, shown as the job's `model` by /openai/v1).
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from lora_core.spec import LoraSpec
from lorajobs.core.errors import InvalidRequest
from lorajobs.core.tables import Artifact, Job, JobStatus
from lorajobs.jobspec import JobRequest

__all__ = ["parse_reference", "resolve_parent"]

# ft:<base>:<suffix>:<job>[:ckpt-step-N] (a base name may hold ":"; job ids never do), or a
# bare job id with an optional checkpoint.
_FT = re.compile(r"^ft:.+:(?P<job>job_[0-9a-f]{24})(?::ckpt-step-(?P<step>\d{1,9}))?$")
_NATIVE = re.compile(r"^(?P<job>job_[0-9a-f]{24})(?::ckpt-step-(?P<step>\d{1,9}))?$")
PARAM = "base_model"


def parse_reference(name: str) -> tuple[str, int | None] | None:
    """(job id, checkpoint step or None) when `name` names a job's adapter, else None."""
    match = _FT.match(name) or _NATIVE.match(name)
    if match is None:
        return None
    step = match.group("step")
    return match.group("job"), int(step) if step is not None else None


def resolve_parent(session: Session, *, tenant_id: str,
                   request: JobRequest) -> tuple[JobRequest, dict[str, Any] | None]:
    """The request with the parent's base model and LoRA config, and its `init_from`; the
    request unchanged and None when `base_model` names a registered model."""
    ref = parse_reference(request.base_model)
    if ref is None:
        return request, None
    job_id, step = ref
    name = request.base_model
    parent = session.get(Job, job_id)
    if parent is None or parent.tenant_id != tenant_id:
        raise InvalidRequest(f"no fine-tuned model {name!r}", param=PARAM,
                             code="model_not_found")
    if step is None and parent.status != JobStatus.SUCCEEDED:
        raise InvalidRequest(f"job {job_id} is {parent.status}: only a succeeded job's model "
                             "can be trained further (or name one of its checkpoints, "
                             "'...:ckpt-step-<N>')", param=PARAM, code="model_not_ready")
    kind_step = Artifact.step.is_(None) if step is None else Artifact.step == step
    files = session.scalar(select(func.count()).select_from(Artifact).where(
        Artifact.job_id == job_id, Artifact.kind == "adapter", kind_step))
    if not files:
        what = f"checkpoint step {step}" if step is not None else "final adapter"
        raise InvalidRequest(f"{name!r}: job {job_id} has no {what} (never saved, or its "
                             "artifacts were deleted)", param=PARAM, code="model_not_found")
    inherited = LoraSpec.model_validate(parent.spec.get("lora") or {})
    _refuse_conflicts(request, inherited, name)
    resolved = request.model_copy(update={"base_model": parent.base_model, "lora": inherited})
    return resolved, {"job": job_id, "step": step, "model": name}


def _refuse_conflicts(request: JobRequest, inherited: LoraSpec, name: str) -> None:
    """Every `lora` field the client set must equal the parent's (all named at once)."""
    if "lora" not in request.model_fields_set:
        return
    problems = []
    for field in sorted(request.lora.model_fields_set):
        mine, theirs = getattr(request.lora, field), getattr(inherited, field)
        if field == "target_modules" and isinstance(mine, list) and isinstance(theirs, list):
            mine, theirs = sorted(mine), sorted(theirs)
        if mine != theirs:
            problems.append((f"lora.{field}", mine, theirs))
    if problems:
        detail = "; ".join(f"{p} is {m!r} but the adapter of {name} has {t!r}"
                           for p, m, t in problems)
        raise InvalidRequest(f"{detail}: a job continuing an adapter keeps its LoRA config "
                             "(omit lora to inherit it)", param=problems[0][0],
                             code="lora_conflict")
