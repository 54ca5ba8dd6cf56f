"""The exceptions lora_core raises: one small tree, each naming what the caller got wrong.

    LoraCoreError                 base; `.code`, `.message`, `.param`, `.user_fault`
    ├── SpecError                 a spec field is out of range / unknown   (user)
    ├── DatasetError              a data line is malformed                (user)  `.line`, `.errors`
    ├── ModelError                model dir missing, pickle-only, bad config (user)
    ├── TrainingError             the run itself failed (NaN loss, OOM)   (system)
    ├── MergeError                a merge failed or failed verification   (system)
    └── StorageError              disk full / unwritable output           (system)

`job_error()` gives the `events.JobError` the service stores and returns; `to_dict()` the
fields of the trainer's `error` event (a DatasetError adds its `errors`).
"""

from __future__ import annotations

from typing import Any

from lora_core.events import JobError

__all__ = [
    "LoraCoreError",
    "SpecError",
    "DatasetError",
    "ModelError",
    "TrainingError",
    "MergeError",
    "StorageError",
    "validation_problems",
]


def validation_problems(errors: list[Any], rename: dict[str, str] | None = None
                        ) -> tuple[str, str]:
    """(param of the first problem, "a.b: msg; c: msg" naming every problem) of a pydantic
    ValidationError's `errors()`: a spec with three mistakes is reported once, not three
    round trips. `rename` maps our dotted field names to the caller's (the OpenAI names)."""
    rename = rename or {}
    names = [rename.get(n, n) for n in
             (".".join(str(p) for p in e.get("loc", ())) or "spec" for e in errors)]
    problems = "; ".join(f"{n}: {e.get('msg', 'invalid')}"
                         for n, e in zip(names, errors, strict=True))
    return (names[0] if names else "spec"), problems


class LoraCoreError(Exception):
    """Base of every error lora_core raises on purpose."""

    code = "lora_core_error"
    user_fault = False

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def job_error(self) -> JobError:
        return JobError(code=self.code, message=self.message, param=self.param,
                        user_fault=self.user_fault)

    def to_dict(self) -> dict[str, Any]:
        return self.job_error().model_dump()


class SpecError(LoraCoreError):
    """A spec field has a bad value: `param` is the dotted field name, e.g. `lora.r`."""

    code = "invalid_spec"
    user_fault = True

    def __init__(self, message: str, *, param: str | None = None, value: Any = None) -> None:
        super().__init__(message, param=param)
        self.value = value


class DatasetError(LoraCoreError):
    """One or more data lines are malformed. `errors` holds `{line, field, message}` dicts."""

    code = "invalid_dataset"
    user_fault = True

    def __init__(
        self,
        message: str,
        *,
        line: int | None = None,
        field: str | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message, param=field)
        self.line = line
        self.field = field
        single = [{"line": line, "field": field, "message": message}] if line else []
        self.errors = errors or single

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "errors": self.errors}


class ModelError(LoraCoreError):
    """The base model directory is missing, unsafe (pickle-only) or unusable."""

    code = "invalid_model"
    user_fault = True


class TrainingError(LoraCoreError):
    """Training failed for a reason that is not the user's input (OOM, NaN loss, crash)."""

    code = "training_failed"


class MergeError(LoraCoreError):
    """A merge failed, produced NaN/Inf, or its logits check exceeded the tolerance."""

    code = "merge_failed"


class StorageError(LoraCoreError):
    """Writing output failed (disk full, permissions). Earlier checkpoints stay intact."""

    code = "storage_error"
