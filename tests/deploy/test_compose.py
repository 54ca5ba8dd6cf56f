"""No Docker engine runs here: parse docker-compose.yml and Dockerfile.gpu and check that every
command they run exists in this project (CLI subcommands, files they COPY)."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from lorajobs.cli import app

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_the_production_services() -> None:
    services = _compose()["services"]
    assert {"postgres", "redis", "migrate", "api", "worker", "beat"} <= set(services)
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    env = _compose()["x-lorajobs-env"]
    assert env["LORAJOBS_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["LORAJOBS_BROKER_URL"].startswith("redis://")


def test_maintenance_runs_apart_from_the_gpu_workers() -> None:
    """The reaper must not wait for a GPU worker: beat sweeps in its own process (no GPU), and
    workers consume job messages only (tests/worker/test_reaper.py proves it with processes)."""
    from lorajobs.core.queue import QUEUE_NAME
    from lorajobs.worker.celery_app import WORKER_QUEUES

    beat = _compose()["services"]["beat"]
    assert beat["command"] == ["lorajobs", "beat"]
    assert "deploy" not in beat and beat.get("restart") == "unless-stopped"
    assert WORKER_QUEUES == (QUEUE_NAME,)


def test_every_compose_command_is_a_real_cli_command() -> None:
    runner = CliRunner()
    for name, service in _compose()["services"].items():
        command = service.get("command")
        if not command or command[0] != "lorajobs":
            continue
        # `--help` on the exact subcommand path proves it exists and its options parse.
        args = [a for a in command[1:] if not a.startswith("-")][:2]
        words = [a for a in args if a in {"db", "upgrade", "api", "worker", "beat"}]
        result = runner.invoke(app, [*words, "--help"])
        assert result.exit_code == 0, f"{name}: lorajobs {' '.join(words)}: {result.output}"
        for opt in (a for a in command[1:] if a.startswith("--")):
            assert opt in result.output, f"{name}: option {opt} unknown to lorajobs {words}"


def test_dockerfile_copies_existing_paths_and_pins_torch() -> None:
    text = (ROOT / "Dockerfile.gpu").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile.gpu copies missing {src}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in pyproject
    assert "torch==2.13.0" in text
    assert 'CMD ["lorajobs", "api"' in text
