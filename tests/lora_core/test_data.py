"""Data formats, validation reports, tokenisation masks and collation (tiny, seeded)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lora_core.data.formats import detect_format, load_examples, validate_file
from lora_core.errors import DatasetError


def _jsonl(rows: list) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def test_formats_detected_from_first_valid_record():
    assert detect_format({"instruction": "a", "output": "b"}) == "alpaca"
    assert detect_format({"prompt": "a", "completion": "b"}) == "completion"
    assert detect_format({"messages": []}) == "chat"
    assert detect_format({"text": "x"}) == "text"
    data = _jsonl(["not json", {"text": "hello"}, {"text": "world"}])
    report = validate_file(data)
    assert report.format == "text" and report.num_examples == 2
    assert report.errors == [{"line": 1, "field": "", "message": report.errors[0]["message"]}]
    assert report.errors[0]["message"].startswith("invalid JSON")


def test_every_line_read_and_errors_name_line_and_field():
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
    ]
    report = validate_file(_jsonl(rows), "chat")
    got = {(e["line"], e["field"], e["message"]) for e in report.errors}
    assert (2, "messages[1].role", "unknown role 'bot'") in got
    assert (3, "messages", "no assistant turn") in got
    assert (4, "messages[0].content", "missing field 'content'") in got
    assert report.num_examples == 1 and report.num_errors == 4  # line 2 also lacks an assistant


def test_alpaca_errors_and_max_errors_cap():
    rows = [{"instruction": "do", "output": ""}, {"instruction": "do"}] * 30
    report = validate_file(_jsonl(rows), "alpaca", max_errors=5)
    assert report.num_errors == 60 and len(report.errors) == 5
    assert report.errors[0] == {"line": 1, "field": "output", "message": "empty output"}
    assert report.errors[1] == {"line": 2, "field": "output", "message": "missing field 'output'"}


def test_json_list_and_sha256_and_char_stats(tmp_path):
    path = tmp_path / "d.json"
    rows = [{"prompt": "a", "completion": "bc"}, {"prompt": "", "completion": "d"}]
    path.write_text(json.dumps(rows))
    report = validate_file(path)
    assert report.ok and report.format == "completion" and report.num_examples == 2
    assert report.stats["unit"] == "chars" and report.stats["max"] == 3
    assert len(report.sha256) == 64


def test_load_examples_raises_with_all_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(_jsonl([{"text": "ok"}, {"text": ""}, "{"]))
    with pytest.raises(DatasetError) as exc:
        load_examples(path)
    assert [e["line"] for e in exc.value.errors] == [2, 3]
    assert exc.value.line == 2


def test_token_stats_with_plain_tokenizers_tokenizer(tiny_model_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    rows = [{"text": "the quick brown fox " * n} for n in (1, 2, 40)]
    report = validate_file(_jsonl(rows), tokenizer=tok, max_seq_length=32)
    assert report.stats["unit"] == "tokens" and report.num_tokens == sum(
        len(tok.encode(r["text"]).ids) + 1 for r in rows
    )
    assert report.num_truncated == 1


def test_formats_module_is_torch_free():
    code = "import sys, lora_core.data.formats; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_prompt_masked_and_eos_appended(tokenizer):
    from lora_core.data.tokenize import IGNORE_INDEX, tokenize_example

    example = {"prompt": "red fox", "completion": " fox red"}
    feats, truncated = tokenize_example(example, tokenizer, 64)
    prompt_len = len(tokenizer("red fox")["input_ids"])
    assert not truncated
    assert feats["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert feats["labels"][prompt_len:] == feats["input_ids"][prompt_len:]
    assert feats["input_ids"][-1] == tokenizer.eos_token_id


def test_chat_trains_on_assistant_turns_only(tokenizer):
    from lora_core.data.tokenize import IGNORE_INDEX, tokenize_example

    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "red"},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "cat"},
        {"role": "assistant", "content": "dog"},
    ]
    feats, _ = tokenize_example({"messages": msgs}, tokenizer, 256)
    rendered = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert tokenizer.decode(feats["input_ids"]) == rendered
    pairs = zip(feats["input_ids"], feats["labels"], strict=True)
    trained = tokenizer.decode([t for t, lab in pairs if lab != IGNORE_INDEX])
    assert trained.replace("</s>", "").split() == ["blue", "dog"]


def test_truncation_drops_examples_without_loss_tokens(tokenizer):
    from lora_core.data.tokenize import tokenize_examples

    long_prompt = {"prompt": "apple " * 50, "completion": "river"}
    ok = {"prompt": "a", "completion": "b"}
    feats, stats = tokenize_examples([long_prompt, ok], tokenizer, 16)
    assert len(feats) == 1 and stats.num_dropped == 1 and stats.num_truncated == 1
    with pytest.raises(DatasetError):
        tokenize_examples([long_prompt], tokenizer, 16)


def test_batched_encoding_equals_encoding_one_text_at_a_time(tokenizer, monkeypatch):
    """tokenize_examples encodes each field over a batch of examples in one tokenizer call:
    the features must be those of one call per text, across batch boundaries and for every
    shape of example (an empty prompt or completion encodes to nothing, not to a BOS)."""
    from lora_core.data import tokenize
    from lora_core.data.tokenize import IGNORE_INDEX, tokenize_example, tokenize_examples

    monkeypatch.setattr(tokenize, "ENCODE_BATCH", 3)
    chat = {"messages": [{"role": "user", "content": "red"},
                         {"role": "assistant", "content": "blue fish"}]}
    examples = [{"prompt": "red fox", "completion": " fox red"},
                {"text": "the quick brown fox"},
                chat,
                {"prompt": "", "completion": "river stone"},
                {"prompt": "green book", "completion": " wolf" * 40},  # truncated
                {"prompt": "a", "completion": ""},
                {"prompt": "blue", "completion": " green green"},
                chat]
    eos = tokenizer.eos_token_id

    def one_at_a_time(example):
        if "messages" in example:
            return tokenize_example(example, tokenizer, 32)[0]
        enc = [] if not example.get("prompt", "x") else tokenizer(
            example.get("text", example.get("prompt")), add_special_tokens=True)["input_ids"]
        if "text" in example:
            ids, labels = enc + [eos], enc + [eos]
        else:
            completion = tokenizer(example["completion"], add_special_tokens=False)[
                "input_ids"] if example["completion"] else []
            ids = enc + completion + [eos]
            labels = [IGNORE_INDEX] * len(enc) + completion + [eos]
        return {"input_ids": ids[:32], "labels": labels[:32], "attention_mask": [1] * len(ids[:32])}

    features, stats = tokenize_examples(examples, tokenizer, 32)
    assert features == [one_at_a_time(e) for e in examples]
    assert stats.num_examples == len(examples) and stats.num_truncated == 1
    assert stats.num_tokens == sum(len(f["input_ids"]) for f in features)


def _features(tokenizer, n=5):
    from lora_core.data.formats import normalize_record
    from lora_core.data.synthetic import make_examples
    from lora_core.data.tokenize import tokenize_examples

    records = [normalize_record(r, "alpaca") for r in make_examples(n, seed=3)]
    records.append({"text": "the quick brown fox"})
    return tokenize_examples(records, tokenizer, 128)[0]


def test_padding_collator_pads_to_longest(tokenizer):
    from lora_core.data.collate import PaddingCollator

    feats = _features(tokenizer)
    batch = PaddingCollator(tokenizer.pad_token_id)(feats)
    longest = max(len(f["input_ids"]) for f in feats)
    assert batch["input_ids"].shape == (len(feats), longest)
    assert batch["attention_mask"].sum() == sum(len(f["input_ids"]) for f in feats)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
