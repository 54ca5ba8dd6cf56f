"""`lorajobs.localserver`: the start/wait/stop of a local server that `make demo` and the API
bench share. Real processes, each a second or less."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lorajobs.localserver import ServerStartError, free_port, http_ok, start_server, stop_server
from lorajobs.worker.process_control import pid_alive
from tests.servicefixtures import wait_for

pytestmark = pytest.mark.timeout(60)


def test_started_when_it_answers_and_stopped_with_its_children(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    child_pid = tmp_path / "child.pid"
    # an HTTP server that also starts a child of its own, as `lorajobs serve` does
    script = (f"import subprocess, http.server; p = subprocess.Popen(['sleep', '60']); "
              f"open({str(child_pid)!r}, 'w').write(str(p.pid)); "
              f"http.server.test(http.server.SimpleHTTPRequestHandler, port={port}, "
              f"bind='127.0.0.1')")
    proc = start_server([sys.executable, "-c", script], cwd=tmp_path, timeout=30,
                        log=tmp_path / "server.log",
                        ready=lambda: http_ok(url) and child_pid.exists())
    try:
        assert http_ok(url) and proc.poll() is None
        child = int(child_pid.read_text())
        assert pid_alive(child)
    finally:
        stop_server(proc, grace=5)
    assert proc.returncode is not None and not http_ok(url)
    wait_for(lambda: not pid_alive(child), timeout=5, what="the server's child to be stopped")


def test_exit_before_ready_says_so_and_where_the_log_is(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with pytest.raises(ServerStartError, match=rf"exited with 3 .*{log}"):
        start_server([sys.executable, "-c", "print('bad config'); raise SystemExit(3)"],
                     ready=lambda: False, timeout=30, log=log)
    assert "bad config" in log.read_text()


def test_not_ready_in_time_is_stopped(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); " \
             "time.sleep(60)"
    with pytest.raises(ServerStartError, match="was not ready in 2s"):
        start_server([sys.executable, "-c", script], ready=lambda: False, timeout=2)
    if pid_file.exists():  # else it was stopped before it even wrote its pid
        assert not pid_alive(int(pid_file.read_text()))
