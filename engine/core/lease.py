"""Leases on the store: one holder at a time, by compare-and-swap, with a heartbeat and an expiry.

A lease is one JSON object (``indexes/<index>/leases/<what>.json``) created with
``put_if_absent`` and renewed with ``put_if_match`` on its ETag. A holder that crashes stops
renewing, so its lease expires by itself; one whose process on this host is gone is stale at
once. A second holder gets a ConflictError that names the first (who, where, since when, what
it is doing). Used by refresh (one per index) and by migrate (one runner per migration).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.core import layout
from engine.core.errors import ConflictError, EmbedctlError, NotFoundError
from engine.core.names import whoami
from engine.core.storage import Store, json_bytes

log = logging.getLogger(__name__)


def hostname() -> str:
    """This host's name for lock and lease documents (``EMBEDCTL_HOSTNAME`` overrides, for tests)."""
    return os.environ.get("EMBEDCTL_HOSTNAME") or socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether a process of this host still runs (a SIGKILLed holder frees its lock at once)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class HeldLease:
    """What a held lease does wherever its record lives: renew, record progress, release.

    Subclasses say how the record is replaced (``_put``) and removed (``_drop``), each a
    compare-and-swap that fails (ConflictError/NotFoundError) once someone else took the lease.
    """

    doc: dict[str, Any]
    lock: threading.Lock
    lost: str | None  # why we no longer hold it (set by the heartbeat)

    @property
    def lease_id(self) -> str:
        return str(self.doc["lease_id"])

    def _put(self, doc: dict[str, Any]) -> None:
        raise NotImplementedError

    def _drop(self) -> None:
        raise NotImplementedError

    def _where(self) -> str:
        return ""

    def _replace(self, doc: dict[str, Any]) -> None:
        with self.lock:
            if self.lost:
                raise ConflictError(self.lost)
            try:
                self._put(doc)
            except (ConflictError, NotFoundError) as err:
                self.lost = (f"the {self.doc.get('what', '')} lease{self._where()} was taken over by another holder "
                             f"(ours expired or was broken: {err}); stopping without publishing")
                raise ConflictError(self.lost) from err
            self.doc = doc

    def renew(self, ttl_s: float | None = None) -> None:
        """Extend the expiry; ConflictError (and ``lost`` set) if someone took the lease."""
        now = time.time()
        ttl = float(ttl_s or self.doc["ttl_s"])
        self._replace(dict(self.doc, renewed_at=now, expires_at=now + ttl,
                           renewals=int(self.doc.get("renewals", 0)) + 1))

    def update(self, **fields_: Any) -> None:
        """Record progress in the lease document (what ``embedctl refresh`` shows a waiting user)."""
        self._replace(dict(self.doc, **fields_))

    def release(self) -> None:
        with self.lock:
            if self.lost:
                return
            try:
                self._drop()
            except EmbedctlError as err:  # an unreleased lease expires by itself
                log.warning("the %s lease%s changed hands before release, or the store failed (%s); leaving it",
                            self.doc.get("what"), self._where(), err)
            self.lost = "released"


@dataclass
class Lease(HeldLease):
    """A lease that is its own store object: its key, our ETag of it, and its document."""

    store: Store
    key: str
    etag: str
    doc: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    lost: str | None = None

    def _put(self, doc: dict[str, Any]) -> None:
        self.etag = self.store.put_if_match(self.key, json_bytes(doc), self.etag)

    def _drop(self) -> None:
        self.store.delete_if_match(self.key, self.etag)

    def _where(self) -> str:
        return f" {self.store.describe(self.key)}"


def lease_state(doc: dict[str, Any], now: float | None = None) -> tuple[bool, str]:
    """(stale, why) for a lease document: stale when expired, or its process on this host is gone."""
    now = time.time() if now is None else now
    expires = float(doc.get("expires_at", 0))
    if expires <= now:
        return True, f"expired {now - expires:.0f} s ago"
    if doc.get("host") == hostname() and doc.get("pid") and not pid_alive(int(doc["pid"])):
        return True, f"its process {doc['pid']} on this host ({doc['host']}) is gone"
    return False, f"expires in {expires - now:.0f} s"


def lease_record(what: str, index: str, ttl_s: float, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """A new lease document held by this process (``info`` adds fields, e.g. the run it works for)."""
    now = time.time()
    return {"format": 1, "what": what, "index": index, "lease_id": uuid.uuid4().hex, "host": hostname(),
            "pid": os.getpid(), "by": whoami(), "acquired_at": now, "renewed_at": now, "expires_at": now + ttl_s,
            "ttl_s": ttl_s, "renewals": 0, **(info or {})}


def acquire_lease(store: Store, index: str, *, ttl_s: float, info: dict[str, Any] | None = None,
                  break_lease: bool = False, what: str) -> Lease:
    """Create the lease object, or take over a stale one; ConflictError (fast) when it is held."""
    key = layout.lease_key(index, what)
    doc = lease_record(what, index, ttl_s, info)
    data = json_bytes(doc)
    for _attempt in range(3):
        try:
            return Lease(store, key, store.put_if_absent(key, data), doc)
        except ConflictError:
            pass
        current = store.get_versioned(key)
        if current is None:
            continue  # released between our create and our read: try again
        try:
            held = json.loads(current.data)
        except json.JSONDecodeError:
            held = {"expires_at": 0}
        stale, why = lease_state(held)
        if not stale and not break_lease:
            raise ConflictError(
                f"another {what} of index {index!r} is running: lease {store.describe(key)} is held by "
                f"{held.get('by', '?')} (pid {held.get('pid', '?')} on {held.get('host', '?')}, run "
                f"{held.get('run_id', '?')}, stage {held.get('stage', '?')}) since "
                f"{_fmt_time(held.get('acquired_at'))}; it {why}. Wait for it to finish; if it crashed, its lease "
                f"expires by itself, or rerun with --break-lease when you know its holder is dead")
        log.warning("taking over the %s lease of index %s from %s (pid %s on %s): %s", what, index,
                    held.get("by"), held.get("pid"), held.get("host"),
                    why if stale else "--break-lease")
        doc["took_over"] = {k: held.get(k) for k in ("lease_id", "by", "host", "pid", "run_id")}
        data = json_bytes(doc)
        try:
            return Lease(store, key, store.put_if_match(key, data, current.etag), doc)
        except (ConflictError, NotFoundError):
            continue  # someone else took it (or it was released): look again
    raise ConflictError(f"could not take the {what} lease {store.describe(key)}: another {what} keeps "
                        "taking it; try again later")


def _fmt_time(t: Any) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(t)))
    except (TypeError, ValueError):
        return "?"


DocUpdate = Callable[[Callable[[dict[str, Any]], None]], Any]


class FieldLease(HeldLease):
    """A lease kept as one field of a JSON document that its owner changes by compare-and-swap.

    A migration's runner lock lives in its state document, so that every state write checks the
    lock in the same compare-and-swap (a runner that lost it cannot write once more). Same record
    (``lease_record``), staleness rule (``lease_state``), take-over and keeper as ``Lease``;
    ``update_doc(change)`` is the owner's read-modify-CAS of the document (``change`` edits it in place).
    """

    def __init__(self, update_doc: DocUpdate, field_name: str, doc: dict[str, Any]):
        self._update_doc = update_doc
        self.field = field_name
        self.doc = doc
        self.lock = threading.Lock()
        self.lost = None

    def _write(self, new: dict[str, Any] | None) -> None:
        def change(d: dict[str, Any]) -> None:
            held = d.get(self.field) or {}
            if held.get("lease_id") != self.lease_id:
                raise ConflictError(f"it is held by {held.get('by')} (pid {held.get('pid')} on {held.get('host')})"
                                    if held else "it was released by someone else")
            d[self.field] = new

        self._update_doc(change)

    def _put(self, doc: dict[str, Any]) -> None:
        self._write(doc)

    def _drop(self) -> None:
        self._write(None)


def acquire_field_lease(update: DocUpdate, field_name: str, *, what: str, index: str, ttl_s: float,
                        info: dict[str, Any] | None = None, break_lease: bool = False,
                        held_message: Callable[[dict[str, Any], str], str] | None = None) -> FieldLease:
    """Take the lease in ``field_name`` of a document (free, stale, or ``break_lease``) in one
    ``update``; ConflictError when a live holder has it (``held_message(holder, why)`` words it)."""
    doc = lease_record(what, index, ttl_s, info)

    def take(d: dict[str, Any]) -> None:
        held = d.get(field_name)
        if held:
            stale, why = lease_state(held)
            if not stale and not break_lease:
                raise ConflictError(held_message(held, why) if held_message else
                                    f"another {what} of index {index!r} is running: held by {held.get('by', '?')} "
                                    f"(pid {held.get('pid', '?')} on {held.get('host', '?')}); it {why}")
            log.warning("taking over the %s lease of index %s from %s (pid %s on %s): %s", what, index,
                        held.get("by"), held.get("pid"), held.get("host"), why if stale else "broken on request")
            doc["took_over"] = {k: held.get(k) for k in ("lease_id", "by", "host", "pid")}
        d[field_name] = doc

    update(take)
    return FieldLease(update, field_name, doc)


class LeaseKeeper:
    """Renews a lease every ``ttl/4`` seconds from a daemon thread while its holder works."""

    def __init__(self, lease: HeldLease):
        self.lease = lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embedctl-lease", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.lease.release()

    def _run(self) -> None:
        interval = max(0.2, float(self.lease.doc["ttl_s"]) / 4)
        while not self._stop.wait(interval):
            try:
                self.lease.renew()
            except ConflictError:
                log.error("%s", self.lease.lost)
                return
            except Exception as err:  # noqa: BLE001 - a flaky store: try again next tick
                log.warning("could not renew the %s lease (will retry): %s", self.lease.doc.get("what"), err)

    def check(self) -> None:
        """Fencing before an irreversible step: renew now, raise ConflictError if the lease is gone."""
        self.lease.renew()
