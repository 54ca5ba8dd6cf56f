"""Private server instances for fault tests that stop and start a server: never the shared ones.

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

__all__ = ["PrivatePostgres", "pg_bin"]

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
