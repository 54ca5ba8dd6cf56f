"""One stored object as an HTTP response: streamed from the store with Range, or a redirect.

    GET .../artifacts/{id}              200  whole object, streamed from the store
      Range: bytes=a-b | a- | -n        206  Content-Range: bytes a-b/size
      (If-Range not our ETag)           200  whole object (the client's part is stale)
      (start past the end)              416  Content-Range: bytes */size
      (several ranges, bad syntax)      200  whole object (RFC 9110 lets a server ignore Range)
    store_presign_downloads + S3 store  307  Location: a presigned URL valid for
                                             store_presign_seconds; the client repeats its
                                             Range there and gets 200/206/416 from the store

Every answer carries the object's sha256 (ETag, Digest, Repr-Digest, X-Checksum-SHA256), the 307
too: a client verifies what it fetched from the store against what the API recorded. The store's
reader is opened before the response starts, so a missing object or a failing store is a
status (500, 503), not a truncated body; a store failing mid-body closes the connection.
"""

from __future__ import annotations

import base64
import mimetypes
import re
from collections.abc import Iterator
from typing import BinaryIO
from urllib.parse import quote

from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

from lorajobs.api.errors import error_body
from lorajobs.core.storage import ArtifactStore

__all__ = ["digest_headers", "object_response", "parse_range"]

CHUNK = 1024 * 1024  # 1 MiB reads from the store, one send each
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def digest_headers(sha256_hex: str) -> dict[str, str]:
    b64 = base64.b64encode(bytes.fromhex(sha256_hex)).decode()
    return {"ETag": f'"{sha256_hex}"', "Digest": f"sha-256={b64}",
            "Repr-Digest": f"sha-256=:{b64}:", "X-Checksum-SHA256": sha256_hex}


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """(start, end) inclusive for one satisfiable byte range; None to send the whole object
    (no Range, several ranges, or a syntax we ignore); "unsatisfiable" for a 416."""
    if not header:
        return None
    match = _RANGE.match(header.replace(" ", ""))
    if not match or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size:
        return "unsatisfiable"
    if end < start:
        return None  # invalid range-spec: ignored
    return start, end


def _content_disposition(filename: str) -> str:
    quoted = quote(filename, safe="")
    if quoted != filename:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{filename}"'


def _chunks(reader: BinaryIO) -> Iterator[bytes]:
    with reader:
        while chunk := reader.read(CHUNK):
            yield chunk


def object_response(store: ArtifactStore, key: str, *, size: int, sha256: str, filename: str,
                    range_header: str | None, if_range: str | None, presign_seconds: int | None,
                    ) -> Response:
    """The response for one object (see the module docstring); `presign_seconds` None streams."""
    headers = digest_headers(sha256)
    if presign_seconds is not None:
        url = store.presigned_url(key, expires_seconds=presign_seconds, filename=filename)
        if url is not None:
            return RedirectResponse(url, status_code=307,
                                    headers={**headers, "Cache-Control": "no-store"})
    headers |= {"Accept-Ranges": "bytes", "Content-Disposition": _content_disposition(filename)}
    media_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    wanted = parse_range(range_header, size)
    if wanted is not None and if_range is not None and if_range != headers["ETag"]:
        wanted = None  # the client's copy is of another object: it gets the whole new one
    if wanted == "unsatisfiable":
        return JSONResponse(error_body("range_not_satisfiable",
                                       f"the range starts past the object's {size} bytes",
                                       "Range"),
                            status_code=416,
                            headers={**headers, "Content-Range": f"bytes */{size}"})
    if isinstance(wanted, tuple):
        start, end = wanted
        reader = store.open_range(key, start, end)
        return StreamingResponse(_chunks(reader), status_code=206, media_type=media_type,
                                 headers={**headers, "Content-Length": str(end - start + 1),
                                          "Content-Range": f"bytes {start}-{end}/{size}"})
    reader = store.open(key)
    return StreamingResponse(_chunks(reader), media_type=media_type,
                             headers={**headers, "Content-Length": str(size)})
