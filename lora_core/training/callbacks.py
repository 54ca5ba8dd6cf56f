"""Trainer hooks and the checkpoint layout they maintain.

    output_dir/checkpoints/checkpoint-<step>/          Trainer's resumable checkpoint (adapter,
        adapter/                                       optimizer, scheduler, RNG, trainer_state)
        COMPLETE                                       written last: only such dirs are resumed

A kill during a save leaves a dir without COMPLETE; `find_resumable_checkpoint` skips it and
`remove_incomplete_checkpoints` deletes it before a resumed run writes the same step again.

`EventCallback` turns Trainer logs into progress/eval events; `StopCallback` polls the
cooperative stop flag each step (agreed across ranks); `CheckpointCallback` exports the
adapter (gathered under ZeRO-3) and seals each checkpoint.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from lora_core.errors import TrainingError

__all__ = [
    "COMPLETE_MARKER",
    "EventCallback",
    "StopCallback",
    "CheckpointCallback",
    "list_checkpoints",
    "find_resumable_checkpoint",
    "remove_incomplete_checkpoints",
    "export_adapter",
]

COMPLETE_MARKER = "COMPLETE"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
# TRL's DPOTrainer log keys -> our ProgressEvent fields (lora_core.events)
DPO_LOG_FIELDS = {"rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected",
                  "rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy"}
Emit = Callable[..., None]


def list_checkpoints(root: Path, *, complete_only: bool = True) -> list[dict[str, Any]]:
    """[{step, path, adapter_path}] sorted by step; only sealed ones unless told otherwise."""
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = _CKPT_RE.match(d.name)
            if m and d.is_dir() and (not complete_only or (d / COMPLETE_MARKER).exists()):
                found.append({"step": int(m.group(1)), "path": d, "adapter_path": d / "adapter"})
    return sorted(found, key=lambda c: c["step"])


def find_resumable_checkpoint(root: Path) -> Path | None:
    """The newest sealed checkpoint dir under `root`, or None."""
    ckpts = list_checkpoints(root)
    return ckpts[-1]["path"] if ckpts else None


def remove_incomplete_checkpoints(root: Path) -> list[Path]:
    """Delete checkpoint dirs that lack COMPLETE (a save was interrupted); return them."""
    removed = []
    for c in list_checkpoints(root, complete_only=False):
        if not (c["path"] / COMPLETE_MARKER).exists():
            shutil.rmtree(c["path"], ignore_errors=True)
            removed.append(c["path"])
    return removed


def _zero3_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Trainable parameters partitioned by ZeRO-3 (they carry `ds_id`); empty otherwise."""
    return [p for p in model.parameters() if p.requires_grad and hasattr(p, "ds_id")]


def export_adapter(model: Any, out_dir: Path, *, is_main: bool = True) -> None:
    """Save the PEFT adapter (adapter_config.json + adapter_model.safetensors) to `out_dir`.

    Under ZeRO-3 each rank holds a shard of every LoRA matrix and a plain save writes 0-sized
    tensors, so the trainable params are gathered first; every rank must call this (the gather
    is a collective), only `is_main` writes.
    """
    partitioned = _zero3_params(model)
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            if is_main:
                _save_peft(model, out_dir)
    elif is_main:
        _save_peft(model, out_dir)


def _save_peft(model: Any, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)


class EventCallback(TrainerCallback):
    """Trainer logs -> on_event("progress"|"eval"); raises TrainingError on a NaN/Inf loss.

    Emits "started" on train begin with `started` fields added (resumed_from_step, ...).
    `token_counter()` returns loss-bearing tokens emitted by this rank's collator so far;
    tokens/s = its growth between logs x world_size; `tokens_seen` in each progress event is the
    running total (x world_size), which lets a benchmark time any window of steps exactly.
    """

    def __init__(
        self, emit: Emit, token_counter: Callable[[], int], world_size: int = 1,
        started: dict[str, Any] | None = None,
    ):
        self.emit = emit
        self.started = started or {}
        self.token_counter = token_counter
        self.world_size = world_size
        self.last_loss: float | None = None
        self.last_eval_loss: float | None = None
        self.train_loss: float | None = None
        self._t0 = self._t_last = time.monotonic()
        self._step0 = 0
        self._tokens_last = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = self._t_last = time.monotonic()
        self._step0 = state.global_step
        self._tokens_last = self.token_counter()
        if state.is_world_process_zero:
            self.emit("started", total_steps=state.max_steps, world_size=self.world_size,
                      **self.started)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "eval_loss" in logs:
            self.last_eval_loss = float(logs["eval_loss"])
            if state.is_world_process_zero:
                self.emit("eval", step=state.global_step, eval_loss=self.last_eval_loss)
        if "train_loss" in logs:
            self.train_loss = float(logs["train_loss"])
        if "loss" not in logs:
            return
        loss = float(logs["loss"])
        if not math.isfinite(loss):
            raise TrainingError(f"loss became {loss} at step {state.global_step}", param="loss")
        self.last_loss = loss
        now = time.monotonic()
        tokens = self.token_counter()
        tps = (tokens - self._tokens_last) * self.world_size / max(now - self._t_last, 1e-9)
        self._t_last, self._tokens_last = now, tokens
        done = state.global_step - self._step0
        per_step = (now - self._t0) / done if done > 0 else None
        eta = per_step * (state.max_steps - state.global_step) if per_step is not None else None
        if state.is_world_process_zero:
            self.emit(
                "progress", step=state.global_step, total_steps=state.max_steps,
                epoch=logs.get("epoch", state.epoch), loss=loss,
                learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                tokens_per_second=round(tps, 1), eta_seconds=None if eta is None else round(eta, 1),
                tokens_seen=tokens * self.world_size,
                **{ours: float(logs[theirs]) for theirs, ours in DPO_LOG_FIELDS.items()
                   if theirs in logs},
            )


class StopCallback(TrainerCallback):
    """Polls `should_stop()` after every step; on True: save a checkpoint, then stop.

    With several ranks the flag is all-reduced (max) so every rank stops at the same step:
    a rank that stopped alone would hang the others in their next collective.
    """

    def __init__(self, should_stop: Callable[[], bool] | None):
        self.should_stop = should_stop
        self.stopped = False

    def _agreed(self, local: bool) -> bool:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([int(local)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self.should_stop is None:
            return
        if self._agreed(bool(self.should_stop())):
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        # A stop ends the epoch loop, and with save_strategy "epoch" (save_steps unset: every
        # job from /openai/v1) Trainer's on_epoch_end asks for a save again: the same step
        # saved twice, two checkpoint events, whose uploads clobbered each other (issue 13).
        if self.stopped:
            control.should_save = False


class CheckpointCallback(TrainerCallback):
    """After Trainer's save: export the adapter beside it, write COMPLETE, emit "checkpoint"."""

    def __init__(self, root: Path, emit: Emit):
        self.root = root
        self.emit = emit
        self.saved: list[dict[str, Any]] = []
        self._step_ended: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        # Trainer saves after on_step_end (in _maybe_log_save_evaluate): the save's stall is
        # measured from here to the seal.
        self._step_ended = time.monotonic()

    def on_save(self, args, state, control, model=None, **kwargs):
        path = self.root / f"checkpoint-{state.global_step}"
        adapter = path / "adapter"
        is_main = state.is_world_process_zero
        export_adapter(model, adapter, is_main=is_main)
        _barrier()
        if is_main:
            (path / COMPLETE_MARKER).write_text(f"{state.global_step}\n", encoding="utf-8")
            entry = {"step": state.global_step, "path": str(path), "adapter_path": str(adapter)}
            self.saved.append(entry)
            stall = (time.monotonic() - self._step_ended) if self._step_ended else None
            self.emit("checkpoint", **entry, resumable=True,
                      save_seconds=None if stall is None else round(stall, 4))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
