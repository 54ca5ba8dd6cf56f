"""The PEFT side of a run: a validated LoraConfig, a safely loaded base model, get_peft_model.

Order matters: the spec is checked against the model's safetensors headers (lora_core.model_files)
BEFORE a single weight is loaded, so a typo in `target_modules` fails in milliseconds with the
list of valid names instead of after minutes of loading. Loading is safetensors-only and never
runs remote code.

Init: PEFT's `init_lora_weights="gaussian"` draws A ~ N(0, 1/r), not the N(0, 0.02) we
document (the LLMBook's init). For "gaussian" we let PEFT build the layers and then redraw A
with std GAUSSIAN_INIT_STD ourselves; "kaiming" is PEFT's default (`init_lora_weights=True`).
B = 0 either way, so the wrapped model starts exactly at the base model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lora_core.errors import ModelError, SpecError
from lora_core.model_files import ModelInfo, inspect_model_dir, validate_lora_spec
from lora_core.spec import LoraSpec
from lora_core.training.lora_layer import GAUSSIAN_INIT_STD

__all__ = ["build_lora_config", "load_base_model", "apply_lora", "reinit_lora_a",
           "load_init_adapter", "DTYPES"]

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip


def build_lora_config(
    lora_spec: LoraSpec, model_dir: str | os.PathLike[str] | ModelInfo
) -> Any:  # -> peft.LoraConfig
    """A peft.LoraConfig for `lora_spec`, validated against the model's headers first.

    Raises SpecError (every problem at once) or ModelError; loads no weights.
    """
    from peft import LoraConfig, TaskType

    info = model_dir if isinstance(model_dir, ModelInfo) else inspect_model_dir(model_dir)
    targets = validate_lora_spec(lora_spec, info)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora_spec.r,
        lora_alpha=lora_spec.alpha,  # type: ignore[arg-type]  # peft says int; it only divides it
        lora_dropout=lora_spec.dropout,
        target_modules=targets,
        use_rslora=lora_spec.use_rslora,
        init_lora_weights=True,  # "gaussian" is redrawn by apply_lora (see module docstring)
        modules_to_save=lora_spec.modules_to_save,
        bias="none",
    )


def _torch_dtype(dtype: str | torch.dtype | None, info: ModelInfo) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = info.dtype if dtype in (None, "auto") else dtype
    if name not in DTYPES:
        raise SpecError(f"unsupported dtype {name!r}", param="training.precision", value=name)
    return DTYPES[name]


def load_base_model(
    model_dir: str | os.PathLike[str], dtype: str | torch.dtype | None = "auto"
) -> Any:  # -> transformers.PreTrainedModel
    """Load a causal LM from local safetensors only: no hub, no pickle, no remote code.

    `dtype`: "auto" (the weights' dtype), a name ("bf16", "float32", ...) or a torch.dtype.
    """
    from transformers import AutoModelForCausalLM

    info = inspect_model_dir(model_dir)  # refuses pickle-only / corrupt dirs before torch loads
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            dtype=_torch_dtype(dtype, info),
            use_safetensors=True,
            trust_remote_code=False,
            local_files_only=True,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load the model in {model_dir}: {exc}") from exc


@torch.no_grad()
def reinit_lora_a(peft_model: Any, std: float = GAUSSIAN_INIT_STD) -> int:
    """Redraw every lora_A weight ~ N(0, std) (B stays 0). Returns how many were redrawn."""
    count = 0
    for name, param in peft_model.named_parameters():
        if ".lora_A." in name:
            param.normal_(mean=0.0, std=std)
            count += 1
    return count


def apply_lora(model: Any, lora_spec: LoraSpec, model_dir: str | os.PathLike[str],
               init_adapter: str | os.PathLike[str] | None = None) -> Any:
    """Wrap `model` with get_peft_model (freezes all but the adapters); returns the PeftModel.
    `init_adapter`: a PEFT adapter dir whose weights replace the fresh init."""
    from peft import get_peft_model

    config = build_lora_config(lora_spec, model_dir)
    peft_model = get_peft_model(model, config)
    if lora_spec.init == "gaussian":
        reinit_lora_a(peft_model)
    if init_adapter is not None:
        load_init_adapter(peft_model, lora_spec, Path(init_adapter))
    return peft_model


def _targets(value: Any) -> list[str] | None:
    return sorted(value) if isinstance(value, list | set | tuple) else None


def load_init_adapter(peft_model: Any, lora_spec: LoraSpec, adapter_dir: Path) -> int:
    """Copy an adapter's weights into `peft_model` (built from `lora_spec`); returns how many
    tensors were loaded. The adapter's config must match the spec (SpecError naming the
    field) and every LoRA weight must be present with its shape (ModelError otherwise): a
    partial load would silently train from a mix of old and fresh weights."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    config_file = adapter_dir / "adapter_config.json"
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise ModelError(f"init_adapter {adapter_dir} is not a PEFT adapter dir (needs "
                         "adapter_config.json and adapter_model.safetensors)")
    config = json.loads(config_file.read_text())
    wanted: list[tuple[str, str, Any]] = [
        ("lora.r", "r", lora_spec.r), ("lora.alpha", "lora_alpha", lora_spec.alpha),
        ("lora.use_rslora", "use_rslora", lora_spec.use_rslora)]
    mismatched = [(field, config.get(key), want) for field, key, want in wanted
                  if config.get(key, want) != want]
    ours = _targets(getattr(peft_model.peft_config["default"], "target_modules", None))
    if ours is not None and _targets(config.get("target_modules")) not in (None, ours):
        mismatched.append(("lora.target_modules", config.get("target_modules"), ours))
    if mismatched:
        field, theirs, want = mismatched[0]
        raise SpecError("; ".join(f"{f}: the init adapter has {t!r}, the spec {w!r}"
                                  for f, t, w in mismatched), param=field, value=want)
    state = load_file(str(weights_file))
    ours_lora = {k for k, _ in peft_model.named_parameters() if ".lora_" in k}
    try:
        result: Any = set_peft_model_state_dict(peft_model, state)
    except RuntimeError as exc:  # a shape mismatch
        raise ModelError(f"init_adapter {adapter_dir} does not fit the model: {exc}") from exc
    missing = sorted(k for k in result.missing_keys if k in ours_lora)
    if missing or result.unexpected_keys:
        raise ModelError(f"init_adapter {adapter_dir} does not fit the model: missing "
                         f"{missing[:3]}, unexpected {list(result.unexpected_keys)[:3]}")
    return len(state)
