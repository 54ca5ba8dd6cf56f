"""`pip install lorajobs` (no extras) is the SDK and the remote CLI, without torch.

Builds the wheel from this checkout, installs it into a fresh venv (its dependencies from the
package index, as a laptop would), and drives a live server with it: `lorajobs submit` works,
the local spec check runs on the client's own copy of the schema, a server-only command says in
one line which extra to install, and torch (or any server package) is not importable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.client.live import Live, alpaca_records, write_jsonl

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CLIENT_INSTALL_MB = 60  # issue 11: the client install stays under this, in a fresh venv


def _run(*cmd: str | Path, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600,
                          **kw)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only `pip install <the lorajobs wheel>`; its bin dir."""
    tmp = tmp_path_factory.mktemp("client-install")
    src = tmp / "src"  # a copy: setuptools writes build/ and *.egg-info beside the sources
    for package in ("lora_core", "lorajobs", "migrations"):
        shutil.copytree(REPO / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    built = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "-q", "-w", tmp / "dist", src)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp / "dist").glob("lorajobs-*.whl"))
    venv = tmp / "venv"
    # No pip of its own (ensurepip and a second pip's start are ~5 of the fixture's ~12
    # CPU-s): this pip installs into it, resolving from the same index as `pip install` there.
    made = _run(sys.executable, "-m", "venv", "--without-pip", venv)
    assert made.returncode == 0, made.stderr
    installed = _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python",
                     "install", "-q", wheel)
    assert installed.returncode == 0, installed.stderr[-2000:]
    return venv / "bin"


def _site_packages_mb(bin_dir: Path) -> float:
    site = next((bin_dir.parent / "lib").glob("python3.*/site-packages"))
    baseline = {"pip", "setuptools", "_distutils_hack"}  # what `python -m venv` puts there
    total = 0
    for entry in site.iterdir():
        if entry.name.split("-")[0] in baseline or entry.name.startswith("pip-"):
            continue
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        total += sum(p.stat().st_size for p in files)
    return total / 2**20


def _env(live: Live, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LORAJOBS_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "LORAJOBS_URL": live.url, "LORAJOBS_API_KEY": live.key,
            "LORAJOBS_DATA_DIR": str(home), "COLUMNS": "120"}


def test_client_install_is_small_and_torch_free(client_venv: Path) -> None:
    size = _site_packages_mb(client_venv)
    assert size < CLIENT_INSTALL_MB, f"client install is {size:.1f} MB"
    for module in ("torch", "transformers", "sqlalchemy", "fastapi", "celery"):
        probe = _run(client_venv / "python", "-c", f"import {module}", cwd="/")
        assert probe.returncode != 0, f"{module} is importable in the client install"
    sdk = _run(client_venv / "python", "-c",
               "from lorajobs.client import Client, AsyncClient; import lorajobs.client.errors",
               cwd="/")
    assert sdk.returncode == 0, sdk.stderr
    helped = _run(client_venv / "lorajobs", "--help", cwd="/")
    assert helped.returncode == 0 and "submit" in helped.stdout, helped.stderr


def test_client_install_submits_and_names_the_missing_extra(client_venv: Path, live: Live,
                                                             tmp_path: Path,
                                                             tiny_model_dir: Path) -> None:
    env = _env(live, tmp_path / "home")
    write_jsonl(tmp_path / "train.jsonl", alpaca_records(8))
    spec = tmp_path / "job.yaml"
    spec.write_text("base_model: tiny\ntraining_file: ./train.jsonl\n"
                    "training: {max_steps: 2, save_steps: 2}\n")
    done = _run(client_venv / "lorajobs", "submit", spec, "--wait", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert "succeeded" in done.stdout, done.stdout
    uploaded = _run(client_venv / "lorajobs", "models", "upload", "from-client", tiny_model_dir,
                    cwd=tmp_path, env=env)  # a base model from a machine without torch
    assert uploaded.returncode == 0, uploaded.stderr
    assert uploaded.stdout.startswith("registered from-client ("), uploaded.stdout

    spec.write_text("base_model: tiny\ntraining_file: ./train.jsonl\ntraining: {max_step: 2}\n")
    typo = _run(client_venv / "lorajobs", "submit", spec, cwd=tmp_path, env=env)
    assert typo.returncode == 1
    assert "did you mean 'max_steps'" in typo.stderr, typo.stderr

    for command, extra in ((["serve"], "worker"), (["db", "upgrade"], "server"),
                           (["make-tiny-model", str(tmp_path / "m")], "train")):
        out = _run(client_venv / "lorajobs", *command, cwd=tmp_path, env=env)
        assert out.returncode == 1, (command, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        assert f"pip install 'lorajobs[{extra}]'" in lines[0], lines[0]
