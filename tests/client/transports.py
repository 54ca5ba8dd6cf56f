"""httpx transports that misbehave on purpose, in front of a real server.

They sit where the network would fail: the request really reaches the live server (so its side
effects happen), and only what comes back is lost or cut. That is the case retries with an
Idempotency-Key and resumable downloads exist for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx

__all__ = ["DropFirstResponse", "AsyncDropFirstResponse", "CutFirstBody", "Recording"]

Match = Callable[[httpx.Request], bool]


class Recording(httpx.BaseTransport):
    """Forwards everything; remembers each request (method, path, headers)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


class DropFirstResponse(Recording):
    """The first matching request is processed by the server, then its response is lost
    (a connection reset on the way back)."""

    def __init__(self, match: Match) -> None:
        super().__init__()
        self.match = match
        self.dropped = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if self.match(request) and not self.dropped:
            response.read()
            response.close()
            self.dropped += 1
            raise httpx.ReadError("connection reset by peer (test)", request=request)
        return response


class AsyncDropFirstResponse(httpx.AsyncBaseTransport):
    """`DropFirstResponse` for the asyncio client."""

    def __init__(self, match: Match) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.match = match
        self.dropped = 0
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        response = await self.inner.handle_async_request(request)
        if self.match(request) and not self.dropped:
            await response.aread()
            await response.aclose()
            self.dropped += 1
            raise httpx.ReadError("connection reset by peer (test)", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class _CutStream(httpx.SyncByteStream):
    """Yields the first `keep` bytes of the real body, then fails like a dropped connection."""

    def __init__(self, response: httpx.Response, keep: int, request: httpx.Request) -> None:
        self.response, self.keep, self.request = response, keep, request

    def __iter__(self) -> Iterator[bytes]:
        body = self.response.read()
        self.response.close()
        yield body[: self.keep]
        raise httpx.RemoteProtocolError("peer closed connection mid-body (test)",
                                        request=self.request)


class CutFirstBody(Recording):
    """The first matching response delivers only `keep` bytes of its body, then breaks."""

    def __init__(self, match: Match, keep: int) -> None:
        super().__init__()
        self.match, self.keep = match, keep
        self.cut = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if self.match(request) and not self.cut:
            self.cut += 1
            return httpx.Response(response.status_code, headers=response.headers,
                                  stream=_CutStream(response, self.keep, request),
                                  request=request)
        return response
