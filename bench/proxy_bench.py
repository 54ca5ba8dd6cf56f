"""The OpenAI proxy's overhead: chat completions through lorajobs vs. straight to the server.

    .venv/bin/python bench/proxy_bench.py                 # 400 requests each way, SQLite
    .venv/bin/python bench/proxy_bench.py -n 1000 --upstream http://vllm:8000 --model NAME

Upstream: by default tests/fake_vllm.py in a process of its own (a fixed answer, so the
difference is the proxy alone: auth, route lookup, relay); `--upstream` points at a real vLLM
serving `--model`. lorajobs: uvicorn (one process) with the upstream as a settings target.
Requests alternate direct / proxied / lorajobs' `/healthz` on one keep-alive client each,
sequentially. One JSON line: p50/p99 of both (ms), p50 and p99 overhead (ms), and the same for
a streamed answer's last byte; the p50 of the `/healthz` round trips interleaved with them (the
same moments of load) and the overhead in those units (`overhead_in_healthz`: on a shared,
loaded machine, a ratio to compare runs by where milliseconds swing with the load); the API
process's CPU time per proxied request (`api_cpu_ms`: its CPU over the measured loop, less the
interleaved `/healthz` requests' CPU measured alone; moves far less with the load than wall
time); plus the floor every authenticated lorajobs request pays (the key check, then a 404).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.checkpoint_bench import cpu_flags  # noqa: E402
from lorajobs.localserver import free_port, http_ok, start_server, stop_server  # noqa: E402

WARMUP = 30
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def _timed(client: httpx.Client, url: str, body: dict[str, object], stream: bool) -> float:
    start = time.perf_counter()
    if stream:
        with client.stream("POST", url, json={**body, "stream": True}) as resp:
            for _ in resp.iter_raw():
                pass
            assert resp.status_code == 200, resp.status_code
    else:
        resp = client.post(url, json=body)
        assert resp.status_code == 200, resp.text
    return (time.perf_counter() - start) * 1000


def _get(client: httpx.Client, url: str) -> float:
    start = time.perf_counter()
    assert client.get(url).status_code == 200
    return (time.perf_counter() - start) * 1000


def _compare(direct: httpx.Client, proxied: httpx.Client, upstream: str, api: str,
             body: dict[str, object], n: int, stream: bool, api_pid: int) -> dict[str, float]:
    for _ in range(WARMUP):
        _timed(direct, f"{upstream}/v1/chat/completions", body, stream)
        _timed(proxied, f"{api}/openai/v1/chat/completions", body, stream)
    d: list[float] = []
    p: list[float] = []
    h: list[float] = []
    cpu = _cpu_s(api_pid)
    for _ in range(n):
        d.append(_timed(direct, f"{upstream}/v1/chat/completions", body, stream))
        p.append(_timed(proxied, f"{api}/openai/v1/chat/completions", body, stream))
        h.append(_get(proxied, f"{api}/healthz"))
    cpu = _cpu_s(api_pid) - cpu
    overhead = _pct(p, 50) - _pct(d, 50)
    return {"direct_p50_ms": round(_pct(d, 50), 3), "direct_p99_ms": round(_pct(d, 99), 3),
            "proxied_p50_ms": round(_pct(p, 50), 3), "proxied_p99_ms": round(_pct(p, 99), 3),
            "overhead_p50_ms": round(overhead, 3),
            "overhead_p99_ms": round(_pct(p, 99) - _pct(d, 99), 3),
            "healthz_p50_ms": round(_pct(h, 50), 3),
            "overhead_in_healthz": round(overhead / _pct(h, 50), 2),
            "api_cpu_ms_per_iteration": round(cpu * 1000 / n, 3)}


def _floor(client: httpx.Client, url: str, n: int, api_pid: int) -> tuple[float, float]:
    """(p50 ms, API CPU ms per request) of a GET that answers without touching the upstream."""
    times = []
    for i in range(WARMUP + n):
        if i == WARMUP:
            cpu = _cpu_s(api_pid)
        start = time.perf_counter()
        client.get(url)
        times.append((time.perf_counter() - start) * 1000)
    return round(_pct(times[WARMUP:], 50), 3), (_cpu_s(api_pid) - cpu) * 1000 / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=400)
    parser.add_argument("--upstream", default=None)
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()
    from lorajobs.core import keys
    from lorajobs.core.db import get_sessionmaker
    from lorajobs.core.migrate import upgrade
    from lorajobs.core.settings import Settings

    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        upstream = args.upstream
        if upstream is None:
            port = free_port()
            upstream = f"http://127.0.0.1:{port}"
            procs.append(start_server(
                [sys.executable, "-m", "tests.fake_vllm", "--model", args.model, "--port",
                 str(port)], ready=lambda: http_ok(f"{upstream}/v1/models"), timeout=30))
        target = {"name": "bench", "urls": [upstream], "base_models": [args.model],
                  "adapter_dir": str(Path(tmp) / "adapters")}
        settings = Settings(data_dir=Path(tmp) / "data")
        upgrade(settings)
        with get_sessionmaker(settings)() as session:
            tenant = keys.create_tenant(session, name="bench")
            _, key = keys.create_key(session, tenant_id=tenant.id, name="bench")
            session.commit()
        api_port = free_port()
        api = f"http://127.0.0.1:{api_port}"
        env = {**os.environ, "LORAJOBS_DATA_DIR": str(settings.data_dir),
               "LORAJOBS_SERVING_TARGETS": json.dumps([target])}
        procs.append(start_server(
            [sys.executable, "-m", "uvicorn", "lorajobs.api.app:create_app", "--factory",
             "--host", "127.0.0.1", "--port", str(api_port), "--log-level", "warning",
             "--no-access-log"], ready=lambda: http_ok(f"{api}/healthz"), timeout=60,
            env=env, cwd=REPO))
        body: dict[str, object] = {"model": args.model, "max_tokens": 8, "temperature": 0,
                                   "messages": [{"role": "user", "content": "Add 3 and 4."}]}
        try:
            with httpx.Client(timeout=60) as direct, \
                    httpx.Client(timeout=60, headers={"Authorization": f"Bearer {key}"}) as prox:
                api_pid = procs[-1].pid
                load_start = os.getloadavg()[0]
                json_ = _compare(direct, prox, upstream, api, body, args.n, False, api_pid)
                stream = _compare(direct, prox, upstream, api, body, args.n, True, api_pid)
                # What any lorajobs request pays before a route runs: /healthz (no key) and an
                # unknown /v1 path with a key (the key's database check, then 404): the
                # proxy's overhead includes the second.
                healthz_ms, healthz_cpu = _floor(prox, f"{api}/healthz", args.n, api_pid)
                key_check_ms, _ = _floor(prox, f"{api}/v1/no-such-route", args.n, api_pid)
                for arm in (json_, stream):
                    arm["api_cpu_ms"] = round(arm["api_cpu_ms_per_iteration"] - healthz_cpu, 3)
                result = {"n": args.n, "upstream": "fake" if args.upstream is None else upstream,
                          "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
                          "load_avg_1m_start": load_start, "json": json_, "stream": stream,
                          "lorajobs_healthz_p50_ms": healthz_ms,
                          "lorajobs_healthz_api_cpu_ms": round(healthz_cpu, 3),
                          "lorajobs_key_check_p50_ms": key_check_ms,
                          "load_avg_1m_end": os.getloadavg()[0]}
        finally:
            for proc in reversed(procs):
                stop_server(proc)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
