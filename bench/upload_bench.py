"""Upload benchmark: API peak RSS growth and MB/s while `POST /v1/datasets` validates a file.

    python bench/upload_bench.py [--sizes 1,20,200] [--hostile-mib 20] [--backend sqlite]

One uvicorn process of the API (1 worker, uvloop + httptools, as bench/api_bench.py starts it)
and, in the same run, the baseline: a bare FastAPI endpoint that reads the same multipart body
and throws it away (the ceiling of this server and client for moving the bytes). Uploads are
sent by `curl -F` (C, streaming the file from disk; httpx if curl is missing).

Files: valid alpaca JSONL of each size in MiB (records of 100-1500 bytes, ~560 on average), and
a hostile JSON list `[{},{},...]` (the issue's 20 MiB file that took the API from 123 MB to
1.37 GB before its 422). Per upload:

    RSS growth  peak resident memory of the API process during the upload minus its resident
                memory just before (VmHWM after resetting it through /proc/<pid>/clear_refs,
                and VmRSS sampled every 5 ms, whichever is higher)
    MB/s        file bytes / wall time of the request (10^6 bytes per second)
    MB/cpu-s    file bytes / CPU seconds the API process spent on the request (utime + stime):
                what one core of its own would do, on a machine shared with other work

Targets (issue 10, item 2): RSS growth under 64 MiB at every size; at least 50 MB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_bench import ROOT, free_port, start_uvicorn  # noqa: E402

from lorajobs.localserver import stop_server as stop  # noqa: E402

MiB = 1024 * 1024
RSS_TARGET_MIB = 64
MBPS_TARGET = 50
SAMPLE_SECONDS = 0.005
BARE_APP = '''
from fastapi import FastAPI, Request
app = FastAPI()
@app.get("/healthz")
def healthz():
    return {"status": "ok"}
@app.post("/upload")
async def upload(request: Request):
    n = 0
    async for chunk in request.stream():
        n += len(chunk)
    return {"bytes": n}
'''
WORDS = ("the a name animal list answer with one word of in to is that for on as it be by this "
         "write summary explain why which how translate sentence following paragraph").split()


def make_valid(path: Path, mib: int, seed: int = 0) -> int:
    """Alpaca JSONL of at most `mib` MiB (whole lines); returns the number of records."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))

    block = "".join(json.dumps({"instruction": text(5, 40), "input": text(0, 60) if
                                rng.random() < 0.4 else "", "output": text(10, 200)}) + "\n"
                    for _ in range(4000)).encode()
    target, written, records = mib * MiB, 0, 0
    per_block = block.count(b"\n")
    with open(path, "wb") as out:
        while written + len(block) <= target:
            out.write(block)
            written += len(block)
            records += per_block
        rest = block[:block.rfind(b"\n", 0, target - written) + 1]
        out.write(rest)
        records += rest.count(b"\n")
    return records


def make_hostile(path: Path, mib: int) -> None:
    """`[{},{},...,{}]` of `mib` MiB."""
    n = (mib * MiB - 2) // 3
    with open(path, "wb") as out:
        out.write(b"[")
        for _ in range(n // 100_000):
            out.write(b"{}," * 100_000)
        out.write(b"{}," * (n % 100_000) + b"{}]")


def status_kib(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, same user); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kib, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, status_kib(self.pid)["VmRSS"])
            time.sleep(SAMPLE_SECONDS)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def post_file(url: str, path: Path, key: str | None) -> tuple[int, float, str]:
    """(status, seconds, body) of a multipart upload of `path`."""
    if shutil.which("curl"):
        args = ["curl", "-s", "-o", "-", "-w", "\n%{http_code} %{time_total}", "-F",
                f"file=@{path};type=application/jsonl", url]
        if key:
            args += ["-H", f"Authorization: Bearer {key}"]
        out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
        body, _, tail = out.rpartition("\n")
        code, seconds = tail.split()
        return int(code), float(seconds), body
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    t0 = time.perf_counter()
    with open(path, "rb") as fh:
        resp = httpx.post(url, files={"file": (path.name, fh)}, headers=headers, timeout=600)
    return resp.status_code, time.perf_counter() - t0, resp.text


def measure(pid: int, url: str, path: Path, key: str | None) -> dict[str, float]:
    before = status_kib(pid)["VmRSS"]
    hwm = reset_peak(pid)
    cpu = cpu_seconds(pid)
    with RssSampler(pid) as sampler:
        code, seconds, body = post_file(url, path, key)
    cpu = max(cpu_seconds(pid) - cpu, 1e-3)
    peak = max(sampler.peak_kib, status_kib(pid)["VmHWM"] if hwm else 0)
    size = path.stat().st_size
    return {"status": code, "seconds": seconds, "mb_s": size / seconds / 1e6,
            "mb_cpu_s": size / cpu / 1e6,
            "rss_before_mib": before / 1024, "growth_mib": max(0, peak - before) / 1024,
            "bytes": size, "body": body[:300]}


def seed(env: dict[str, str]) -> str:
    """Migrate and create a tenant with a key; returns the key."""
    os.environ.update(env)
    from lorajobs.core import keys
    from lorajobs.core.db import session_scope
    from lorajobs.core.migrate import upgrade
    from lorajobs.core.settings import Settings

    settings = Settings()
    upgrade(settings)
    with session_scope(settings) as session:
        tenant = keys.create_tenant(session, name="bench")
        _, key = keys.create_key(session, tenant_id=tenant.id, name="bench", is_admin=True)
        session.commit()
    return key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,20,200", help="valid files, MiB, comma-separated")
    parser.add_argument("--hostile-mib", type=int, default=20)
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lorajobs-upload-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    from api_bench import drop_database, make_database

    url = make_database(args.backend, work)
    limit = (max(sizes + [args.hostile_mib]) + 1) * MiB
    env = {**os.environ, "LORAJOBS_DATA_DIR": str(work / "data"), "LORAJOBS_DATABASE_URL": url,
           "LORAJOBS_MAX_UPLOAD_BYTES": str(max(limit, 200 * MiB)), "PYTHONPATH": str(ROOT)}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        key = seed(env)
        files = {}
        for mib in sizes:
            files[f"valid {mib} MiB"] = path = work / f"valid-{mib}.jsonl"
            make_valid(path, mib)
        files[f"hostile {args.hostile_mib} MiB"] = hostile = work / "hostile.json"
        make_hostile(hostile, args.hostile_mib)
        (work / "bare_app.py").write_text(BARE_APP)
        bare_port, api_port = free_port(), free_port()
        procs.append(start_uvicorn("bare_app:app", bare_port, {**env, "PYTHONPATH": str(work)},
                                   work, factory=False))
        procs.append(start_uvicorn("lorajobs.api.app:create_app", api_port, env, ROOT,
                                   factory=True))
        api = f"http://127.0.0.1:{api_port}/v1/datasets"
        bare = f"http://127.0.0.1:{bare_port}/upload"
        warm = work / "warm.jsonl"
        make_valid(warm, 1)
        for target, k in ((api, key), (bare, None)):  # first-use imports and allocator growth
            post_file(target, warm, k)
        idle = status_kib(procs[1].pid)["VmRSS"] / 1024
        print(f"backend={args.backend}  API idle RSS {idle:.0f} MiB (the baseline of every "
              f"growth below); 1 uvicorn worker, uvloop + httptools, client "
              f"{'curl' if shutil.which('curl') else 'httpx'}")
        rows = []
        for name, path in files.items():
            base = measure(procs[0].pid, bare, path, None)
            ours = measure(procs[1].pid, api, path, key)
            expect = 422 if name.startswith("hostile") else 201
            if ours["status"] != expect:
                raise SystemExit(f"{name}: expected {expect}, got {ours['status']}: "
                                 f"{ours['body']}")
            rows.append((name, ours, base))
            print(f"{name:18} -> {ours['status']}  RSS growth {ours['growth_mib']:6.1f} MiB  "
                  f"{ours['mb_s']:7.1f} MB/s  ({ours['seconds']:6.2f} s, "
                  f"{ours['mb_cpu_s']:6.1f} MB/cpu-s)   bare endpoint {base['mb_s']:7.1f} MB/s "
                  f"({base['mb_cpu_s']:6.1f} MB/cpu-s), RSS growth {base['growth_mib']:5.1f} MiB"
                  f"   ratio vs bare {ours['mb_s'] / base['mb_s']:5.2f}")
        worst_rss = max(r[1]["growth_mib"] for r in rows)
        valid_rows = [r for r in rows if r[0].startswith("valid")]
        slowest = min(r[1]["mb_s"] for r in valid_rows) if valid_rows else float("nan")
        print(f"target RSS growth < {RSS_TARGET_MIB} MiB at every size: worst "
              f"{worst_rss:.1f} MiB: {'met' if worst_rss < RSS_TARGET_MIB else 'NOT met'}")
        per_cpu = min(r[1]["mb_cpu_s"] for r in valid_rows) if valid_rows else float("nan")
        print(f"target >= {MBPS_TARGET} MB/s (valid files): slowest {slowest:.1f} MB/s: "
              f"{'met' if slowest >= MBPS_TARGET else 'NOT met'} (per API CPU second: slowest "
              f"{per_cpu:.1f} MB/cpu-s; load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} CPUs)")
    finally:
        for p in procs:
            stop(p)
        drop_database(url)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
