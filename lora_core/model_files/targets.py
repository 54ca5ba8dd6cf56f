"""Which modules a LoRA spec targets in a model, checked against its headers (torch-free).

PEFT's matching rule, the embeddings/`modules_to_save` split and every shape check a spec
needs before a weight is loaded; the model's facts come from `headers.inspect_model_dir`.
"""

from __future__ import annotations

import os
from typing import Any

from lora_core.errors import SpecError
from lora_core.model_files.headers import (
    DEFAULT_TARGET_MODULES,
    OUTPUT_HEADS,
    ModelInfo,
    inspect_model_dir,
)

__all__ = ["matches", "resolve_target_modules", "validate_lora_spec"]


def _as_info(info_or_dir: ModelInfo | str | os.PathLike[str]) -> ModelInfo:
    return info_or_dir if isinstance(info_or_dir, ModelInfo) else inspect_model_dir(info_or_dir)


def matches(module: str, name: str) -> bool:
    """PEFT's rule: `name` targets `module` if equal or a dotted suffix (`...self_attn.q_proj`)."""
    return module == name or module.endswith("." + name)


def resolve_target_modules(
    info_or_dir: ModelInfo | str | os.PathLike[str],
    target_modules: list[str] | str | None,
) -> list[str]:
    """Turn the spec's `target_modules` into explicit names that exist in the model.

    None -> the architecture's default (PEFT's table); "all-linear" -> every linear leaf name
    except output heads and embeddings; names -> checked, SpecError lists the available ones.
    """
    info = _as_info(info_or_dir)
    available = [n for n in info.linear_names if n not in OUTPUT_HEADS]
    if target_modules is None:
        default = DEFAULT_TARGET_MODULES.get(info.model_type or "")
        if default is None:
            raise SpecError(
                f"no default target modules for model_type {info.model_type!r}; "
                f"set lora.target_modules, available: {available}",
                param="lora.target_modules",
                value=None,
            )
        target_modules = default
    elif target_modules == "all-linear":
        return available
    elif isinstance(target_modules, str):
        target_modules = [target_modules]
    unknown = [t for t in target_modules if not any(matches(m, t) for m in info.linear_shapes)]
    if unknown:
        raise SpecError(
            f"unknown target module(s) {unknown}; available linear modules: {available}",
            param="lora.target_modules",
            value=unknown,
        )
    return list(target_modules)


def _spec_field(spec: Any, name: str) -> Any:
    return spec.get(name) if isinstance(spec, dict) else getattr(spec, name, None)


def validate_lora_spec(lora_spec: Any, model_info: ModelInfo | str | os.PathLike[str]) -> list[str]:
    """Check a LoraSpec (or dict) against a model; collect every problem, raise one SpecError.

    Checks what pydantic cannot: targets exist, modules_to_save exist, and r <= min(d_in, d_out)
    of every target (a rank above that adds parameters without adding expressiveness).
    Returns the resolved target names.
    """
    info = _as_info(model_info)
    problems: list[tuple[str, Any, str]] = []  # (param, value, message)
    targets: list[str] = []
    try:
        targets = resolve_target_modules(info, _spec_field(lora_spec, "target_modules"))
    except SpecError as exc:
        problems.append((exc.param or "lora.target_modules", exc.value, exc.message))
    for name in _spec_field(lora_spec, "modules_to_save") or []:
        if not any(matches(m, name) for m in info.module_names):
            problems.append(
                ("lora.modules_to_save", name, f"modules_to_save {name!r} not found in the model")
            )
    r = _spec_field(lora_spec, "r")
    if r is not None and targets:
        limit = min(
            min(shape)
            for module, shape in info.linear_shapes.items()
            if any(matches(module, t) for t in targets)
        )
        if r > limit:
            problems.append(
                ("lora.r", r, f"r={r} exceeds min(d_in, d_out)={limit} of the targeted modules")
            )
    if problems:
        param, value, _ = problems[0]
        message = "; ".join(f"{p}: {m}" for p, _, m in problems)
        raise SpecError(message, param=param, value=value)
    return targets
