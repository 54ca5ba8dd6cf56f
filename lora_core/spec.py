"""The training spec: the one definition of every field a LoRA run takes.

Shared by the local CLI (`lorajobs train spec.yaml`), the trainer child process and the HTTP
job spec (the API reuses `LoraSpec`, `TrainingSpec`, `DistributedSpec`), so a field means the
same thing everywhere. Torch-free: the API imports this module.

Unknown fields are rejected (`extra="forbid"`), out-of-range values name their field.
Defaults follow the LLMBook recipe where it is sound (r=16, alpha=16, dropout=0.05,
targets = the architecture's default) and deviate where it is not (lr 1e-4, not 1e-5:
1e-5 barely moves a LoRA adapter in a short run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lora_core.evaluation.spec import EvaluationSpec

__all__ = [
    "LoraSpec",
    "TrainingSpec",
    "DistributedSpec",
    "DpoSpec",
    "Method",
    "MergeMode",
    "RunSpec",
    "DATA_FORMATS",
    "SFT_FORMATS",
    "DPO_FORMATS",
    "VLLM_LORA_RANKS",
]

MergeMode = Literal["final", "all", "none"]
# "sft": next-token loss on the response; "dpo": Direct Preference Optimisation on preference
# pairs (lora_core.training.dpo), the reference being the base with the adapter disabled.
Method = Literal["sft", "dpo"]
DATA_FORMATS = ("alpaca", "completion", "chat", "text", "preference")
SFT_FORMATS = ("alpaca", "completion", "chat", "text")  # what method "sft" trains on
DPO_FORMATS = ("preference",)  # what method "dpo" trains on
# Ranks vLLM's punica kernels accept (vllm/config LoRAConfig.max_lora_rank choices).
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)

MAX_RANK = 1024  # beyond this a "low-rank" adapter is a full fine-tune in disguise


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class LoraSpec(_Strict):
    """LoRA hyper-parameters. `target_modules`: names, "all-linear", or None (arch default)."""

    r: int = Field(16, ge=1, le=MAX_RANK)
    alpha: float = Field(16, gt=0, le=1e4)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] | None = None
    use_rslora: bool = False
    init: Literal["gaussian", "kaiming"] = "gaussian"
    modules_to_save: list[str] | None = None

    @field_validator("target_modules")
    @classmethod
    def _non_empty_names(cls, v: list[str] | str | None) -> list[str] | str | None:
        if isinstance(v, list):
            if not v:
                raise ValueError("must name at least one module, or be omitted")
            for name in v:
                if not name or not name.replace("_", "").replace(".", "").isalnum():
                    raise ValueError(f"invalid module name {name!r}")
        return v


class TrainingSpec(_Strict):
    """Optimisation settings. `save_steps=None` saves once per epoch (the book's choice).

    `packing` "auto"/true: each micro-batch of `batch_size` examples is one padding-free row with
    per-example causal attention (lora_core.training.attention), examples drawn in random order;
    false:
    length-grouped batches padded to their longest example. Same examples per step either way.
    """

    epochs: float = Field(2, gt=0, le=1000)
    max_steps: int | None = Field(None, ge=1, le=1_000_000)
    learning_rate: float = Field(1e-4, gt=0, le=1)
    batch_size: int = Field(8, ge=1, le=4096)
    gradient_accumulation_steps: int = Field(2, ge=1, le=1024)
    max_seq_length: int = Field(2048, ge=8, le=262_144)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float = Field(1.0, ge=0, le=1e6)
    seed: int = Field(42, ge=0, le=2**32 - 1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    save_steps: int | None = Field(None, ge=1, le=1_000_000)
    save_total_limit: int | None = Field(None, ge=1, le=1000)
    eval_steps: int | None = Field(None, ge=1, le=1_000_000)
    validation_split: float = Field(0.0, ge=0, lt=1)
    packing: bool | Literal["auto"] = "auto"
    logging_steps: int = Field(1, ge=1, le=100_000)


class DistributedSpec(_Strict):
    """How many processes train one job and with which ZeRO stage (0 = plain DDP/single)."""

    num_processes: int = Field(1, ge=1, le=64)
    zero_stage: Literal[0, 2, 3] = 0


class DpoSpec(_Strict):
    """DPO settings (method "dpo"). The loss is the sigmoid DPO loss of Rafailov et al. 2023,
    -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), with sequence log-probabilities
    summed over the completion tokens; `beta` 0.1 is TRL's and OpenAI's default ("auto")."""

    beta: float = Field(0.1, gt=0, le=100)


class RunSpec(_Strict):
    """A whole local run: paths instead of registered names and dataset ids.

    `output_dir/checkpoints/checkpoint-<step>/` (resumable) and `adapter/` beside it,
    `output_dir/merged/...` for merges, `output_dir/adapter/` for the final adapter.
    """

    model_dir: Path
    train_file: Path
    validation_file: Path | None = None
    data_format: Literal["alpaca", "completion", "chat", "text", "preference"] | None = None
    output_dir: Path
    method: Method = "sft"
    dpo: DpoSpec = Field(default_factory=DpoSpec)  # read only when method is "dpo"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    merge: MergeMode = "final"
    merge_shard_size: str = "2GB"
    resume: bool = True
    # A PEFT adapter dir (adapter_config.json + adapter_model.safetensors) the new adapter
    # starts from instead of the fresh init: training continues an earlier run's adapter. Its
    # r, alpha and target modules must equal `lora` (peft_setup.load_init_adapter checks).
    init_adapter: Path | None = None
    # graded generations at step 0 and every checkpoint, best checkpoint, early stopping
    # (lora_core.evaluation); `evaluation.file` is a path here, else the validation file
    evaluation: EvaluationSpec | None = None

    @model_validator(mode="after")
    def _evaluation_has_prompts(self) -> RunSpec:
        if (self.evaluation is not None and self.evaluation.file is None
                and self.validation_file is None):
            raise ValueError("evaluation needs held-out prompts: set validation_file or "
                             "evaluation.file")
        if self.evaluation is not None and self.method != "sft":
            raise ValueError(f"evaluation runs with method 'sft' (not {self.method!r}) for now")
        return self

    @model_validator(mode="after")
    def _method_fits(self) -> RunSpec:
        """The data format and the method must agree; DPO runs in one process for now."""
        formats = DPO_FORMATS if self.method == "dpo" else SFT_FORMATS
        if self.data_format is not None and self.data_format not in formats:
            raise ValueError(f"data_format {self.data_format!r} does not train with method "
                             f"{self.method!r} (it takes {', '.join(formats)})")
        if self.method == "dpo" and (self.distributed.num_processes > 1
                                     or self.distributed.zero_stage):
            raise ValueError("method 'dpo' runs in one process without ZeRO for now: set "
                             "distributed.num_processes 1 and zero_stage 0")
        return self
