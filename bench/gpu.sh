#!/usr/bin/env bash
# Training throughput on a lent H200: tuned HF peer (b) vs lora_core.training.trainer (c), bf16, ~0.5B
# Llama-style model built from a config (random init, local tokenizer: no hub), fixed steps.
# Prints useful tokens/s per arm, the ratio, and MFU against the H200's dense bf16 peak
# (989 TFLOP/s). Budget: < 8 minutes (model build ~1 min, 2 arms x 40 steps, eval).
#
#   bash bench/gpu.sh              # STEPS=40 by default; STEPS=20 bash bench/gpu.sh if short
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import torch,sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    PY=.venv/bin/python
  else
    PY=python3
  fi
fi
# The CPU venv carries a CPU torch: on the GPU box use (or pip-install) a CUDA build.
if ! "$PY" -c 'import torch,sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo "no CUDA torch in $PY; installing pip packages (torch, transformers, peft, ...)" >&2
  "$PY" -m pip install -q torch "transformers>=5" "peft>=0.17" accelerate safetensors tokenizers pydantic
  "$PY" -m pip install -q -e . --no-deps
fi
"$PY" - <<'PYEOF'
import torch
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PYEOF
export TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
timeout 460 "$PY" bench/train_bench.py --gpu --steps "${STEPS:-40}" --repeats 1 \
  --workdir "${WORKDIR:-/tmp/lorajobs-gpu-bench}"
echo "MFU above = model FLOPs/s over ${H200_PEAK:-989} TFLOP/s (H200 SXM dense bf16)."
