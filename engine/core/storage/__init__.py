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

The package is split by role: ``base`` (keys, checksums, the ``Store`` interface), ``local``,
``s3``, ``probe`` (conditional-write detection) and ``redaction``; this module is its face:
``open_store`` and the names callers import.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from engine.core.errors import StorageError
from engine.core.storage.base import (
    CHUNK,
    ENDPOINT_ENV,
    MAX_ATTEMPTS_ENV,
    SYSTEM_PREFIX,
    MiB,
    ObjectInfo,
    Store,
    Versioned,
    check_key,
    join,
    json_bytes,
    sha256_bytes,
    sha256_file,
)
from engine.core.storage.local import LocalStore
from engine.core.storage.probe import ProbeReport, probe_conditional_writes, require_conditional_writes
from engine.core.storage.redaction import RedactingFilter, install_log_redaction, redact, remember_secret
from engine.core.storage.s3 import S3Store

__all__ = ["CHUNK", "ENDPOINT_ENV", "MAX_ATTEMPTS_ENV", "MiB", "SYSTEM_PREFIX", "LocalStore", "ObjectInfo", "ProbeReport",
           "RedactingFilter", "S3Store", "Store", "Versioned", "check_key", "install_log_redaction", "join",
           "json_bytes", "open_store", "probe_conditional_writes", "redact", "remember_secret",
           "require_conditional_writes", "sha256_bytes", "sha256_file", "temp_dir", "wait_for"]


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


def absolute_uri(uri: str | None) -> str | None:
    """A local path made absolute (``s3://``/``file://`` URIs and ``None`` as they are): a path that travels to
    Ray workers must not be relative, their working folder is not the caller's."""
    if not uri or "://" in uri:
        return uri
    return str(Path(uri).expanduser().resolve())


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
