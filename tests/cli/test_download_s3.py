"""`lorajobs download` against a live API (uvicorn) whose artifacts live in S3 (moto's server)
and whose downloads answer 307 to presigned URLs: the CLI follows them, never sends the API key
to the store, verifies sha256, and leaves nothing behind on a mismatch."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from lorajobs.core import registry
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.storage import get_store
from lorajobs.core.tables import Artifact, new_id
from tests.s3fixtures import S3Target
from tests.servicefixtures import LiveService

REPO = Path(__file__).resolve().parents[2]
FILES = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": os.urandom(70_000)}


def _cli(svc: LiveService, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAJOBS_", "AWS_"))}
    env.update({"LORAJOBS_URL": str(svc.base_url), "LORAJOBS_API_KEY": str(svc.admin_key),
                "LORAJOBS_DATA_DIR": str(cwd / ".home"), "PYTHONPATH": str(REPO)})
    return subprocess.run([sys.executable, "-m", "lorajobs", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_follows_presigned_downloads(tmp_path: Path, s3_bucket: S3Target,
                                         tiny_model_dir: Path) -> None:
    svc = LiveService(tmp_path, "sqlite", trainer=None, model_root=tmp_path / "models",
                      **s3_bucket.settings(store_presign_downloads=True))
    try:
        svc.migrate()
        shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
        with get_sessionmaker(svc.settings)() as session:
            registry.register_model(session, name="tiny", path_under_model_root="tiny",
                                    settings=svc.settings)
        url = svc.start_api()
        auth = {"Authorization": f"Bearer {svc.admin_key}"}
        data = b'{"instruction": "a", "input": "", "output": "b"}\n' * 4
        ds = httpx.post(f"{url}/v1/datasets", headers=auth,
                        files={"file": ("t.jsonl", data)}).json()["id"]
        job = httpx.post(f"{url}/v1/jobs", headers=auth,
                         json={"base_model": "tiny", "training_file": ds}).json()["id"]
        store = get_store(svc.settings)
        with get_sessionmaker(svc.settings)() as session:
            for name, body in FILES.items():  # what a worker registers
                key = f"jobs/{job}/adapter/final/{name}"
                store.put_stream(key, io.BytesIO(body))
                session.add(Artifact(id=new_id("art"), job_id=job, kind="adapter", step=None,
                                     name=name, storage_key=key, size=len(body),
                                     sha256=hashlib.sha256(body).hexdigest()))
            session.commit()
        art = httpx.get(f"{url}/v1/jobs/{job}/artifacts", headers=auth).json()["data"][0]
        assert httpx.get(f"{url}{art['url']}", headers=auth).status_code == 307

        r = _cli(svc, "download", job, "-o", "out", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "sha256 verified" in r.stdout
        assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == FILES

        # the object changed behind its recorded sha256: an error, no file, no part
        store.put_stream(f"jobs/{job}/adapter/final/adapter_model.safetensors",
                         io.BytesIO(b"tampered"))
        bad = _cli(svc, "download", job, "-o", "bad", cwd=tmp_path)
        assert bad.returncode != 0 and "sha256" in (bad.stderr + bad.stdout)
        left = sorted(p.name for p in (tmp_path / "bad").rglob("*"))
        assert "adapter_model.safetensors" not in left
        assert not any(n.endswith(".part") for n in left)
    finally:
        svc.close()
