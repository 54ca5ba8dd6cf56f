"""The one settings object, read from `LORAJOBS_*` environment variables, failing fast.

Embedded defaults (SQLite, an embedded broker on SQLite, a local artifact directory) live
under one `data_dir`; production sets `LORAJOBS_DATABASE_URL=postgresql+psycopg://...` and
`LORAJOBS_BROKER_URL=redis://...`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from lora_core.data.reader import MAX_RECORD_BYTES

__all__ = ["Settings", "get_settings"]

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAJOBS_", extra="ignore")

    data_dir: Path = Field(default_factory=lambda: Path.home() / ".lorajobs")
    database_url: str | None = None  # default: sqlite under data_dir
    broker_url: str | None = None  # default: embedded kombu SQLAlchemy transport under data_dir
    artifact_root: Path | None = None  # default: data_dir/artifacts
    model_root: Path | None = None  # default: data_dir/models; registered models live here

    # The object store (lorajobs/core/storage.py). Unset: the local directory artifact_root.
    # `s3://bucket/prefix`: an S3-compatible store (AWS S3, MinIO, Ceph RGW, R2, GCS in S3
    # mode); credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID..., a profile, an
    # instance role). store_endpoint_url points at a non-AWS server (http://minio:9000).
    store_url: str | None = None
    store_endpoint_url: str | None = None
    store_region: str | None = None
    # The endpoint presigned download URLs name, where clients reach the store by another
    # address than the API and workers do (compose: http://minio:9000 inside, a public name
    # outside). Default: store_endpoint_url.
    store_public_endpoint_url: str | None = None
    # Downloads: stream through the API (HTTP Range, sha256 headers), or answer 307 to a
    # presigned URL valid for store_presign_seconds (an S3 store only; the SDK and CLI follow
    # either and verify sha256 either way).
    store_presign_downloads: bool = False
    store_presign_seconds: int = Field(300, ge=10, le=7 * 24 * 3600)
    # Node-local scratch: a worker's trainer runs here (inputs fetched from the store,
    # checkpoints uploaded from here); each job's directory is removed when the job settles.
    scratch_dir: Path | None = None  # default: data_dir/scratch
    # Node-local cache of base models fetched from the store, keyed by content hash, evicted
    # least-recently-used past model_cache_bytes.
    model_cache_dir: Path | None = None  # default: data_dir/model-cache
    model_cache_bytes: int = Field(200 * 1024 * MiB, ge=1)
    # True: a cached model's files are hashed again (sha256) before every use. False: after
    # its download, then again only when a file's size, mtime or inode differs from the last
    # full check (sha256 runs at ~0.4-1.5 GB/s: re-reading a 140 GB model costs minutes).
    model_cache_verify_every_use: bool = True
    # A worker's uploads (checkpoints while training, final artifacts) retry a failing store
    # with backoff for this long; a checkpoint that still fails is not resumable, and the
    # job's settle waits at most this long for pending checkpoint uploads.
    store_retry_seconds: float = Field(120, gt=0)
    # POST /v1/models (lorajobs/core/model_import.py): a model's files together (an upload,
    # an s3:// prefix, a Hugging Face snapshot) may not exceed max_model_bytes; they are staged
    # under model_staging_dir (on the API's node, removed once stored). A registration from
    # s3:// or a hub is synchronous, so at most max_concurrent_model_fetches run at once per
    # API process (more: 429 + Retry-After), each bounded by model_fetch_timeout_seconds.
    max_model_bytes: int = Field(200 * 1024 * MiB, ge=1)
    model_staging_dir: Path | None = None  # default: data_dir/model-staging
    max_concurrent_model_fetches: int = Field(2, ge=1, le=8)
    model_fetch_timeout_seconds: float = Field(3600, gt=0)

    # Leases: a worker renews every LEASE_RENEW_SECONDS; a lease not renewed for
    # lease_seconds means the worker died and the reaper may requeue the job.
    lease_seconds: int = Field(60, ge=2)
    lease_renew_seconds: float = Field(10, gt=0)
    reaper_interval_seconds: float = Field(15, gt=0)
    # A queued job whose message nobody picked up within this is sent again (broker lost it).
    requeue_after_seconds: float = Field(60, gt=0)
    max_attempts: int = Field(3, ge=1, le=20)
    # Cancel: the trainer gets a stop file, then SIGTERM, then SIGKILL after this grace.
    cancel_grace_seconds: float = Field(15, gt=0)
    worker_poll_seconds: float = Field(0.5, gt=0)

    # Resource limits (OWASP API4).
    max_upload_bytes: int = Field(200 * MiB, ge=1)
    max_examples_per_dataset: int = Field(2_000_000, ge=1)
    # One record of an upload (a JSONL line, or one element of a JSON list): a longer one is a
    # line error, and what an upload's validation holds in memory is bounded by it (1 MiB is
    # ~250k tokens of English, more than any context a job trains on).
    max_record_bytes: int = Field(MAX_RECORD_BYTES, ge=1024)
    max_request_bytes: int = Field(1 * MiB, ge=1024)
    max_active_jobs_per_tenant: int = Field(16, ge=1)
    max_total_steps: int = Field(1_000_000, ge=1)
    # Job-spec bounds (checked at submit, lorajobs/core/bounds.py): what one tenant's job
    # may ask of a shared node. max_seq_length is also capped by the model's position limit.
    max_seq_length: int = Field(32_768, ge=8)
    max_batch_size: int = Field(256, ge=1)
    max_gradient_accumulation_steps: int = Field(128, ge=1)
    # Tokens in one micro-batch (batch_size x max_seq_length): what drives activation memory.
    max_batch_tokens: int = Field(262_144, ge=8)
    # Processes (GPUs) one job may use: the largest node of the fleet. A worker also refuses a
    # job wider than the devices it sees (runspec.worker_capacity), as a user error at claim.
    max_processes_per_job: int = Field(8, ge=1, le=64)
    # Checkpoints one job writes, and merged models a job with merge "all" writes (one per
    # kept checkpoint + the final one): each merged model is a full copy of the base weights.
    max_checkpoints_per_job: int = Field(100, ge=1)
    max_merges_per_job: int = Field(8, ge=1)
    # Graded generations (`evaluation` in a job, lora_core.evaluation): per evaluation at most
    # this many prompts and new tokens each; they run in the job's own time at every checkpoint.
    evaluation_max_samples: int = Field(256, ge=1)
    evaluation_max_new_tokens: int = Field(256, ge=1)
    # Wall time of one attempt; then the trainer is stopped (it checkpoints) and the job fails
    # with `max_runtime_exceeded` (not retried). 72 h.
    max_job_runtime_seconds: float = Field(72 * 3600, gt=0)
    # Bytes a tenant may keep stored: its datasets + its jobs' registered artifacts. Past it,
    # uploads and new jobs answer 413 `storage_quota_exceeded` until DELETEs free space.
    storage_quota_bytes_per_tenant: int = Field(500 * 1024 * MiB, ge=1)
    # Requests the API works on at once (more wait in the event loop, holding no thread and
    # no database connection). Must stay <= db.POOL_CAPACITY / 2: a request holds at most two
    # connections (its session, the enqueue stamp). Without it, a burst of sync requests could
    # hold every pooled connection while the threads that would release them wait for one.
    api_max_concurrent_requests: int = Field(16, ge=1, le=20)
    # Slow or stalled request bodies (lorajobs/api/limits.py). A JSON body must arrive whole
    # within body_timeout_seconds of its headers (1 MiB max: >= 100 KB/s), else 408; it takes
    # a request slot only once it has. An upload holds a slot while it streams: it gets 408
    # after body_timeout_seconds without a byte, or once it falls below
    # upload_min_bytes_per_second on average after that grace (0: no rate floor; 64 KiB/s
    # sends the 200 MiB maximum in under an hour). At most max_concurrent_uploads uploads
    # hold slots at once, so uploads alone never fill the limit.
    body_timeout_seconds: float = Field(10, gt=0, le=300)
    upload_min_bytes_per_second: int = Field(64 * 1024, ge=0)
    max_concurrent_uploads: int = Field(4, ge=1, le=20)
    # JSON bodies held in memory share a 64 MiB budget (limits.BUFFERED_BODIES_BYTES); one
    # tenant's bodies may hold at most this fraction of it (its keys together: any key can mint
    # more): past it, 429 at once; a body waits body_timeout_seconds at most for room in the
    # whole budget, then 503; both with Retry-After.
    buffered_body_share_per_tenant: float = Field(0.25, gt=0, le=1)
    # Slow-reading clients (a download read 1 byte/s): a request gives its slot back once its
    # response has started (the route and its database session are done by then), and each
    # send of a response body must complete within this, else the response is abandoned and
    # the connection closed (event streams have their own, events.SEND_TIMEOUT_SECONDS).
    response_send_timeout_seconds: float = Field(30, gt=0, le=600)
    # When set, GET /metrics needs `Authorization: Bearer <metrics_token>` and also exposes the
    # per-job series (job ids of every tenant); unset, /metrics is open and aggregate only.
    metrics_token: str | None = Field(None, min_length=16)

    # Live event streams (GET /v1/jobs/{id}/events/stream, lorajobs/api/streams.py). Open
    # streams per key and per API process: more answer 429. A stream ends after
    # stream_max_seconds (clients reconnect with Last-Event-ID and lose nothing) and within
    # stream_key_check_seconds of its key's revocation. One poll per job every
    # stream_poll_seconds serves all of that job's streams.
    stream_max_per_key: int = Field(16, ge=1)
    stream_max_total: int = Field(1000, ge=1)
    stream_max_seconds: float = Field(600, gt=0)
    stream_key_check_seconds: float = Field(2, gt=0)
    stream_poll_seconds: float = Field(0.5, gt=0)

    # Webhooks (lorajobs/core/webhooks.py; sent by beat, lorajobs/worker/webhook_sender.py).
    # An endpoint URL whose host resolves to a loopback, private, link-local, multicast or
    # reserved address is refused at registration and again before every attempt (DNS can
    # change), unless webhook_allow_private_addresses; http:// unless webhook_allow_http.
    webhook_allow_private_addresses: bool = False
    webhook_allow_http: bool = False
    webhook_connect_timeout_seconds: float = Field(5, gt=0, le=60)
    webhook_read_timeout_seconds: float = Field(10, gt=0, le=120)
    # A sender's claim on a delivery lasts connect + read timeouts + this margin; a sender
    # killed mid-attempt leaves the delivery due again once its claim runs out.
    webhook_claim_margin_seconds: float = Field(15, gt=0)
    # A failed attempt is retried after min(base * 2**(attempts-1), max_delay) (+-10% jitter)
    # until retry_window after the first attempt (at least 24 h), then the delivery fails.
    webhook_retry_base_seconds: float = Field(10, gt=0)
    webhook_retry_max_delay_seconds: float = Field(4 * 3600, gt=0)
    webhook_retry_window_seconds: float = Field(72 * 3600, ge=24 * 3600)
    # How often an idle sender looks for due deliveries; each sweep claims up to concurrency
    # of them and sends them in parallel (one slow receiver does not hold up the others).
    webhook_poll_seconds: float = Field(1.0, gt=0)
    webhook_concurrency: int = Field(8, ge=1, le=64)
    # Endpoints one tenant may register.
    webhook_max_endpoints_per_tenant: int = Field(16, ge=1)
    # Delivered and failed deliveries (with their attempts) are deleted this long after they
    # finished (the sender sweeps hourly); pending ones are never.
    webhook_retention_seconds: float = Field(30 * 24 * 3600, gt=0)

    # Serving (lorajobs/core/serving.py): vLLM server groups finished adapters are published
    # to. Targets here (JSON list of {name, urls, base_models, api_key?, adapter_dir,
    # server_adapter_dir?, max_lora_rank?, supported_modules?}) come on top of those an admin
    # registers with POST /v1/serving-targets. Beat (and `serve`) reloads a deployment on a
    # server that forgot it (restarted) every serving_reconcile_seconds.
    serving_targets: list[dict[str, Any]] = Field(default_factory=list)
    serving_reconcile_seconds: float = Field(10, gt=0)
    # The OpenAI proxy's wait for a server's first byte (generation can take long).
    serving_read_timeout_seconds: float = Field(600, gt=0)

    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=0, le=65535)
    # Python used to run the trainer child (`python -m lora_core run`); default: this one.
    trainer_python: str | None = None
    torchrun: str | None = None
    # The trainer's CPU threads: None (default) = torch's default (all cores); an int pins
    # OMP/MKL threads to it, and reruns of a spec are then bit-identical.
    trainer_threads: int | None = None
    # With trainer_threads None: let the trainer choose its count by measurement while it trains
    # (lora_core/training/thread_tuner.py): one thread where busy neighbours oversubscribe the
    # cores (2 threads ran 2.9-8.5x slower there). Off by default: on a quiet machine it kept 1
    # thread where 2 were 1.7x faster (bench/README.md, "Thread count by measurement").
    trainer_thread_tuning: bool = False
    # Fork single-process trainers from a pre-warmed zygote that has imported torch,
    # transformers and peft once per worker (lorajobs/worker/prewarm.py): a job's `started`
    # comes ~4 s sooner (bench/LATENCY.md), for ~0.4 GB of resident memory per worker. Not used
    # with a custom trainer_python, torchrun or DeepSpeed specs: those start cold.
    trainer_prewarm: bool = True

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'lorajobs.db'}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.data_dir / 'broker.db'}"

    @property
    def resolved_artifact_root(self) -> Path:
        return self.artifact_root or self.data_dir / "artifacts"

    @property
    def resolved_model_root(self) -> Path:
        return self.model_root or self.data_dir / "models"

    @property
    def resolved_scratch_dir(self) -> Path:
        return self.scratch_dir or self.data_dir / "scratch"

    @property
    def resolved_model_cache_dir(self) -> Path:
        return self.model_cache_dir or self.data_dir / "model-cache"

    @property
    def resolved_model_staging_dir(self) -> Path:
        return self.model_staging_dir or self.data_dir / "model-staging"

    @property
    def admin_key_file(self) -> Path:
        """Where the embedded server writes the local admin key for the CLI to find."""
        return self.data_dir / "admin_key"

    @property
    def is_embedded_broker(self) -> bool:
        return self.resolved_broker_url.startswith(("sqla+", "filesystem"))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
