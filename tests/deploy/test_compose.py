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


def _named_volumes(service: dict) -> set[str]:
    """The named volumes a service mounts ("name:/path" entries, not host paths)."""
    mounts = [str(v).split(":", 1)[0] for v in service.get("volumes", [])]
    return {m for m in mounts if m and not m.startswith((".", "/", "~"))}


def test_the_fleet_shares_only_postgres_redis_and_the_bucket() -> None:
    """No volume is mounted by two services but the serving adapters' (API, beat, vLLM): the
    API and the workers may run on different hosts, meeting only in PostgreSQL, Redis and the
    object store (MinIO here)."""
    compose = _compose()
    services = compose["services"]
    env = compose["x-lorajobs-env"]
    assert env["LORAJOBS_STORE_URL"].startswith("s3://")
    assert env["LORAJOBS_STORE_ENDPOINT_URL"] == "http://minio:9000"
    assert "LORAJOBS_ARTIFACT_ROOT" not in env and "LORAJOBS_MODEL_ROOT" not in env
    owners: dict[str, list[str]] = {}
    for name, service in services.items():
        for volume in _named_volumes(service):
            owners.setdefault(volume, []).append(name)
    # One exception, by design (issue 16): vLLM reads runtime-loaded adapters from a directory,
    # which the API and beat (the deployers) write; the workers never mount it.
    shared = {v: sorted(o) for v, o in owners.items() if len(o) > 1}
    assert shared == {"adapters": ["api", "beat", "vllm"]}
    assert _named_volumes(services["api"]) == {"adapters"}
    assert _named_volumes(services["worker"]) == {"worker-scratch", "worker-model-cache"}
    assert services["worker"]["environment"]["LORAJOBS_SCRATCH_DIR"].startswith("/var/lib")
    # the bucket exists before the API or a worker starts: a one-shot `mc mb`
    init = services["minio-init"]
    assert "mc mb --ignore-existing store/lorajobs" in " ".join(init["command"])
    assert env["LORAJOBS_STORE_URL"].startswith("s3://lorajobs/")
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["minio-init"] == {
            "condition": "service_completed_successfully"}


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
