"""A small Llama-style model and tokenizer built locally: no model hub, ever.

Used by the tests, the demo and the benchmarks. The weights are random (seeded), the tokenizer
is a byte-level BPE trained with `tokenizers` on a bundled corpus (plus any extra text given),
so every byte string is encodable. Saved with `save_pretrained` as safetensors only.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path

__all__ = ["make_tiny_model", "train_tokenizer"]

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# A minimal chat template so the `chat` data format renders the same way in training and serving.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _bundled_corpus() -> list[str]:
    text = resources.files("lora_core").joinpath("assets/corpus.txt").read_text("utf-8")
    return [line for line in text.splitlines() if line.strip()]


def train_tokenizer(vocab_size: int = 1024, extra_text: Iterable[str] = ()):  # type: ignore[no-untyped-def]
    """Byte-level BPE on the bundled corpus (+ `extra_text`); returns a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = _bundled_corpus() + [t for t in extra_text if t]
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 1024,
    max_position_embeddings: int = 2048,
    dtype: str = "float32",
    seed: int = 0,
    extra_text: Iterable[str] = (),
    max_shard_size: str | int = "2GB",
) -> Path:
    """Build, randomly initialise (seeded) and save a Llama-style model + tokenizer to `out_dir`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size=vocab_size, extra_text=extra_text)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or int(hidden_size * 8 / 3 // 16 * 16) or 16,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    return out
