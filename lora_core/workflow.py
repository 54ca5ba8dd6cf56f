"""The whole job: validate -> train -> save -> merge -> verify, reported as stage events
(`events.Stage`; every event's fields: lora_core.events).

    stage preparing   model headers, LoRA spec, every data line (inside `train`, before output)
    stage training    train(); progress / eval / checkpoint events
    stage saving      final adapter + checkpoint adapters get a sha256 manifest
    stage merging     spec.merge: "final" -> merged/final; "all" -> merged/checkpoint-<step>
                      for every sealed checkpoint and merged/final; "none" -> nothing
    stage verifying   each merged dir: manifest re-hashed, safetensors headers readable
    finished          {status, adapter_path, metrics}

Merging runs once, on rank 0, after the process group (and any ZeRO-3 hooks) is torn down:
ZeRO-3 would otherwise partition the weights the merge loads. merge_adapter itself checks the
merged logits against base+adapter (`max_abs_diff` in each "merged" event). A stopped run
(cooperative cancel) is not merged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_core.errors import MergeError
from lora_core.events import Stage
from lora_core.spec import RunSpec

__all__ = ["PipelineResult", "run", "MERGED_DIR"]

MERGED_DIR = "merged"
OnEvent = Callable[..., None]


@dataclass
class PipelineResult:
    """`merged`: [{step, path, max_abs_diff, files}] ("final" has step = the final step)."""

    status: str
    adapter_path: Path
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    merged: list[dict[str, Any]] = field(default_factory=list)
    global_step: int = 0


def _noop(type_: str, **fields: Any) -> None:
    return None


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run(
    spec: RunSpec,
    on_event: OnEvent | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PipelineResult:
    """Train per `spec`, then merge per `spec.merge` on rank 0; see the module docstring."""
    from lora_core.training.trainer import train

    emit = on_event if on_event is not None and _is_main() else _noop
    emit("stage", stage=Stage.PREPARING)
    stages = _StageEmitter(emit)
    result = train(spec, on_event=stages, should_stop=should_stop)
    _teardown_distributed()
    out = PipelineResult(result.status, result.adapter_path, result.checkpoints,
                         result.metrics, [], result.global_step)
    if not _is_main():
        return out
    emit("stage", stage=Stage.SAVING)
    _write_manifests(out)
    if result.status == "completed" and spec.merge != "none":
        out.merged = _merge_all(spec, out, emit)
    emit("finished", status=out.status, adapter_path=str(out.adapter_path), metrics=out.metrics,
         merged=[m["path"] for m in out.merged])
    return out


class _StageEmitter:
    """Forwards train()'s events, inserting stage=training before its first "started"."""

    def __init__(self, emit: OnEvent) -> None:
        self.emit = emit
        self.training = False

    def __call__(self, type_: str, **fields: Any) -> None:
        if type_ == "started" and not self.training:
            self.training = True
            self.emit("stage", stage=Stage.TRAINING)
        self.emit(type_, **fields)


def _teardown_distributed() -> None:
    """Leave no process group or HF ZeRO-3 hook behind: merging loads whole weights."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except (ImportError, RuntimeError):
        pass
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    except ImportError:
        pass


def _write_manifests(result: PipelineResult) -> None:
    from lora_core.model_files.manifest import write_manifest

    write_manifest(result.adapter_path)
    for c in result.checkpoints:
        if Path(c["adapter_path"]).exists():
            write_manifest(c["adapter_path"])


def _merge_all(spec: RunSpec, result: PipelineResult, emit: OnEvent) -> list[dict[str, Any]]:
    """Merge the final adapter (and every checkpoint for "all"), then verify each output."""
    from lora_core.merging.merge import merge_adapter

    root = Path(spec.output_dir) / MERGED_DIR
    jobs: list[tuple[int, Path, Path]] = []
    if spec.merge == "all":
        jobs += [(c["step"], Path(c["adapter_path"]), root / f"checkpoint-{c['step']}")
                 for c in result.checkpoints]
    jobs.append((result.global_step, result.adapter_path, root / "final"))
    emit("stage", stage=Stage.MERGING)
    merged: list[dict[str, Any]] = []
    for step, adapter, target in jobs:
        res = merge_adapter(spec.model_dir, adapter, target, max_shard_size=spec.merge_shard_size,
                            verify=True, overwrite=True)
        entry: dict[str, Any] = {"step": step, "path": str(res.out_dir),
                                 "max_abs_diff": res.max_abs_diff, "files": res.files}
        emit("merged", **entry, final=adapter == result.adapter_path)
        merged.append(entry)
    emit("stage", stage=Stage.VERIFYING)
    for entry in merged:
        _verify_output(Path(entry["path"]))
    return merged


def _verify_output(merged_dir: Path) -> None:
    """The published dir still matches its manifest and its headers parse (cheap: no weights)."""
    from lora_core.model_files import inspect_model_dir
    from lora_core.model_files.manifest import verify_manifest

    problems = verify_manifest(merged_dir)
    if problems:
        raise MergeError(f"{merged_dir}: manifest mismatch: {problems[:5]}")
    inspect_model_dir(merged_dir)
