"""What a client may ask for when it creates a job: the body of `POST /v1/jobs`.

Shared by the server (`service.submit` checks it against the model, the data and the tenant's
limits) and the client (the CLI checks a spec file before uploading anything). It imports only
pydantic and `lora_core.spec`, both torch- and SQL-free, so the client-only install
(`pip install lorajobs`) can validate with the server's own schema.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lora_core.evaluation.spec import EvaluationSpec
from lora_core.spec import DistributedSpec, DpoSpec, LoraSpec, MergeMode, Method, TrainingSpec

__all__ = ["JobRequest", "MAX_METADATA_KEYS", "MAX_METADATA_KEY_CHARS",
           "MAX_METADATA_VALUE_CHARS"]

MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_CHARS = 64  # OpenAI's metadata limits, so the compat layer can pass it through
MAX_METADATA_VALUE_CHARS = 512


class DeployOnSuccess(BaseModel):
    """Deploy the finished adapter to a serving target (`POST /v1/jobs/{id}/deploy` done for
    you by the serving reconciler once the job succeeds)."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(min_length=1, max_length=100)


class JobRequest(BaseModel):
    """What a client may set on a job. No status/tenant/attempt/lease: mass assignment is moot."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(min_length=1, max_length=200)
    training_file: str = Field(min_length=1, max_length=40)
    validation_file: str | None = Field(None, min_length=1, max_length=40)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    merge: MergeMode = "final"
    # "sft" (next-token loss) or "dpo" (preference pairs; `dpo.beta`), as lora_core.spec.RunSpec
    # and `lorajobs train` take them; /openai/v1 maps OpenAI's `method` onto these
    method: Method = "sft"
    dpo: DpoSpec | None = None
    suffix: str | None = Field(None, min_length=1, max_length=40, pattern=r"^[a-z0-9-]+$")
    metadata: dict[str, str] = Field(default_factory=dict, max_length=MAX_METADATA_KEYS)
    # graded generations, best checkpoint, early stopping (lora_core.evaluation.spec);
    # `evaluation.file` is a dataset id, the validation file by default
    evaluation: EvaluationSpec | None = None
    # deploy the final adapter to this serving target once the job succeeds (issue 16)
    deploy: DeployOnSuccess | None = None

    @model_validator(mode="after")
    def _evaluation_has_prompts(self) -> JobRequest:
        ev = self.evaluation
        if ev is not None and ev.file is None and self.validation_file is None:
            raise ValueError("evaluation needs held-out prompts: set validation_file or "
                             "evaluation.file (a dataset id)")
        return self

    @model_validator(mode="after")
    def _method_fits(self) -> JobRequest:
        if self.dpo is not None and self.method != "dpo":
            raise ValueError("dpo settings are read only with method 'dpo'")
        if self.method == "dpo" and (self.distributed.num_processes > 1
                                     or self.distributed.zero_stage):
            raise ValueError("method 'dpo' runs in one process without ZeRO for now: set "
                             "distributed.num_processes 1 and zero_stage 0")
        return self

    @field_validator("metadata")
    @classmethod
    def _metadata_sizes(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not key or len(key) > MAX_METADATA_KEY_CHARS:
                raise ValueError(f"key {key[:20]!r}: 1 to {MAX_METADATA_KEY_CHARS} characters")
            if len(value) > MAX_METADATA_VALUE_CHARS:
                raise ValueError(f"value of {key!r}: at most {MAX_METADATA_VALUE_CHARS} chars")
        return v
