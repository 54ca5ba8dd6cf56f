"""A fleet, not one box (issue 12): API + beat + two workers as separate processes that share
nothing but PostgreSQL, Redis and an S3 server (moto, a real HTTP server of the test's own).

Each worker is a "node" with its own data dir, scratch dir and model cache; the API has its
own; the base model is registered by upload (POST /v1/models) and reaches each node from the
store. The real trainer on the tiny model.

    (c) job 1 trains on node A; while A is frozen later, its artifacts download (from the
        store, through the API) and match their sha256.
    (a) job 2 trains on A; A is frozen (SIGSTOP of the worker and its trainer: a partitioned
        node) right after its first checkpoint is recorded; the lease expires, the job is
        requeued, B (started only now) downloads the newest recorded checkpoint and finishes.
        SIGCONT A: its late writes change nothing (the rows are byte for byte what B left, the
        final artifacts are B's attempt's, verified by sha256 and by the merged-vs-adapter
        logits check), and its late uploads are deleted; the loss curve is complete.
    (b) job 3: the S3 server is paused (SIGSTOP: requests hang, state survives) once training
        started, until the trainer has sealed two checkpoints: nothing is recorded while the
        store is down; after it is back the uploads complete, the job succeeds, and every
        registered file matches its sha256 in the store.
"""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from sqlalchemy import select

from lorajobs.core.db import get_sessionmaker
from lorajobs.core.storage import get_store
from lorajobs.core.tables import Artifact, Checkpoint, JobMetric
from tests.client.live import REAL_TRAINING, alpaca_records
from tests.s3fixtures import S3Target
from tests.servicefixtures import LiveService, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.services, pytest.mark.timeout(600)]

TERMINAL = ("succeeded", "failed", "cancelled")


def _node_env(root: Path) -> dict[str, str]:
    """One node's directories: nothing shared with the API or the other worker."""
    return {"LORAJOBS_DATA_DIR": str(root), "LORAJOBS_SCRATCH_DIR": str(root / "scratch"),
            "LORAJOBS_MODEL_CACHE_DIR": str(root / "model-cache")}


def _freeze(pid: int, sig: signal.Signals) -> list[psutil.Process]:
    """SIGSTOP/SIGCONT a worker and every process under it (zygote, trainer)."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for p in procs if sig == signal.SIGSTOP else reversed(procs):
        p.send_signal(sig)
    return procs


class Fleet:
    def __init__(self, svc: LiveService, client: httpx.Client, nodes: dict[str, Path]) -> None:
        self.svc, self.client, self.nodes = svc, client, nodes
        self.sessions = get_sessionmaker(svc.settings)

    def submit(self, dataset_id: str, *, max_steps: int, save_steps: int) -> str:
        r = self.client.post("/v1/jobs", json={
            "base_model": "tiny", "training_file": dataset_id, "lora": {"r": 8, "alpha": 16},
            "training": {**REAL_TRAINING, "gradient_accumulation_steps": 1,
                         "max_steps": max_steps, "save_steps": save_steps},
            "merge": "final"})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.client.get(f"/v1/jobs/{job_id}").json())

    def wait_end(self, job_id: str, timeout: float = 180) -> dict[str, Any]:
        job = wait_for(lambda: (j := self.job(job_id))["status"] in TERMINAL and j,
                       timeout=timeout, what=f"job {job_id} to end")
        assert job["status"] == "succeeded", (job, self.svc.log("worker-a")[-3000:],
                                              self.svc.log("worker-b")[-3000:])
        return dict(job)

    def trainer_events(self, job_id: str) -> list[dict[str, Any]]:
        """The trainer's own events on whichever node runs it (scratch, read-only)."""
        out = []
        for root in self.nodes.values():
            for f in sorted((root / "scratch" / "jobs" / job_id / "run").glob("events-*.jsonl")):
                out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        return out

    def rows(self, job_id: str) -> dict[str, Any]:
        """Everything the database holds about a job's results, comparable with ==."""
        with self.sessions() as session:
            arts = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
            ckpts = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all()
            metrics = session.scalars(select(JobMetric).where(JobMetric.job_id == job_id)
                                      .order_by(JobMetric.step)).all()
            return {"artifacts": sorted((a.id, a.kind, a.step, a.name, a.storage_key, a.size,
                                         a.sha256) for a in arts),
                    "checkpoints": sorted((c.step, c.attempt, c.path, c.resumable,
                                           json.dumps(c.manifest, sort_keys=True))
                                          for c in ckpts),
                    "metrics": [(m.step, m.train_loss) for m in metrics]}

    def download_verified(self, job_id: str, kinds: tuple[str, ...] = ("adapter", "merged")
                          ) -> int:
        """Every file of `kinds` (final) through the API, checked against its sha256."""
        arts = self.client.get(f"/v1/jobs/{job_id}/artifacts", params={"limit": 200}).json()
        count = 0
        for a in arts["data"]:
            if a["kind"] in kinds and a.get("step") is None:
                r = self.client.get(f"/v1/jobs/{job_id}/artifacts/{a['id']}",
                                    follow_redirects=True)
                assert r.status_code == 200, r.text
                assert hashlib.sha256(r.content).hexdigest() == a["sha256"], a["name"]
                count += 1
        return count


@pytest.fixture
def fleet(tmp_path: Path, tiny_model_dir: Path, private_s3: S3Target) -> Any:
    svc = LiveService(tmp_path, "postgresql", trainer=None,
                      **private_s3.settings(store_retry_seconds=60))
    nodes = {"a": tmp_path / "node-a", "b": tmp_path / "node-b"}
    try:
        svc.migrate()
        base_url = svc.start_api()
        svc.start_beat()
        with httpx.Client(base_url=base_url, timeout=60,
                          headers={"Authorization": f"Bearer {svc.admin_key}"}) as client:
            files = [("files", (p.name, p.read_bytes())) for p in sorted(tiny_model_dir.iterdir())
                     if p.is_file()]
            r = client.post("/v1/models", data={"name": "tiny"}, files=files)
            assert r.status_code == 201, r.text
            yield Fleet(svc, client, nodes)
    finally:
        private_s3.server.resume()  # never leave it paused for the teardown
        svc.close()


def test_two_nodes_partition_outage_and_resume(fleet: Fleet, private_s3: S3Target,
                                               tiny_model_dir: Path) -> None:
    svc, client = fleet.svc, fleet.client
    data = "".join(json.dumps(r) + "\n" for r in alpaca_records(64))
    r = client.post("/v1/datasets", files={"file": ("train.jsonl", data.encode())})
    assert r.status_code == 201, r.text
    dataset_id = r.json()["id"]
    worker_a = svc.start_worker("worker-a", env=_node_env(fleet.nodes["a"]))

    # (c)'s job: trained on A alone
    job1 = fleet.submit(dataset_id, max_steps=4, save_steps=2)
    fleet.wait_end(job1)

    # (a) job 2 on A; freeze A once its first checkpoint is recorded
    total = 40
    job2 = fleet.submit(dataset_id, max_steps=total, save_steps=4)

    def recorded(job_id: str) -> list[tuple[int, int | None]]:
        with fleet.sessions() as session:
            return [(c.step, c.attempt) for c in session.scalars(
                select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.resumable))]

    wait_for(lambda: recorded(job2), timeout=180, interval=0.05, what="A's first checkpoint")
    frozen = _freeze(worker_a.pid, signal.SIGSTOP)
    try:
        a_steps = [e["step"] for e in fleet.trainer_events(job2) if e["type"] == "progress"]
        assert max(a_steps) < total, "A finished before it was frozen: make job 2 longer"
        from_a = recorded(job2)
        assert all(attempt == 1 for _, attempt in from_a)
        svc.start_worker("worker-b", env=_node_env(fleet.nodes["b"]))
        # (c) a job trained on A downloads (from the store) while A is stopped
        assert fleet.download_verified(job1) >= 4
        job = fleet.wait_end(job2)
        assert job["attempt"] == 2
        resumed = max(step for step, _ in from_a)
        events = client.get(f"/v1/jobs/{job2}/events").json()["data"]
        started = [e for e in events if e["type"] == "started"]
        assert started[-1]["data"]["resumed_from_step"] >= resumed  # A may record more first
        before = fleet.rows(job2)
    finally:
        for p in reversed(frozen):
            p.send_signal(signal.SIGCONT)
    # A wakes up: its watch loop or a fenced write finds the lease lost; it settles "lost"
    wait_for(lambda: "lost" in svc.task_outcomes("worker-a"), timeout=60,
             what="A to notice it lost the job")
    after = fleet.rows(job2)
    assert after == before, "a late worker changed the job's rows"
    assert [step for step, _ in after["metrics"]] == list(range(1, total + 1))
    finals = [a for a in after["artifacts"] if a[2] is None and a[1] in ("adapter", "merged")]
    assert finals and all(a[4].startswith(f"jobs/{job2}/attempt-2/") for a in finals)
    assert fleet.download_verified(job2) == len(finals)
    store = get_store(svc.settings)
    recorded_prefixes = {c[2] for c in after["checkpoints"] if c[1] == 1}
    late = [o.key for o in store.list(f"jobs/{job2}/attempt-1")
            if not any(o.key.startswith(p + "/") for p in recorded_prefixes)]
    assert late == [], f"A's unrecorded uploads were left in the store: {late}"
    assert not (fleet.nodes["a"] / "scratch" / "jobs" / job2).exists()
    _assert_merged_matches_adapter(store, after["artifacts"], tiny_model_dir,
                                   svc.tmp_path / "check")

    # (b) the S3 server down while checkpoints are sealed and uploaded
    job3 = fleet.submit(dataset_id, max_steps=12, save_steps=2)
    wait_for(lambda: any(e["type"] == "started" for e in fleet.trainer_events(job3)),
             timeout=180, interval=0.05, what="job 3's training to start")
    private_s3.server.pause()
    try:
        wait_for(lambda: sum(e["type"] == "checkpoint" for e in fleet.trainer_events(job3)) >= 2,
                 timeout=120, interval=0.05, what="two checkpoints sealed during the outage")
        assert recorded(job3) == [], "a checkpoint was recorded while the store was down"
    finally:
        private_s3.server.resume()
    fleet.wait_end(job3)
    rows = fleet.rows(job3)
    assert [c[0] for c in rows["checkpoints"]] == [2, 4, 6, 8, 10, 12]  # + the final step
    for step, _, prefix, resumable, manifest in rows["checkpoints"]:
        assert resumable
        for f in json.loads(manifest)["files"]:
            with store.open(f"{prefix}/{f['path']}") as fh:
                assert hashlib.sha256(fh.read()).hexdigest() == f["sha256"], (step, f)
    for _, _, _, name, key, size, sha in rows["artifacts"]:
        with store.open(key) as fh:
            body = fh.read()
        assert len(body) == size and hashlib.sha256(body).hexdigest() == sha, name


def _assert_merged_matches_adapter(store: Any, artifacts: list[tuple[Any, ...]],
                                   base_dir: Path, work: Path) -> None:
    """Base + B's final adapter (PEFT) and B's merged model give the same logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dirs = {"adapter": work / "adapter", "merged": work / "merged"}
    for _, kind, step, name, key, _, _ in artifacts:
        if kind in dirs and step is None:
            store.get_file(key, dirs[kind] / name)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        adapted = PeftModel.from_pretrained(base, dirs["adapter"]).eval()
        merged = AutoModelForCausalLM.from_pretrained(dirs["merged"], dtype=torch.float32).eval()
        expected, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
