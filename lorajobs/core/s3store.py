"""`S3ArtifactStore`: the artifact store on an S3-compatible object store (AWS S3, MinIO, Ceph
RGW, R2, GCS in S3 mode), through boto3 and s3transfer.

    key "jobs/j1/adapter/a.safetensors" ─▶ s3://<bucket>/<prefix>/jobs/j1/adapter/a.safetensors

    put_file / put_stream ─▶ one PUT below `multipart_threshold`, else a multipart upload of
                             `part_bytes` parts (s3transfer; parts in parallel for a file, at most
                             MAX_STREAM_PARTS_IN_MEMORY parts buffered for a stream). S3 shows an
                             object only once its PUT or CompleteMultipartUpload succeeded, and
                             s3transfer aborts the multipart upload on any failure: atomic.
    open / open_range     ─▶ GET (with Range), streamed
    get_file              ─▶ ranged GETs in parallel into `dest.part` (0600), renamed into place

Errors are two, whatever botocore says underneath: a missing object is `FileNotFoundError` (as
the local store's), and anything else the store does wrong (unreachable, timing out, 5xx after
botocore's retries, access denied, no such bucket) is `StorageUnavailable` (503 at the API).
An exception raised by the caller's own stream in `put_stream` passes through unchanged.
Credentials come from the standard AWS chain (environment, profile, instance or pod role).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast
from urllib.parse import quote, urlparse

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from lorajobs.core.errors import InvalidRequest, StorageUnavailable
from lorajobs.core.storage import (
    PRIVATE_FILE_MODE,
    ArtifactStore,
    StoredObject,
    _create_private,
    _make_dirs,
    safe_key,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

__all__ = ["S3ArtifactStore", "parse_s3_url", "PART_BYTES", "MULTIPART_THRESHOLD"]

MiB = 1024 * 1024
# Parts of 16 MiB: S3 allows 10,000 parts, so one object may reach 160 GB (a merged 70B model's
# shards are ~5 GB each); fewer, larger requests than s3transfer's 8 MiB default.
PART_BYTES = 16 * MiB
MULTIPART_THRESHOLD = 16 * MiB
MAX_CONCURRENCY = 4  # parallel part uploads/ranged downloads of one file
# A stream (an upload arriving over HTTP) cannot be re-read: s3transfer buffers its parts in
# memory; this bounds one put_stream to 4 x 16 MiB of parts whatever the object's size.
# Measured (moto server, 2026-12-06): peak RSS +67 MiB for a 48 MiB stream, +103 for 160 MiB,
# +118 for 400 MiB (the parts plus in-flight request copies): flat, not the object's size.
MAX_STREAM_PARTS_IN_MEMORY = 4
# botocore retries throttling, 5xx and connection errors this many times in all (standard mode:
# exponential backoff with jitter) before StorageUnavailable; a dead endpoint fails in seconds.
MAX_ATTEMPTS = 4
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 30  # a hung store (SIGSTOPped, partitioned) fails a call within 4 x 30 s
DELETE_BATCH = 1000  # DeleteObjects' maximum
PROBE_TIMEOUT_S = 2  # /readyz's check: one attempt, connect and read within this
# Kept-alive connections: a download holds one while its body streams, after its request slot
# is free (api.limits), so an API process may stream many at once; more than this still work,
# their connections are just not reused.
POOL_CONNECTIONS = 64
_MISSING = {"404", "NoSuchKey", "NotFound"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """"s3://bucket/some/prefix" -> ("bucket", "some/prefix"); the prefix may be empty."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise InvalidRequest(f"store_url {url!r} is not s3://bucket[/prefix]", param="store_url")
    return parsed.netloc, parsed.path.strip("/")


@contextmanager
def _mapped(key: str) -> Iterator[None]:
    """botocore's and s3transfer's exceptions -> FileNotFoundError / StorageUnavailable."""
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code in _MISSING:
            raise FileNotFoundError(f"no object {key!r} in the store") from exc
        raise StorageUnavailable(f"object store error on {key!r}: {code} "
                                 f"{error.get('Message', '')}".rstrip()) from exc
    except (BotoCoreError, S3UploadFailedError) as exc:
        if "NoSuchKey" in str(exc) or "Not Found" in str(exc):
            raise FileNotFoundError(f"no object {key!r} in the store") from exc
        raise StorageUnavailable(f"object store unavailable ({key!r}): {exc}") from exc


class _Body(io.RawIOBase):
    """A GET's streaming body whose read errors are StorageUnavailable (the connection broke
    mid-object), closed with the response."""

    def __init__(self, body: Any, key: str) -> None:
        self._body = body
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        with _mapped(self._key):
            data = self._body.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class _Counting:
    """A read-only wrapper that counts the bytes read (put_stream returns them)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.count += len(data)
        return data


class S3ArtifactStore(ArtifactStore):
    """Objects under `s3://bucket/prefix/`. `endpoint_url` names a non-AWS server (MinIO);
    `public_endpoint_url` the host presigned URLs name, where clients reach the store by another
    address than the API does (default: the same). `part_bytes` / `multipart_threshold` are
    constructor arguments so tests can force multipart on small files (S3's minimum part is
    5 MiB: s3transfer raises a smaller part size to it)."""

    def __init__(self, url: str, *, endpoint_url: str | None = None, region: str | None = None,
                 public_endpoint_url: str | None = None, part_bytes: int = PART_BYTES,
                 multipart_threshold: int = MULTIPART_THRESHOLD) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = url
        self._client = self._make_client(endpoint_url, region)
        public = public_endpoint_url or endpoint_url
        self._signer = (self._client if public == endpoint_url
                        else self._make_client(public, region))
        self._endpoint_url, self._region = endpoint_url, region
        self._probe: S3Client | None = None
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=part_bytes,
            max_concurrency=MAX_CONCURRENCY, use_threads=True,
            preferred_transfer_client="classic")  # s3transfer, not awscrt where installed
        # s3transfer's own knob (boto3's constructor does not take it)
        self._transfer.max_in_memory_upload_chunks = MAX_STREAM_PARTS_IN_MEMORY

    @staticmethod
    def _make_client(endpoint_url: str | None, region: str | None, *,
                     attempts: int = MAX_ATTEMPTS, connect_timeout: float = CONNECT_TIMEOUT_S,
                     read_timeout: float = READ_TIMEOUT_S) -> S3Client:
        config = Config(
            retries={"max_attempts": attempts, "mode": "standard"},
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            signature_version="s3v4",
            # MinIO and most self-hosted servers serve buckets as paths, not subdomains
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            max_pool_connections=POOL_CONNECTIONS,
        )
        session = boto3.session.Session()
        return session.client("s3", endpoint_url=endpoint_url, region_name=region,
                              config=config)

    def _key(self, key: str) -> str:
        key = safe_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _strip(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def put_file(self, key: str, src: Path, *, immutable: bool = False) -> None:
        with _mapped(key):
            self._client.upload_file(str(src), self.bucket, self._key(key),
                                     Config=self._transfer)

    def put_stream(self, key: str, stream: BinaryIO) -> int:
        counting = _Counting(stream)
        with _mapped(key):
            self._client.upload_fileobj(cast(Any, counting), self.bucket, self._key(key),
                                        Config=self._transfer)
        return counting.count

    def get_file(self, key: str, dest: Path) -> None:
        dest = Path(dest)
        _make_dirs(dest.parent)
        tmp = dest.with_name(dest.name + ".part")
        try:
            with _create_private(tmp) as out, _mapped(key):
                self._client.download_fileobj(self.bucket, self._key(key), out,
                                              Config=self._transfer)
            os.chmod(tmp, PRIVATE_FILE_MODE)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _get(self, key: str, byte_range: str | None = None) -> BinaryIO:
        with _mapped(key):
            if byte_range is None:
                response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            else:
                response = self._client.get_object(Bucket=self.bucket, Key=self._key(key),
                                                   Range=byte_range)
        return cast(BinaryIO, io.BufferedReader(_Body(response["Body"], key), 1 * MiB))

    def open(self, key: str) -> BinaryIO:
        return self._get(key)

    def open_range(self, key: str, start: int, end: int) -> BinaryIO:
        return self._get(key, f"bytes={start}-{end}")

    def size(self, key: str) -> int:
        with _mapped(key):
            return self._client.head_object(Bucket=self.bucket,
                                            Key=self._key(key))["ContentLength"]

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str) -> Iterator[StoredObject]:
        full = self._key(prefix)
        found = False
        with _mapped(prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full + "/")
            objects = [(self._strip(o["Key"]), o["Size"])
                       for page in pages for o in page.get("Contents", [])]
        for key, size in sorted(objects):
            found = True
            yield StoredObject(key=key, size=size)
        if not found and self.exists(prefix):  # the prefix is one object's key
            yield StoredObject(key=prefix, size=self.size(prefix))

    def delete(self, key: str) -> None:
        with _mapped(key):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        keys = [self._key(o.key) for o in self.list(prefix)]
        for i in range(0, len(keys), DELETE_BATCH):
            batch = keys[i:i + DELETE_BATCH]
            with _mapped(prefix):
                result = self._client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": k} for k in batch], "Quiet": True})
            if result.get("Errors"):
                first = result["Errors"][0]
                raise StorageUnavailable(f"object store refused to delete {first.get('Key')}: "
                                         f"{first.get('Code')} {first.get('Message', '')}")

    def reachable(self) -> bool:
        if self._probe is None:
            self._probe = self._make_client(self._endpoint_url, self._region, attempts=1,
                                            connect_timeout=PROBE_TIMEOUT_S,
                                            read_timeout=PROBE_TIMEOUT_S)
        try:
            self._probe.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError):
            return False
        return True

    def presigned_url(self, key: str, *, expires_seconds: int,
                      filename: str | None = None) -> str | None:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if filename:  # the browser saves it under its own name, not the key's last part
            params["ResponseContentDisposition"] = (
                f"attachment; filename*=UTF-8''{quote(filename, safe='')}")
        with _mapped(key):
            return self._signer.generate_presigned_url("get_object", Params=params,
                                                       ExpiresIn=expires_seconds)
