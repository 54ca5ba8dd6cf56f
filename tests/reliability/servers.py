"""Private server instances for fault tests that stop and start a server: never the shared ones.

`PrivateRedis` runs `redis-server` on a free loopback port, in memory only (no RDB, no AOF).

`PrivatePostgres` runs `initdb` + `pg_ctl` on a free loopback port with its socket in its own
directory. PostgreSQL refuses to run as root, so under root every command runs as the
`postgres` user (`runuser`), in a directory that user owns (pytest's tmp dirs are 0700 root).
A missing binary is `service_missing` (a failure under LORAJOBS_REQUIRE_SERVICES=1).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.dbfixtures import service_missing
from tests.servicefixtures import free_port, wait_for

__all__ = ["PrivatePostgres", "PrivateRedis", "pg_bin"]

PG_START_TIMEOUT_SECONDS = 30


def pg_bin(name: str) -> str:
    """Path of a PostgreSQL server binary (Debian keeps them off PATH)."""
    found = shutil.which(name) or next(iter(sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        service_missing(f"PostgreSQL server binary {name}", FileNotFoundError(name))
    return str(found)


class PrivatePostgres:
    """A throwaway cluster: `start()`, `stop(mode)`, `url`; `close()` removes everything."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="lorajobs-pg-"))
        self.data = self.root / "data"
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self._run([pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                   "--no-sync", "-E", "UTF8"])
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{self.root}'\nfsync = off\n"
                       "max_connections = 200\n")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, cmd: list[str]) -> None:
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=120)

    def start(self) -> None:
        self._run([pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "pg.log"),
                   "-w", "-t", str(PG_START_TIMEOUT_SECONDS), "start"])
        wait_for(self.ready, timeout=PG_START_TIMEOUT_SECONDS, what="private PostgreSQL")

    def ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres",
                                 dbname="postgres", connect_timeout=1):
                return True
        except psycopg.Error:
            return False

    def stop(self, mode: str = "fast") -> None:
        """`fast` ends sessions cleanly; `immediate` is a crash (recovery on next start)."""
        self._run([pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def close(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # not running
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateRedis:
    """A throwaway redis-server: `start()` (again after `stop()`: same port), `stop()`."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port, self.workdir = port, workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redis

        binary = shutil.which("redis-server")
        if binary is None:
            service_missing("redis-server", FileNotFoundError("redis-server"))
        self.proc = subprocess.Popen(
            [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)

        def _up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(_up, timeout=10, what="private redis-server")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
