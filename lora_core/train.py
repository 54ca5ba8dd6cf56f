"""Train a LoRA adapter from a RunSpec with HF Trainer + PEFT (+ DeepSpeed ZeRO when asked).

Order of work, so that a bad input costs nothing and leaves nothing behind:

    1. validate   model dir (safetensors headers), lora spec, every data line, tokenisation
    2. create     output_dir (only now), resume point (newest sealed checkpoint)
    3. load       base model + LoRA; Trainer with our callbacks
    4. train      progress/eval/checkpoint events; cooperative stop -> checkpoint + "stopped"
    5. export     final adapter to output_dir/adapter/

Precision "auto" = bf16 on a CUDA GPU that supports it, fp32 otherwise. bf16 on CPU runs fp32
weights under bf16 autocast (FACTS.md: 1.2-1.7x). Events go through `on_event(type, **fields)`
on rank 0 only.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_core.errors import ModelError, SpecError
from lora_core.spec import RunSpec

__all__ = ["TrainResult", "PreparedData", "train", "prepare_data", "resolve_precision"]

OnEvent = Callable[..., None]
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
# Packing "auto": off. Measured on this CPU (FACTS.md, fp32): dynamic padding grouped by length
# 1,490 useful tok/s vs packed rows 1,624 (+9%), while packed rows cannot be evaluated with a
# KV cache and need a 4D mask; the gain is not worth the risk as a default.
PACKING_AUTO = False
MAX_WARMUP_RATIO = 0.999  # TrainingArguments.warmup_steps reads values >= 1 as a step count


@dataclass
class TrainResult:
    """What a run produced. `checkpoints`: [{step, path, adapter_path}] of sealed checkpoints."""

    status: str  # "completed" | "stopped"
    adapter_path: Path
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float | None] = field(default_factory=dict)
    global_step: int = 0
    resumed_from_step: int | None = None


@dataclass
class PreparedData:
    """Tokenised train/eval features (lists of {input_ids, labels, attention_mask})."""

    tokenizer: Any
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]] | None
    format: str
    num_examples: int
    num_tokens: int
    num_dropped: int
    num_truncated: int


def _noop(type_: str, **fields: Any) -> None:
    return None


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_precision(precision: str) -> str:
    """"auto" -> "bf16" on CUDA with bf16 support, else "fp32"; fp16 needs a GPU."""
    import torch

    cuda = torch.cuda.is_available()
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not cuda:
        raise SpecError("fp16 needs a CUDA GPU; use bf16 or fp32 on CPU",
                        param="training.precision", value=precision)
    return precision


def validate_model(spec: RunSpec) -> Any:
    """Headers-only model + LoRA checks (ModelError / SpecError); returns the ModelInfo."""
    from lora_core.inspect import inspect_model_dir, validate_lora_spec

    info = inspect_model_dir(spec.model_dir)
    validate_lora_spec(spec.lora, info)
    return info


def prepare_data(spec: RunSpec, on_event: OnEvent = _noop) -> PreparedData:
    """Read, validate and tokenise the data; DatasetError before any model weight is loaded."""
    from transformers import AutoTokenizer

    from lora_core.data.formats import load_examples
    from lora_core.data.tokenize import tokenize_examples

    fmt, examples = load_examples(spec.train_file, spec.data_format)
    val_examples = None
    if spec.validation_file is not None:
        _, val_examples = load_examples(spec.validation_file, spec.data_format or fmt)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(spec.model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer in {spec.model_dir}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_len = spec.training.max_seq_length
    train, stats = tokenize_examples(examples, tokenizer, max_len)
    if stats.num_dropped:
        on_event("warning", message=f"{stats.num_dropped} training example(s) dropped: no "
                 f"response token within max_seq_length={max_len}")
    evals = tokenize_examples(val_examples, tokenizer, max_len)[0] if val_examples else None
    if evals is None and spec.training.validation_split > 0:
        train, evals = _split(train, spec.training.validation_split, spec.training.seed)
    return PreparedData(tokenizer, train, evals, fmt, len(train), stats.num_tokens,
                        stats.num_dropped, stats.num_truncated)


def _split(feats: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic train/eval split; at least one example on each side."""
    import random

    order = list(range(len(feats)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(feats) * fraction)), len(feats) - 1)
    if n_eval < 1:
        raise SpecError("validation_split needs at least 2 examples",
                        param="training.validation_split", value=fraction)
    return [feats[i] for i in order[n_eval:]], [feats[i] for i in order[:n_eval]]


def build_training_args(
    spec: RunSpec, precision: str, *, has_eval: bool, packing: bool,
    deepspeed: dict[str, Any] | None = None,
) -> Any:  # -> transformers.TrainingArguments
    """TrainingArguments from the spec: saves to output_dir/checkpoints, no hub, no tqdm."""
    import torch
    from transformers import TrainingArguments

    t = spec.training
    eval_kw: dict[str, Any] = {"eval_strategy": "no"}
    if has_eval:
        eval_kw = {"eval_strategy": "steps" if t.eval_steps else "epoch",
                   "eval_steps": t.eval_steps, "per_device_eval_batch_size": t.batch_size}
    return TrainingArguments(
        output_dir=str(Path(spec.output_dir) / CHECKPOINTS_DIR),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        # 5.x: a float < 1 is a ratio of total steps (warmup_ratio is gone); 1.0 would mean 1 step
        warmup_steps=min(t.warmup_ratio, MAX_WARMUP_RATIO),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        save_strategy="steps" if t.save_steps else "epoch",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        logging_strategy="steps",
        logging_nan_inf_filter=False,  # a NaN loss must reach EventCallback, not be averaged away
        train_sampling_strategy="random" if packing else "group_by_length",
        remove_unused_columns=False,  # our collators build the model inputs themselves
        dataloader_num_workers=0,  # the collator's token counter must live in this process
        report_to=[],
        disable_tqdm=True,
        deepspeed=deepspeed,
        **eval_kw,
    )


def _load_model(spec: RunSpec, precision: str) -> Any:
    """Base model + LoRA, seeded. Weights stay fp32 on CPU (bf16 runs as autocast there)."""
    import torch
    from transformers import set_seed

    from lora_core.peft_setup import apply_lora, load_base_model

    set_seed(spec.training.seed)  # LoRA A init and dropout must not depend on the caller
    dtype = "bf16" if precision == "bf16" and torch.cuda.is_available() else "float32"
    model = load_base_model(spec.model_dir, dtype=dtype)
    model.config.use_cache = False  # no KV cache while training; packed rows forbid it anyway
    return apply_lora(model, spec.lora, spec.model_dir)


def _collator(spec: RunSpec, tokenizer: Any, precision: str) -> Any:
    import torch

    from lora_core.data.collate import PackingCollator, PaddingCollator

    packing = spec.training.packing
    if packing is True or (packing == "auto" and PACKING_AUTO):
        mask_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return PackingCollator(tokenizer.pad_token_id, spec.training.max_seq_length, mask_dtype)
    return PaddingCollator(tokenizer.pad_token_id)


def _prepare_output_dir(spec: RunSpec) -> tuple[Path | None, int | None]:
    """Create output_dir; return (checkpoint to resume from, its step)."""
    from lora_core.callbacks import (
        find_resumable_checkpoint,
        list_checkpoints,
        remove_incomplete_checkpoints,
    )

    out = Path(spec.output_dir)
    root = out / CHECKPOINTS_DIR
    if not spec.resume and (list_checkpoints(root) or (out / ADAPTER_DIR).exists()):
        raise SpecError(f"output_dir {out} already holds a run; set resume=true or pick another",
                        param="output_dir", value=str(out))
    if rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        remove_incomplete_checkpoints(root)  # a kill mid-save left these; never resume them
    ckpt = find_resumable_checkpoint(root) if spec.resume else None
    return ckpt, int(ckpt.name.split("-")[1]) if ckpt else None


def train(
    spec: RunSpec,
    *,
    on_event: OnEvent | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Run the whole training described by `spec`; see the module docstring for the order.

    Raises ModelError/SpecError/DatasetError before anything is written, TrainingError on a
    NaN loss. A dir this call created is removed again if it fails before a checkpoint exists.
    """
    from lora_core.deepspeed_config import build_deepspeed_config, init_distributed, uses_deepspeed

    emit = on_event if on_event is not None and rank() == 0 else _noop
    precision = resolve_precision(spec.training.precision)
    validate_model(spec)
    data = prepare_data(spec, emit)
    ds_config = None
    if uses_deepspeed(spec):
        init_distributed()  # before TrainingArguments: it reads the process group
        ds_config = build_deepspeed_config(spec, precision)
    collator = _collator(spec, data.tokenizer, precision)
    packing = not hasattr(collator, "pad_to_multiple_of")
    # TrainingArguments under ZeRO-3 holds the HfDeepSpeedConfig that makes from_pretrained
    # partition weights as they load: it must exist (and stay referenced) before the model.
    args = build_training_args(spec, precision, has_eval=bool(data.eval), packing=packing,
                               deepspeed=ds_config)
    out = Path(spec.output_dir)
    created = not out.exists()
    try:
        return _run(spec, args, data, collator, emit, should_stop)
    except BaseException:
        _cleanup_if_empty(out, created)
        raise


def _trainer_class() -> type:
    """Trainer whose length-grouped sampler is seeded per epoch (exact resume; see collate)."""
    from transformers import Trainer

    from lora_core.data.collate import SeededLengthGroupedSampler

    class LoraTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if self.args.train_sampling_strategy != "group_by_length":
                return super()._get_train_sampler(train_dataset)
            mega = self.args.train_batch_size * self.args.gradient_accumulation_steps
            lengths = [len(f["input_ids"]) for f in dataset]
            return SeededLengthGroupedSampler(lengths, mega, self.args.data_seed or self.args.seed)

    return LoraTrainer


def _run(spec, args, data, collator, emit, should_stop) -> TrainResult:
    from transformers.trainer_callback import PrinterCallback

    from lora_core.callbacks import (
        CheckpointCallback,
        EventCallback,
        StopCallback,
        _barrier,
        export_adapter,
        list_checkpoints,
    )

    ckpt, ckpt_step = _prepare_output_dir(spec)
    _barrier()
    model = _load_model(spec, args_precision(args))
    root = Path(spec.output_dir) / CHECKPOINTS_DIR
    events = EventCallback(emit, lambda: collator.label_tokens, world_size(), started={
        "resumed_from_step": ckpt_step, "num_examples": data.num_examples,
        "num_tokens": data.num_tokens})
    stop = StopCallback(should_stop)
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
        data_collator=collator, processing_class=data.tokenizer,
        callbacks=[events, stop, CheckpointCallback(root, emit)],
    )
    trainer.remove_callback(PrinterCallback)  # progress is reported through events, not stdout
    output = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    if data.eval and not stop.stopped and _last_eval_step(trainer) != trainer.state.global_step:
        trainer.evaluate()  # the final eval loss, whatever eval_steps was
    adapter = Path(spec.output_dir) / ADAPTER_DIR
    export_adapter(trainer.model, adapter, is_main=rank() == 0)
    _barrier()
    return TrainResult(
        status="stopped" if stop.stopped else "completed",
        adapter_path=adapter,
        checkpoints=list_checkpoints(root),
        metrics={"train_loss": events.train_loss or output.training_loss,
                 "final_loss": events.last_loss, "eval_loss": events.last_eval_loss},
        global_step=trainer.state.global_step,
        resumed_from_step=ckpt_step,
    )


def args_precision(args: Any) -> str:
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def _last_eval_step(trainer: Any) -> int | None:
    steps = [h["step"] for h in trainer.state.log_history if "eval_loss" in h]
    return steps[-1] if steps else None


def _cleanup_if_empty(out: Path, created: bool) -> None:
    """Remove an output dir this run created if it holds no sealed checkpoint."""
    from lora_core.callbacks import list_checkpoints

    if created and rank() == 0 and out.exists() and not list_checkpoints(out / CHECKPOINTS_DIR):
        shutil.rmtree(out, ignore_errors=True)

