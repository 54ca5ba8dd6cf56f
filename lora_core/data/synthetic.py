"""The demo task: a small, deterministic instruction dataset a random-init base cannot solve.

Default task "animal": `{"instruction": "Name the animal in the list.", "input": "red fox tree",
"output": "fox"}`: one animal among colours/things, words from the bundled tokenizer corpus.
("reverse" and "upper" are harder: a random-init 2-layer base + LoRA stays at the unigram loss
on them within minutes on CPU, because they need learnt copy-by-position attention.)

Held-out evaluation uses word sequences never seen in training (the split is
by the sequence, not by the word), so exact-match accuracy measures the learnt rule.

`evaluate_exact_match` greedily generates a response per example and compares it, stripped,
with the expected output; the random-init base scores ~0.

Preference pairs (method "dpo"), `make_preference_pairs`: OpenAI's preference records for the
animal task, `{"input": {"messages": [user: "Name the animal in the list: red fox tree"]},
"preferred_output": [assistant: "fox"], "non_preferred_output": [assistant: "tree"]}`: the
preferred answer follows the rule, the rejected one is another word of the same list.
`preference_accuracy` is the fraction of pairs whose preferred answer the model gives the higher
log-probability; a random-init base is near 0.5 (it prefers no word for the right reason).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "WORDS",
    "TASKS",
    "make_examples",
    "write_demo_files",
    "evaluate_exact_match",
    "make_preference_pairs",
    "completion_logps",
    "preference_accuracy",
]

# From lora_core/assets/corpus.txt (colours, animals, things): the tiny tokenizer knows them.
COLOURS = "red orange yellow green blue black white grey brown pink gold silver".split()
ANIMALS = "cat dog bird fish horse cow sheep goat lion tiger bear wolf fox deer mouse owl".split()
THINGS = ("apple river stone cloud tree house road light water fire earth wind book door table "
          "chair").split()
WORDS = COLOURS + ANIMALS + THINGS
# task -> (instruction, draw(rng, n_words) -> (input words, output text))
TASKS: dict[str, tuple[str, Callable[[random.Random, int], tuple[list[str], str]]]] = {
    "animal": ("Name the animal in the list.", lambda rng, n: _one_animal(rng, n)),
    "reverse": ("Reverse the order of the words.", lambda rng, n: _words(rng, n, reversed)),
    "upper": ("Write the words in capital letters.", lambda rng, n: _words(rng, n, str.upper)),
}
DEFAULT_TASK = "animal"  # learnable by a random-init tiny base + LoRA in ~1 min on 2 CPU cores


def _one_animal(rng: random.Random, n: int) -> tuple[list[str], str]:
    """One animal among n-1 colours/things, shuffled; the answer is the animal."""
    animal = rng.choice(ANIMALS)
    words = rng.sample(COLOURS + THINGS, n - 1) + [animal]
    rng.shuffle(words)
    return words, animal


def _words(rng: random.Random, n: int, how: Callable) -> tuple[list[str], str]:
    words = rng.sample(WORDS, n)
    if how is reversed:
        return words, " ".join(reversed(words))
    return words, " ".join(how(w) for w in words)
DEMO_SEED = 1234  # the bundled files are write_demo_files(assets) with these defaults
DEMO_TRAIN_SIZE = 2000
DEMO_EVAL_SIZE = 200
MIN_WORDS, MAX_WORDS = 2, 4  # per example; short enough for a tiny model to learn in minutes


def make_examples(
    n: int, *, task: str = DEFAULT_TASK, seed: int = 0, exclude: set[str] | None = None,
    min_words: int = MIN_WORDS, max_words: int = MAX_WORDS, fmt: str = "alpaca",
) -> list[dict[str, str]]:
    """`n` distinct records; inputs in `exclude` are skipped (held-out split).

    `fmt="completion"` gives a short prompt (`"<instruction> Input: <words>. Output:"`): the
    ~40-token Alpaca preamble dilutes what a tiny random-init model attends to.
    """
    instruction, draw = TASKS[task]
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[dict[str, str]] = []
    while len(out) < n:
        words, answer = draw(rng, rng.randint(min_words, max_words))
        text = " ".join(words)
        if text in seen:
            continue
        seen.add(text)
        if fmt == "completion":
            prompt = f"{instruction} Input: {text}. Output:"
            out.append({"prompt": prompt, "completion": " " + answer, "input": text})
        else:
            out.append({"instruction": instruction, "input": text, "output": answer})
    return out


def write_demo_files(
    out_dir: str | Path, *, task: str = DEFAULT_TASK, n_train: int = DEMO_TRAIN_SIZE,
    n_eval: int = DEMO_EVAL_SIZE, seed: int = DEMO_SEED, fmt: str = "completion",
) -> tuple[Path, Path]:
    """Write demo_train.jsonl and demo_eval.jsonl (eval inputs disjoint from train)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = make_examples(n_train, task=task, seed=seed, fmt=fmt)
    held = make_examples(n_eval, task=task, seed=seed + 1, fmt=fmt,
                         exclude={r["input"] for r in train})
    paths = (out / "demo_train.jsonl", out / "demo_eval.jsonl")
    for path, rows in zip(paths, (train, held), strict=True):
        if fmt == "completion":  # "input" only served the held-out split
            rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
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


PREFERENCE_PROMPT = "Name the animal in the list: {words}"


def make_preference_pairs(
    n: int, *, seed: int = 0, exclude: set[str] | None = None, words: int = 3,
    token_count: Callable[[str], int] | None = None,
) -> list[dict[str, Any]]:
    """`n` preference records with distinct word lists (those in `exclude` skipped: a held-out
    split); see the module docstring.

    `token_count(word)`: the rejected word is one with as many tokens as the animal, so that
    a model's ranking is not decided by length (each token costs a random-init model ~ln V
    nats: without this the base "prefers" the shorter word, not nothing)."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[dict[str, Any]] = []
    while len(out) < n:
        listed, animal = _one_animal(rng, words)
        text = " ".join(listed)
        others = [w for w in listed if w != animal and (
            token_count is None or token_count(w) == token_count(animal))]
        if text in seen or not others:
            continue
        seen.add(text)
        wrong = rng.choice(others)
        out.append({
            "input": {"messages": [{"role": "user",
                                    "content": PREFERENCE_PROMPT.format(words=text)}]},
            "preferred_output": [{"role": "assistant", "content": animal}],
            "non_preferred_output": [{"role": "assistant", "content": wrong}],
        })
    return out


def completion_logps(model: Any, tokenizer: Any, prompt: list[dict[str, str]],
                     completions: list[list[dict[str, str]]]) -> list[float]:
    """log p(completion | prompt) of each completion, summed over its tokens, rendered as TRL's
    DPO renders a pair: the chat template with the generation prompt, then the rest. One
    right-padded batch."""
    import torch

    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    rows = [tokenizer.apply_chat_template(prompt + c, tokenize=True, return_dict=False)
            for c in completions]
    longest = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), longest), dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(2, ids[:, 1:, None])[..., 0]
    keep = mask[:, 1:].clone()
    keep[:, :len(prompt_ids) - 1] = 0  # position t predicts token t+1: completion tokens only
    return (logp * keep).sum(dim=1).tolist()


def preference_accuracy(model: Any, tokenizer: Any, records: list[dict[str, Any]]) -> float:
    """Fraction of preference records whose preferred output the model scores higher."""
    model.eval()
    hits = 0
    for r in records:
        chosen, rejected = completion_logps(model, tokenizer, r["input"]["messages"],
                                            [r["preferred_output"], r["non_preferred_output"]])
        hits += int(chosen > rejected)
    return hits / max(1, len(records))
