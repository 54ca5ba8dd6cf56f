"""The few calls lorajobs makes to a vLLM server's admin API, retried.

    GET  /v1/models                 which models (base + LoRA adapters) it serves now
    POST /v1/load_lora_adapter      {"lora_name", "lora_path"}  (needs
                                    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True on the server)
    POST /v1/unload_lora_adapter    {"lora_name"}

Transport errors and 5xx are retried (tenacity, RETRY_ATTEMPTS with exponential backoff) and
then raise `UpstreamUnavailable`; a 4xx is vLLM refusing (a bad adapter): `AdapterRefused`,
never retried. Loading an adapter that is already loaded, or unloading one that is not,
counts as done: both calls are idempotent from our side.
"""

from __future__ import annotations

from typing import Any

import httpx
from tenacity import (
    retry,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from lorajobs.core.errors import InvalidRequest, UpstreamUnavailable

__all__ = ["AdapterRefused", "VllmClient"]

RETRY_ATTEMPTS = 3  # ~0.2 + 0.4 s of backoff: a deploy answers within seconds either way
CONNECT_TIMEOUT_S = 3.0
# Loading reads the adapter from disk and allocates its slot: well under a second for a
# rank-16 adapter of a 7B model; a minute covers a cold network filesystem.
LOAD_TIMEOUT_S = 60.0


class AdapterRefused(InvalidRequest):
    code = "adapter_refused"


class _Retryable(Exception):
    pass


_retrying = retry(retry=retry_if_exception_type(_Retryable),
                  stop=stop_after_attempt(RETRY_ATTEMPTS),
                  wait=wait_exponential(multiplier=0.2, max=2), reraise=True)


class VllmClient:
    """One server: `VllmClient("http://vllm:8000", api_key=None)`."""

    def __init__(self, url: str, api_key: str | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, transport=transport,
                                  timeout=httpx.Timeout(LOAD_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> VllmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def models(self) -> set[str]:
        """Ids of the models it serves now (base models and loaded adapters)."""
        body = self._call("GET", "/v1/models").json()
        return {m["id"] for m in body.get("data", [])}

    def load(self, name: str, path: str) -> None:
        resp = self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path},
                          ok_if="already been loaded")
        if resp.status_code >= 400:
            raise AdapterRefused(f"{self.url} refused adapter {name!r}: {_message(resp)}",
                                 param="target")

    def unload(self, name: str) -> None:
        resp = self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name},
                          ok_if="not found")
        if resp.status_code >= 400 and resp.status_code != 404:
            raise AdapterRefused(f"{self.url} refused to unload {name!r}: {_message(resp)}",
                                 param="target")

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              ok_if: str | None = None) -> httpx.Response:
        try:
            resp = self._send(method, path, body)
        except (_Retryable, httpx.HTTPError) as exc:
            raise UpstreamUnavailable(f"{self.url}{path}: {exc}", param="target") from exc
        if resp.status_code >= 400 and ok_if and ok_if in resp.text.lower():
            return httpx.Response(200, request=resp.request)
        if resp.status_code >= 400 and method == "GET":
            raise UpstreamUnavailable(f"{self.url}{path}: HTTP {resp.status_code}",
                                      param="target")
        return resp

    @_retrying
    def _send(self, method: str, path: str, body: dict[str, Any] | None) -> httpx.Response:
        try:
            resp = self._http.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
        if resp.status_code >= 500:
            raise _Retryable(f"HTTP {resp.status_code}: {resp.text[:200]}")
        return resp


def _message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500]
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err)[:500]
        return str(body.get("message") or body.get("detail") or body)[:500]
    return str(body)[:500]
