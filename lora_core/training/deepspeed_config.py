"""DeepSpeed ZeRO configs built from a RunSpec, and the process-group setup they need.

The ZeRO-3 config is the book's (bf16, overlap_comm, contiguous_gradients,
stage3_gather_16bit_weights_on_model_save) with "auto" sizes that the HF integration fills
from TrainingArguments, and `zero_allow_untested_optimizer` so the Trainer's torch AdamW is
used: DeepSpeed's fused CPU Adam would be JIT-compiled (30-60 s, FACTS.md) and is not needed
for a few million LoRA parameters.

On CPU the backend is gloo; DeepSpeed still needs RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/
MASTER_PORT even for one process, so `init_distributed` sets them (a free port per run) when
no launcher (torchrun) did.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

__all__ = ["build_deepspeed_config", "init_distributed", "uses_deepspeed"]

# Where DeepSpeed caches JIT-built ops; shared across runs so a build is paid once.
TORCH_EXTENSIONS_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / (
    "lorajobs/torch_extensions"
)
# Bucket sizes in elements. DeepSpeed's defaults (5e8) pre-allocate GBs; LoRA grads are small.
REDUCE_BUCKET_SIZE = 50_000_000
STAGE3_PREFETCH_BUCKET_SIZE = 50_000_000


def uses_deepspeed(spec: Any) -> bool:
    """DeepSpeed only when a ZeRO stage is asked for; plain multi-process runs use DDP."""
    return spec.distributed.zero_stage > 0


def build_deepspeed_config(spec: Any, precision: str) -> dict[str, Any]:
    """The DeepSpeed config dict for `spec.distributed.zero_stage` (0, 2 or 3).

    `precision` is the resolved one ("fp32" | "bf16" | "fp16"); it must agree with the
    TrainingArguments flags or the HF integration refuses the config.
    """
    stage = spec.distributed.zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 2:
        zero.update(
            overlap_comm=True,
            contiguous_gradients=True,
            reduce_bucket_size=REDUCE_BUCKET_SIZE,
        )
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=STAGE3_PREFETCH_BUCKET_SIZE,
            stage3_param_persistence_threshold=0,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000_000,  # progress is ours to report
        "wall_clock_breakdown": False,
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None) -> None:
    """Set the rendezvous env for a lone process, then `deepspeed.init_distributed`.

    Must run before TrainingArguments is built (it reads the process group). Idempotent.
    """
    import torch

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(TORCH_EXTENSIONS_DIR))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if not torch.cuda.is_available():
        _skip_shm_comm_op()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    deepspeed.init_distributed(dist_backend=backend)


def _skip_shm_comm_op() -> None:
    """Keep DeepSpeed from JIT-building its shared-memory comm op on CPU.

    Its TorchBackend builds `deepspeed_shm_comm` (two C++ files, ~50 CPU-s and over a minute on
    2 cores, again whenever the venv's path changes) for `inference_all_reduce` only; ZeRO
    training's all_gather/reduce_scatter go through gloo whether it is built or not. Marking it
    incompatible in the probe's dict (cached by deepspeed.ops, edits persist) makes
    `build_shm_op` return None, its documented fallback.
    """
    import deepspeed  # imports deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
