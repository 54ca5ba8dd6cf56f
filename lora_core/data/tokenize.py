"""Normalised examples -> token ids with loss masks.

Output per example (lists of equal length L <= max_seq_length):

    input_ids       [L]  prompt tokens + response tokens + EOS
    labels          [L]  IGNORE_INDEX (-100) on prompt / non-assistant tokens, else = input_ids
    attention_mask  [L]  all ones (padding is the collator's job)

Prompt and response are tokenised separately and concatenated, so the mask boundary is exact
(tokenising "prompt+response" as one string can merge tokens across the boundary). Examples
with no loss-bearing token left after truncation are dropped and counted: they would add a
0/0 loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_core.errors import DatasetError

__all__ = ["IGNORE_INDEX", "TokenizeStats", "tokenize_example", "tokenize_examples"]

IGNORE_INDEX = -100  # torch.nn.CrossEntropyLoss's default ignore_index; HF models use it too
# Examples encoded per tokenizer call: large enough that the per-call cost vanishes, small
# enough that a huge file's Encoding objects never all exist at once.
ENCODE_BATCH = 1024


@dataclass
class TokenizeStats:
    """Counts over a tokenised dataset. `num_label_tokens` = tokens that carry loss."""

    num_examples: int = 0
    num_dropped: int = 0
    num_truncated: int = 0
    num_tokens: int = 0
    num_label_tokens: int = 0


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _encode_many(tokenizer: Any, texts: list[str], *, special: bool) -> list[list[int]]:
    """`_encode` of each text, the whole batch at once: a fast tokenizer encodes a batch in one
    Rust call (on its own threads) instead of one Python round trip per text.

    The first text goes through the tokenizer's own call, which sets its Rust backend up as
    every call does (no truncation, no padding, its special-token splitting); the others go to
    that backend's `encode_batch` straight, as the call would pass them, without transformers
    turning each encoding into a dict of lists (over half of a batch's time). Same ids.
    """
    out: list[list[int]] = [[] for _ in texts]
    todo = [i for i, text in enumerate(texts) if text]
    if not todo:
        return out
    batch = [texts[i] for i in todo]
    encoded = list(tokenizer(batch[:1], add_special_tokens=special)["input_ids"])
    backend = getattr(tokenizer, "backend_tokenizer", None) \
        if getattr(tokenizer, "is_fast", False) else None
    if len(batch) > 1:
        if backend is not None:
            encoded += [e.ids for e in backend.encode_batch(batch[1:],
                                                            add_special_tokens=special)]
        else:
            encoded += tokenizer(batch[1:], add_special_tokens=special)["input_ids"]
    for i, ids in zip(todo, encoded, strict=True):
        out[i] = list(ids)
    return out


def _segments(example: dict[str, Any], tokenizer: Any) -> list[tuple[list[int], bool]]:
    """[(ids, trains_on)] in order; EOS appended to the last loss-bearing segment."""
    if "messages" in example:
        return _chat_segments(example["messages"], tokenizer)
    return _segments_batch([example], tokenizer)[0]


def _segments_batch(examples: list[dict[str, Any]], tokenizer: Any
                    ) -> list[list[tuple[list[int], bool]]]:
    """`_segments` of each text or prompt/completion example, each field encoded in one call
    over the batch (chat examples render per example: _chat_segments)."""
    eos = tokenizer.eos_token_id
    plain = [e for e in examples if "messages" not in e]
    firsts = _encode_many(tokenizer, [e["text"] if "text" in e else e["prompt"] for e in plain],
                          special=True)
    completions = _encode_many(tokenizer, [e.get("completion", "") for e in plain],
                               special=False)
    encoded = iter(zip(plain, firsts, completions, strict=True))
    out = []
    for example in examples:
        if "messages" in example:
            out.append(_chat_segments(example["messages"], tokenizer))
            continue
        _, first, completion = next(encoded)
        if "text" in example:
            out.append([(first + [eos], True)])
        else:
            out.append([(first, False), (completion + [eos], True)])
    return out


def _chat_segments(messages: list[dict[str, str]], tokenizer: Any) -> list[tuple[list[int], bool]]:
    """Render with the tokenizer's chat template; only assistant content (+ its end) trains.

    For each assistant turn i: text(messages[:i], add_generation_prompt) is the prompt prefix,
    text(messages[:i+1]) minus that prefix is the response (its closing EOS included by the
    template). Requires a template whose renders extend each other, which HF templates do.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError("chat data needs a tokenizer with a chat_template", field="messages")

    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    segments: list[tuple[list[int], bool]] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = render(messages[:i], True) if i else render([], True)
        full = render(messages[: i + 1], False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise DatasetError("chat template renders are not prefix-consistent", field="messages")
        segments.append((_encode(tokenizer, prefix[len(done):], special=not done), False))
        response = _encode(tokenizer, full[len(prefix):], special=False)
        if tokenizer.eos_token_id not in response[-2:]:
            response.append(tokenizer.eos_token_id)
        segments.append((response, True))
        done = full
    return segments


def tokenize_example(
    example: dict[str, Any], tokenizer: Any, max_seq_length: int
) -> tuple[dict[str, list[int]] | None, bool]:
    """(features or None if nothing trains after truncation, was_truncated)."""
    return _features(_segments(example, tokenizer), max_seq_length)


def _features(segments: list[tuple[list[int], bool]], max_seq_length: int
              ) -> tuple[dict[str, list[int]] | None, bool]:
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, trains in segments:
        input_ids += ids
        labels += ids if trains else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > max_seq_length
    input_ids, labels = input_ids[:max_seq_length], labels[:max_seq_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None, truncated
    feats = {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}
    return feats, truncated


def tokenize_examples(
    examples: list[dict[str, Any]], tokenizer: Any, max_seq_length: int
) -> tuple[list[dict[str, list[int]]], TokenizeStats]:
    """Tokenise all examples; DatasetError if none is left with a loss-bearing token."""
    stats = TokenizeStats()
    features = []
    segments = (seg for start in range(0, len(examples), ENCODE_BATCH)
                for seg in _segments_batch(examples[start:start + ENCODE_BATCH], tokenizer))
    for segs in segments:
        feats, truncated = _features(segs, max_seq_length)
        stats.num_truncated += int(truncated)
        if feats is None:
            stats.num_dropped += 1
            continue
        features.append(feats)
        stats.num_tokens += len(feats["input_ids"])
        stats.num_label_tokens += sum(1 for x in feats["labels"] if x != IGNORE_INDEX)
    stats.num_examples = len(features)
    if not features:
        raise DatasetError(
            f"no example has a loss-bearing token within max_seq_length={max_seq_length} "
            f"({stats.num_dropped} dropped)",
            field="training.max_seq_length",
        )
    return features, stats
