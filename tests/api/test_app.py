"""Edges of the app: error shapes, body limits, health, Prometheus, and no torch in the API."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from fastapi.testclient import TestClient

from tests.api.conftest import Api


def test_unknown_route_and_method(api: Api) -> None:
    resp = api.client.get("/v1/nothing-here", headers=api.h("alice"))
    assert resp.status_code == 404
    assert resp.json() == {"error": {"code": "not_found", "message": "Not Found", "param": None}}
    resp = api.client.delete("/v1/jobs", headers=api.h("alice"))
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"


def test_json_body_over_limit_is_413(api: Api) -> None:
    api.client.app.state.settings.max_request_bytes = 2048
    body = {"base_model": "x", "training_file": "y", "metadata": {"k": "v" * 3000}}
    resp = api.client.post("/v1/jobs", headers=api.h("alice"), json=body)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"

    def chunks():
        yield b'{"base_model": "'
        yield b"x" * 4096
        yield b'"}'

    resp = api.client.post("/v1/jobs", headers={**api.h("alice"),
                           "Content-Type": "application/json"}, content=chunks())
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"
    bad_json = api.client.post("/v1/jobs", headers={**api.h("alice"),
                               "Content-Type": "application/json"}, content=b"{nope")
    assert bad_json.status_code == 422 and bad_json.json()["error"]["code"] == "invalid_request"


def test_internal_error_does_not_leak(api: Api) -> None:
    def boom(job_id: str) -> None:
        raise RuntimeError("secret stack detail")

    app = api.client.app
    app.state.enqueue = boom
    client = TestClient(app, raise_server_exceptions=False)
    resp = client.post("/v1/jobs", headers=api.h("alice"),
                       json={"base_model": "tiny-llama", "training_file": api.dataset("alice")})
    assert resp.status_code == 500
    assert resp.json()["error"]["code"] == "internal_error"
    assert "secret" not in resp.text and "Traceback" not in resp.text


def test_health_ready_and_prometheus(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
    api.job("alice", api.dataset("alice"))
    text = api.client.get("/metrics").text
    assert 'lorajobs_jobs{status="queued"} 1.0' in text
    assert 'lorajobs_jobs{status="running"} 0.0' in text
    assert 'lorajobs_http_request_duration_seconds_count{method="POST",route="/v1/jobs",' \
           'status="201"} 1.0' in text


NO_TORCH_SCRIPT = textwrap.dedent("""
    import json, shutil, sys
    from pathlib import Path
    from fastapi.testclient import TestClient
    from lorajobs.api.app import create_app
    from lorajobs.core import keys
    from lorajobs.core.db import get_sessionmaker
    from lorajobs.core.migrate import upgrade
    from lorajobs.core.settings import Settings

    data_dir, model_dir = Path(sys.argv[1]), Path(sys.argv[2])
    settings = Settings(data_dir=data_dir)
    shutil.copytree(model_dir, settings.resolved_model_root / "tiny")
    upgrade(settings)
    with get_sessionmaker(settings)() as session:
        tenant = keys.create_tenant(session, name="t")
        _, key = keys.create_key(session, tenant_id=tenant.id, is_admin=True)
        session.commit()
    auth = {"Authorization": f"Bearer {key}"}
    client = TestClient(create_app(settings))
    r = client.post("/v1/models", headers=auth, json={"name": "tiny", "path": "tiny"})
    assert r.status_code == 201, r.text
    line = json.dumps({"instruction": "say hi", "output": "hi"}) + "\\n"
    r = client.post("/v1/datasets", headers=auth, files={"file": ("d.jsonl", line * 4)})
    assert r.status_code == 201, r.text
    r = client.post("/v1/jobs", headers=auth,
                    json={"base_model": "tiny", "training_file": r.json()["id"]})
    assert r.status_code == 201, r.text
    assert r.json()["estimate"]["total_steps"] > 0
    print(json.dumps({"torch": "torch" in sys.modules,
                      "transformers": "transformers" in sys.modules}))
""")


def test_api_process_never_imports_torch(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Fresh interpreter: app + model registration + upload + submit (real embedded enqueue)."""
    out = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT, str(tmp_path / "data"),
                          str(tiny_model_dir)], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"torch": False,
                                                               "transformers": False}
