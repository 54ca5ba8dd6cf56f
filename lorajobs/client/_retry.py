"""Retry policy shared by the sync and async clients (tenacity does the looping).

Retried: connection errors, timeouts, 5xx, 429. Not retried: other 4xx (the request is wrong;
sending it again cannot help). A create is only retried because it carries an
`Idempotency-Key`, so a retry after a lost response returns the same job, never a second one.
"""

from __future__ import annotations

from typing import Any

import httpx
from tenacity import retry_if_exception, stop_after_attempt, wait_exponential_jitter

__all__ = ["RETRYABLE_STATUS", "is_retryable", "retry_kwargs"]

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
BACKOFF_INITIAL_S = 0.25
BACKOFF_MAX_S = 8.0


class RetryableStatus(Exception):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, httpx.TransportError | RetryableStatus)


def retry_kwargs(max_retries: int) -> dict[str, Any]:
    return {
        "retry": retry_if_exception(is_retryable),
        "stop": stop_after_attempt(max_retries + 1),
        "wait": wait_exponential_jitter(multiplier=BACKOFF_INITIAL_S, max=BACKOFF_MAX_S),
        "reraise": True,
    }
