"""Graded generations inside training: a task the base cannot do goes from ~0 exact match at
step 0 to >= 90% with the job's own string_check grader, and the samples show it; batched
left-padded generation equals one-by-one generation; the selection state machine."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lora_core.evaluation.selection import Selector

STEPS = 60  # constant lr 3e-3: 1.0 exact match by step 60 (0.56 at 20, 0.88 at 40) when tuned


def _records(n: int, seed: int) -> list[dict[str, str]]:
    """'Is it a colour or an animal: fox' -> ' animal': a random-init base answers noise."""
    from lora_core.data.synthetic import ANIMALS, COLOURS

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.choice(["colour", "animal"])
        word = rng.choice(COLOURS if kind == "colour" else ANIMALS)
        out.append({"prompt": f"Is it a colour or an animal: {word}", "completion": " " + kind})
    return out


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_exact_match_learnt_and_samples_stored(tiny_model_dir: Path, tmp_path: Path) -> None:
    from lora_core.spec import RunSpec
    from lora_core.workflow import run

    spec = RunSpec(
        model_dir=tiny_model_dir, train_file=_write(tmp_path / "t.jsonl", _records(400, 1)),
        validation_file=_write(tmp_path / "v.jsonl", _records(16, 2)),
        output_dir=tmp_path / "out", merge="none",
        lora={"r": 16, "alpha": 32, "dropout": 0.0, "init": "kaiming",
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                 "up_proj", "down_proj", "lm_head"]},
        training={"max_steps": STEPS, "batch_size": 16, "gradient_accumulation_steps": 1,
                  "learning_rate": 3e-3, "max_seq_length": 64, "save_steps": STEPS // 2,
                  "precision": "fp32", "seed": 42},
        evaluation={"num_samples": 16, "max_new_tokens": 3,
                    "select": {"metric": "exact_match"}})
    events: list[tuple[str, dict]] = []
    result = run(spec, on_event=lambda t, **f: events.append((t, f)))
    evals = [f for t, f in events if t == "evaluation"]
    assert [e["step"] for e in evals] == [0, STEPS // 2, STEPS]
    assert evals[0]["scores"]["exact_match"] <= 0.1
    assert evals[-1]["scores"]["exact_match"] >= 0.9
    last = evals[-1]["samples"]
    assert len(last) == 16 and all(s["base_output"] == b["output"]
                                   for s, b in zip(last, evals[0]["samples"], strict=True))
    hits = [s for s in last if s["output"] == s["reference"]]
    assert len(hits) >= 0.9 * 16 and all(s["scores"]["exact_match"] == 1.0 for s in hits)
    assert all(s["reference"] in ("colour", "animal") for s in last)
    assert result.metrics["best_step"] == STEPS and result.metrics["stopped_early"] is False
    ckpt = tmp_path / "out" / "checkpoints" / f"checkpoint-{STEPS}" / "evaluation.json"
    assert json.loads(ckpt.read_text())["scores"]["exact_match"] >= 0.9


@pytest.mark.slow
def test_batched_generation_equals_one_by_one(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from lora_core.evaluation.generation import generate
    from lora_core.spec import LoraSpec
    from lora_core.training.peft_setup import apply_lora, load_base_model

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = apply_lora(load_base_model(tiny_model_dir, dtype="float32"),
                       LoraSpec(r=4, init="kaiming"), tiny_model_dir)
    model.train()
    prompts = [r["prompt"] for r in _records(6, 3)] + ["red", "a much longer prompt " * 3]
    batched = generate(model, tok, prompts, max_new_tokens=5, batch_size=8)
    single = [generate(model, tok, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == single and model.training  # mode restored
    assert generate(model, tok, prompts[:2], max_new_tokens=5, adapter=False) == \
        generate(model.get_base_model(), tok, prompts[:2], max_new_tokens=5)


def test_selector_best_ties_and_patience() -> None:
    sel = Selector("exact_match", "max", patience=2)
    assert sel.observe(10, 0.4) and sel.observe(20, 0.9)
    assert not sel.observe(30, 0.8) and not sel.should_stop
    assert not sel.observe(40, 0.9) and sel.should_stop  # a tie is no improvement
    assert sel.best_step == 20 and "patience 2" in sel.stop_reason()
    loss = Selector("valid_loss", "min", patience=1, min_delta=0.1)
    assert loss.observe(1, 2.0) and not loss.observe(2, 1.95) and loss.should_stop
    assert not Selector("x", "max").observe(1, None)  # no value: never the best
