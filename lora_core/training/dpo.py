"""DPO on LoRA (method "dpo"): TRL's DPOTrainer on our run layout, callbacks and events.

    preference records (lora_core.data.formats)  {prompt: [msgs], chosen: [msgs], rejected: [msgs]}
        -> datasets.Dataset -> TRL tokenises with the chat template (prompt with the generation
           prompt; chosen/rejected = the rest of prompt+completion), truncates at max_seq_length
        -> each step: policy forward on [chosen; rejected] (one padded batch), reference forward
           on the same batch with the adapter DISABLED (no second copy of the weights: PEFT's
           `disable_adapter`, through TRL's `use_adapter(model, None)`; use_base_as_reference
           removes the adapter copy TRL would otherwise score the reference with), then
           loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), log-probs summed over
           the completion tokens

Why TRL and not our own loss: it installs beside our pins (transformers 5.25, peft 0.21, torch
2.13) without changing them, its sigmoid loss is the reference implementation, and it logs the
implicit rewards (`rewards/chosen|rejected|margins|accuracies`) that EventCallback turns into
progress fields. Ours could be faster only through padding-free batches, which TRL 1.16 has
disabled for DPO and which we would then have to prove exact ourselves.

Everything else is the SFT run's: output_dir layout, sealed checkpoints + exact resume (Trainer
state, RNG, sampler seeded by data_seed), stop flag, final adapter export; workflow.py merges and
verifies the adapter like any other. TRL's default `disable_dropout=True` is kept: with dropout,
the policy and reference forwards of the same pair would differ at step 0 and the loss would not
start at ln 2. Single process only (RunSpec refuses num_processes > 1 / ZeRO with "dpo").
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_core.errors import ModelError, SpecError
from lora_core.spec import DPO_FORMATS, RunSpec
from lora_core.training.trainer import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    FROZEN_BF16_ON_CPU,
    TrainResult,
    _cleanup_if_empty,
    _last_eval_step,
    _load_model,
    _prepare_output_dir,
    args_precision,
    build_training_args,
    freeze_linear_weights_in_bf16,
    resolve_precision,
    tune_cpu_allocator,
    validate_model,
    world_size,
)

__all__ = ["PreferenceData", "prepare_preferences", "build_dpo_args", "train_dpo",
           "use_base_as_reference"]

OnEvent = Callable[..., None]
LOSS_TYPE = "sigmoid"  # the DPO paper's loss; the one OpenAI's DPO method trains with
REF_ADAPTER = "ref"  # the name TRL gives its copy of the starting adapter (use_base_as_reference)


@dataclass
class PreferenceData:
    """Normalised preference records (TRL's conversational columns) and the tokenizer."""

    tokenizer: Any
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]] | None


def _noop(type_: str, **fields: Any) -> None:
    return None


def _load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer in {model_dir}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"preference data needs a tokenizer with a chat_template "
                         f"({model_dir} has none)")
    return tokenizer


def _read(path: Path, fmt: str | None) -> list[dict[str, Any]]:
    from lora_core.data.formats import load_examples

    found, examples = load_examples(path, fmt)  # DatasetError naming every bad line
    if found not in DPO_FORMATS:
        raise SpecError(f"{path.name} holds {found} data; method 'dpo' trains on preference "
                        "data ({input, preferred_output, non_preferred_output})",
                        param="method", value="dpo")
    return [_arrow_friendly(e) for e in examples]


def _arrow_friendly(example: dict[str, Any]) -> dict[str, Any]:
    """Tools are free-form JSON schemas: a JSON string per row (TRL json.loads it), so every
    row has the same columns (datasets takes the columns from the first row)."""
    tools = example.get("tools")
    return {**example, "tools": json.dumps(tools) if tools else None}


def prepare_preferences(spec: RunSpec) -> PreferenceData:
    """Validated preference records of the train (and validation) data; nothing written."""
    tokenizer = _load_tokenizer(spec.model_dir)
    train = _read(spec.train_file, spec.data_format)
    evals = None
    if spec.validation_file is not None:
        evals = _read(spec.validation_file, spec.data_format)
    elif spec.training.validation_split > 0:
        order = list(range(len(train)))
        random.Random(spec.training.seed).shuffle(order)
        n_eval = round(len(train) * spec.training.validation_split)
        if not 1 <= n_eval < len(train):
            raise SpecError("validation_split leaves no pair on one side",
                            param="training.validation_split",
                            value=spec.training.validation_split)
        train, evals = ([train[i] for i in order[n_eval:]], [train[i] for i in order[:n_eval]])
    return PreferenceData(tokenizer, train, evals)


def build_dpo_args(spec: RunSpec, precision: str, *, has_eval: bool) -> Any:  # -> DPOConfig
    """The SFT run's TrainingArguments (lora_core.training.trainer) as TRL's DPOConfig."""
    from trl import DPOConfig

    return build_training_args(
        spec, precision, has_eval=has_eval, packing=True, args_class=DPOConfig,
        beta=spec.dpo.beta, loss_type=[LOSS_TYPE],
        max_length=spec.training.max_seq_length, truncation_mode="keep_start",
        precompute_ref_log_probs=False,  # exact resume needs no pre-pass; the ref forward is
        # no_grad, about a third of a step
    )


class _CountingCollator:
    """TRL's collator, counting completion tokens (tokens/s in progress events)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.label_tokens = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(features)
        self.label_tokens += int(batch["completion_mask"].sum())
        return batch


def _trainer_class() -> type:
    from trl import DPOTrainer

    class LoraDpoTrainer(DPOTrainer):
        def create_model_card(self, *args: Any, **kwargs: Any) -> None:
            return None  # TRL writes a README.md into output_dir on every save; not ours

    return LoraDpoTrainer


def _token_stats(dataset: Any, before: int, max_len: int) -> dict[str, int]:
    """The "started" event's counts: tokens both sequences of each pair run through."""
    tokens = truncated = 0
    for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"],
                       strict=True):
        tokens += min(len(p) + len(c), max_len) + min(len(p) + len(r), max_len)
        truncated += int(len(p) + max(len(c), len(r)) > max_len)
    return {"num_examples": len(dataset), "num_tokens": tokens, "num_truncated": truncated,
            "num_dropped": before - len(dataset)}


def use_base_as_reference(model: Any) -> None:
    """Make the reference the base with the adapter disabled, as this module promises.

    Given a PeftModel, TRL 1.16 copies its adapter into a frozen second adapter "ref" and
    scores the reference with it: for a fresh adapter (B = 0) the same numbers at extra cost,
    and PEFT would save the copy beside every adapter (`adapter/ref/`). Without "ref", TRL's
    reference forward runs under `disable_adapter()`. A run that starts from an earlier
    adapter (`init_adapter`) is then measured against the base too, so its step-0 loss is not
    ln 2."""
    if REF_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REF_ADAPTER)


def train_dpo(
    spec: RunSpec, *, on_event: OnEvent | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """train() for method "dpo": same order of work, same failure guarantees."""
    import torch

    emit = on_event if on_event is not None else _noop
    precision = resolve_precision(spec.training.precision)
    if not torch.cuda.is_available():
        tune_cpu_allocator()
    validate_model(spec)
    data = prepare_preferences(spec)
    args = build_dpo_args(spec, precision, has_eval=bool(data.eval))
    out = Path(spec.output_dir)
    created = not out.exists()
    try:
        return _run(spec, args, data, emit, should_stop)
    except BaseException:
        _cleanup_if_empty(out, created)
        raise


def _run(spec: RunSpec, args: Any, data: PreferenceData, emit: OnEvent,
         should_stop: Callable[[], bool] | None) -> TrainResult:
    import datasets  # type: ignore[import-untyped]  # no py.typed
    import torch
    from transformers.trainer_callback import PrinterCallback

    from lora_core.training.callbacks import (
        CheckpointCallback,
        EventCallback,
        StopCallback,
        export_adapter,
        list_checkpoints,
    )
    from lora_core.training.thread_tuner import thread_tuning_callback

    datasets.disable_progress_bars()
    ckpt, ckpt_step = _prepare_output_dir(spec)
    model = _load_model(spec, args_precision(args))
    if FROZEN_BF16_ON_CPU and args.bf16 and not torch.cuda.is_available():
        freeze_linear_weights_in_bf16(model)
    root = Path(spec.output_dir) / CHECKPOINTS_DIR
    counter: list[_CountingCollator] = []
    events = EventCallback(emit, lambda: counter[0].label_tokens if counter else 0,
                           started={"resumed_from_step": ckpt_step})
    stop = StopCallback(should_stop)
    # completion tokens as the unit of work: TRL's batches carry no count of their own
    threads = thread_tuning_callback(lambda: counter[0].label_tokens if counter else 0, emit,
                                     world_size=world_size())
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(data.train),
        eval_dataset=datasets.Dataset.from_list(data.eval) if data.eval else None,
        processing_class=data.tokenizer,
        callbacks=[events, stop, CheckpointCallback(root, emit),
                   *([threads] if threads is not None else [])],
    )
    trainer.remove_callback(PrinterCallback)
    use_base_as_reference(trainer.model)
    counter.append(_CountingCollator(trainer.data_collator))
    trainer.data_collator = counter[0]
    if len(trainer.train_dataset) == 0:
        raise SpecError(f"every pair's prompt fills max_seq_length="
                        f"{spec.training.max_seq_length}", param="training.max_seq_length")
    events.started.update(_token_stats(trainer.train_dataset, len(data.train),
                                       spec.training.max_seq_length))
    output = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    if data.eval and not stop.stopped and _last_eval_step(trainer) != trainer.state.global_step:
        trainer.evaluate()
    adapter = Path(spec.output_dir) / ADAPTER_DIR
    export_adapter(trainer.model, adapter)
    return TrainResult(
        status="stopped" if stop.stopped else "completed",
        adapter_path=adapter,
        checkpoints=list_checkpoints(root),
        metrics={"train_loss": events.train_loss or output.training_loss,
                 "final_loss": events.last_loss, "eval_loss": events.last_eval_loss,
                 **_last_rewards(trainer.state.log_history)},
        global_step=trainer.state.global_step,
        resumed_from_step=ckpt_step,
    )


def _last_rewards(history: list[dict[str, Any]]) -> dict[str, float]:
    """The newest logged reward margin / accuracy (train, and eval when there was one)."""
    out: dict[str, float] = {}
    for entry in history:
        for key, name in (("rewards/margins", "reward_margin"),
                          ("rewards/accuracies", "reward_accuracy"),
                          ("eval_rewards/margins", "eval_reward_margin"),
                          ("eval_rewards/accuracies", "eval_reward_accuracy")):
            if key in entry:
                out[name] = float(entry[key])
    return out

