"""Object storage: one interface, two backends (local disk and S3) with the same semantics.

Keys are relative POSIX paths under the store root (``runs/<id>/manifest.json``). Every
write of a whole object is atomic: readers see the old bytes or the new bytes, never a
torn file. Pointers (aliases, leases) are updated by compare-and-swap on an ETag:

- S3: ``put_object`` with ``IfNoneMatch="*"`` to create and ``IfMatch=<etag>`` to update
  (a single ``put_object``; conditional multipart/copy is not enforced by every endpoint);
- local disk: an exclusive ``flock`` on a sidecar lock file, compare, write a temp file,
  ``os.replace``. The ETag is the sha256 of the content.

Hardening on S3 (each claim has a test in tests/test_storage.py against a real loopback
endpoint, some through a fault-injecting proxy):

- retries with exponential backoff and jitter on throttling (``SlowDown``, 429/503) and 5xx,
  and on dropped connections: botocore's ``adaptive`` retry mode, ``max_attempts`` total tries
  per request (default 8, ``EMBEDCTL_S3_MAX_ATTEMPTS``), which also rate-limits the client
  after throttling;
- a retried conditional write whose first attempt landed (the response was lost) comes back
  as a 412; ``put_if_absent``/``put_if_match`` then re-read the object and count the write as
  theirs when the stored bytes are exactly the bytes they sent. Callers that need to know who
  won a race therefore put a nonce in their payload (``engine.publish.aliases`` does);
- large files go up as multipart uploads (``multipart_threshold``/``multipart_chunksize``),
  every part with a SHA-256 the server checks on receipt; after the upload the object's size
  and SHA-256 (the server's full or composite checksum, else a streamed read-back) are
  compared with the local file, so ``upload_file`` returns only for a verified object;
- ``probe_conditional_writes`` detects an endpoint that ignores ``If-None-Match``/``If-Match``
  (some S3-compatible stores do); ``require_conditional_writes`` refuses to go on there;
- error messages and log records never carry credentials (``redact``, ``RedactingFilter``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import urlparse

from engine.core.errors import ConflictError, EmbedctlError, IntegrityError, NotFoundError, StorageError

if TYPE_CHECKING:
    import pyarrow.fs

log = logging.getLogger(__name__)

ENDPOINT_ENV = "EMBEDCTL_S3_ENDPOINT_URL"
MAX_ATTEMPTS_ENV = "EMBEDCTL_S3_MAX_ATTEMPTS"
CHUNK = 8 * 1024 * 1024
MiB = 1024 * 1024
# Store-wide scratch space (doctor's and the default probe's objects), outside runs and indexes.
SYSTEM_PREFIX = "_embedctl"


def check_key(key: str) -> str:
    """Return ``key`` normalised, or raise if it escapes the store root (``..``, absolute, URL)."""
    if not isinstance(key, str) or not key:
        raise IntegrityError(f"invalid object key {key!r}: must be a non-empty relative path")
    if "://" in key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise IntegrityError(f"object key {key!r} is absolute or a URL; keys must be relative to the store")
    norm = posixpath.normpath(key)
    if norm.startswith("..") or norm == "." or any(part == ".." for part in key.split("/")):
        raise IntegrityError(f"object key {key!r} escapes its prefix with '..'")
    return norm


def join(*parts: str) -> str:
    """Join key parts with '/' (no normalisation beyond stripping duplicate slashes)."""
    return "/".join(p.strip("/") for p in parts if p not in ("", None))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


# --- credential redaction ------------------------------------------------------------------

# Values that must never reach a message or a log line. Filled from the environment on each
# call and from the credentials every S3 client resolved (profiles, SSO, instance roles).
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")
_known_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_SIGNING = re.compile(
    r"(?i)(Credential=|X-Amz-Credential=|X-Amz-Security-Token[=:]\s*|X-Amz-Signature=|Signature=|"
    r"aws_secret_access_key\s*=\s*|aws_session_token\s*=\s*)[^\s,&'\"]+"
)


def remember_secret(*values: str | None) -> None:
    """Add credential values to the set that ``redact`` removes (short values are ignored)."""
    with _secrets_lock:
        _known_secrets.update(v for v in values if v and len(v) >= 8)


def redact(text: str) -> str:
    """``text`` with credentials removed: known key/secret/token values, URL userinfo, signatures."""
    if not text:
        return text
    with _secrets_lock:
        secrets = set(_known_secrets)
    secrets.update(v for k in _SECRET_ENV if (v := os.environ.get(k)) and len(v) >= 8)
    for value in sorted(secrets, key=len, reverse=True):
        text = text.replace(value, "***")
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    return _SIGNING.sub(r"\1***", text)


class RedactingFilter(logging.Filter):
    """A handler filter that rewrites every record through ``redact`` (attach it to handlers:
    filters on a logger do not see records propagated from its children)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string must not kill logging
            return True
        clean = redact(message)
        if record.exc_info and record.exc_info[1] is not None:
            # The traceback text is rendered later by the formatter: render it now, redacted.
            import traceback

            clean += "\n" + redact("".join(traceback.format_exception(*record.exc_info)).rstrip())
            record.exc_info = None
            record.exc_text = None
        record.msg, record.args = clean, None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Attach a ``RedactingFilter`` to every handler of ``logger`` (default: the root logger),
    and keep botocore/urllib3 wire logs (which carry signed headers) at INFO or above."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        lg = logging.getLogger(name)
        if lg.getEffectiveLevel() < logging.INFO:
            lg.setLevel(logging.INFO)


@dataclass(frozen=True)
class ObjectInfo:
    """One object in a listing: its key, size in bytes and last-modified time (epoch seconds)."""

    key: str
    size: int
    mtime: float


@dataclass(frozen=True)
class Versioned:
    """An object's bytes with the ETag to pass back for a compare-and-swap."""

    data: bytes
    etag: str


class Store(ABC):
    """A root in object storage. Same semantics on every backend."""

    uri: str

    # --- whole objects -------------------------------------------------------------------
    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def upload_file(self, key: str, path: str | os.PathLike[str], *, sha256: str | None = None) -> str:
        """Copy a local file to ``key`` and verify the stored object's size and SHA-256 against
        the file (or ``sha256``, when the caller already knows it). Returns the SHA-256 hex.
        Raises IntegrityError when the stored object differs."""

    @abstractmethod
    def download_file(self, key: str, path: str | os.PathLike[str]) -> None: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys under ``prefix`` (recursive), sorted."""

    @abstractmethod
    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        """Like ``list`` with each object's size and last-modified time."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    # --- compare-and-swap pointers -----------------------------------------------------
    @abstractmethod
    def get_versioned(self, key: str) -> Versioned | None:
        """The object and its ETag, or None when it does not exist."""

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> str:
        """Create ``key``; raise ConflictError if it exists. Returns the new ETag."""

    @abstractmethod
    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        """Replace ``key`` only if its ETag is still ``etag``; else ConflictError."""

    @abstractmethod
    def delete_if_match(self, key: str, etag: str) -> None:
        """Delete ``key`` only if its ETag is still ``etag``; else ConflictError."""

    # --- pyarrow access (Parquet read/write without copying through the driver) ---------
    @abstractmethod
    def arrow_filesystem(self) -> pyarrow.fs.FileSystem: ...

    @abstractmethod
    def arrow_path(self, key: str) -> str: ...

    # --- helpers shared by backends ---------------------------------------------------------
    def read_json(self, key: str) -> Any:
        data = self.read_bytes(key)
        try:
            return json.loads(data)
        except json.JSONDecodeError as err:
            raise IntegrityError(f"{self.describe(key)} is not valid JSON: {err}") from err

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, json_bytes(obj))

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    def sha256(self, key: str) -> str:
        """SHA-256 hex of the stored object, streamed (large shards are never held in memory)."""
        h = hashlib.sha256()
        for block in self.iter_bytes(key):
            h.update(block)
        return h.hexdigest()

    def iter_bytes(self, key: str, block_size: int = CHUNK) -> Iterator[bytes]:
        """The object's bytes in blocks (backends override this to stream)."""
        yield self.read_bytes(key)

    def describe(self, key: str = "") -> str:
        """A printable location for messages (never contains credentials)."""
        return self.uri.rstrip("/") + ("/" + key if key else "")

    def child(self, prefix: str) -> Store:
        """A store rooted at ``prefix`` under this one."""
        return open_store(self.describe(check_key(prefix)), endpoint_url=getattr(self, "endpoint_url", None))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def json_bytes(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, 2-space indent) so equal objects give equal bytes."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


# ---------------------------------------------------------------------------------------------
# local disk
# ---------------------------------------------------------------------------------------------


class LocalStore(Store):
    """A directory on local disk (the embedded default)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def local_path(self, key: str) -> Path:
        """The file that holds ``key`` (read it in place instead of copying it)."""
        return self._path(key)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
            raise NotFoundError(f"{self.describe(key)} does not exist") from err

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def upload_file(self, key: str, path: str | os.PathLike[str], *, sha256: str | None = None) -> str:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        expected = sha256 or sha256_file(path)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        try:
            shutil.copyfile(path, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            # Verify the copy before it becomes visible under its key.
            got = sha256_file(tmp)
            if got != expected:
                raise IntegrityError(f"copy of {os.fspath(path)!r} to {self.describe(key)} has sha256 {got[:12]}, "
                                     f"expected {expected[:12]}; the source changed or the disk is failing")
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return expected

    def download_file(self, key: str, path: str | os.PathLike[str]) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NotFoundError(f"{self.describe(key)} does not exist")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError as err:
            raise NotFoundError(f"{self.describe(key)} does not exist") from err

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [check_key(prefix)]
        if not base.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".") and (name.endswith(".tmp") or name.endswith(".lock")):
                    continue  # in-flight temp files and lock files are not objects
                out.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return sorted(out)

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        out = []
        for key in self.list(prefix):
            with contextlib.suppress(FileNotFoundError):  # deleted between list and stat
                st = self._path(key).stat()
                out.append(ObjectInfo(key, st.st_size, st.st_mtime))
        return out

    def iter_bytes(self, key: str, block_size: int = CHUNK) -> Iterator[bytes]:
        try:
            f = open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
            raise NotFoundError(f"{self.describe(key)} does not exist") from err
        with f:
            yield from iter(lambda: f.read(block_size), b"")

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def delete_prefix(self, prefix: str) -> int:
        n = super().delete_prefix(prefix)
        # Local disk keeps directories: drop the now-empty ones (and their lock files) so a
        # deleted prefix is gone, as it is on S3.
        base = self._path(prefix)
        if base.is_dir():
            for dirpath, _dirs, files in os.walk(base, topdown=False):
                if all(name.startswith(".") and name.endswith(".lock") for name in files):
                    for name in files:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(dirpath, name))
                    with contextlib.suppress(OSError):
                        os.rmdir(dirpath)
        return n

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[Path]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_name(f".{path.name}.lock")
        with open(lock, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield path
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def get_versioned(self, key: str) -> Versioned | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return Versioned(data, sha256_bytes(data))

    def put_if_absent(self, key: str, data: bytes) -> str:
        with self._locked(key) as path:
            if path.exists():
                raise ConflictError(f"{self.describe(key)} already exists")
            self.write_bytes(key, data)
        return sha256_bytes(data)

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        with self._locked(key) as path:
            try:
                current = sha256_bytes(path.read_bytes())
            except FileNotFoundError as err:
                raise ConflictError(f"{self.describe(key)} was deleted concurrently") from err
            if current != etag:
                raise ConflictError(f"{self.describe(key)} changed concurrently (etag {etag[:12]} is stale)")
            self.write_bytes(key, data)
        return sha256_bytes(data)

    def delete_if_match(self, key: str, etag: str) -> None:
        with self._locked(key) as path:
            try:
                current = sha256_bytes(path.read_bytes())
            except FileNotFoundError:
                return
            if current != etag:
                raise ConflictError(f"{self.describe(key)} changed concurrently (etag {etag[:12]} is stale)")
            path.unlink()

    def arrow_filesystem(self) -> pyarrow.fs.FileSystem:
        import pyarrow.fs

        return pyarrow.fs.LocalFileSystem()

    def arrow_path(self, key: str) -> str:
        return str(self._path(key)) if key else str(self.root)


# ---------------------------------------------------------------------------------------------
# S3
# ---------------------------------------------------------------------------------------------


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

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
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


@dataclass
class ProbeReport:
    """What ``probe_conditional_writes`` found about a store's compare-and-swap support."""

    store: str
    if_none_match: bool = False
    if_match: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.if_none_match and self.if_match and not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "ok": self.ok, "if_none_match": self.if_none_match,
                "if_match": self.if_match, "problems": list(self.problems)}


def probe_conditional_writes(store: Store, prefix: str = SYSTEM_PREFIX) -> ProbeReport:
    """Check that the store really enforces create-if-absent and update-if-match.

    Writes a scratch object under ``<prefix>/_probes/`` (default ``_embedctl/``; publish
    probes inside the index it writes to, so a credential scoped to that index suffices)
    and tries each condition both ways:
    a second create must be refused, an update with a stale ETag must be refused, an update
    with the current ETag must succeed. Endpoints that silently ignore ``If-None-Match`` or
    ``If-Match`` would let two publishers both "win" an alias swap; this finds them.
    """
    report = ProbeReport(store.describe())
    probe_dir = join(check_key(prefix), "_probes", uuid.uuid4().hex)
    key = join(probe_dir, "probe.json")
    nonce = uuid.uuid4().hex
    try:
        try:
            store.put_if_absent(key, json_bytes({"probe": nonce, "step": "create"}))
        except ConflictError:
            report.problems.append("a create-if-absent of a fresh key was refused")
            return report
        except StorageError as err:
            report.problems.append(f"create-if-absent (If-None-Match: *) failed: {err}")
            return report
        try:
            store.put_if_absent(key, json_bytes({"probe": nonce, "step": "second-create"}))
            report.problems.append("the endpoint ignores If-None-Match: a second create of an existing key "
                                   "succeeded")
        except ConflictError:
            report.if_none_match = True
        except StorageError as err:
            report.problems.append(f"create-if-absent of an existing key failed oddly: {err}")
        current = store.get_versioned(key)
        if current is None:
            report.problems.append("the probe object vanished after it was written (no read-after-write)")
            return report
        stale = '"' + ("0" if current.etag != '"' + "0" * 32 + '"' else "1") * 32 + '"'
        try:
            store.put_if_match(key, json_bytes({"probe": nonce, "step": "stale-update"}), stale)
            report.problems.append("the endpoint ignores If-Match: an update with a stale ETag succeeded")
        except ConflictError:
            report.if_match = True
        except StorageError as err:
            report.problems.append(f"update-if-match with a stale ETag failed oddly: {err}")
        current = store.get_versioned(key)
        try:
            if current is None:
                raise ConflictError("probe object vanished")
            store.put_if_match(key, json_bytes({"probe": nonce, "step": "update"}), current.etag)
        except (ConflictError, StorageError) as err:
            report.if_match = False
            report.problems.append(f"an update with the current ETag was refused: {err}")
        return report
    finally:
        with contextlib.suppress(EmbedctlError):
            store.delete_prefix(probe_dir)


_probe_cache: dict[tuple[str, str | None], ProbeReport] = {}
_probe_lock = threading.Lock()


def require_conditional_writes(store: Store, *, prefix: str = SYSTEM_PREFIX, refresh: bool = False) -> ProbeReport:
    """Probe the store once per process (per URI and endpoint) and raise StorageError if its
    conditional writes are not enforced: publishing there could race silently."""
    cache_key = (store.describe(), getattr(store, "endpoint_url", None))
    with _probe_lock:
        report = None if refresh else _probe_cache.get(cache_key)
        if report is None:
            report = probe_conditional_writes(store, prefix)
            if report.ok:
                _probe_cache[cache_key] = report
    if not report.ok:
        raise StorageError(f"{store.describe()} does not enforce conditional writes ({'; '.join(report.problems)}). "
                           "Refusing to publish: two publishers could both win an alias swap. Use an endpoint that "
                           "supports If-None-Match/If-Match on PutObject (AWS S3, MinIO, moto) "
                           "and check with `embedctl doctor`.")
    return report


def open_store(uri: str | os.PathLike[str], endpoint_url: str | None = None, **s3_options: Any) -> Store:
    """``s3://bucket/prefix`` -> S3Store; ``file:///path`` or a plain path -> LocalStore.
    ``s3_options`` (max_attempts, multipart_threshold, ...) go to S3Store."""
    text = os.fspath(uri)
    if text.startswith("s3://"):
        return S3Store(text, endpoint_url=endpoint_url, **s3_options)
    if text.startswith("file://"):
        return LocalStore(urlparse(text).path)
    if "://" in text:
        raise StorageError(f"unsupported store URI {redact(text)!r}: use a local path, file:// or s3://")
    return LocalStore(text)


def wait_for(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass (used by tests and pollers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def temp_dir(prefix: str = "embedctl-") -> str:
    return tempfile.mkdtemp(prefix=prefix)
