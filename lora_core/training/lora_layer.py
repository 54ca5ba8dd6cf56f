"""Our own LoRA layer, written to the PEFT file format.

    x ──► W (frozen, d_out x d_in) ─────────────────────────────┐
    │                                                           (+) ──► y
    └──► dropout ──► A (r x d_in) ──► B (d_out x r) ──► · s ──┘

    y = W x + s · B A dropout(x),   s = alpha / r   (rsLoRA: alpha / sqrt(r))

The LLMBook's layer omits s; PEFT applies it, and so do we, so an adapter trained here means the
same thing when loaded by PEFT (`PeftModel.from_pretrained`) or vLLM. A ~ N(0, 0.02) and B = 0,
so an untouched adapter reproduces the base model exactly. Merging folds s·BA into W, computing
the delta in fp32 and rounding once to W's dtype (rounding twice loses ~1 bf16 step on a fifth
of the elements).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_core.errors import ModelError, SpecError

__all__ = [
    "LoRALinear",
    "inject_lora",
    "lora_state_dict",
    "save_adapter",
    "load_adapter",
    "adapter_config_dict",
    "GAUSSIAN_INIT_STD",
    "PEFT_PREFIX",
]

GAUSSIAN_INIT_STD = 0.02  # A ~ N(0, 0.02): the LLMBook's init (PEFT's "gaussian" uses 1/r)
PEFT_PREFIX = "base_model.model."  # what PeftModel prepends to every module path on save
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OUTPUT_HEADS = ("lm_head",)  # never wrapped by "all-linear" (PEFT excludes the output layer)


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update. x: (..., d_in) -> (..., d_out)."""

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "gaussian",
    ) -> None:
        super().__init__()
        if r < 1:
            raise SpecError(f"r must be >= 1, got {r}", param="lora.r", value=r)
        self.base = base
        self.base.requires_grad_(False)
        d_in, d_out = base.in_features, base.out_features
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Linear(d_in, r, bias=False, **factory)  # weight: (r, d_in)
        self.lora_b = nn.Linear(r, d_out, bias=False, **factory)  # weight: (d_out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.merged = False
        self._unmerged_weight: torch.Tensor | None = None
        self.reset_lora_parameters(init)

    def reset_lora_parameters(self, init: str = "gaussian") -> None:
        """A ~ N(0, 0.02) ("gaussian") or PEFT's kaiming_uniform(a=sqrt(5)); B = 0."""
        if init == "gaussian":
            nn.init.normal_(self.lora_a.weight, mean=0.0, std=GAUSSIAN_INIT_STD)
        elif init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        else:
            raise SpecError(f"unknown init {init!r}", param="lora.init", value=init)
        nn.init.zeros_(self.lora_b.weight)

    def delta_weight(self) -> torch.Tensor:
        """s · B A in fp32, shape (d_out, d_in): the update merge() folds into W."""
        return self.scaling * (self.lora_b.weight.float() @ self.lora_a.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) -> (..., d_out). After merge() the LoRA path is already inside W."""
        y = self.base(x)
        if self.merged:
            return y
        return y + self.lora_b(self.lora_a(self.dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """W <- round(W + s·BA), added in fp32 and rounded once to W's dtype.

        `keep_original` stashes W so unmerge() restores it bit for bit; without it unmerge()
        subtracts the delta, exact only up to one rounding.
        """
        if self.merged:
            return
        w = self.base.weight
        merged = w.float() + self.delta_weight()
        if not torch.isfinite(merged).all():
            raise ModelError("merge produced NaN/Inf: the adapter weights are not finite")
        self._unmerged_weight = w.detach().clone() if keep_original else None
        w.copy_(merged.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): restore the stashed W, or subtract s·BA in fp32 and round once."""
        if not self.merged:
            return
        w = self.base.weight
        if self._unmerged_weight is not None:
            w.copy_(self._unmerged_weight)
            self._unmerged_weight = None
        else:
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def _is_target(name: str, targets: list[str] | str) -> bool:
    if targets == "all-linear":
        return name.rsplit(".", 1)[-1] not in OUTPUT_HEADS
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_lora(
    model: nn.Module,
    target_modules: list[str] | str,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str = "gaussian",
) -> list[str]:
    """Wrap every matching nn.Linear in LoRALinear and freeze all other parameters.

    A name matches as in PEFT: equal to a target or ending in "." + target ("all-linear":
    every linear but lm_head). Returns the wrapped module paths; SpecError if none match.
    """
    model.requires_grad_(False)
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and _is_target(n, target_modules)
    ]
    if not names:
        raise SpecError(
            f"no nn.Linear matches target_modules {target_modules!r}",
            param="lora.target_modules",
            value=target_modules,
        )
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = LoRALinear(getattr(parent, leaf), r, alpha, dropout, use_rslora, init)
        setattr(parent, leaf, wrapped)
    # read back by save_adapter; ignore: torch types a Module's attributes as Tensor | Module
    model._lora_settings = {  # type: ignore[assignment]
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": use_rslora,
        "target_modules": target_modules, "init": init,
    }  # fmt: skip
    return names


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A and B of every LoRALinear under PEFT's key names (no adapter-name segment).

    `<path>.lora_a.weight` -> `base_model.model.<path>.lora_A.weight`, (r, d_in);
    `<path>.lora_b.weight` -> `base_model.model.<path>.lora_B.weight`, (d_out, r).
    """
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            prefix = f"{PEFT_PREFIX}{name}"
            out[f"{prefix}.lora_A.weight"] = module.lora_a.weight.detach().contiguous().cpu()
            out[f"{prefix}.lora_B.weight"] = module.lora_b.weight.detach().contiguous().cpu()
    return out


def adapter_config_dict(
    base_model_name_or_path: str,
    *,
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    target_modules: list[str] | str,
    use_rslora: bool = False,
    init: str = "gaussian",
    modules_to_save: list[str] | None = None,
) -> dict[str, Any]:
    """The adapter_config.json PEFT 0.21 writes for a plain LoRA (fields it needs to load it)."""
    return {
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": init if init == "gaussian" else True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": lora_alpha,
        "lora_bias": False,
        "lora_dropout": lora_dropout,
        "modules_to_save": modules_to_save,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
        "target_modules": (
            target_modules if isinstance(target_modules, str) else sorted(target_modules)
        ),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": use_rslora,
    }


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    base_model_name_or_path: str,
    **config_fields: Any,
) -> Path:
    """Write adapter_config.json + adapter_model.safetensors in PEFT's format.

    `config_fields` override the settings recorded by inject_lora (r, lora_alpha, ...).
    """
    from safetensors.torch import save_file

    settings = {**getattr(model, "_lora_settings", {}), **config_fields}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = adapter_config_dict(base_model_name_or_path, **settings)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(lora_state_dict(model), str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike[str]) -> list[str]:
    """Inject LoRA as adapter_config.json says and load its weights. Returns wrapped paths."""
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    config = json.loads((d / ADAPTER_CONFIG).read_text("utf-8"))
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise ModelError(f"{d} is not a plain LoRA adapter (peft_type={config.get('peft_type')})")
    init = config.get("init_lora_weights")
    names = inject_lora(
        model,
        config["target_modules"],
        r=config["r"],
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout", 0.0),
        use_rslora=config.get("use_rslora", False),
        init=init if init == "gaussian" else "kaiming",
    )
    state = load_file(str(d / ADAPTER_WEIGHTS))
    expected = lora_state_dict(model).keys()
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ModelError(
            f"adapter does not match the model: missing {missing[:3]}, extra {extra[:3]}"
        )
    for name in names:
        module = model.get_submodule(name)
        assert isinstance(module, LoRALinear)
        with torch.no_grad():
            module.lora_a.weight.copy_(state[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            module.lora_b.weight.copy_(state[f"{PEFT_PREFIX}{name}.lora_B.weight"])
    return names
