"""Measured GEMM peak of this machine: the denominator of the training bench's "fraction of peak".

A square matmul large enough to run at the BLAS/oneDNN kernel's best speed, repeated for a fixed
wall time; the best of several windows (the machine is shared: a median would mostly measure the
neighbours). fp32 goes through MKL, bf16 through oneDNN (AVX512-BF16 or AMX where present).

    .venv/bin/python bench/gemm_peak.py          # prints fp32 and bf16 GFLOP/s
"""

from __future__ import annotations

import time

GEMM_N = 2048  # 2048^3 x 2 = 17 GFLOP per matmul: ~0.02-0.1 s on 2 cores, kernel-bound
WINDOW_S = 0.6  # one timing window; several windows, best kept
WINDOWS = 4


def gemm_gflops(dtype_name: str, n: int = GEMM_N, windows: int = WINDOWS,
                window_s: float = WINDOW_S, per_cpu_s: bool = False) -> float:
    """Best GFLOP/s of (n, n) @ (n, n) in `dtype_name` ("fp32" | "bf16") over `windows` windows.

    `per_cpu_s`: GFLOP per CPU-second of this process instead (user + sys, all threads), times
    torch's thread count: the peak a fully-fed process would reach, little moved by neighbours
    taking the cores (a descheduled thread burns no CPU time). The training bench divides its
    arms' FLOPs per CPU-second by it on a loaded machine.
    """
    import resource

    import torch

    def clock() -> float:
        if not per_cpu_s:
            return time.perf_counter()
        r = resource.getrusage(resource.RUSAGE_SELF)
        return (r.ru_utime + r.ru_stime) / torch.get_num_threads()

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.matmul(a, b)  # warm-up: oneDNN builds its kernel on the first call
    best = 0.0
    for _ in range(windows):
        count, t0, c0 = 0, time.perf_counter(), clock()
        while time.perf_counter() - t0 < window_s or count == 0:
            torch.matmul(a, b)
            count += 1
        best = max(best, 2 * n**3 * count / (clock() - c0) / 1e9)
    return best


def main() -> None:
    for name in ("fp32", "bf16"):
        print(f"gemm {name} {GEMM_N}x{GEMM_N}: {gemm_gflops(name):.0f} GFLOP/s, "
              f"{gemm_gflops(name, per_cpu_s=True):.0f} per CPU-second x threads")


if __name__ == "__main__":
    main()
