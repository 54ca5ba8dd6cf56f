"""The asyncio SDK: the same calls as `Client` for the job lifecycle, awaitable."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from tenacity import AsyncRetrying

from lorajobs.client._retry import RETRYABLE_STATUS, RetryableStatus, retry_kwargs
from lorajobs.client.config import resolve_api_key, resolve_url
from lorajobs.client.errors import APIConnectionError, raise_for_response
from lorajobs.client.model_files import model_upload_files
from lorajobs.client.sync import (
    LIST_PAGE,
    MODEL_TIMEOUT,
    default_sample_step,
    download_headers,
    finish_download,
    safe_destination,
    select_artifacts,
)
from lorajobs.client.types import Artifact, Dataset, Job, Model, Webhook, WebhookDelivery
from lorajobs.client.webhooks import WEBHOOKS_PAGE, create_body, delivery_params, update_body

__all__ = ["AsyncClient"]


class AsyncClient:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float = 30.0, max_retries: int = 3,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = resolve_url(base_url)
        key = resolve_api_key(api_key)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                       timeout=timeout, transport=transport)
        # presigned store URLs (a 307 from a download) go through a pool with no default
        # headers: the API key never reaches the store's host
        self._store_http = httpx.AsyncClient(timeout=timeout)
        self.max_retries = max_retries

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._store_http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            async for attempt in AsyncRetrying(**retry_kwargs(self.max_retries)):
                with attempt:
                    response = await self._http.request(method, path, **kwargs)
                    if response.status_code in RETRYABLE_STATUS:
                        raise RetryableStatus(response)
        except RetryableStatus as exc:
            response = exc.response
        except httpx.TransportError as exc:
            raise APIConnectionError(f"cannot reach {self.base_url}: {exc}") from exc
        raise_for_response(response)
        return response

    async def paginate(self, path: str, *, limit: int = 50, **params: Any
                       ) -> AsyncIterator[dict[str, Any]]:
        """`Client.paginate`: follow `next_cursor` until `has_more` is false."""
        after: Any = None
        while True:
            query = {k: v for k, v in {**params, "limit": limit, "after": after}.items()
                     if v is not None}
            page = (await self.request("GET", path, params=query)).json()
            for row in page["data"]:
                yield row
            if not page.get("has_more"):
                return
            cursor = page.get("next_cursor")  # may be 0 (a step): not "missing"
            after = cursor if cursor is not None else page["data"][-1]["id"]

    async def upload_dataset(self, path: str | Path, *, format: str | None = None) -> Dataset:
        path = Path(path)
        data = {"format": format} if format else {}
        r = await self.request("POST", "/v1/datasets",
                               files={"file": (path.name, path.read_bytes())}, data=data)
        return Dataset.model_validate(r.json())

    async def upload_model(self, name: str, directory: str | Path) -> Model:
        """`Client.models.upload`: a local model directory into the server's store, the
        files streamed from disk (admin key)."""
        files = model_upload_files(directory)
        handles = [open(p, "rb") for p in files]  # noqa: SIM115 - closed below
        try:
            r = await self.request("POST", "/v1/models", data={"name": name},
                                   files=[("files", (p.name, fh))
                                          for p, fh in zip(files, handles, strict=True)],
                                   timeout=MODEL_TIMEOUT)
        finally:
            for fh in handles:
                fh.close()
        return Model.model_validate(r.json())

    async def register_model_from(self, name: str, *, s3: str | None = None,
                                  hf_repo: str | None = None,
                                  revision: str | None = None) -> Model:
        """`Client.models.register_from`: the server copies s3:// or a hub repo."""
        source = {k: v for k, v in (("s3", s3), ("hf_repo", hf_repo), ("revision", revision))
                  if v is not None}
        r = await self.request("POST", "/v1/models", json={"name": name, "source": source},
                               timeout=MODEL_TIMEOUT)
        return Model.model_validate(r.json())

    async def create_job(self, spec: dict[str, Any], *, idempotency_key: str | None = None
                         ) -> Job:
        key = idempotency_key or str(uuid.uuid4())
        r = await self.request("POST", "/v1/jobs", json=spec, headers={"Idempotency-Key": key})
        return Job.model_validate(r.json())

    async def get_job(self, job_id: str) -> Job:
        return Job.model_validate((await self.request("GET", f"/v1/jobs/{job_id}")).json())

    async def list_jobs(self, *, status: str | None = None, limit: int = 50
                        ) -> AsyncIterator[Job]:
        async for row in self.paginate("/v1/jobs", limit=limit, status=status):
            yield Job.model_validate(row)

    async def cancel_job(self, job_id: str) -> Job:
        r = await self.request("POST", f"/v1/jobs/{job_id}/cancel")
        return Job.model_validate(r.json())

    async def pause_job(self, job_id: str) -> Job:
        """Queued: paused now; running: checkpointed and stopped (`status` moves to paused)."""
        r = await self.request("POST", f"/v1/jobs/{job_id}/pause")
        return Job.model_validate(r.json())

    async def resume_job(self, job_id: str) -> Job:
        """A paused job back in the queue; training continues from its last checkpoint."""
        r = await self.request("POST", f"/v1/jobs/{job_id}/resume")
        return Job.model_validate(r.json())

    async def deploy(self, job_id: str, target: str, *,
                     checkpoint: int | None = None) -> dict[str, Any]:
        """`Client.jobs.deploy`: the adapter loaded on every server of `target` (idempotent)."""
        r = await self.request("POST", f"/v1/jobs/{job_id}/deploy",
                               json={"target": target, "checkpoint": checkpoint})
        deployed: dict[str, Any] = r.json()
        return deployed

    async def undeploy(self, job_id: str, target: str, *, checkpoint: int | None = None) -> None:
        params: dict[str, Any] = {"target": target}
        if checkpoint is not None:
            params["checkpoint"] = checkpoint
        await self.request("DELETE", f"/v1/jobs/{job_id}/deploy", params=params)

    async def evaluations(self, job_id: str) -> list[dict[str, Any]]:
        """`Client.jobs.evaluations`: the score curve [{step, scores: {grader: mean}}], step 0 =
        the base model."""
        data: list[dict[str, Any]] = (await self.request(
            "GET", f"/v1/jobs/{job_id}/evaluations")).json()["data"]
        return data

    async def samples(self, job_id: str, step: int | None = None) -> dict[str, Any]:
        """`Client.jobs.samples`: {step, scores, base_scores, samples: [{prompt, reference,
        base_output, output, scores}]} of `step` (default: the best step, else the last
        evaluated one)."""
        if step is None:
            job = (await self.request("GET", f"/v1/jobs/{job_id}")).json()
            step = default_sample_step(job, await self.evaluations(job_id))
        result: dict[str, Any] = (await self.request(
            "GET", f"/v1/jobs/{job_id}/checkpoints/{step}/samples")).json()
        return result

    async def artifacts(self, job_id: str) -> list[Artifact]:
        return [Artifact.model_validate(a) async for a in self.paginate(
            f"/v1/jobs/{job_id}/artifacts", limit=LIST_PAGE)]

    async def download(self, job_id: str, out_dir: str | Path, *, merged: bool = False,
                       step: int | None = None, kind: str | None = None) -> list[Path]:
        """`Client.jobs.download`: file by file, resumed with Range, sha256 verified; a 307 to
        the object store is followed without the API key."""
        kind = kind or ("merged" if merged else "adapter")
        wanted = select_artifacts(await self.artifacts(job_id), job_id=job_id, kind=kind,
                                  step=step)
        dests = [safe_destination(Path(out_dir), a.name) for a in wanted]  # before any write
        return [await self.download_artifact(job_id, a, d)
                for a, d in zip(wanted, dests, strict=True)]

    async def download_artifact(self, job_id: str, artifact: Artifact, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        last_error: httpx.TransportError | None = None
        for _ in range(self.max_retries + 1):
            try:
                await self._fetch_into(job_id, artifact, part, download_headers(part))
                last_error = None
                break
            except httpx.TransportError as exc:
                last_error = exc  # resume from what we have
        if last_error is not None:
            raise APIConnectionError(f"{artifact.name}: download kept failing ({last_error}); "
                                     f"run it again to resume from {part}") from last_error
        return finish_download(artifact, part, dest)

    async def _fetch_into(self, job_id: str, artifact: Artifact, part: Path,
                          headers: dict[str, str]) -> None:
        async with self._http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{artifact.id}",
                                     headers=headers) as r:
            if r.status_code in (301, 302, 303, 307, 308) and "location" in r.headers:
                location = r.headers["location"]
            else:
                await _write_body(r, part)
                return
        async with self._store_http.stream("GET", location, headers=headers) as r:
            await _write_body(r, part)

    async def create_webhook(self, url: str, event_types: list[str], *, name: str = "",
                             enabled: bool = True) -> Webhook:
        """`Client.webhooks.create`: the answer's `signing_secret` is shown only now."""
        r = await self.request("POST", "/v1/webhooks",
                               json=create_body(url, event_types, name=name, enabled=enabled))
        return Webhook.model_validate(r.json())

    async def list_webhooks(self) -> AsyncIterator[Webhook]:
        async for row in self.paginate("/v1/webhooks", limit=WEBHOOKS_PAGE):
            yield Webhook.model_validate(row)

    async def get_webhook(self, webhook_id: str) -> Webhook:
        r = await self.request("GET", f"/v1/webhooks/{webhook_id}")
        return Webhook.model_validate(r.json())

    async def update_webhook(self, webhook_id: str, *, url: str | None = None,
                             event_types: list[str] | None = None, name: str | None = None,
                             enabled: bool | None = None) -> Webhook:
        body = update_body(url=url, event_types=event_types, name=name, enabled=enabled)
        r = await self.request("PATCH", f"/v1/webhooks/{webhook_id}", json=body)
        return Webhook.model_validate(r.json())

    async def delete_webhook(self, webhook_id: str) -> None:
        await self.request("DELETE", f"/v1/webhooks/{webhook_id}")

    async def rotate_webhook_secret(self, webhook_id: str, *,
                                    keep_old_secret: bool = False) -> Webhook:
        r = await self.request("POST", f"/v1/webhooks/{webhook_id}/rotate_secret",
                               json={"keep_old_secret_active_for_24_hours": keep_old_secret})
        return Webhook.model_validate(r.json())

    async def list_webhook_deliveries(self, webhook_id: str, *, status: str | None = None
                                      ) -> AsyncIterator[WebhookDelivery]:
        """`Client.webhooks.deliveries`: newest first, each with its attempts."""
        async for row in self.paginate(f"/v1/webhooks/{webhook_id}/deliveries",
                                       limit=WEBHOOKS_PAGE, **delivery_params(status)):
            yield WebhookDelivery.model_validate(row)

    async def replay_webhook_delivery(self, webhook_id: str, delivery_id: str
                                      ) -> WebhookDelivery:
        r = await self.request("POST",
                               f"/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/replay")
        return WebhookDelivery.model_validate(r.json())

    async def wait(self, job_id: str, *,
                   on_progress: Callable[[Job], Awaitable[None] | None] | None = None,
                   poll_interval: float = 1.0) -> Job:
        while True:
            job = await self.get_job(job_id)
            if on_progress:
                maybe = on_progress(job)
                if asyncio.iscoroutine(maybe):
                    await maybe
            if job.is_settled:
                return job
            await asyncio.sleep(poll_interval)


async def _write_body(r: httpx.Response, part: Path) -> None:
    """206 appends to the part, 200 rewrites it, 416 leaves it (already complete)."""
    if r.status_code == 416:
        return
    if r.status_code >= 400:
        await r.aread()
        raise_for_response(r)
    if r.status_code not in (200, 206):
        raise APIConnectionError(f"unexpected HTTP {r.status_code} for a download")
    with open(part, "ab" if r.status_code == 206 else "wb") as fh:
        async for chunk in r.aiter_raw():
            fh.write(chunk)
