"""Train a LoRA adapter from a RunSpec with HF Trainer + PEFT (+ DeepSpeed ZeRO when asked).

Order of work, so that a bad input costs nothing and leaves nothing behind:

    1. validate   model dir (safetensors headers), lora spec, every data line, tokenisation
    2. create     output_dir (only now), resume point (newest sealed checkpoint)
    3. load       base model + LoRA; Trainer with our callbacks
    4. train      progress/eval/checkpoint events; cooperative stop -> checkpoint + "stopped"
    5. export     final adapter to output_dir/adapter/

Precision "auto" = bf16 on a CUDA GPU that supports it or a CPU with native bf16 (AVX512-BF16 /
AMX), fp32 otherwise. bf16 on CPU runs under bf16 autocast: trainable weights fp32, frozen
Linear weights stored in bf16 (FROZEN_BF16_ON_CPU). On CPU the intra-op thread count is
chosen by measurement unless pinned (lora_core.training.thread_tuner). Events go through
`on_event(type, **fields)` on rank 0 only.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_core.errors import ModelError, SpecError
from lora_core.spec import SFT_FORMATS, RunSpec

__all__ = [
    "TrainResult",
    "PreparedData",
    "train",
    "prepare_data",
    "load_features",
    "resolve_precision",
    "tune_cpu_allocator",
]

OnEvent = Callable[..., None]
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
# Packing "auto": on. Each micro-batch is one padding-free row (FlatteningCollator) and the
# attention runs per example (lora_core.training.attention): no padding in any matmul, causal-only
# attention. bench/train_bench.py (bench/README.md) measured it against length-grouped padded
# batches; packing=false keeps those.
PACKING_AUTO = True
# On CPU under bf16 autocast every frozen nn.Linear weight is cast fp32 -> bf16 on every call
# (autocast caches casts only of weights that require grad). Storing the frozen weights in bf16
# once gives bit-identical matmuls (the same round-to-nearest cast) without the per-step copies
# and halves their memory. LoRA weights, norms and embeddings stay fp32.
FROZEN_BF16_ON_CPU = True
# LoRA dropout from 16-bit random words instead of a float bernoulli per element
# (lora_core.training.dropout): the mask took 5-8% of a CPU step. Same semantics, p rounded to
# 2**-16.
BITS_DROPOUT_ON_CPU = True
# LM head + cross-entropy on labelled positions only (lora_core.training.loss). Measured with
# bench/train_bench.py (bench/README.md); equal to the full loss (tests/lora_core/test_perf_loss).
LABELLED_ONLY_LOSS = True
# Precision "auto" on a CPU with native bf16: bf16 autocast (fp32 master weights). Measured with
# bench/train_bench.py: faster at equal eval loss (bench/README.md).
AUTO_BF16_ON_CPU = True
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# glibc malloc serves blocks >= 128 KiB-32 MiB (dynamic threshold) with mmap and unmaps them on
# free, so every training step page-faults its activations in again: on 2 cores ~20-30% of the
# wall time went to the kernel (sys time), measured with bench/train_bench.py. Keeping freed
# memory in the heap (no mmap, no trim) removes that; the heap then stays at the step's peak.
MALLOC_MMAP_THRESHOLD = 1 << 30  # mallopt's maximum on 64-bit is HEAP_MAX/2; 1 GiB is allowed
MALLOC_TRIM_THRESHOLD = (1 << 31) - 1  # never give the heap top back between steps
TUNE_CPU_ALLOCATOR = True
MAX_WARMUP_RATIO = 0.999  # TrainingArguments.warmup_steps reads values >= 1 as a step count


@dataclass
class TrainResult:
    """What a run produced. `checkpoints`: [{step, path, adapter_path}] of sealed checkpoints."""

    status: str  # "completed" | "stopped"
    adapter_path: Path
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
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


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16, Linux flags).

    There oneDNN's bf16 GEMM runs ~3-4x the fp32 one (bench/gemm_peak.py); without them bf16
    is emulated and slower than fp32.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return False
    return bool(BF16_CPU_FLAGS & set(flags))


def resolve_precision(precision: str) -> str:
    """"auto" -> bf16 on CUDA with bf16 support, or on a CPU with native bf16 (AUTO_BF16_ON_CPU);
    else fp32. fp16 needs a GPU."""
    import torch

    cuda = torch.cuda.is_available()
    if precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if AUTO_BF16_ON_CPU and cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and not cuda:
        raise SpecError("fp16 needs a CUDA GPU; use bf16 or fp32 on CPU",
                        param="training.precision", value=precision)
    return precision


def tune_cpu_allocator() -> bool:
    """Make glibc keep freed activation memory (see MALLOC_MMAP_THRESHOLD). True if applied.

    Process-wide and permanent: the trainer child process exists for this one job.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not TUNE_CPU_ALLOCATOR or name is None or "libc.so" not in name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h> M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
        return bool(libc.mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)
                    and libc.mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False


def validate_model(spec: RunSpec) -> Any:
    """Headers-only model + LoRA checks (ModelError / SpecError); returns the ModelInfo."""
    from lora_core.model_files import inspect_model_dir, validate_lora_spec

    info = inspect_model_dir(spec.model_dir)
    validate_lora_spec(spec.lora, info)
    return info


def prepare_data(spec: RunSpec, on_event: OnEvent = _noop) -> PreparedData:
    """Read, validate and tokenise the data; DatasetError before any model weight is loaded.

    Features come from the tokenised-dataset cache (lora_core.data.cache) when this file was
    tokenised before with the same tokenizer and max_seq_length.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(spec.model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer in {spec.model_dir}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_len = spec.training.max_seq_length
    fmt, train, stats = load_features(spec.train_file, spec.data_format, tokenizer,
                                      spec.model_dir, max_len)
    if stats.num_dropped:
        on_event("warning", message=f"{stats.num_dropped} training example(s) dropped: no "
                 f"response token within max_seq_length={max_len}")
    evals = None
    if spec.validation_file is not None:
        evals = load_features(spec.validation_file, spec.data_format or fmt, tokenizer,
                              spec.model_dir, max_len)[1]
    if evals is None and spec.training.validation_split > 0:
        train, evals = _split(train, spec.training.validation_split, spec.training.seed)
    return PreparedData(tokenizer, train, evals, fmt, len(train), stats.num_tokens,
                        stats.num_dropped, stats.num_truncated)


def load_features(
    path: Path, fmt: str | None, tokenizer: Any, tokenizer_dir: Path, max_len: int
) -> tuple[str, list[dict[str, list[int]]], Any]:
    """(format, features, TokenizeStats) of one data file: from the cache, else tokenised
    (and cached). Raises DatasetError for bad data, which is never cached."""
    from lora_core.data import cache
    from lora_core.data.formats import _read_bytes, load_examples
    from lora_core.data.tokenize import tokenize_examples

    data = _read_bytes(path)
    key = cache.cache_key(data, fmt, max_len, Path(tokenizer_dir))
    hit = cache.load(key)
    if hit is not None:
        return hit
    found_fmt, examples = load_examples(path, fmt)  # the path: errors name the file
    if found_fmt not in SFT_FORMATS:
        raise SpecError(f"{Path(path).name} holds {found_fmt} data, which trains with method "
                        "'dpo'", param="method", value="sft")
    features, stats = tokenize_examples(examples, tokenizer, max_len)
    cache.save(key, found_fmt, features, stats)
    return found_fmt, features, stats


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
    deepspeed: dict[str, Any] | None = None, args_class: type | None = None, **extra: Any,
) -> Any:  # -> transformers.TrainingArguments
    """TrainingArguments from the spec: saves to output_dir/checkpoints, no hub, no tqdm.

    `args_class` (a TrainingArguments subclass, e.g. TRL's DPOConfig) with its own `extra`
    fields."""
    import torch
    from transformers import TrainingArguments

    t = spec.training
    eval_kw: dict[str, Any] = {"eval_strategy": "no"}
    if has_eval:
        eval_kw = {"eval_strategy": "steps" if t.eval_steps else "epoch",
                   "eval_steps": t.eval_steps, "per_device_eval_batch_size": t.batch_size}
    return (args_class or TrainingArguments)(
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
        prediction_loss_only=True,  # eval needs the loss only; else it gathers every logit
        dataloader_num_workers=0,  # the collator's token counter must live in this process
        report_to=[],
        disable_tqdm=True,
        deepspeed=deepspeed,
        **eval_kw,
        **extra,
    )


def _load_model(spec: RunSpec, precision: str) -> Any:
    """Base model + LoRA, seeded. Weights stay fp32 on CPU (bf16 runs as autocast there)."""
    import torch
    from transformers import set_seed

    from lora_core.training.peft_setup import apply_lora, load_base_model

    set_seed(spec.training.seed)  # LoRA A init and dropout must not depend on the caller
    dtype = "bf16" if precision == "bf16" and torch.cuda.is_available() else "float32"
    model = load_base_model(spec.model_dir, dtype=dtype)
    model.config.use_cache = False  # no KV cache while training; packed rows forbid it anyway
    return apply_lora(model, spec.lora, spec.model_dir, init_adapter=spec.init_adapter)


def _collator(spec: RunSpec, tokenizer: Any) -> Any:
    from lora_core.data.collate import FlatteningCollator, PaddingCollator

    packing = spec.training.packing
    if packing is True or (packing == "auto" and PACKING_AUTO):
        return FlatteningCollator()
    return PaddingCollator(tokenizer.pad_token_id)


def _is_flattening(collator: Any) -> bool:
    from lora_core.data.collate import FlatteningCollator

    return isinstance(collator, FlatteningCollator)


def freeze_linear_weights_in_bf16(model: Any) -> int:
    """Store every frozen nn.Linear weight in bf16 (FROZEN_BF16_ON_CPU); returns how many.

    Skips a weight shared with an embedding (tied lm_head): the residual stream starts from
    the embedding and must stay fp32.
    """
    import torch

    embeddings = {m.weight.data_ptr() for m in model.modules()
                  if isinstance(m, torch.nn.Embedding)}
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, torch.nn.Linear) and weight is not None
                and not weight.requires_grad and weight.dtype == torch.float32
                and weight.data_ptr() not in embeddings):
            module.weight.data = weight.data.to(torch.bfloat16)
            count += 1
    return count


def _prepare_output_dir(spec: RunSpec) -> tuple[Path | None, int | None]:
    """Create output_dir; return (checkpoint to resume from, its step)."""
    from lora_core.training.callbacks import (
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
    import torch

    from lora_core.training.deepspeed_config import (
        build_deepspeed_config,
        init_distributed,
        uses_deepspeed,
    )

    if spec.method == "dpo":
        from lora_core.training.dpo import train_dpo

        return train_dpo(spec, on_event=on_event, should_stop=should_stop)
    emit = on_event if on_event is not None and rank() == 0 else _noop
    precision = resolve_precision(spec.training.precision)
    if not torch.cuda.is_available():
        tune_cpu_allocator()
    validate_model(spec)
    data = prepare_data(spec, emit)
    ds_config = None
    if uses_deepspeed(spec):
        init_distributed()  # before TrainingArguments: it reads the process group
        ds_config = build_deepspeed_config(spec, precision)
    collator = _collator(spec, data.tokenizer)
    packing = _is_flattening(collator)
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
    """Trainer with a per-epoch seeded length-grouped sampler (exact resume; see collate) and
    the LM head + loss over labelled positions only (lora_core.training.loss) where that is
    exact."""
    from transformers import Trainer

    from lora_core.data.collate import SeededLengthGroupedSampler
    from lora_core.training.loss import labelled_only_loss, supports_labelled_only

    class LoraTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if self.args.train_sampling_strategy != "group_by_length":
                return super()._get_train_sampler(train_dataset)
            mega = self.args.train_batch_size * self.args.gradient_accumulation_steps
            lengths = [len(f["input_ids"]) for f in dataset]
            return SeededLengthGroupedSampler(lengths, mega, self.args.data_seed or self.args.seed)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            fast = (LABELLED_ONLY_LOSS and "labels" in inputs and not self.is_deepspeed_enabled
                    and self.label_smoother is None and self.compute_loss_func is None
                    and supports_labelled_only(model))
            if not fast:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # Trainer's autocast (bf16) wraps model.forward, which this path bypasses
            with self.accelerator.autocast():
                loss = labelled_only_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does
            return (loss, {"loss": loss}) if return_outputs else loss

    return LoraTrainer


def _run(spec, args, data, collator, emit, should_stop) -> TrainResult:
    import torch
    from transformers.trainer_callback import PrinterCallback

    from lora_core.data.collate import PaddingCollator
    from lora_core.evaluation.callback import copy_adapter, evaluation_callback
    from lora_core.training.attention import use_varlen_attention
    from lora_core.training.callbacks import (
        CheckpointCallback,
        EventCallback,
        StopCallback,
        _barrier,
        export_adapter,
        list_checkpoints,
    )
    from lora_core.training.dropout import use_bits_dropout
    from lora_core.training.thread_tuner import thread_tuning_callback

    ckpt, ckpt_step = _prepare_output_dir(spec)
    _barrier()
    model = _load_model(spec, args_precision(args))
    if _is_flattening(collator) and use_varlen_attention(model) is None:
        emit("warning", message="this model's attention cannot take padding-free batches; "
             "training on padded batches instead")
        collator = PaddingCollator(data.tokenizer.pad_token_id)
    if (FROZEN_BF16_ON_CPU and args.bf16 and not args.deepspeed
            and not torch.cuda.is_available()):
        freeze_linear_weights_in_bf16(model)
    if BITS_DROPOUT_ON_CPU and not torch.cuda.is_available():
        use_bits_dropout(model)
    root = Path(spec.output_dir) / CHECKPOINTS_DIR
    events = EventCallback(emit, lambda: collator.label_tokens, world_size(), started={
        "resumed_from_step": ckpt_step, "num_examples": data.num_examples,
        "num_tokens": data.num_tokens, "num_truncated": data.num_truncated,
        "num_dropped": data.num_dropped})
    stop = StopCallback(should_stop)
    evaluation = evaluation_callback(spec, data, emit, precision=args_precision(args), root=root,
                                     stopped=lambda: stop.stopped, zero3=_is_zero3(spec))
    threads = thread_tuning_callback(lambda: collator.tokens, emit, world_size=world_size())
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
        data_collator=collator, processing_class=data.tokenizer,
        callbacks=[events, stop, CheckpointCallback(root, emit),
                   *([evaluation] if evaluation is not None else []),
                   *([threads] if threads is not None else [])],
    )
    trainer.remove_callback(PrinterCallback)  # progress is reported through events, not stdout
    output = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    if data.eval and not stop.stopped and _last_eval_step(trainer) != trainer.state.global_step:
        trainer.evaluate()  # the final eval loss, whatever eval_steps was
    adapter = Path(spec.output_dir) / ADAPTER_DIR
    best = evaluation.best_checkpoint() if evaluation is not None else None
    if best is not None:  # the selected checkpoint is the result (lora_core.evaluation)
        if rank() == 0:
            copy_adapter(best / "adapter", adapter)
    else:
        export_adapter(trainer.model, adapter, is_main=rank() == 0)
    _barrier()
    return TrainResult(
        status="stopped" if stop.stopped else "completed",
        adapter_path=adapter,
        checkpoints=list_checkpoints(root),
        metrics={"train_loss": events.train_loss or output.training_loss,
                 "final_loss": events.last_loss, "eval_loss": events.last_eval_loss,
                 **(evaluation.summary() if evaluation is not None else {})},
        global_step=trainer.state.global_step,
        resumed_from_step=ckpt_step,
    )


def _is_zero3(spec: RunSpec) -> bool:
    return spec.distributed.zero_stage == 3


def args_precision(args: Any) -> str:
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def _last_eval_step(trainer: Any) -> int | None:
    steps = [h["step"] for h in trainer.state.log_history if "eval_loss" in h]
    return steps[-1] if steps else None


def _cleanup_if_empty(out: Path, created: bool) -> None:
    """Remove an output dir this run created if it holds no sealed checkpoint."""
    from lora_core.training.callbacks import list_checkpoints

    if created and rank() == 0 and out.exists() and not list_checkpoints(out / CHECKPOINTS_DIR):
        shutil.rmtree(out, ignore_errors=True)

