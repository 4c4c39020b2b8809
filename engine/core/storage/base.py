"""The store interface and its key rules: keys, checksums, ObjectInfo/Versioned, the abstract Store."""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import os
import posixpath
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.core.errors import IntegrityError

if TYPE_CHECKING:
    import pyarrow.fs

log = logging.getLogger(__name__)

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
    def list_info(self, prefix: str = "") -> builtins.list[ObjectInfo]:  # `list` is a method here
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
        from engine.core.storage import open_store  # the factory lives in the package face

        return open_store(self.describe(check_key(prefix)), endpoint_url=getattr(self, "endpoint_url", None))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def json_bytes(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, 2-space indent) so equal objects give equal bytes."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
