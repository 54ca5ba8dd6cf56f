"""The demo task: a small, deterministic instruction dataset a random-init base cannot solve.

Task "reverse": `{"instruction": "Reverse the order of the words.", "input": "red fox tree",
"output": "tree fox red"}` over WORDS, words drawn from the bundled tokenizer corpus so each is
one or two tokens. Held-out evaluation uses word sequences never seen in training (the split is
by the sequence, not by the word), so exact-match accuracy measures the learnt rule.

`evaluate_exact_match` greedily generates a response per example and compares it, stripped,
with the expected output; the random-init base scores ~0.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

__all__ = [
    "WORDS",
    "TASKS",
    "make_examples",
    "write_demo_files",
    "evaluate_exact_match",
]

# From lora_core/assets/corpus.txt (colours, animals, things): the tiny tokenizer knows them.
WORDS = (
    "red orange yellow green blue black white grey brown pink gold silver "
    "cat dog bird fish horse cow sheep goat lion tiger bear wolf fox deer mouse owl "
    "apple river stone cloud tree house road light water fire earth wind book door table chair"
).split()
TASKS = {
    "reverse": ("Reverse the order of the words.", lambda ws: " ".join(reversed(ws))),
    "upper": ("Write the words in capital letters.", lambda ws: " ".join(w.upper() for w in ws)),
}
DEMO_SEED = 1234  # the bundled files are make_examples(..., seed=DEMO_SEED)
DEMO_TRAIN_SIZE = 2000
DEMO_EVAL_SIZE = 200
MIN_WORDS, MAX_WORDS = 2, 4  # per example; short enough for a tiny model to learn in minutes


def make_examples(
    n: int, *, task: str = "reverse", seed: int = 0, exclude: set[str] | None = None,
    min_words: int = MIN_WORDS, max_words: int = MAX_WORDS,
) -> list[dict[str, str]]:
    """`n` distinct alpaca records; inputs in `exclude` are skipped (held-out split)."""
    instruction, fn = TASKS[task]
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[dict[str, str]] = []
    while len(out) < n:
        words = rng.sample(WORDS, rng.randint(min_words, max_words))
        text = " ".join(words)
        if text in seen:
            continue
        seen.add(text)
        out.append({"instruction": instruction, "input": text, "output": fn(words)})
    return out


def write_demo_files(
    out_dir: str | Path, *, task: str = "reverse", n_train: int = DEMO_TRAIN_SIZE,
    n_eval: int = DEMO_EVAL_SIZE, seed: int = DEMO_SEED,
) -> tuple[Path, Path]:
    """Write demo_train.jsonl and demo_eval.jsonl (eval inputs disjoint from train)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = make_examples(n_train, task=task, seed=seed)
    held = make_examples(n_eval, task=task, seed=seed + 1, exclude={r["input"] for r in train})
    paths = (out / "demo_train.jsonl", out / "demo_eval.jsonl")
    for path, rows in zip(paths, (train, held), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


def bundled_demo_files() -> tuple[Path, Path]:
    """Paths of the demo files shipped in lora_core/assets."""
    from importlib import resources

    assets = resources.files("lora_core").joinpath("assets")
    return Path(str(assets / "demo_train.jsonl")), Path(str(assets / "demo_eval.jsonl"))


def evaluate_exact_match(
    model: Any, tokenizer: Any, examples: list[dict[str, Any]], max_new_tokens: int = 16
) -> float:
    """Fraction of examples whose greedy response equals the expected output (stripped).

    `examples`: alpaca/completion records or normalised `{prompt, completion}` dicts.
    The model is put in eval mode; generation stops at EOS or `max_new_tokens`.
    """
    import torch

    from lora_core.data.formats import detect_format, normalize_record

    model.eval()
    device = next(model.parameters()).device
    hits = 0
    for record in examples:
        fmt = detect_format(record)
        ex = normalize_record(record, fmt) if fmt in ("alpaca", "completion") else record
        ids = tokenizer(ex["prompt"], return_tensors="pt")["input_ids"].to(device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        hits += int(text.strip() == ex["completion"].strip())
    return hits / max(1, len(examples))
