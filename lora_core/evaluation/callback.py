"""The Trainer callback that grades generations: the base at step 0, then every checkpoint.

    on_train_begin  base outputs (adapter off), once per process; "evaluation" step 0 on a
                    fresh run (a resumed run restores the selection state instead)
    on_save         after CheckpointCallback sealed checkpoint-<step>: outputs with the
                    adapter on, graded; checkpoint-<step>/evaluation.json; "evaluation" event;
                    the best checkpoint is kept from rotation (state.best_model_checkpoint);
                    early stopping sets control.should_training_stop
    best_checkpoint the dir whose adapter becomes the run's result (trainer.py copies it)

Every rank generates (ZeRO-3 partitions the weights: a forward is a collective, so all ranks
run the same prompts with `synced_gpus`); rank 0 writes and emits, and its stop decision is
broadcast so every rank leaves the loop at the same step. A cooperative stop (cancel) skips
the evaluation of its checkpoint: a cancel should not wait for generation.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lora_core.errors import DatasetError
from lora_core.evaluation.formula import FormulaError
from lora_core.evaluation.graders import GraderError, grade
from lora_core.evaluation.selection import Selector
from lora_core.evaluation.spec import VALID_LOSS, EvaluationSpec

__all__ = ["EvaluationCallback", "load_items", "EVALUATION_FILE", "MAX_SAMPLE_CHARS"]

EVALUATION_FILE = "evaluation.json"  # in each checkpoint dir: its scores + the selection state
MAX_SAMPLE_CHARS = 4000  # per stored text (prompt, reference, outputs): rows stay small
Emit = Callable[..., None]


def load_items(path: Path, fmt: str | None, tokenizer: Any, n: int) -> list[dict[str, Any]]:
    """The first `n` records as grader items `{prompt, reference, ...}` (the `item` namespace).

    alpaca/completion: the prompt as trained, the completion as reference; chat: the
    conversation up to its last assistant turn (chat template, generation prompt) and that
    turn's content. Text records have no reference: DatasetError."""
    from lora_core.data.formats import load_examples

    found, examples = load_examples(path, fmt)
    items: list[dict[str, Any]] = []
    for ex in examples[:n]:
        if "prompt" in ex:
            items.append({"prompt": ex["prompt"], "reference": ex["completion"].strip(),
                          "completion": ex["completion"]})
        elif "messages" in ex:
            msgs = ex["messages"]
            last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
            if last is None:
                continue
            prompt = tokenizer.apply_chat_template(msgs[:last], tokenize=False,
                                                   add_generation_prompt=True)
            items.append({"prompt": prompt, "reference": msgs[last]["content"].strip(),
                          "messages": msgs[:last]})
    if not items:
        raise DatasetError(f"{path}: evaluation needs prompt/reference records (alpaca, "
                           f"completion or chat with an assistant turn); got {found}",
                           field="evaluation.file")
    return items


def _clip(text: str) -> str:
    return text if len(text) <= MAX_SAMPLE_CHARS else text[:MAX_SAMPLE_CHARS] + "…"


def _eval_loss_at(state: Any, step: int) -> float | None:
    """The validation loss logged at `step` (Trainer evaluates before it saves), else None."""
    for entry in reversed(state.log_history):
        if "eval_loss" in entry and entry.get("step") == step:
            return float(entry["eval_loss"])
    return None


def _broadcast_flag(flag: bool) -> bool:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


class EvaluationCallback(TrainerCallback):
    def __init__(
        self, spec: EvaluationSpec, items: list[dict[str, Any]], tokenizer: Any, emit: Emit, *,
        precision: str, seed: int, root: Path, max_prompt_tokens: int = 0,
        stopped: Callable[[], bool] = lambda: False, synced_gpus: bool = False,
    ) -> None:
        self.spec = spec
        self.items = items
        self.tokenizer = tokenizer
        self.emit = emit
        self.precision = precision
        self.seed = seed
        self.root = root
        self.max_prompt_tokens = max_prompt_tokens
        self.stopped = stopped
        self.synced_gpus = synced_gpus
        select, early = spec.select, spec.early_stopping
        self.selector = (Selector(select.metric, select.resolved_mode,
                                  early.patience if early else None,
                                  early.min_delta if early else 0.0)
                         if select is not None else None)
        self.base_outputs: list[str] = []
        self.stopped_early = False
        self.stop_reason: str | None = None
        self.seconds = 0.0  # generation + grading, for the overhead figure
        self.evaluations = 0
        self._warned: set[str] = set()
        self._prompt_ids: list[list[int]] | None = None

    # -- generation and grading -------------------------------------------------------------
    def _generate(self, model: Any, adapter: bool) -> list[str]:
        from lora_core.evaluation.generation import generate_ids, prompt_ids

        if self._prompt_ids is None:  # the prompts are the same at every evaluation
            self._prompt_ids = prompt_ids(self.tokenizer, [it["prompt"] for it in self.items],
                                          self.max_prompt_tokens)
        return generate_ids(model, self.tokenizer, self._prompt_ids,
                            max_new_tokens=self.spec.max_new_tokens,
                            batch_size=self.spec.batch_size, precision=self.precision,
                            adapter=adapter, temperature=self.spec.temperature, seed=self.seed,
                            synced_gpus=self.synced_gpus)

    def grade(self, outputs: list[str]) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
        """(mean score per grader, samples). A sample a grader cannot grade (a template
        variable its item lacks, a formula failing on its values) scores None there, with one
        warning per grader; the mean is over the graded samples."""
        totals: dict[str, list[float]] = {g.name: [] for g in self.spec.graders}
        samples = []
        for i, (item, out) in enumerate(zip(self.items, outputs, strict=True)):
            per: dict[str, float | None] = {}
            for g in self.spec.graders:
                try:
                    score, _ = grade(g, item=item, sample={"output_text": out})
                except (GraderError, FormulaError) as exc:
                    score = None
                    if g.name not in self._warned:
                        self._warned.add(g.name)
                        self.emit("warning", message=f"grader {g.name!r}: {exc} (sample {i}; "
                                  "such samples score null)")
                per[g.name] = score
                if score is not None:
                    totals[g.name].append(score)
            base = self.base_outputs[i] if i < len(self.base_outputs) else None
            samples.append({"index": i, "prompt": _clip(item["prompt"]),
                            "reference": _clip(item["reference"]),
                            "base_output": None if base is None else _clip(base),
                            "output": _clip(out), "scores": per})
        means = {k: (sum(v) / len(v) if v else None) for k, v in totals.items()}
        return means, samples

    # -- selection state, kept in each checkpoint so a resumed run continues it ---------------
    def _restore(self, step: int) -> None:
        if self.selector is None or step == 0:
            return
        path = self.root / f"checkpoint-{step}" / EVALUATION_FILE
        try:
            saved = json.loads(path.read_text())["selection"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        sel = self.selector
        sel.best_step, sel.best_value = saved.get("best_step"), saved.get("best_value")
        sel.since_best = int(saved.get("since_best", 0))
        sel.history = [tuple(h) for h in saved.get("history", [])]  # type: ignore[misc]

    def best_checkpoint(self) -> Path | None:
        """checkpoint-<best step> when selection is on and chose one that still exists."""
        if self.selector is None or self.selector.best_step is None:
            return None
        path = self.root / f"checkpoint-{self.selector.best_step}"
        return path if (path / "adapter").is_dir() else None

    def summary(self) -> dict[str, Any]:
        """Job-level fields for the run's metrics: best step and why, early stop and why."""
        out: dict[str, Any] = {"evaluation_seconds": round(self.seconds, 3),
                               "evaluations": self.evaluations}
        if self.selector is not None:
            out.update(self.selector.summary())
        out["stopped_early"] = self.stopped_early
        if self.stop_reason:
            out["stop_reason"] = self.stop_reason
        return out

    # -- Trainer hooks -----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        t0 = time.perf_counter()
        self.base_outputs = self._generate(model, adapter=False)
        self._restore(state.global_step)
        if state.global_step == 0 and state.is_world_process_zero:
            scores, samples = self.grade(self.base_outputs)
            self.emit("evaluation", step=0, scores=scores, samples=samples)
        self.evaluations += 1
        self.seconds += time.perf_counter() - t0

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.stopped():
            return
        t0 = time.perf_counter()
        step = state.global_step
        outputs = self._generate(model, adapter=True)
        scores, samples = self.grade(outputs)
        valid_loss = _eval_loss_at(state, step)
        if valid_loss is not None:
            scores[VALID_LOSS] = valid_loss
        fields: dict[str, Any] = {}
        stop = False
        if self.selector is not None:
            value = scores.get(self.selector.metric)
            if self.selector.observe(step, value if value is None or math.isfinite(value)
                                     else None):
                state.best_model_checkpoint = str(self.root / f"checkpoint-{step}")
            stop = self.selector.should_stop
            fields = self.selector.summary()
            if stop:
                fields["stop_reason"] = self.selector.stop_reason()
        stop = _broadcast_flag(stop)
        if state.is_world_process_zero:
            self._write(step, scores)
            self.emit("evaluation", step=step, scores=scores, samples=samples, stop=stop,
                      **fields)
        if stop:
            self.stopped_early = True
            self.stop_reason = fields.get("stop_reason") or "early stopping"
            control.should_training_stop = True
        self.evaluations += 1
        self.seconds += time.perf_counter() - t0

    def _write(self, step: int, scores: dict[str, float | None]) -> None:
        sel = self.selector
        selection = None if sel is None else {
            "best_step": sel.best_step, "best_value": sel.best_value,
            "since_best": sel.since_best, "history": sel.history}
        path = self.root / f"checkpoint-{step}" / EVALUATION_FILE
        path.write_text(json.dumps({"step": step, "scores": scores, "selection": selection}))


def evaluation_callback(spec: Any, data: Any, emit: Emit, *, precision: str, root: Path,
                        stopped: Callable[[], bool], zero3: bool) -> EvaluationCallback | None:
    """The callback for a RunSpec with `evaluation`, else None. Items come from
    `evaluation.file` or the validation file, the first `num_samples` of them; prompts keep
    room for `max_new_tokens` within `max_seq_length`."""
    ev: EvaluationSpec | None = spec.evaluation
    if ev is None:
        return None
    path = Path(ev.file) if ev.file is not None else spec.validation_file
    items = load_items(path, spec.data_format or data.format, data.tokenizer, ev.num_samples)
    room = max(1, spec.training.max_seq_length - ev.max_new_tokens)
    return EvaluationCallback(ev, items, data.tokenizer, emit, precision=precision,
                              seed=spec.training.seed, root=root, max_prompt_tokens=room,
                              stopped=stopped, synced_gpus=zero3)


def copy_adapter(src: Path, dst: Path) -> None:
    """The selected checkpoint's adapter as the run's adapter, byte for byte (its sha256s are
    the checkpoint's)."""
    import shutil

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
