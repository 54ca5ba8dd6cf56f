"""bench/upload_bench.py at its smallest (1 MiB valid, 1 MiB hostile): it starts the API and
the bare baseline, uploads, and prints RSS growth, MB/s and the target lines (seconds).

Speed is not asserted (2 shared cores); the memory target line is (before uploads streamed,
the 20 MiB hostile file grew the API by 1247 MiB: RELIABILITY.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_upload_bench_smallest_sizes(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "upload_bench.py"), "--sizes", "1",
         "--hostile-mib", "1", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"valid 1 MiB\s+-> 201 .* MB/s .*ratio vs bare", out), out
    assert re.search(r"hostile 1 MiB\s+-> 422 ", out), out
    assert "at every size: worst" in out and ": met" in out, out
    assert "MB/s (valid files): slowest" in out, out
