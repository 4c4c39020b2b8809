"""Object storage: one interface, two backends (local disk and S3) with the same semantics.

Keys are relative POSIX paths under the store root (``runs/<id>/manifest.json``). Every
write of a whole object is atomic: readers see the old bytes or the new bytes, never a
torn file. Pointers (aliases, leases) are updated by compare-and-swap on an ETag:

- S3: ``put_object`` with ``IfNoneMatch="*"`` to create and ``IfMatch=<etag>`` to update
  (a single ``put_object``; conditional multipart/copy is not enforced by every endpoint);
- local disk: an exclusive ``flock`` on a sidecar lock file, compare, write a temp file,
  ``os.replace``. The ETag is the sha256 of the content.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import urlparse

from engine.errors import ConflictError, IntegrityError, NotFoundError, StorageError

if TYPE_CHECKING:
    import pyarrow.fs

log = logging.getLogger(__name__)

ENDPOINT_ENV = "EMBEDCTL_S3_ENDPOINT_URL"
CHUNK = 8 * 1024 * 1024


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
    def upload_file(self, key: str, path: str | os.PathLike[str]) -> None: ...

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
        return sha256_bytes(self.read_bytes(key))

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

    def upload_file(self, key: str, path: str | os.PathLike[str]) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)

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

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

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
    """``s3://bucket/prefix`` through boto3; any S3-compatible endpoint via ``endpoint_url``."""

    def __init__(self, uri: str, endpoint_url: str | None = None):
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StorageError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix)")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.uri = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint_url = endpoint_url or _endpoint_from_env()
        self._client: Any = None

    # boto3 clients are not picklable; build lazily so a Store can travel to Ray workers.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            cfg = Config(retries={"max_attempts": 8, "mode": "adaptive"}, connect_timeout=10, read_timeout=120)
            self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=cfg)
        return self._client

    def _key(self, key: str) -> str:
        return join(self.prefix, check_key(key)) if key else self.prefix

    def _call(self, what: str, key: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                raise NotFoundError(f"{self.describe(key)} does not exist") from None
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                raise ConflictError(f"{what} {self.describe(key)}: the object changed concurrently ({code})") from None
            if code == "NoSuchBucket":
                raise StorageError(f"bucket {self.bucket!r} does not exist at the endpoint; create it first") from None
            raise StorageError(f"{what} {self.describe(key)} failed: {code or status}") from None
        except BotoCoreError as err:
            # The message of a BotoCoreError names the endpoint and the problem, never secrets.
            raise StorageError(f"{what} {self.describe(key)} failed: {type(err).__name__}: {err}") from None

    def read_bytes(self, key: str) -> bytes:
        resp = self._call("read", key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return resp["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call("write", key, self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def upload_file(self, key: str, path: str | os.PathLike[str]) -> None:
        from boto3.s3.transfer import TransferConfig

        # Multipart above 64 MiB; boto3 retries each part. Size is verified after upload.
        cfg = TransferConfig(multipart_threshold=64 * 1024 * 1024, multipart_chunksize=64 * 1024 * 1024)
        self._call("upload", key, self.client.upload_file, Filename=str(path), Bucket=self.bucket,
                   Key=self._key(key), Config=cfg)
        expected = os.path.getsize(path)
        if self.size(key) != expected:
            raise IntegrityError(f"upload of {self.describe(key)} is incomplete: size differs from {expected}")

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

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix) if prefix else self.prefix
        if full and not full.endswith("/"):
            # "runs/a" must not match "runs/ab/..."; an exact key still lists itself.
            exact = full
            full = full + "/"
        else:
            exact = None
        out: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    out.append(obj["Key"][strip:])
            if exact is not None and not out and self.exists(prefix):
                out.append(check_key(prefix))
        except Exception as err:  # noqa: BLE001 - mapped to one clear error
            if isinstance(err, (NotFoundError, StorageError)):
                raise
            raise StorageError(f"list {self.describe(prefix)} failed: {type(err).__name__}") from None
        return sorted(out)

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def get_versioned(self, key: str) -> Versioned | None:
        try:
            resp = self._call("read", key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        except NotFoundError:
            return None
        return Versioned(resp["Body"].read(), resp["ETag"])

    def put_if_absent(self, key: str, data: bytes) -> str:
        resp = self._call("create", key, self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data,
                          IfNoneMatch="*")
        return resp["ETag"]

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        resp = self._call("update", key, self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data,
                          IfMatch=etag)
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
            kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key)
            if frozen.token:
                kwargs["session_token"] = frozen.token
        kwargs["region"] = session.region_name or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return pyarrow.fs.S3FileSystem(**kwargs)

    def arrow_path(self, key: str) -> str:
        return join(self.bucket, self._key(key))


def open_store(uri: str | os.PathLike[str], endpoint_url: str | None = None) -> Store:
    """``s3://bucket/prefix`` -> S3Store; ``file:///path`` or a plain path -> LocalStore."""
    text = os.fspath(uri)
    if text.startswith("s3://"):
        return S3Store(text, endpoint_url=endpoint_url)
    if text.startswith("file://"):
        return LocalStore(urlparse(text).path)
    if "://" in text:
        raise StorageError(f"unsupported store URI {text!r}: use a local path, file:// or s3://")
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
