"""Credentials never reach the access log (issue 10, item 4), on a live uvicorn.

Before: the dashboard took `/ui?key=<key>`, and uvicorn wrote that line verbatim. Now `/ui`
refuses a key in the query string (the page takes it through its form or `#key=`, which no
browser sends), the API reads keys from the Authorization header only, and the access log
redacts whatever a client put in a URL all the same. The test puts a live admin key and the
metrics token everywhere a client might, then greps the captured log.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servicefixtures import LiveService

pytestmark = pytest.mark.timeout(60)

METRICS_TOKEN = "mt-0123456789abcdef-secret"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveService]:
    svc = LiveService(tmp_path, "sqlite", metrics_token=METRICS_TOKEN)
    try:
        svc.migrate()
        svc.start_api()
        yield svc
    finally:
        svc.close()


def _raw(svc: LiveService, target: str) -> bytes:
    """One request line sent as is (httpx would drop a fragment or re-encode the target)."""
    assert svc.base_url is not None
    with socket.create_connection(("127.0.0.1", int(svc.base_url.rsplit(":", 1)[1])),
                                  timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_no_credential_in_the_access_log(server: LiveService) -> None:
    key = server.admin_key
    assert key is not None and key.startswith("lj_")
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=server.base_url or "", timeout=10) as http:
        for name in ("key", "api_key", "token", "access_token", "KEY"):
            refused = http.get("/ui", params={name: key})
            assert refused.status_code == 400, name
            assert key not in refused.text
        assert http.get("/ui").status_code == 200
        assert http.get("/v1/jobs", params={"key": key}).status_code == 401  # not a way in
        assert http.get("/v1/jobs", params={"api_key": key}, headers=auth).status_code == 200
        assert http.get("/v1/jobs", params={"q": key, "limit": 5}, headers=auth) \
            .status_code == 200
        assert http.get(f"/v1/jobs/{key}", headers=auth).status_code == 404
        assert http.get(f"/v1/datasets/{key}/x").status_code in (401, 404)
        assert http.get("/metrics", params={"token": METRICS_TOKEN}).status_code == 401
        assert http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}) \
            .status_code == 200
        assert http.get("/ui", params={"next": f"/v1/jobs?key={key}"}).status_code == 200
    _raw(server, f"/ui#key={key}")  # a client that sends its fragment
    encoded = key.replace("_", "%5F")
    _raw(server, f"/ui?x=1&key={encoded}")
    _raw(server, f"/v1/models?q={encoded}")

    log = server.log("api")
    assert '"GET /ui?key=[redacted] HTTP/1.1" 400' in log  # the lines are there, redacted
    assert '"GET /v1/jobs?q=[redacted]&limit=5 HTTP/1.1" 200' in log
    assert key not in log and key[3:] not in log and encoded[5:] not in log
    for part in key[3:].split("_"):  # no piece of the encoded one either
        assert len(part) < 8 or part not in log
    assert METRICS_TOKEN not in log
