"""bench/train_bench.py --quick runs every arm end to end and prints its ratio lines.

Speed is not asserted: --quick uses 128-token sequences and batches of 2 (QUICK_SHAPE) so it
takes seconds of training even where bf16 is emulated; the HF arms fall back to fp32 there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
HANG_TIMEOUT_S = 900  # a hang, not speed: ~1 min of CPU, >10 min of wall at load 20 on 2 cores


def test_quick_bench_prints_ratios(tmp_path):
    # its own session: on a timeout the arms' child processes go too, not only the parent
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "train_bench.py"), "--quick",
         "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=HANG_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    for line in ("ratio ours/book [quick]:", "ratio ours/peer [quick]", "eval loss ours/peer",
                 "GEMM peak, ours [quick]", "GEMM peak, peer [quick]", "LM head", "cpu flags:",
                 "== summary"):
        assert line in out, out
    row = next(ln for ln in out.splitlines() if ln.lstrip().startswith("quick "))
    assert "M " in row and "x" in row, row  # the summary's row for the shape
