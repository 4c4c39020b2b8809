"""The S3 store (boto3, any S3-compatible endpoint): conditional writes, retries, verified multipart uploads."""

from __future__ import annotations

import base64
import builtins
import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from engine.core.errors import ConflictError, IntegrityError, NotFoundError, StorageError
from engine.core.storage.base import (
    CHUNK,
    ENDPOINT_ENV,
    MAX_ATTEMPTS_ENV,
    MiB,
    ObjectInfo,
    Store,
    Versioned,
    check_key,
    join,
)
from engine.core.storage.redaction import redact, remember_secret

if TYPE_CHECKING:
    import pyarrow.fs

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)


def _endpoint_from_env() -> str | None:
    return os.environ.get(ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


class S3Store(Store):
    """``s3://bucket/prefix`` through boto3; any S3-compatible endpoint via ``endpoint_url``.

    Credentials come from boto3's usual chain (environment, profiles, SSO, instance roles);
    the store never stores or prints them.
    """

    def __init__(self, uri: str, endpoint_url: str | None = None, *, max_attempts: int | None = None,
                 multipart_threshold: int = 64 * MiB, multipart_chunksize: int = 64 * MiB,
                 max_concurrency: int = 8):
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StorageError(f"not an S3 URI: {redact(uri)!r} (expected s3://bucket/prefix)")
        if "@" in parsed.netloc or ":" in parsed.netloc:
            raise StorageError("an s3:// URI names a bucket only; pass credentials through the AWS environment "
                               "variables or a profile, never inside the URI")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.uri = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint_url = endpoint_url or _endpoint_from_env()
        env_attempts = os.environ.get(MAX_ATTEMPTS_ENV)
        self.max_attempts = int(max_attempts or (env_attempts if env_attempts else 8))
        if self.max_attempts < 1:
            raise StorageError(f"max_attempts must be >= 1, got {self.max_attempts}")
        self.multipart_threshold = int(multipart_threshold)
        self.multipart_chunksize = int(multipart_chunksize)
        self.max_concurrency = int(max_concurrency)
        self._client: Any = None
        self._client_lock = threading.Lock()

    # boto3 clients are not picklable; build lazily so a Store can travel to Ray workers.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"] = None
        state.pop("_client_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._client_lock = threading.Lock()

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    import boto3
                    from botocore.config import Config

                    # "adaptive" = "standard" retries (exponential backoff with jitter on
                    # throttling, 5xx and dropped connections) plus a client-side rate limiter
                    # that slows down after throttling responses.
                    cfg = Config(retries={"total_max_attempts": self.max_attempts, "mode": "adaptive"},
                                 connect_timeout=10, read_timeout=120,
                                 max_pool_connections=max(10, 2 * self.max_concurrency))
                    session = boto3.session.Session()
                    creds = session.get_credentials()
                    if creds is not None:
                        frozen = creds.get_frozen_credentials()
                        remember_secret(frozen.access_key, frozen.secret_key, frozen.token)
                    self._client = session.client("s3", endpoint_url=self.endpoint_url, config=cfg)
        return self._client

    def _key(self, key: str) -> str:
        return join(self.prefix, check_key(key))

    def _call(self, what: str, key: str, fn: Any, **kwargs: Any) -> Any:
        """Run one S3 call (botocore retries it) and map failures to the error hierarchy.
        The messages name the bucket, key and error code only (never a credential)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404 and code != "NoSuchBucket":
                raise NotFoundError(f"{self.describe(key)} does not exist") from None
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                raise ConflictError(f"{what} {self.describe(key)}: the object changed concurrently ({code})") from None
            if code == "NoSuchBucket":
                raise StorageError(f"bucket {self.bucket!r} does not exist at the endpoint; create it first") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken") or status == 403:
                raise StorageError(f"{what} {self.describe(key)} was refused ({code or status}): check the AWS "
                                   "credentials/profile and the bucket policy") from None
            if code in ("SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded") or \
                    (isinstance(status, int) and status >= 500):
                raise StorageError(f"{what} {self.describe(key)} failed after {self.max_attempts} attempts with "
                                   f"backoff ({code or status}); the endpoint is throttling or unavailable, "
                                   f"retry later or raise {MAX_ATTEMPTS_ENV}") from None
            raise StorageError(f"{what} {self.describe(key)} failed: {code or status}") from None
        except BotoCoreError as err:
            # A BotoCoreError names the endpoint and the problem; redact in case the endpoint
            # URL was given with userinfo.
            raise StorageError(f"{what} {self.describe(key)} failed: {type(err).__name__}: "
                               f"{redact(str(err))}") from None

    def read_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

        return self._call("read", key, get)

    def iter_bytes(self, key: str, block_size: int = CHUNK) -> Iterator[bytes]:
        resp = self._call("read", key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        body = resp["Body"]
        try:
            while True:
                block = self._call("read", key, body.read, amt=block_size)
                if not block:
                    return
                yield block
        finally:
            body.close()

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call("write", key, self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def upload_file(self, key: str, path: str | os.PathLike[str], *, sha256: str | None = None) -> str:
        from boto3.s3.transfer import TransferConfig
        from s3transfer.utils import ChunksizeAdjuster

        size = os.path.getsize(path)
        multipart = size >= self.multipart_threshold
        part_size = ChunksizeAdjuster().adjust_chunksize(self.multipart_chunksize, size) if multipart else size
        local_sha, composite = _file_digests(path, part_size if multipart else None)
        if sha256 is not None and sha256 != local_sha:
            raise IntegrityError(f"{os.fspath(path)!r} has sha256 {local_sha[:12]}, expected {sha256[:12]}; "
                                 "the file changed after it was written")
        cfg = TransferConfig(multipart_threshold=self.multipart_threshold, multipart_chunksize=part_size or CHUNK,
                             max_concurrency=self.max_concurrency)
        # Every request (the single PUT or each part) carries its SHA-256; the server rejects
        # a body that does not match it, so nothing corrupted in transit is ever stored.
        self._call("upload", key, self.client.upload_file, Filename=str(path), Bucket=self.bucket,
                   Key=self._key(key), Config=cfg, ExtraArgs={"ChecksumAlgorithm": "SHA256"})
        self._verify_upload(key, size, local_sha, composite)
        log.debug("uploaded %s (%d bytes, %s)", self.describe(key), size, "multipart" if multipart else "single put")
        return local_sha

    def _verify_upload(self, key: str, size: int, sha_hex: str, composite_b64: str | None) -> None:
        head = self._call("head", key, self.client.head_object, Bucket=self.bucket, Key=self._key(key),
                          ChecksumMode="ENABLED")
        if int(head["ContentLength"]) != size:
            raise IntegrityError(f"upload of {self.describe(key)} is incomplete: {head['ContentLength']} bytes "
                                 f"stored, {size} expected")
        server = str(head.get("ChecksumSHA256") or "").split("-")[0]
        if server:
            full = base64.b64encode(bytes.fromhex(sha_hex)).decode()
            if server in (full, composite_b64):
                return
        # No (or an unrecognised) server checksum: read the object back and hash it.
        got = self.sha256(key)
        if got != sha_hex:
            raise IntegrityError(f"upload of {self.describe(key)} is corrupt: stored sha256 {got[:12]}, "
                                 f"expected {sha_hex[:12]}")

    def download_file(self, key: str, path: str | os.PathLike[str]) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._call("download", key, self.client.download_file, Bucket=self.bucket, Key=self._key(key),
                   Filename=str(path))

    def exists(self, key: str) -> bool:
        try:
            self._call("head", key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        except NotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        resp = self._call("head", key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        return int(resp["ContentLength"])

    def _list_objects(self, prefix: str) -> list[dict[str, Any]]:
        full = self._key(prefix) if prefix else self.prefix
        if full and not full.endswith("/"):
            # "runs/a" must not match "runs/ab/..."; an exact key still lists itself.
            exact = full
            full = full + "/"
        else:
            exact = None

        from botocore.exceptions import ClientError

        def pages() -> list[dict[str, Any]]:
            objs: list[dict[str, Any]] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                objs.extend(page.get("Contents", []))
            if exact is not None and not objs:
                with contextlib.suppress(ClientError):
                    head = self.client.head_object(Bucket=self.bucket, Key=exact)
                    objs.append({"Key": exact, "Size": head["ContentLength"], "LastModified": head["LastModified"]})
            return objs

        return self._call("list", prefix, pages)

    def _strip(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1:] if self.prefix else full_key

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self._strip(o["Key"]) for o in self._list_objects(prefix))

    def list_info(self, prefix: str = "") -> builtins.list[ObjectInfo]:  # `list` is a method here
        objs = self._list_objects(prefix)
        return sorted((ObjectInfo(self._strip(o["Key"]), int(o["Size"]), o["LastModified"].timestamp())
                       for o in objs), key=lambda i: i.key)

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self._key(k)} for k in keys[start:start + 1000]]
            resp = self._call("delete", prefix, self.client.delete_objects, Bucket=self.bucket,
                              Delete={"Objects": batch, "Quiet": True})
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(f"delete under {self.describe(prefix)} failed for {len(errors)} objects "
                                   f"(first: {self._strip(first.get('Key', '?'))}: {first.get('Code')})")
        return len(keys)

    def get_versioned(self, key: str) -> Versioned | None:
        def get() -> Versioned:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return Versioned(resp["Body"].read(), resp["ETag"])

        try:
            return self._call("read", key, get)
        except NotFoundError:
            return None

    def _landed(self, key: str, data: bytes) -> str | None:
        """After a 412 on a conditional write: the ETag if the stored bytes are ours (a retried
        request whose first attempt succeeded), else None (someone else won)."""
        current = self.get_versioned(key)
        if current is not None and current.data == data:
            log.info("conditional write to %s answered 412 but the object holds our bytes: an earlier attempt "
                     "of the same request landed", self.describe(key))
            return current.etag
        return None

    def put_if_absent(self, key: str, data: bytes) -> str:
        try:
            resp = self._call("create", key, self.client.put_object, Bucket=self.bucket, Key=self._key(key),
                              Body=data, IfNoneMatch="*")
        except ConflictError:
            etag = self._landed(key, data)
            if etag is None:
                raise ConflictError(f"{self.describe(key)} already exists") from None
            return etag
        return resp["ETag"]

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        try:
            resp = self._call("update", key, self.client.put_object, Bucket=self.bucket, Key=self._key(key),
                              Body=data, IfMatch=etag)
        except (ConflictError, NotFoundError):
            landed = self._landed(key, data)
            if landed is None:
                raise ConflictError(f"{self.describe(key)} changed concurrently (etag {etag} is stale)") from None
            return landed
        return resp["ETag"]

    def delete_if_match(self, key: str, etag: str) -> None:
        try:
            self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._key(key), IfMatch=etag)
        except NotFoundError:
            return

    def arrow_filesystem(self) -> pyarrow.fs.FileSystem:
        import pyarrow.fs

        kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        import boto3

        session = boto3.session.Session()
        creds = session.get_credentials()
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            remember_secret(frozen.access_key, frozen.secret_key, frozen.token)
            kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key)
            if frozen.token:
                kwargs["session_token"] = frozen.token
        kwargs["region"] = session.region_name or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return pyarrow.fs.S3FileSystem(**kwargs)

    def arrow_path(self, key: str) -> str:
        return join(self.bucket, self._key(key) if key else self.prefix)


def _file_digests(path: str | os.PathLike[str], part_size: int | None) -> tuple[str, str | None]:
    """One pass over a file: its SHA-256 hex, and (for a multipart upload with ``part_size``)
    S3's composite checksum, base64(sha256(concat(sha256(part_i)))), as S3 reports it."""
    whole = hashlib.sha256()
    part_digests: list[bytes] = []
    part = hashlib.sha256()
    in_part = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            whole.update(block)
            if part_size is None:
                continue
            view = memoryview(block)
            while view:
                take = min(len(view), part_size - in_part)
                part.update(view[:take])
                in_part += take
                view = view[take:]
                if in_part == part_size:
                    part_digests.append(part.digest())
                    part, in_part = hashlib.sha256(), 0
    if part_size is None:
        return whole.hexdigest(), None
    if in_part:
        part_digests.append(part.digest())
    return whole.hexdigest(), base64.b64encode(hashlib.sha256(b"".join(part_digests)).digest()).decode()
