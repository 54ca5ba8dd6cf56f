"""Event streams at larger N: another tenant's `GET /v1/jobs` p99 idle vs. with N streams
open, and the API process's CPU while only the streams are open (live uvicorn, same run).

    .venv/bin/python bench/stream_bench.py                       # N = 200 500 1000, SQLite
    .venv/bin/python bench/stream_bench.py -n 1000 --backend postgresql

One JSON line per N: p50 and p99 idle and loaded (ms), p99_ratio, stream_cpu_s_per_s (API
CPU seconds per second with the streams open and nothing else). The CI test with N=200 is
tests/api/test_streams.py::test_other_tenants_p99_under_open_streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.api.test_streams import (  # noqa: E402
    STREAMED_JOBS,
    Server,
    _hold_streams,
    _start,
    cpu_seconds,
)

SAMPLES = 300
CPU_WINDOW_S = 3.0


async def _latencies(client: httpx.AsyncClient, n: int) -> tuple[float, float]:
    """(p50, p99) in ms of `n` sequential GET /v1/jobs."""
    took = []
    for _ in range(n):
        start = time.perf_counter()
        r = await client.get("/v1/jobs", params={"limit": 20})
        took.append(time.perf_counter() - start)
        r.raise_for_status()
    cuts = statistics.quantiles(took, n=100)
    return round(cuts[49] * 1000, 1), round(cuts[98] * 1000, 1)


async def _measure(server: Server, n: int) -> dict[str, float]:
    api = server.svc.procs[-1].pid
    for _ in range(20):
        server.job("reader")
    streamed = [server.job("streamer", events=5) for _ in range(STREAMED_JOBS)]
    async with httpx.AsyncClient(base_url=server.url, headers=server.h("reader"),
                                 timeout=60) as reader:
        await _latencies(reader, 30)
        idle = await _latencies(reader, SAMPLES)
        opened, stop = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(_hold_streams(server, streamed, n, opened, stop))
        await asyncio.wait_for(opened.wait(), 300)
        before, start = cpu_seconds(api), time.monotonic()
        await asyncio.sleep(CPU_WINDOW_S)
        stream_cpu = (cpu_seconds(api) - before) / (time.monotonic() - start)
        loaded = await _latencies(reader, SAMPLES)
        stop.set()
        await holder
    return {"idle_p50_ms": idle[0], "loaded_p50_ms": loaded[0], "idle_p99_ms": idle[1],
            "loaded_p99_ms": loaded[1], "p99_ratio": round(loaded[1] / idle[1], 2),
            "stream_cpu_s_per_s": round(stream_cpu, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, nargs="+", default=[200, 500, 1000])
    parser.add_argument("--backend", default="sqlite", choices=["sqlite", "postgresql"])
    args = parser.parse_args()
    for n in args.n:
        with tempfile.TemporaryDirectory() as tmp:
            gen = _start(Path(tmp), ("streamer", "reader"), backend=args.backend,
                         stream_max_per_key=n, stream_max_total=n)
            server = next(gen)
            try:
                row = asyncio.run(_measure(server, n))
            finally:
                gen.close()
        print(json.dumps({"scenario": "streams", "backend": args.backend, "n": n, **row}),
              flush=True)


if __name__ == "__main__":
    main()
