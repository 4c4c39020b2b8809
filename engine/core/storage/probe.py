"""Detect object stores that ignore conditional writes, and refuse to publish there."""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.core.errors import ConflictError, EmbedctlError, StorageError
from engine.core.storage.base import SYSTEM_PREFIX, Store, check_key, join, json_bytes

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)


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
