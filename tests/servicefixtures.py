"""`LiveService`: the real processes (API, workers, reaper) on a throwaway data directory.

Backends: "sqlite" (SQLite + the embedded broker, nothing else needed) and "postgresql" (a fresh
database on the shared server + the shared Redis). Parallel test sessions must not steal each
other's tasks on the shared Redis: each LiveService claims a Redis database number for itself
(SET NX on a lock key in db 0, released on close) and flushes it before and after.

Processes are real subprocesses: `uvicorn lorajobs.api.app:create_app --factory` and
`python -m lorajobs.worker.main worker|reaper`. The trainer defaults to
tests/worker/fake_trainer.py (through a small wrapper, since `trainer_python` is a program).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from lorajobs.localserver import free_port
from tests.dbfixtures import (
    REDIS_URL,
    REQUIRE_SERVICES,
    check_redis,
    create_pg_database,
    drop_pg_database,
)

__all__ = ["LiveService", "free_port", "wait_for", "live_service", "FAKE_TRAINER"]

FAKE_TRAINER = Path(__file__).parent / "worker" / "fake_trainer.py"
REDIS_TEST_DBS = range(1, 16)  # db 0 is left to other users and holds the claim keys
REDIS_CLAIM_SECONDS = 3600  # a crashed session's claim expires on its own
# Fast-moving knobs: leases expire in seconds, the reaper sweeps twice a second.
TEST_SETTINGS: dict[str, Any] = {
    "lease_seconds": 3, "lease_renew_seconds": 0.5, "worker_poll_seconds": 0.1,
    "cancel_grace_seconds": 2, "requeue_after_seconds": 2, "reaper_interval_seconds": 0.5,
    "trainer_threads": 1,
}


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@contextmanager
def api_in_thread(settings: Any, *, timeout: float = 30.0) -> Iterator[str]:
    """The API app for `settings` served by uvicorn on a thread of this process (no import
    cost, so a test can start several); its base URL while the block runs."""
    import uvicorn

    from lorajobs.api.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=timeout, what="uvicorn started")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def migrated_tenant_key(settings: Any) -> str:
    """Migrate `settings`' database and create one tenant with one API key; the key."""
    from lorajobs.core import keys
    from lorajobs.core.db import get_sessionmaker
    from lorajobs.core.migrate import upgrade

    upgrade(settings)
    with get_sessionmaker(settings)() as session:
        tenant = keys.create_tenant(session, name="t")
        _, key = keys.create_key(session, tenant_id=tenant.id)
        session.commit()
    return key


def _claim_redis_db(base_url: str) -> tuple[str, int]:
    import redis

    admin = redis.Redis.from_url(base_url, socket_connect_timeout=2)
    token = secrets.token_hex(8)
    for db in REDIS_TEST_DBS:
        if admin.set(f"lorajobs:test:redis-db:{db}", token, nx=True, ex=REDIS_CLAIM_SECONDS):
            url = base_url.rsplit("/", 1)[0] + f"/{db}"
            redis.Redis.from_url(url).flushdb()
            return url, db
    # 15 sessions at once, or claims of crashed sessions (they expire): not a reason to pass
    why = f"no free Redis database number in {REDIS_TEST_DBS} for this test session"
    if REQUIRE_SERVICES:
        pytest.fail(f"{why} (LORAJOBS_REQUIRE_SERVICES=1)")
    pytest.skip(why)


def _release_redis_db(base_url: str, url: str, db: int) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()
    redis.Redis.from_url(base_url).delete(f"lorajobs:test:redis-db:{db}")


class LiveService:
    """Settings + the processes of one service instance; `close()` stops and cleans all."""

    def __init__(self, tmp_path: Path, backend: str = "sqlite", *, broker_url: str | None = None,
                 trainer: Path | None = FAKE_TRAINER, **overrides: Any) -> None:
        from lorajobs.core.settings import Settings

        self.tmp_path = tmp_path
        self.backend = backend
        self.procs: list[subprocess.Popen[bytes]] = []
        self._pg_url: str | None = None
        self._redis: tuple[str, int] | None = None
        database_url = None
        if backend == "postgresql":
            self._pg_url = database_url = create_pg_database()
            if broker_url is None:
                check_redis()
                url, db = _claim_redis_db(REDIS_URL)
                self._redis = (url, db)
                broker_url = url
        trainer_python = self._trainer_wrapper(trainer) if trainer else None
        self.settings = Settings(**{
            "data_dir": tmp_path / "data", "database_url": database_url,
            "broker_url": broker_url, "trainer_python": trainer_python,
            **TEST_SETTINGS, **overrides})
        self.base_url: str | None = None
        self.admin_key: str | None = None

    def _trainer_wrapper(self, trainer: Path) -> str:
        wrapper = self.tmp_path / "trainer-python"
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{trainer}" "$@"\n')
        wrapper.chmod(0o755)
        return str(wrapper)

    @property
    def env(self) -> dict[str, str]:
        from lorajobs.worker.main import settings_env

        return {**os.environ, **settings_env(self.settings), "LORAJOBS_TRAINER_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
                "LORAJOBS_FAKE_TRAINER_DIR": str(self.settings.data_dir / "fake-trainer")}

    def migrate(self) -> None:
        from lorajobs.core.db import get_sessionmaker
        from lorajobs.core.keys import ensure_admin_key
        from lorajobs.core.migrate import upgrade

        upgrade(self.settings)
        with get_sessionmaker(self.settings)() as session:
            self.admin_key = ensure_admin_key(session, key_file=self.settings.admin_key_file)

    def _spawn(self, args: list[str], name: str,
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.tmp_path / f"{name}.log", "ab")  # noqa: SIM115 - closed with the proc
        proc = subprocess.Popen([sys.executable, *args], env={**self.env, **(env or {})},
                                stdout=log,
                                stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
        log.close()
        self.procs.append(proc)
        return proc

    def start_worker(self, name: str = "worker", pool: str = "solo",
                     env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """`env`: overrides for this worker alone (a node's own scratch_dir, model cache).

        With the real trainer, returns once the worker's pre-warmed trainer zygote is ready
        (lorajobs/worker/prewarm.py). A job that comes sooner waits at most half a lease for
        it, 1.5 s with the tests' 3 s leases, then starts cold beside it: two processes
        imported torch, transformers and peft (~5 CPU-s each) for every real-trainer test, and
        its job ran the cold path where production (60 s leases) forks."""
        warm_before = self._zygote_outcomes(name)
        proc = self._spawn(["-m", "lorajobs.worker.main", "worker", "--loglevel", "INFO",
                            "--pool", pool], name, env)
        if self.settings.trainer_prewarm and self.settings.trainer_python is None:
            def _warm() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"worker {name} exited: {self.log(name)[-2000:]}")
                return self._zygote_outcomes(name) > warm_before

            wait_for(_warm, timeout=180, interval=0.2,  # a hang bound: ~4 s quiet, 12 at load 8
                     what=f"worker {name}'s trainer zygote ready")
        return proc

    def _zygote_outcomes(self, name: str) -> int:
        """How many zygotes of worker `name` got ready, or failed to, so far (its log)."""
        return len(re.findall(r"trainer zygote (?:\d+ ready|cannot serve)|starting the trainer "
                              r"zygote failed", self.log(name)))

    def start_reaper(self) -> subprocess.Popen[bytes]:
        return self._spawn(["-m", "lorajobs.worker.main", "reaper"], "reaper")

    def start_beat(self) -> subprocess.Popen[bytes]:
        """`lorajobs beat` as production runs it: the maintenance process."""
        return self._spawn(["-m", "lorajobs", "beat"], "beat")

    def start_api(self) -> str:
        """uvicorn on a free port; its base URL once /healthz answers."""
        import httpx

        port = free_port()
        proc = self._spawn(["-m", "uvicorn", "lorajobs.api.app:create_app", "--factory",
                            "--host", "127.0.0.1", "--port", str(port)], "api")
        self.base_url = f"http://127.0.0.1:{port}"

        def _up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"API exited: {self.log('api')[-2000:]}")
            try:
                return httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(_up, timeout=180, what="API /healthz")  # a hang bound: imports crawl at load 20
        return self.base_url

    def log(self, name: str) -> str:
        path = self.tmp_path / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def task_outcomes(self, name: str = "worker") -> list[str]:
        """How each job message the worker `name` took ended, from Celery's own log lines: the
        task's return value ("succeeded", "noop", ...), else the first word of Celery's failure
        line ("raised", "retry", ...). Counting them tells that every message sent so far was
        handled, without sleeping."""
        from lorajobs.core.queue import RUN_JOB_TASK

        ended = re.compile(re.escape(f"Task {RUN_JOB_TASK}[") +
                           r"[^\]]+\] (?!received)(?:succeeded in \S+: '?(\w+)'?|(\S+))")
        return [m.group(1) or m.group(2) for m in ended.finditer(self.log(name))]

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
             timeout: float = 30) -> int:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc, signal.SIGTERM, timeout=15)
        from lorajobs.core.db import get_engine

        get_engine(self.settings).dispose()
        if self._pg_url:
            drop_pg_database(self._pg_url)
        if self._redis:
            _release_redis_db(REDIS_URL, *self._redis)


@pytest.fixture(params=["sqlite", "postgresql"])
def live_service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LiveService]:
    """A migrated service with one worker, on each backend. No API: its users (the worker's
    lifecycle tests) enqueue and read the database directly (start_api() where one is needed)."""
    service = LiveService(tmp_path, request.param)
    try:
        service.migrate()
        service.start_worker()
        yield service
    finally:
        service.close()
