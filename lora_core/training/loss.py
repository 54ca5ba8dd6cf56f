"""Causal-LM loss computed only where labels are: the LM head never sees unlabelled positions.

A causal LM's forward computes logits for every position, (batch, seq, vocab), then the loss
keeps the positions whose (shifted) label is not IGNORE_INDEX. In instruction tuning the prompt
carries no label (~60% of tokens in Alpaca-like data) and padding none either, so most of the
head's matmul, its fp32 upcast, the log-softmax over the vocabulary and their backward are
thrown away. With a 32k vocabulary the head is the largest matmul of a small model.

Here the decoder body runs as usual, the hidden states of labelled positions are gathered,
and only those go through the head and the cross-entropy:

    hidden (B, S, H) --[:, :-1][labels[:, 1:] != -100]--> (N, H) --lm_head--> (N, V) --CE--> sum

Same reduction as transformers' ForCausalLMLoss: summed, divided by `num_items_in_batch` (label
tokens over all gradient-accumulation micro-batches) when given, else by N. Equal to the
model's own loss up to float summation order (tests/lora_core/test_perf_loss.py).

The head and the cross-entropy are fused and chunked (`FusedHeadCrossEntropy`): per chunk of
HEAD_CHUNK rows the logits are computed, reduced to the loss, and turned straight into the
gradient of the hidden states (softmax - onehot) @ W. Never more than (HEAD_CHUNK, V) fp32 logits
exist, instead of three (N, V) fp32 tensors (log-softmax, its backward, nll's backward), and the
backward is a multiply by the incoming scalar. A head that trains (LoRA on lm_head,
modules_to_save) goes through the plain module instead.

Only for architectures whose forward is exactly body -> lm_head -> CE (no logit scaling or
soft-capping); others, and DeepSpeed-wrapped models, use the model's own forward.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "LABELLED_ONLY_MODEL_TYPES",
    "FusedHeadCrossEntropy",
    "supports_labelled_only",
    "labelled_only_loss",
]

IGNORE_INDEX = -100
HEAD_CHUNK = 1024  # rows per chunk: (1024, 32000) fp32 logits = 131 MB, GEMMs still large
# model_type values whose CausalLM forward is `lm_head(model(...)[0])` then ForCausalLMLoss,
# checked in transformers 5.x modeling code (Gemma/Cohere/Granite scale or cap logits: excluded)
LABELLED_ONLY_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})


def _causal_lm(model: Any) -> Any:
    """The transformers *ForCausalLM inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_labelled_only(model: Any) -> bool:
    """True when `labelled_only_loss` computes exactly what `model(**batch).loss` would."""
    lm = _causal_lm(model)
    config = getattr(lm, "config", None)
    if config is None or getattr(config, "model_type", None) not in LABELLED_ONLY_MODEL_TYPES:
        return False
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    # any head: a frozen plain Linear takes the fused path, a trainable one (LoRA on lm_head,
    # modules_to_save) runs as a module over the labelled rows (_head_loss_sum)
    return hasattr(lm, "model") and lm.get_output_embeddings() is not None


class FusedHeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), gradient w.r.t. hidden computed in the forward.

    hidden (N, H), weight (V, H) frozen, targets (N,) int64 -> scalar fp32. The matmuls run in
    `compute_dtype` (bf16 under autocast, like nn.Linear would), softmax in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype):  # type: ignore[override]
        w = weight.to(compute_dtype)
        need_grad = hidden.requires_grad
        grad = (torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
                if need_grad else None)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], HEAD_CHUNK):
            h = hidden[start:start + HEAD_CHUNK].to(compute_dtype)
            t = targets[start:start + HEAD_CHUNK]
            # one kernel from the matmul's output to fp32 log-probabilities: no separate
            # upcast, max, subtract passes over the (C, V) block (the head's elementwise work
            # was as large as its matmul on a 256-wide model)
            logp = torch.log_softmax(h @ w.T, dim=-1, dtype=torch.float32)  # (C, V)
            total -= logp.gather(1, t[:, None]).sum()
            if need_grad:
                probs = logp.exp_()  # softmax in place
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                grad[start:start + HEAD_CHUNK] = probs.to(compute_dtype) @ w
        ctx.save_for_backward(grad if need_grad else torch.empty(0))
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad * grad_total).to(ctx.hidden_dtype), None, None, None


def _head_loss_sum(head: Any, picked: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed CE of the head over `picked` (N, H); fused when the head is a frozen Linear."""
    weight = getattr(head, "weight", None)
    plain = (type(head) is torch.nn.Linear and head.bias is None and weight is not None
             and not weight.requires_grad)
    if not plain:
        logits = head(picked).float()  # (N, V): HF's loss upcasts too
        return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    assert weight is not None  # `plain` checked it
    if torch.is_autocast_enabled(picked.device.type):
        compute_dtype = torch.get_autocast_dtype(picked.device.type)
    else:
        compute_dtype = torch.promote_types(picked.dtype, weight.dtype)
    with torch.autocast(picked.device.type, enabled=False):
        return FusedHeadCrossEntropy.apply(picked, weight, targets, compute_dtype)


def labelled_only_loss(
    model: Any, inputs: dict[str, torch.Tensor], num_items_in_batch: Any = None
) -> torch.Tensor:
    """Scalar loss of a batch `inputs` = {input_ids (B, S), labels (B, S), attention_mask
    (B, S) or a float 4D mask (B, 1, S, S), position_ids (B, S) optional}."""
    lm = _causal_lm(model)
    body_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = lm.model(**body_inputs, use_cache=False).last_hidden_state  # (B, S, H)
    shifted = inputs["labels"][:, 1:]  # position t predicts token t+1
    keep = shifted != IGNORE_INDEX
    picked = hidden[:, :-1][keep]  # (N, H)
    loss = _head_loss_sum(lm.get_output_embeddings(), picked, shifted[keep])
    if num_items_in_batch is None:
        return loss / keep.sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
