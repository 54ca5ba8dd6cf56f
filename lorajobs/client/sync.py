"""The synchronous Python SDK.

    from lorajobs.client import Client
    c = Client()                                   # URL + key from env or the embedded server
    ds = c.datasets.upload("train.jsonl")
    job = c.jobs.create({"base_model": "tiny-llama", "training_file": ds.id})
    job = c.jobs.wait(job.id, on_progress=lambda j: print(j.progress))
    c.jobs.download(job.id, "out/adapter")         # resumes with Range, verifies sha256
"""

from __future__ import annotations

import builtins
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PureWindowsPath
from typing import Any

import httpx
from tenacity import Retrying

from lorajobs.client._retry import (
    BACKOFF_INITIAL_S,
    BACKOFF_MAX_S,
    RETRYABLE_STATUS,
    RetryableStatus,
    retry_kwargs,
)
from lorajobs.client.config import resolve_api_key, resolve_url
from lorajobs.client.errors import (
    APIConnectionError,
    ChecksumError,
    RateLimitError,
    UnsafePathError,
    raise_for_response,
)
from lorajobs.client.model_files import model_upload_files
from lorajobs.client.types import (
    Artifact,
    Checkpoint,
    Dataset,
    Event,
    Job,
    MetricRow,
    Model,
)
from lorajobs.client.webhooks import Webhooks

__all__ = ["Client"]

DEFAULT_TIMEOUT_S = 30.0
# Registering a model answers once its files are validated and stored (an upload's hashing
# and store writes, or a fetch from s3:// or a hub): no read timeout; the server bounds a
# fetch with its model_fetch_timeout_seconds.
MODEL_TIMEOUT = httpx.Timeout(DEFAULT_TIMEOUT_S, read=None)
DEFAULT_MAX_RETRIES = 3
DOWNLOAD_CHUNK = 1024 * 1024
# A stream that delivered nothing and closed sooner than this counts as a failed connection
# (retried max_retries times in a row), not as the server's maximum duration.
STREAM_MIN_HEALTHY_S = 1.0
# Streams wait for events as long as a job runs; the server pings every 15 s, so a read that
# waits longer than this means a dead connection (retried, resuming with Last-Event-ID).
STREAM_TIMEOUT = httpx.Timeout(DEFAULT_TIMEOUT_S, read=60.0)
# Page sizes for the per-job lists: the server's maxima, so a usual job is one request.
LIST_PAGE = 1000
METRICS_PAGE = 10_000


class Client:
    """One HTTP connection pool to a lorajobs server. Use as a context manager or `close()`."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT_S, max_retries: int = DEFAULT_MAX_RETRIES,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = resolve_url(base_url)
        key = resolve_api_key(api_key)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                  transport=transport)
        # Downloads the API redirects to a presigned URL of the object store go through a pool
        # of their own with no default headers: the API key never reaches the store's host.
        self._store_http = httpx.Client(timeout=timeout)
        self.max_retries = max_retries
        self.datasets = _Datasets(self)
        self.models = _Models(self)
        self.jobs = _Jobs(self)
        self.keys = _Keys(self)
        self.webhooks = Webhooks(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()
        self._store_http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send with retries on transport errors, 429 and 5xx; raise APIError on other errors."""
        try:
            for attempt in Retrying(**retry_kwargs(self.max_retries)):
                with attempt:
                    response = self._http.request(method, path, **kwargs)
                    if response.status_code in RETRYABLE_STATUS:
                        raise RetryableStatus(response)
        except RetryableStatus as exc:
            response = exc.response
        except httpx.TransportError as exc:
            raise APIConnectionError(f"cannot reach {self.base_url}: {exc}") from exc
        raise_for_response(response)
        return response

    def get_json(self, path: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", path, params=clean).json()

    def paginate(self, path: str, *, limit: int = 50, **params: Any) -> Iterator[dict[str, Any]]:
        """Follow `next_cursor` until `has_more` is false."""
        after = params.pop("after", None)
        while True:
            page = self.get_json(path, limit=limit, after=after, **params)
            yield from page["data"]
            if not page.get("has_more"):
                return
            cursor = page.get("next_cursor")  # may be 0 (a step): not "missing"
            after = cursor if cursor is not None else page["data"][-1]["id"]


class _Resource:
    def __init__(self, client: Client) -> None:
        self._c = client


class _Datasets(_Resource):
    def upload(self, path: str | Path, *, format: str | None = None) -> Dataset:
        path = Path(path)
        data = {"format": format} if format else {}
        with open(path, "rb") as fh:
            r = self._c.request("POST", "/v1/datasets", files={"file": (path.name, fh)},
                                data=data)
        return Dataset.model_validate(r.json())

    def get(self, dataset_id: str) -> Dataset:
        return Dataset.model_validate(self._c.get_json(f"/v1/datasets/{dataset_id}"))

    def list(self) -> Iterator[Dataset]:
        for row in self._c.paginate("/v1/datasets"):
            yield Dataset.model_validate(row)


class _Models(_Resource):
    def list(self) -> list[Model]:
        body = self._c.get_json("/v1/models")
        return [Model.model_validate(m) for m in body["data"]]

    def register(self, name: str, path: str) -> Model:
        """A directory under the server's own model root (the embedded default)."""
        r = self._c.request("POST", "/v1/models", json={"name": name, "path": path})
        return Model.model_validate(r.json())

    def upload(self, name: str, directory: str | Path) -> Model:
        """Upload a local model directory (safetensors + config + tokenizer files, streamed
        from disk) into the server's store, from any machine (admin key)."""
        files = model_upload_files(directory)
        handles = [open(p, "rb") for p in files]  # noqa: SIM115 - closed below
        try:
            r = self._c.request("POST", "/v1/models", data={"name": name},
                                files=[("files", (p.name, fh))
                                       for p, fh in zip(files, handles, strict=True)],
                                timeout=MODEL_TIMEOUT)
        finally:
            for fh in handles:
                fh.close()
        return Model.model_validate(r.json())

    def register_from(self, name: str, *, s3: str | None = None, hf_repo: str | None = None,
                      revision: str | None = None) -> Model:
        """Have the server copy a model from `s3://bucket/prefix` or a Hugging Face repo
        (+ revision) into its store; answers once it is there (admin key)."""
        source = {k: v for k, v in (("s3", s3), ("hf_repo", hf_repo), ("revision", revision))
                  if v is not None}
        r = self._c.request("POST", "/v1/models", json={"name": name, "source": source},
                            timeout=MODEL_TIMEOUT)
        return Model.model_validate(r.json())


class _Keys(_Resource):
    def create(self, *, name: str = "", tenant: str | None = None,
               manage_keys: bool = False) -> dict[str, Any]:
        """A new key (its secret is in the answer only). Needs an admin key or one with
        manage_keys; `tenant` (admins only) names another tenant, created if new."""
        body: dict[str, Any] = {"name": name}
        if tenant:
            body["tenant"] = tenant
        if manage_keys:
            body["manage_keys"] = True
        created: dict[str, Any] = self._c.request("POST", "/v1/keys", json=body).json()
        return created

    def revoke(self, key_id: str) -> None:
        self._c.request("DELETE", f"/v1/keys/{key_id}")


class _Jobs(_Resource):
    def create(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> Job:
        """Submit a job. One Idempotency-Key per call, reused by every retry of that call."""
        key = idempotency_key or str(uuid.uuid4())
        r = self._c.request("POST", "/v1/jobs", json=spec, headers={"Idempotency-Key": key})
        return Job.model_validate(r.json())

    def get(self, job_id: str) -> Job:
        return Job.model_validate(self._c.get_json(f"/v1/jobs/{job_id}"))

    def list(self, *, status: str | None = None, limit: int = 50) -> Iterator[Job]:
        for row in self._c.paginate("/v1/jobs", limit=limit, status=status):
            yield Job.model_validate(row)

    def cancel(self, job_id: str) -> Job:
        return Job.model_validate(self._c.request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def pause(self, job_id: str) -> Job:
        """Queued: paused now; running: checkpointed and stopped (`status` moves to paused)."""
        return Job.model_validate(self._c.request("POST", f"/v1/jobs/{job_id}/pause").json())

    def resume(self, job_id: str) -> Job:
        """A paused job back in the queue; training continues from its last checkpoint."""
        return Job.model_validate(self._c.request("POST", f"/v1/jobs/{job_id}/resume").json())

    def deploy(self, job_id: str, target: str, *,
               checkpoint: int | None = None) -> dict[str, Any]:
        """Load the job's adapter (or a checkpoint's) on every vLLM server of `target`; the
        answer's `model` is the name to chat with (idempotent: safe to retry)."""
        body: dict[str, Any] = {"target": target, "checkpoint": checkpoint}
        deployed: dict[str, Any] = self._c.request("POST", f"/v1/jobs/{job_id}/deploy",
                                                   json=body).json()
        return deployed

    def undeploy(self, job_id: str, target: str, *, checkpoint: int | None = None) -> None:
        params = {"target": target, **({"checkpoint": checkpoint} if checkpoint is not None
                                       else {})}
        self._c.request("DELETE", f"/v1/jobs/{job_id}/deploy", params=params)

    def deployments(self, job_id: str) -> builtins.list[dict[str, Any]]:
        rows: builtins.list[dict[str, Any]] = self._c.get_json(
            f"/v1/jobs/{job_id}/deployments")["data"]
        return rows

    def wait(self, job_id: str, *, on_progress: Callable[[Job], None] | None = None,
             poll_interval: float = 1.0, timeout: float | None = None) -> Job:
        """Poll until the job is terminal or paused; `on_progress` sees every poll's job."""
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            job = self.get(job_id)
            if on_progress:
                on_progress(job)
            if job.is_settled:
                return job
            if deadline and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout}s")
            time.sleep(poll_interval)

    def events(self, job_id: str, *, after: int | None = None, limit: int = 100
               ) -> builtins.list[Event]:
        body = self._c.get_json(f"/v1/jobs/{job_id}/events", after=after, limit=limit)
        return [Event.model_validate(e) for e in body["data"]]

    def stream_events(self, job_id: str, *, last_event_id: int | None = None
                      ) -> Iterator[Event]:
        """Live events over SSE until the job is terminal (the server's `event: end`).

        The server ends a stream after its maximum duration (and a proxy may cut one): it is
        opened again with `Last-Event-ID`, so no event is lost or repeated. Broken or refused
        (429) connections are retried like requests, `max_retries` in a row with backoff; a
        revoked key, an unknown job or another error answer raises."""
        cursor, failures = last_event_id, 0
        while True:
            opened, delivered = time.monotonic(), False
            try:
                for event in self._stream_once(job_id, cursor):
                    if event is None:
                        return  # `end`: the job is terminal and every event was sent
                    cursor, delivered = event.id, True
                    yield event
                healthy = delivered or time.monotonic() - opened >= STREAM_MIN_HEALTHY_S
                if not healthy and self.get(job_id).is_terminal:
                    return  # a server without `event: end` closes a finished job's stream
                failure: Exception | None = None if healthy else APIConnectionError(
                    f"the event stream of {job_id} keeps closing at once")
            except (httpx.TransportError, RateLimitError) as exc:
                failure = exc
            if failure is None:
                failures = 0
                continue  # ended by the server (max duration): resume from `cursor`
            failures += 1
            if failures > self._c.max_retries:
                if isinstance(failure, httpx.TransportError):
                    raise APIConnectionError(f"event stream broke: {failure}") from failure
                raise failure
            time.sleep(min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** failures))

    def _stream_once(self, job_id: str, cursor: int | None) -> Iterator[Event | None]:
        """One connection's events; None for the server's `end`. Raises the API's errors,
        including an `event: error` frame (a key revoked while streaming)."""
        from httpx_sse import connect_sse

        headers = {"Last-Event-ID": str(cursor)} if cursor is not None else {}
        with connect_sse(self._c._http, "GET", f"/v1/jobs/{job_id}/events/stream",
                         headers=headers, timeout=STREAM_TIMEOUT) as source:
            if source.response.status_code >= 400:
                source.response.read()
                raise_for_response(source.response)
            for sse in source.iter_sse():
                if sse.event == "end":
                    yield None
                    return
                if sse.event == "error":
                    raise_for_response(httpx.Response(_stream_error_status(sse.data),
                                                      content=sse.data.encode()))
                if sse.data:
                    yield Event.model_validate_json(sse.data)

    def metrics(self, job_id: str) -> builtins.list[MetricRow]:
        """The whole loss curve (every page)."""
        return [MetricRow.model_validate(m) for m in self._c.paginate(
            f"/v1/jobs/{job_id}/metrics", limit=METRICS_PAGE)]

    def checkpoints(self, job_id: str) -> builtins.list[Checkpoint]:
        return [Checkpoint.model_validate(c) for c in self._c.paginate(
            f"/v1/jobs/{job_id}/checkpoints", limit=LIST_PAGE)]

    def evaluations(self, job_id: str) -> builtins.list[dict[str, Any]]:
        """The score curve: [{step, scores: {grader: mean}}], step 0 = the base model."""
        data: builtins.list[dict[str, Any]] = self._c.get_json(
            f"/v1/jobs/{job_id}/evaluations")["data"]
        return data

    def samples(self, job_id: str, step: int | None = None) -> dict[str, Any]:
        """{step, scores, base_scores, samples: [{prompt, reference, base_output, output,
        scores}]} of `step` (default: the job's best step, else its last evaluated one)."""
        if step is None:
            step = default_sample_step(self._c.get_json(f"/v1/jobs/{job_id}"),
                                       self.evaluations(job_id))
        result: dict[str, Any] = self._c.get_json(
            f"/v1/jobs/{job_id}/checkpoints/{step}/samples")
        return result

    def artifacts(self, job_id: str) -> builtins.list[Artifact]:
        return [Artifact.model_validate(a) for a in self._c.paginate(
            f"/v1/jobs/{job_id}/artifacts", limit=LIST_PAGE)]

    def download(self, job_id: str, out_dir: str | Path, *, merged: bool = False,
                 step: int | None = None, kind: str | None = None) -> builtins.list[Path]:
        """Download the adapter (or merged model, or any artifact `kind` such as "tensorboard")
        file by file, verifying each sha256. Without a final one (a cancelled job), the newest
        checkpoint's."""
        kind = kind or ("merged" if merged else "adapter")
        wanted = select_artifacts(self.artifacts(job_id), job_id=job_id, kind=kind, step=step)
        out = Path(out_dir)
        # Every name is checked before the first byte is written: a hostile or broken server
        # must not get a file outside `out` (nor half a download inside it).
        dests = [safe_destination(out, a.name) for a in wanted]
        return [self.download_artifact(job_id, a, d) for a, d in zip(wanted, dests, strict=True)]

    def download_artifact(self, job_id: str, artifact: Artifact, dest: Path) -> Path:
        """Resume a partial `dest.part` with Range; verify sha256; rename into place.

        Bytes are appended as they arrive (no re-chunking), so a broken transfer keeps all it
        received and the next try asks only for the rest. A part that fails the checksum is
        deleted: the next call starts from zero instead of resuming garbage.
        """
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        last_error: httpx.TransportError | None = None
        for _ in range(self._c.max_retries + 1):
            try:
                self._fetch_into(job_id, artifact, part, download_headers(part))
                last_error = None
                break
            except httpx.TransportError as exc:
                last_error = exc  # resume from what we have
        if last_error is not None:
            raise APIConnectionError(f"{artifact.name}: download kept failing ({last_error}); "
                                     f"run it again to resume from {part}") from last_error
        return finish_download(artifact, part, dest)

    def _fetch_into(self, job_id: str, artifact: Artifact, part: Path,
                    headers: dict[str, str]) -> None:
        """One GET: 206 appends, 200 rewrites, 416 means the part is already complete. A 307
        (the server presigns downloads from its object store) is followed by a request of
        its own, with the same Range and without the API key; sha256 is checked either way."""
        with self._c._http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{artifact.id}",
                                  headers=headers) as r:
            if r.status_code in (301, 302, 303, 307, 308) and "location" in r.headers:
                location = r.headers["location"]
            else:
                _write_body(r, part)
                return
        with self._c._store_http.stream("GET", location, headers=headers) as r:
            _write_body(r, part)


def default_sample_step(job: dict[str, Any], curve: builtins.list[dict[str, Any]]) -> int:
    """The step `samples` shows by default: the job's best step, else its last evaluated one,
    else 0 (the base model)."""
    best = (job.get("metrics") or {}).get("best_step")
    if best is not None:
        return int(best)
    return int(curve[-1]["step"]) if curve else 0


def select_artifacts(arts: builtins.list[Artifact], *, job_id: str, kind: str,
                     step: int | None) -> builtins.list[Artifact]:
    """The files of one artifact set: `kind` at `step`; with no step, the final set, else the
    newest checkpoint's (a cancelled job). NotFoundError when there is none."""
    wanted = [a for a in arts if a.kind == kind and a.step == step]
    if not wanted and step is None:
        steps = [a.step for a in arts if a.kind == kind and a.step]
        if steps:
            wanted = [a for a in arts if a.kind == kind and a.step == max(steps)]
    if not wanted:
        from lorajobs.client.errors import NotFoundError

        raise NotFoundError(404, "not_found", f"job {job_id} has no {kind} artifact"
                            + (f" at step {step}" if step is not None else ""))
    return wanted


def download_headers(part: Path) -> dict[str, str]:
    """identity: Range offsets and our bytes on disk must both be the file's own bytes."""
    have = part.stat().st_size if part.exists() else 0
    return {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}


def finish_download(artifact: Artifact, part: Path, dest: Path) -> Path:
    """Verify the part's sha256 and rename it into place; a mismatch deletes it."""
    digest = _sha256(part)
    if digest != artifact.sha256:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{artifact.name}: sha256 {digest} != expected {artifact.sha256}")
    part.replace(dest)
    return dest


def _write_body(r: httpx.Response, part: Path) -> None:
    """206 appends to the part, 200 rewrites it, 416 leaves it (already complete)."""
    if r.status_code == 416:
        return
    if r.status_code >= 400:
        r.read()
        raise_for_response(r)
    if r.status_code not in (200, 206):
        raise APIConnectionError(f"unexpected HTTP {r.status_code} for a download")
    with open(part, "ab" if r.status_code == 206 else "wb") as fh:
        for chunk in r.iter_raw():
            fh.write(chunk)


def _stream_error_status(data: str) -> int:
    """The HTTP status an `event: error` frame's `{"error": {"code": ...}}` stands for."""
    try:
        code = json.loads(data)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return 500
    return {"unauthorized": 401, "forbidden": 403, "not_found": 404}.get(code, 500)


def safe_destination(out: Path, name: str) -> Path:
    """`out / name` for an artifact name the server sent, or UnsafePathError.

    A name is a relative POSIX path inside the artifact ("config.json", "sub/file"). Refused:
    empty, absolute (`/x`, `C:x`, `\\\\host`), backslashes, NUL, `.` or `..` or empty
    components, and any component (or the `.part` file) that is already a symlink on disk,
    since writing through it would land wherever it points."""
    def refuse(why: str) -> UnsafePathError:
        return UnsafePathError(f"refusing to download artifact {name!r} from the server: "
                               f"{why} (files are only written inside {out})")

    if not name or "\x00" in name or "\\" in name:
        raise refuse("empty name, NUL or backslash")
    if name.startswith("/") or PureWindowsPath(name).drive:
        raise refuse("absolute path")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise refuse("'.', '..' or empty path component")
    dest = out.joinpath(*parts)
    probes = [out.joinpath(*parts[:i]) for i in range(1, len(parts) + 1)]
    for probe in [*probes, dest.with_name(dest.name + ".part")]:
        if probe.is_symlink():
            raise refuse(f"{probe} is a symlink")
    root = out.resolve()
    if not dest.resolve().is_relative_to(root):  # belt and braces: the checks above imply it
        raise refuse("resolves outside the target directory")
    return dest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(DOWNLOAD_CHUNK):
            h.update(chunk)
    return h.hexdigest()
