"""One signed webhook POST: what the sender (worker/webhook_sender.py) does per attempt and what
`POST /openai/v1/webhook_endpoints/{id}/test` does once.

    resolve + check the URL now (webhook_guard) -> sign (webhooks.signature_header)
    -> POST to a checked address (the next one if it refuses; Host and TLS SNI: the name)
    -> read <= MAX_RESPONSE_BYTES

No redirects are followed, no proxy from the environment is used (it would bypass the address
check), connect and read timeouts come from the settings; the result never raises.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from lorajobs.core import webhooks
from lorajobs.core.settings import Settings
from lorajobs.core.tables import WebhookEndpoint, utcnow
from lorajobs.core.webhook_guard import UnsafeURL, host_header, reason_text, resolve_target

__all__ = ["Result", "post_event", "make_client", "MAX_RESPONSE_BYTES", "EXCERPT_CHARS",
           "USER_AGENT"]

# Bytes of a receiver's answer read (and the first EXCERPT_CHARS kept on the attempt row): a
# receiver must not make the sender read (or store) a large body.
MAX_RESPONSE_BYTES = 4096
EXCERPT_CHARS = 512
USER_AGENT = "lorajobs-webhooks/1"


@dataclass(frozen=True)
class Result:
    started_at: datetime
    duration_ms: float
    status_code: int | None = None
    error: str | None = None
    excerpt: str | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def post_event(client: httpx.Client, endpoint: WebhookEndpoint, *, event_id: str,
               payload: str, settings: Settings,
               now: Callable[[], datetime] = utcnow) -> Result:
    """One attempt: re-check the URL (DNS now), sign, POST to the checked address."""
    started = now()
    t0 = time.monotonic()

    def took() -> float:
        return round((time.monotonic() - t0) * 1000, 1)

    try:
        target = resolve_target(endpoint.url, settings)
    except UnsafeURL as exc:
        return Result(started, took(), error=f"refused: {exc.message}")
    body = payload.encode()
    timestamp = int(time.time())  # the receiver's clock judges it: real time, not `now`
    headers = {
        "content-type": "application/json", "user-agent": USER_AGENT,
        "host": host_header(target),
        "webhook-id": event_id, "webhook-timestamp": str(timestamp),
        "webhook-signature": webhooks.signature_header(endpoint, event_id, timestamp, body,
                                                       now=utcnow()),
    }
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    try:
        for i, address in enumerate(target.addresses):  # the next only if this one is unreachable
            url = httpx.URL(target.url).copy_with(host=address)
            try:
                return _post(client, url, body, headers, extensions, started, took)
            except httpx.ConnectError:
                if i == len(target.addresses) - 1:
                    raise
        raise AssertionError("unreachable: a Target has at least one address")
    except httpx.TimeoutException as exc:
        return Result(started, took(), error=f"timeout: {type(exc).__name__}")
    except httpx.HTTPError as exc:
        return Result(started, took(), error=reason_text(exc)[:500])


def _post(client: httpx.Client, url: httpx.URL, body: bytes, headers: dict[str, str],
          extensions: dict[str, Any], started: datetime, took: Callable[[], float]) -> Result:
    with client.stream("POST", url, content=body, headers=headers,
                       extensions=extensions) as response:
        received = bytearray()
        for chunk in response.iter_raw():
            received += chunk
            if len(received) >= MAX_RESPONSE_BYTES:
                break
        excerpt = bytes(received[:MAX_RESPONSE_BYTES]).decode("utf-8", "replace")
        error = None
        if response.is_redirect:
            error = (f"redirect not followed ({response.status_code} to "
                     f"{response.headers.get('location', '?')[:200]})")
        return Result(started, took(), status_code=response.status_code, error=error,
                      excerpt=excerpt[:EXCERPT_CHARS] or None)


def make_client(settings: Settings, *, max_connections: int | None = None) -> httpx.Client:
    """No redirects, no proxies from the environment, connect/read timeouts from settings."""
    timeout = httpx.Timeout(connect=settings.webhook_connect_timeout_seconds,
                            read=settings.webhook_read_timeout_seconds,
                            write=settings.webhook_read_timeout_seconds,
                            pool=settings.webhook_connect_timeout_seconds)
    return httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False,
                        limits=httpx.Limits(
                            max_connections=max_connections or settings.webhook_concurrency,
                            max_keepalive_connections=0))
