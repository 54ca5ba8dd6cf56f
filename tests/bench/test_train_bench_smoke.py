"""bench/train_bench.py --quick runs every arm end to end and prints its ratio lines.

Speed is not asserted: --quick uses 128-token sequences and batches of 2 (QUICK_SHAPE) so it
takes seconds of training even where bf16 is emulated; the HF arms fall back to fp32 there.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_quick_bench_prints_ratios(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_bench.py"), "--quick",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for line in ("ratio ours/book [quick]:", "ratio ours/peer [quick]", "eval loss ours/peer",
                 "GEMM peak, ours [quick]", "GEMM peak, peer [quick]", "LM head", "cpu flags:",
                 "== summary"):
        assert line in out, out
    row = next(ln for ln in out.splitlines() if ln.lstrip().startswith("quick "))
    assert "M " in row and "x" in row, row  # the summary's row for the shape
