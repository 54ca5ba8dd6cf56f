"""The trainer zygote: one process that imports torch, transformers, peft and lora_core once, and
forks a fresh trainer child per job, so a job does not pay ~4 s of imports (bench/LATENCY.md).

    python -m lorajobs.worker.zygote --fd N     started by prewarm.py, never by hand

Protocol: JSON lines over the unix socket inherited as fd N (the worker holds the other end).

    zygote -> worker   {"ready": true, "pid", "seconds"}      preloaded, fork-safe, serving
                       {"ready": false, "reason"}             cannot serve; exits
    worker -> zygote   {"args": [...], "cwd", "log",          `python -m lora_core <args>`
                        "env", "unset"}                       environment: set / remove
    zygote -> worker   {"spawned": pid} | {"error": message}
                       {"exited": pid, "returncode": rc}      negative: killed by that signal

Fork safety: nothing here runs a torch op, so no OpenMP/MKL/inter-op thread pool exists yet,
and torch's CUDA is never touched (CUDA does not survive fork). Before every fork the zygote
checks that it still has exactly one thread and that the CUDA driver is not loaded; if not,
it answers an error and the worker falls back to a plain spawn.

A forked child gets what the plain `subprocess.Popen` path gives: its own session and process
group (setsid, so the supervisor's killpg reaches it and its descendants), PR_SET_PDEATHSIG =
SIGKILL (the zygote itself dies with the worker the same way: a worker killed outright takes
zygote and trainer with it), stdin from /dev/null, stdout and stderr appended to the job's log,
cwd = the run dir, the environment runspec.trainer_env gives (the worker starts the zygote with
it and replaces the zygote when it changes; what the preloaded libraries added to it while
importing stays, as it would in a cold child). The child then leaves the serving loop, runs
`lora_core.child_process.main(args)` at the top of this module and exits with its code through
`exit_now`: what the interpreter's shutdown would flush and run, without its seconds of
freeing objects one by one.
The zygote reaps it (pidfd) and reports its exit code.

This module imports torch in its own process only: the worker imports prewarm.py, not this.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import os
import select
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from lora_core.child_process import exit_now
from lorajobs.worker.process_control import die_with_parent

__all__ = ["PRELOAD_MODULES", "CPU_ONLY_PRELOAD", "fork_hazard", "exit_now", "main"]

# What `python -m lora_core run` imports before its `started` event (python -X importtime,
# bench/LATENCY.md): torch ~1.2-2.7 s, transformers + its Trainer ~3 s, peft ~1 s on 2 cores.
# Not deepspeed: its import picks an accelerator with torch.cuda.is_available(), which loads
# the CUDA driver; the child imports it when it needs it (~0.3 s).
PRELOAD_MODULES = (
    "torch", "transformers", "transformers.trainer", "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto", "peft", "accelerate",
    "lora_core.child_process", "lora_core.workflow", "lora_core.training.trainer",
    "lora_core.training.callbacks",
    "lora_core.training.peft_setup", "lora_core.model_files", "lora_core.data.formats",
    "lora_core.data.tokenize", "lora_core.data.cache", "lora_core.data.collate",
    "lora_core.merging.merge", "lora_core.model_files.manifest",
    # what a job imports later, on its way to the first step and through the merge
    "lora_core.training.attention", "lora_core.training.deepspeed_config",
    "lora_core.training.dropout", "lora_core.training.loss", "lora_core.evaluation.callback",
    "lora_core.merging.verify",
    # the architecture of the tiny models and of the Llama family
    "transformers.models.llama.modeling_llama",
)
# Preloaded too where no CUDA device is visible (so none can be initialised): accelerate's
# `Trainer.__init__` imports deepspeed, when installed, in every job to tell a DeepSpeedEngine
# apart (425 modules, 0.5-0.8 s on 2 loaded cores, bench/job_overhead_bench.py). Where a GPU is
# visible its import would pick the CUDA accelerator (see above): the child imports it there.
CPU_ONLY_PRELOAD = ("deepspeed",)
# torch.cuda.is_available() asks NVML instead of initialising the driver while this is set.
NVML_CHECK_ENV = "PYTORCH_NVML_BASED_CUDA_CHECK"
EXIT_ORPHANED = 137  # the zygote died between fork and PR_SET_PDEATHSIG: as if SIGKILLed
EXIT_SETUP_FAILED = 127  # what a failed exec gives on the plain path
SETUP_DONE = b"ok"


@dataclass(frozen=True)
class _Job:
    """What a forked child runs, once set up: `python -m lora_core <args>`."""

    args: list[str]


def preload() -> None:
    """Import PRELOAD_MODULES without letting any of them initialise the CUDA driver."""
    previous = os.environ.get(NVML_CHECK_ENV)
    os.environ[NVML_CHECK_ENV] = "1"
    try:
        for name in PRELOAD_MODULES:
            importlib.import_module(name)
        if not sys.modules["torch"].cuda.is_available():
            for name in CPU_ONLY_PRELOAD:
                if importlib.util.find_spec(name) is not None:
                    importlib.import_module(name)
        _warm_caches()
    finally:
        if previous is None:
            os.environ.pop(NVML_CHECK_ENV, None)
        else:
            os.environ[NVML_CHECK_ENV] = previous
    # Every object so far lives as long as the zygote: out of the collector's sight, a child's
    # collections never walk (and so never copy, page by page) what it inherited. accelerate
    # calls gc.collect() before the first step: 1.8 s in a child on 2 loaded cores without
    # this. (The gc module's own advice for fork without exec.)
    gc.collect()
    gc.freeze()


def _warm_caches() -> None:
    """Build what every trainer would build once per process, pure Python, before the fork.

    transformers compiles its checkpoint conversion rules (~1000 regular expressions) on the
    first `from_pretrained`: 0.2 s quiet, over 1 s on 2 loaded cores. A transformers without
    that cache (another version) just skips this.
    """
    try:
        conversion = importlib.import_module("transformers.conversion_mapping")
    except ImportError:
        return
    build = getattr(conversion, "get_checkpoint_conversion_mapping", None)
    if build is not None:
        build("llama")


def fork_hazard() -> str | None:
    """Why forking this process now would be unsafe, or None."""
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        return f"the zygote runs {threads} threads (a library started one while importing)"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "torch initialised CUDA in the zygote"
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
        if "libcuda.so" in fh.read():
            return "the CUDA driver (libcuda) is loaded in the zygote"
    return None


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def _fork(request: dict[str, Any], sock: socket.socket, children: dict[int, int]) -> _Job | None:
    """Fork one trainer child. Returns its _Job in the child, None in the zygote."""
    problem = fork_hazard()
    if problem is not None:
        _send(sock, {"error": f"not fork-safe: {problem}"})
        return None
    try:  # what Popen would refuse, refused here, before a fork: the worker falls back to it
        if not os.path.isdir(request["cwd"]):
            raise FileNotFoundError(f"no such directory: {request['cwd']}")
        log_fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except (OSError, KeyError, TypeError) as exc:
        _send(sock, {"error": f"cannot start the trainer: {exc}"})
        return None
    zygote_pid = os.getpid()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        try:
            _become_trainer(request, log_fd, zygote_pid, sock, children)
        except BaseException as exc:  # noqa: BLE001 - told to the zygote, which tells the worker
            os.write(ready_w, f"{type(exc).__name__}: {exc}".encode()[:4000])
            os._exit(EXIT_SETUP_FAILED)
        os.write(ready_w, SETUP_DONE)
        os.close(ready_w)
        return _Job(args=[str(a) for a in request["args"]])
    os.close(log_fd)
    os.close(ready_w)
    # Reply only once the child leads its own session: the worker may killpg it right away.
    said = b"".join(iter(lambda: os.read(ready_r, 4096), b""))
    os.close(ready_r)
    if said != SETUP_DONE:
        os.waitpid(pid, 0)
        _send(sock, {"error": "cannot start the trainer: "
                     + (said.decode(errors="replace") or "it died while being set up")})
        return None
    children[os.pidfd_open(pid)] = pid
    _send(sock, {"spawned": pid})
    return None


def _become_trainer(request: dict[str, Any], log_fd: int, zygote_pid: int,
                    sock: socket.socket, children: dict[int, int]) -> None:
    """In the forked child: the same process setup as the plain Popen path."""
    os.setsid()
    die_with_parent()
    if os.getppid() != zygote_pid:
        os._exit(EXIT_ORPHANED)
    sock.close()
    for pidfd in children:
        os.close(pidfd)
    children.clear()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(devnull)
    os.close(log_fd)
    os.chdir(request["cwd"])
    for name in request.get("unset", ()):
        os.environ.pop(name, None)
    os.environ.update(request.get("env") or {})


def _reap(pidfd: int, sock: socket.socket, children: dict[int, int]) -> None:
    pid = children.pop(pidfd)
    os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    _send(sock, {"exited": pid, "returncode": os.waitstatus_to_exitcode(status)})


def serve(sock: socket.socket) -> _Job | None:
    """Fork trainers on request until the worker hangs up (None) or, in a child, its _Job."""
    children: dict[int, int] = {}  # pidfd -> pid
    buffer = b""
    while True:
        readable, _, _ = select.select([sock.fileno(), *children], [], [])
        for fd in readable:
            if fd in children:
                _reap(fd, sock, children)
        if sock.fileno() not in readable:
            continue
        data = sock.recv(65536)
        if not data:
            return None  # the worker is gone; our children die with us (PR_SET_PDEATHSIG)
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            job = _fork(json.loads(line), sock, children)
            if job is not None:
                return job


def _run_trainer(job: _Job) -> int:
    """In a forked child, on a clean stack: what `python -m lora_core <args>` does."""
    from lora_core import child_process

    sys.argv = [os.path.join(os.path.dirname(child_process.__file__), "__main__.py"), *job.args]
    print(f"lorajobs: trainer forked from the pre-warmed zygote {os.getppid()}", flush=True)
    return child_process.main(job.args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorajobs.worker.zygote")
    parser.add_argument("--fd", type=int, required=True, help="the worker's unix socket")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    t0 = time.monotonic()
    try:
        preload()
        problem = fork_hazard()
    except Exception as exc:  # noqa: BLE001 - any import failure: the worker spawns plainly
        problem = f"preloading failed: {type(exc).__name__}: {exc}"
    try:
        if problem is not None:
            _send(sock, {"ready": False, "reason": problem})
            print(f"lorajobs: trainer zygote {os.getpid()} cannot serve: {problem}",
                  file=sys.stderr, flush=True)
            return 1
        seconds = time.monotonic() - t0
        _send(sock, {"ready": True, "pid": os.getpid(), "seconds": round(seconds, 3)})
        # to the worker's log, now: the worker reads the socket only when a job comes
        print(f"lorajobs: trainer zygote {os.getpid()} ready (preloaded in {seconds:.1f} s)",
              file=sys.stderr, flush=True)
        job = serve(sock)
    except OSError:  # the worker hung up mid-message
        return 0
    if job is None:
        return 0
    exit_now(_run_trainer(job))


if __name__ == "__main__":
    sys.exit(main())
