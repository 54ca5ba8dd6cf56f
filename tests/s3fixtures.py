"""A real S3 API server for the tests: moto's standalone server (`moto[server]`) as a subprocess
on a free loopback port. Never an in-process mock of boto3: the store, the API and the workers
talk HTTP to it exactly as to MinIO or AWS.

Fixtures (registered in tests/conftest.py):

    s3_server      session-wide server, started once per test process (an xdist worker)
    s3_bucket      a fresh bucket on it for one test: `S3Target` (.settings(), .store())
    private_s3     a server of this test's own, for fault tests (stop/start, pause/resume)

What survives a fault (moto keeps every object in the server process's memory, and its state
cannot be saved to disk):
    pause() / resume()  SIGSTOP / SIGCONT: requests hang (connections are accepted by the kernel
                        and never answered) until resume; every bucket and object survives.
                        The outage to use while a job runs.
    stop() / start()    SIGKILL, then a new process on the SAME port: connections are refused
                        while it is down; afterwards the buckets named in `S3Server(buckets=)` or
                        `create_bucket` exist again but EMPTY: every object is lost.

Credentials: moto accepts any; `AWS_ENV` is what the fixtures put in os.environ (monkeypatch),
so the test process and the service's subprocesses (which inherit os.environ) find them
through the standard AWS chain, as production does.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lorajobs.localserver import free_port
from tests.dbfixtures import service_missing

__all__ = ["S3Server", "S3Target", "AWS_ENV", "start_s3_server", "aws_env", "s3_server",
           "s3_bucket", "private_s3"]

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
    # no instance-metadata lookups (seconds of timeouts) and no ~/.aws of the machine
    "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
START_TIMEOUT_S = 30.0  # moto imports Flask and its S3 backend: ~1-3 s on this machine


class S3Server:
    """One `moto_server` process on 127.0.0.1:`port`; `buckets` are (re)created at each start."""

    def __init__(self, log_dir: Path, *, port: int | None = None,
                 buckets: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.log_path = log_dir / f"moto-{self.port}.log"
        self.buckets = list(buckets)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> Any:
        import boto3

        return boto3.session.Session(
            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=AWS_ENV["AWS_DEFAULT_REGION"],
        ).client("s3", endpoint_url=self.endpoint_url)

    def start(self) -> S3Server:
        """Start (or restart, on the same port) and wait until it answers S3 requests."""
        assert self.proc is None, "already running"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **AWS_ENV})
        deadline = time.monotonic() + START_TIMEOUT_S
        client = self.client()
        while True:
            try:
                client.list_buckets()
                break
            except Exception as exc:  # noqa: BLE001 - not listening yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start ({exc}); see "
                                       f"{self.log_path}") from exc
                time.sleep(0.05)
        for bucket in self.buckets:
            client.create_bucket(Bucket=bucket)
        return self

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        self.buckets.append(name)
        return name

    def stop(self) -> None:
        """Kill it (SIGKILL: as a crashed server); every object is lost."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused process dies only once running
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: requests hang until `resume`; all state survives."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


def start_s3_server(log_dir: Path, *, port: int | None = None,
                    buckets: tuple[str, ...] = ()) -> S3Server:
    """A started server, or a failure under LORAJOBS_REQUIRE_SERVICES=1 (a skip otherwise)
    where moto[server] is not installed."""
    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        service_missing("moto[server] (the S3 test server)", exc)
    return S3Server(log_dir, port=port, buckets=buckets).start()


@dataclass
class S3Target:
    """A bucket (and key prefix) on a running server: what a test points the service at."""

    server: S3Server
    bucket: str
    prefix: str = "lorajobs"

    @property
    def store_url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def settings(self, **extra: Any) -> dict[str, Any]:
        """Settings overrides (`Settings(**target.settings())`, `LiveService(..., **...)`)."""
        return {"store_url": self.store_url, "store_endpoint_url": self.server.endpoint_url,
                "store_region": AWS_ENV["AWS_DEFAULT_REGION"], **extra}

    def store(self, **kwargs: Any) -> Any:
        from lorajobs.core.s3store import S3ArtifactStore

        return S3ArtifactStore(self.store_url, endpoint_url=self.server.endpoint_url,
                               region=AWS_ENV["AWS_DEFAULT_REGION"], **kwargs)

    def keys(self) -> list[str]:
        """Every key in the bucket (raw, with the prefix): what a test asserts is left."""
        pages = self.server.client().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def multipart_uploads(self) -> list[str]:
        """Keys of multipart uploads begun and neither completed nor aborted."""
        result = self.server.client().list_multipart_uploads(Bucket=self.bucket)
        return [u["Key"] for u in result.get("Uploads", [])]


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Test credentials in os.environ (subprocesses inherit them)."""
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    return AWS_ENV


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server, aws_env: dict[str, str]) -> S3Target:
    """A fresh, empty bucket on the session's server (tests never see each other's objects)."""
    return S3Target(s3_server, s3_server.create_bucket(f"t-{secrets.token_hex(6)}"))


@pytest.fixture
def private_s3(tmp_path: Path, aws_env: dict[str, str]) -> Iterator[S3Target]:
    """A server of this test's own (bucket "lorajobs"), to stop, restart, pause and resume."""
    server = start_s3_server(tmp_path, buckets=("lorajobs",))
    try:
        yield S3Target(server, "lorajobs")
    finally:
        server.stop()
