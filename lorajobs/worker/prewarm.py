"""The worker's side of the pre-warmed trainer (`trainer_prewarm`): keep one zygote process
(zygote.py) that has already imported torch, transformers, peft and lora_core, and fork each
single-process trainer from it instead of spawning `python -m lora_core run` cold.

    worker process init -> start(): Popen the zygote; it preloads (~4 s) and says "ready"
    Supervisor._spawn   -> spawn(): a ZygoteChild (forked, ~0.6 s to `started` on the tiny
                           model instead of ~4-5 s), or None: use the plain Popen path
    worker shutdown     -> stop()

The plain path stays for: prewarm off, a `trainer_python` other than the worker's interpreter
(it may be any program, e.g. the tests' fake trainer), torchrun (num_processes > 1) and
DeepSpeed (zero_stage > 0) specs, calls from a thread other than the main one
(PR_SET_PDEATHSIG binds the zygote to the thread that started it), a zygote that is gone (it
is restarted for the next job), still warming after ZYGOTE_READY_WAIT_SECONDS, or unable to
fork safely.

Lifetime: the zygote runs in its own session with PR_SET_PDEATHSIG, like a trainer, and exits
when the worker closes its socket; its children have PR_SET_PDEATHSIG against it. So a worker
killed outright takes both with it, and a zygote killed mid-job takes that job's trainer (the
job is retried like any trainer crash). Code changes to lora_core reach the zygote's children
only after a worker restart, as they reach the worker itself.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from lora_core.spec import RunSpec
from lorajobs.core.settings import Settings
from lorajobs.worker.process_control import die_with_parent, killpg, pid_alive
from lorajobs.worker.runspec import RunPaths, trainer_args, trainer_env

__all__ = ["Zygote", "ZygoteChild", "start", "stop", "spawn", "current"]

log = logging.getLogger(__name__)

# A job that arrives while the zygote is still importing waits for it rather than importing
# the same modules again beside it, but never longer than this, nor half a lease (the lease
# is renewed only once the supervisor watches a child).
ZYGOTE_READY_WAIT_SECONDS = 30.0
# The zygote answers a spawn request after one fork (milliseconds); past this it is wedged.
SPAWN_REPLY_SECONDS = 10.0
# A child whose zygote died is SIGKILLed by the kernel; how long to wait to see it gone.
ORPHAN_EXIT_SECONDS = 5.0
STOP_SECONDS = 5.0
# Celery sets CELERY_LOG_REDIRECT* in the worker's environment after the pool (and so the
# zygote) started; nothing in a trainer reads them. The child still gets them (spawn's env).
IGNORED_ENV_PREFIXES = ("CELERY_",)


def _relevant(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith(IGNORED_ENV_PREFIXES)}


class Zygote:
    """One zygote process and its socket. Used from one thread (the worker's main thread)."""

    def __init__(self, settings: Settings) -> None:
        self.env = trainer_env(settings)
        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lorajobs.worker.zygote", "--fd", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=self.env,
                start_new_session=True, preexec_fn=die_with_parent)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.ready = False
        self.failure: str | None = None  # why it cannot serve (it said so, or it died)
        self.exits: dict[int, int] = {}  # child pid -> returncode, as reported
        self._replies: list[dict[str, Any]] = []
        self._buffer = b""

    @property
    def alive(self) -> bool:
        return self.failure is None and self.proc.poll() is None

    def _read(self, timeout: float) -> None:
        """Take in whatever the zygote sent within `timeout` seconds."""
        if self.failure is not None:
            return
        readable, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if not readable:
            return
        try:
            data = self.sock.recv(65536)
        except OSError as exc:
            data, reason = b"", str(exc)
        else:
            reason = "the zygote exited"
        if not data:
            self.failure = reason
            return
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            self._take(json.loads(line))

    def _take(self, message: dict[str, Any]) -> None:
        if "ready" in message:
            if message["ready"]:
                self.ready = True
                log.debug("trainer zygote %s ready (preloaded in %.1f s)", message["pid"],
                          message["seconds"])
            else:
                self.failure = message["reason"]
                log.warning("trainer zygote cannot serve: %s; trainers start cold",
                            self.failure)
        elif "exited" in message:
            self.exits[int(message["exited"])] = int(message["returncode"])
        else:
            self._replies.append(message)

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.ready and self.failure is None:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                break
            self._read(min(left, 0.5))
        return self.ready and self.alive

    def matches(self, env: dict[str, str]) -> bool:
        """Whether a trainer with `env` may come from this zygote: the libraries it preloaded
        read their environment when imported, so it must be the one the zygote started with."""
        return _relevant(env) == _relevant(self.env)

    def spawn(self, args: list[str], *, cwd: str, log_file: str,
              env: dict[str, str]) -> ZygoteChild | None:
        """Fork `python -m lora_core <args>`; None if the zygote refused or is gone."""
        request = {"args": args, "cwd": cwd, "log": log_file, "env": env,
                   "unset": sorted(set(self.env) - set(env))}
        try:
            self.sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            self.failure = f"the zygote's socket failed: {exc}"
            return None
        deadline = time.monotonic() + SPAWN_REPLY_SECONDS
        while not self._replies and self.failure is None and time.monotonic() < deadline:
            self._read(deadline - time.monotonic())
        if not self._replies:
            self.failure = self.failure or "the zygote did not answer a spawn request"
            return None
        reply = self._replies.pop(0)
        if "error" in reply:
            log.warning("trainer zygote refused a spawn: %s", reply["error"])
            if reply["error"].startswith("not fork-safe"):
                self.failure = reply["error"]
            return None
        return ZygoteChild(self, int(reply["spawned"]))

    def close(self) -> None:
        """Hang up (the zygote exits on EOF), then make sure it did."""
        self.failure = self.failure or "stopped"
        self.sock.close()
        try:
            self.proc.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class ZygoteChild:
    """A trainer forked by the zygote, with the part of Popen the supervisor uses.

    `pid` leads its own process group. `returncode` is what the zygote reported (negative:
    killed by that signal); if the zygote died first, the kernel SIGKILLed the child with it
    (PR_SET_PDEATHSIG) and the returncode is -SIGKILL once the pid is gone.
    """

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self.zygote = zygote
        self.pid = pid
        self.returncode: int | None = None
        self._orphaned_at: float | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self._update(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if left <= 0:
                raise subprocess.TimeoutExpired(f"trainer pid {self.pid}", timeout or 0)
            self._update(left)
        assert self.returncode is not None
        return self.returncode

    def _update(self, timeout: float) -> None:
        zygote = self.zygote
        zygote._read(timeout)
        if self.pid in zygote.exits:
            self.returncode = zygote.exits.pop(self.pid)
            return
        if zygote.failure is None:
            return
        # The zygote is gone: so is its report. The kernel kills the child (PR_SET_PDEATHSIG);
        # the killpg covers the case where the zygote only closed its socket.
        if self._orphaned_at is None:
            self._orphaned_at = time.monotonic()
            killpg(self.pid, signal.SIGKILL)
        if not pid_alive(self.pid) or time.monotonic() - self._orphaned_at > ORPHAN_EXIT_SECONDS:
            self.returncode = -signal.SIGKILL


_zygote: Zygote | None = None
# Zygotes in a row that died or gave up before they were ready; at MAX_FAILED_STARTS this
# process stops trying (a broken install would otherwise cost a 4 s import per job).
_failed_starts = 0
MAX_FAILED_STARTS = 2


def _custom_python(settings: Settings) -> bool:
    """A trainer_python other than the worker's own interpreter: it may be any program."""
    return bool(settings.trainer_python) and \
        os.path.abspath(settings.trainer_python or "") != os.path.abspath(sys.executable)


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def current() -> Zygote | None:
    """The zygote of this process, if one was started (tests, diagnostics)."""
    return _zygote


def start(settings: Settings) -> None:
    """Start a zygote for this process if prewarm is on and none runs (worker process init)."""
    global _zygote
    if not settings.trainer_prewarm or _custom_python(settings) or \
            _failed_starts >= MAX_FAILED_STARTS or not _on_main_thread():
        return
    if _zygote is not None and _zygote.alive:
        return
    stop()
    try:
        _zygote = Zygote(settings)
    except OSError:
        log.exception("starting the trainer zygote failed; trainers start cold")
        return
    log.info("trainer zygote %s starting (preloading torch, transformers, peft)",
             _zygote.proc.pid)


def stop() -> None:
    global _zygote
    if _zygote is not None:
        zygote, _zygote = _zygote, None
        zygote.close()


def _usable_for(settings: Settings, run_spec: RunSpec) -> bool:
    return (settings.trainer_prewarm and not _custom_python(settings)
            and run_spec.distributed.num_processes == 1 and run_spec.distributed.zero_stage == 0
            and _on_main_thread())


def spawn(settings: Settings, run_spec: RunSpec, paths: RunPaths) -> ZygoteChild | None:
    """The trainer forked from the zygote, or None: the caller spawns it plainly.

    A zygote that died (or was started with another environment) is replaced for the next
    job; this one starts cold rather than wait for the replacement's imports.
    """
    if not _usable_for(settings, run_spec):
        return None
    zygote = _zygote
    env = trainer_env(settings)
    if zygote is not None and zygote.alive and zygote.matches(env):
        wait = min(ZYGOTE_READY_WAIT_SECONDS, settings.lease_seconds / 2)
        if zygote.wait_ready(wait):
            child = zygote.spawn(trainer_args(paths), cwd=str(paths.run_dir),
                                 log_file=str(paths.log_file), env=env)
            if child is not None or zygote.alive:
                return child
        elif zygote.alive:
            log.info("trainer zygote still preloading after %.1f s; this trainer starts cold",
                     wait)
            return None
    _replace(settings, zygote)
    return None


def _replace(settings: Settings, zygote: Zygote | None) -> None:
    global _failed_starts
    if zygote is not None:
        if zygote.ready:
            _failed_starts = 0
        elif zygote.failure is not None or zygote.proc.poll() is not None:
            _failed_starts += 1
        reason = zygote.failure or ("exited" if zygote.proc.poll() is not None
                                    else "the trainer environment changed")
        if _failed_starts >= MAX_FAILED_STARTS:
            log.warning("trainer zygote failed %d times before it was ready (%s); trainers "
                        "start cold in this worker", _failed_starts, reason)
            stop()
            return
        log.warning("trainer zygote %s is gone (%s); this trainer starts cold, another "
                    "zygote preloads for the next", zygote.proc.pid, reason)
    start(settings)
