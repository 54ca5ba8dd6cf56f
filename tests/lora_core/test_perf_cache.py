"""Tokenised-dataset cache: a hit equals fresh tokenisation; any input change misses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def cache_env(tmp_path, monkeypatch) -> Path:
    from lora_core.data.cache import CACHE_ENV

    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _write(path: Path, n: int, seed: int) -> Path:
    from lora_core.data.synthetic import make_examples

    path.write_text("".join(json.dumps(r) + "\n" for r in make_examples(n, seed=seed)))
    return path


def test_cached_features_equal_fresh_tokenisation(cache_env, tokenizer, tiny_model_dir,
                                                  tmp_path):
    from lora_core.data.formats import load_examples
    from lora_core.data.tokenize import tokenize_examples
    from lora_core.training.trainer import load_features

    data = _write(tmp_path / "train.jsonl", 30, seed=4)
    fresh = tokenize_examples(load_examples(data)[1], tokenizer, 256)
    first = load_features(data, None, tokenizer, tiny_model_dir, 256)
    assert len(list(cache_env.glob("*.safetensors"))) == 1
    second = load_features(data, None, tokenizer, tiny_model_dir, 256)  # a hit
    for fmt, feats, stats in (first, second):
        assert fmt == "alpaca" and feats == fresh[0] and stats == fresh[1]


def test_any_input_change_misses(cache_env, tokenizer, tiny_model_dir, tmp_path):
    from lora_core.data.cache import cache_key

    data = _write(tmp_path / "a.jsonl", 5, seed=5).read_bytes()
    base = cache_key(data, None, 64, tiny_model_dir)
    assert base == cache_key(data, None, 64, tiny_model_dir)
    assert base != cache_key(data + b"\n", None, 64, tiny_model_dir)
    assert base != cache_key(data, None, 257, tiny_model_dir)
    assert base != cache_key(data, "alpaca", 64, tiny_model_dir)
    other_tok = tmp_path / "tok"
    other_tok.mkdir()
    for p in tiny_model_dir.iterdir():
        if p.suffix != ".safetensors":  # the weights are not part of the key
            (other_tok / p.name).write_bytes(p.read_bytes())
    assert base == cache_key(data, None, 64, other_tok)  # same tokenizer files, same key
    (other_tok / "tokenizer_config.json").write_text("{}")
    assert base != cache_key(data, None, 64, other_tok)


def test_bad_data_is_not_cached_and_off_disables(cache_env, tokenizer, tiny_model_dir,
                                                 tmp_path, monkeypatch):
    from lora_core.data.cache import CACHE_ENV
    from lora_core.errors import DatasetError
    from lora_core.training.trainer import load_features

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a"}\n')
    with pytest.raises(DatasetError):
        load_features(bad, None, tokenizer, tiny_model_dir, 256)
    assert not cache_env.exists() or not list(cache_env.iterdir())
    monkeypatch.setenv(CACHE_ENV, "off")
    load_features(_write(tmp_path / "ok.jsonl", 3, seed=6), None, tokenizer, tiny_model_dir, 256)
    assert not cache_env.exists() or not list(cache_env.iterdir())
