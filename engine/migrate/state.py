"""The migration state document: store keys, compare-and-swap updates, events, runner lease, retention."""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Literal

from engine.core import layout
from engine.core.errors import ConfigError, ConflictError, IntegrityError, NotFoundError
from engine.core.lease import FieldLease, LeaseKeeper, acquire_field_lease, hostname, lease_state
from engine.core.retention import retained_versions as read_retained
from engine.core.retention import write_retention
from engine.core.storage import Store, join, json_bytes
from engine.migrate.plan import MigrationPlan

log = logging.getLogger(__name__)

STATE_FORMAT = 1
PHASES: tuple[str, ...] = ("baseline", "build", "compare", "calibrate", "rollout", "cutover")
Phase = Literal["baseline", "build", "compare", "calibrate", "rollout", "cutover"]
MAX_EVENTS = 500
LOCK_FIELD = "lock"  # the state document's field holding the runner's lease (engine.core.lease record)


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def migrations_prefix(index: str) -> str:
    return join(layout.index_prefix(index), "migrations")


def migration_prefix(index: str, migration_id: str) -> str:
    from engine.core.names import check_name

    return join(migrations_prefix(index), check_name("migration", migration_id))


def state_key(index: str, migration_id: str) -> str:
    return join(migration_prefix(index, migration_id), "state.json")


def artifact_key(index: str, migration_id: str, name: str) -> str:
    """Bulky results beside the state: baseline.json, compare.json, report.html, ..."""
    return join(migration_prefix(index, migration_id), name)


def list_migrations(store: Store, index: str) -> list[dict[str, Any]]:
    """Every migration of ``index`` (its state documents), oldest first."""
    prefix = migrations_prefix(index)
    out = []
    for key in store.list(prefix):
        rest = key[len(prefix) + 1:]
        if rest.count("/") == 1 and rest.endswith("/state.json"):
            out.append(store.read_json(key))
    return sorted(out, key=lambda s: s.get("created_at", ""))


def retention_entries(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What a migration state still needs kept, as retention-record entries for gc: blue and
    green of an unfinished migration (green may not be on any alias yet, e.g. while a reviewer
    reads the report), and blue of a cut-over migration until its retention ends (the instant
    rollback target)."""
    mid = doc.get("migration_id")
    blue = (doc.get("blue") or {}).get("version")
    green = (doc.get("green") or {}).get("version")
    status = doc.get("status")
    if status == "cut_over":
        until = doc.get("retain_until")
        if blue and until:
            return [{"version": blue, "why": f"migration {mid}: blue retained for rollback until {until}",
                     "until": until}]
        return []
    if status == "abandoned":
        return []
    return [{"version": v, "why": f"migration {mid} ({status}) uses it as {side}", "until": None}
            for side, v in (("blue", blue), ("green", green)) if v]


def sync_retention(store: Store, index: str, doc: Mapping[str, Any]) -> None:
    """Write the retention record (``engine.core.retention``) that this migration state implies."""
    write_retention(store, index, f"migration-{doc.get('migration_id')}", retention_entries(doc))


def retained_versions(store: Store, index: str, *, now: str | None = None) -> dict[str, str]:
    """Versions that migrations of ``index`` still need, with why (what gc reads from the records)."""
    for doc in list_migrations(store, index):
        sync_retention(store, index, doc)  # stores from before retention records existed
    return read_retained(store, index, now=now)


def lock_state(lock: Mapping[str, Any] | None, now: float | None = None) -> tuple[bool, str]:
    """(free, why) for a state's runner lease, by ``engine.core.lease.lease_state``: free when
    absent, expired, or its process on this host is gone (a SIGKILLed runner frees it at once)."""
    if not lock:
        return True, "no runner"
    stale, why = lease_state(dict(lock), now)
    if stale:
        return True, f"the lock of {lock.get('by')} is free: {why}"
    return False, f"held by {lock.get('by')} (pid {lock.get('pid')} on {lock.get('host')}), {why}"


def _parse_state(data: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as err:
        raise IntegrityError(f"{where} is not valid JSON: {err}") from err
    if not isinstance(doc, dict) or doc.get("kind") != "migration":
        raise IntegrityError(f"{where} is not a migration state document")
    if int(doc.get("format", 0)) > STATE_FORMAT:
        raise IntegrityError(f"{where} has state format {doc.get('format')}; this embedctl reads up to "
                             f"{STATE_FORMAT}: upgrade embedctl")
    return doc


def new_state(migration_id: str, index: str, plan: MigrationPlan, by: str) -> dict[str, Any]:
    """The state document of a migration that has just been created."""
    now = now_iso()
    return {
        "format": STATE_FORMAT, "kind": "migration", "migration_id": migration_id, "index": index,
        "alias": plan.alias, "created_at": now, "updated_at": now, "created_by": by, "revision": 1,
        "plan": plan.to_dict(), "plan_identity": plan.identity(), "status": "running", "phase": PHASES[0],
        "blue": None, "green": None,
        "phases": {p: {"status": "pending", "attempts": 0} for p in PHASES},
        "rollout": {"steps": [], "weight": 0}, "retain_until": None, LOCK_FIELD: None,
        "events": [{"at": now, "event": "created", "by": by}],
    }


class MigrationState:
    """The state document of one migration, read and changed by compare-and-swap only.

    The runner lock is an ``engine.core.lease`` lease kept in the document's ``lock`` field
    (``FieldLease``, renewed by a ``LeaseKeeper``): every write checks it in the same
    compare-and-swap, so a runner that lost it cannot change the state once more.
    """

    def __init__(self, store: Store, index: str, migration_id: str, *, lock_ttl_s: float = 120.0):
        self.store = store
        self.index = index
        self.migration_id = migration_id
        self.key = state_key(index, migration_id)
        self.lock_ttl_s = float(lock_ttl_s)
        self.lease: FieldLease | None = None  # set while we hold the runner lock
        self._keeper: LeaseKeeper | None = None

    @property
    def runner_id(self) -> str | None:
        return None if self.lease is None or self.lease.lost else self.lease.lease_id

    @property
    def lost(self) -> str | None:
        return None if self.lease is None else self.lease.lost

    @property
    def _stop(self) -> threading.Event:
        """The heartbeat's stop switch (tests set it to act out a killed runner)."""
        return self._keeper._stop if self._keeper is not None else threading.Event()

    # --- reading ----------------------------------------------------------------------------
    def read(self) -> dict[str, Any]:
        current = self.store.get_versioned(self.key)
        if current is None:
            raise NotFoundError(f"migration {self.migration_id!r} of index {self.index!r} does not exist in "
                                f"{self.store.describe()}; start it with `embedctl migrate run --index {self.index} "
                                "--model M --benchmark B ...` (or `migrate baseline`)")
        return _parse_state(current.data, self.store.describe(self.key))

    def exists(self) -> bool:
        return self.store.exists(self.key)

    # --- creating -------------------------------------------------------------------------
    def create(self, plan: MigrationPlan, by: str) -> dict[str, Any]:
        """Create the state (``put_if_absent``); an existing one with the same plan is returned,
        with another plan refused."""
        doc = new_state(self.migration_id, self.index, plan, by)
        try:
            self.store.put_if_absent(self.key, json_bytes(doc))
            sync_retention(self.store, self.index, doc)
            log.info("migration %s of %s created", self.migration_id, self.index)
            return doc
        except ConflictError:
            pass
        existing = self.read()
        if existing.get("plan_identity") != json.loads(json.dumps(plan.identity(), default=str)):
            raise ConfigError(f"migration {self.migration_id!r} of index {self.index!r} already exists with another "
                              "plan (model, corpus or query set differ); resume it without plan flags, or start a new "
                              "one with --migration NEW_ID")
        return existing

    # --- changing ---------------------------------------------------------------------------
    def update(self, change: Callable[[dict[str, Any]], None], *, event: dict[str, Any] | None = None,
               need_lock: bool = True) -> dict[str, Any]:
        """Apply ``change`` (which mutates the document in place) by compare-and-swap; on a lost
        race re-read and re-apply. With ``need_lock`` (default) refuses unless we still hold the
        runner lock: a runner that lost its lock must stop, not write."""
        for attempt in range(50):
            current = self.store.get_versioned(self.key)
            if current is None:
                raise NotFoundError(f"migration state {self.store.describe(self.key)} vanished")
            doc = _parse_state(current.data, self.store.describe(self.key))
            if need_lock:
                self._check_lock(doc)
            new = copy.deepcopy(doc)
            change(new)
            new["revision"] = int(doc.get("revision", 0)) + 1
            new["updated_at"] = now_iso()
            if event is not None:
                new.setdefault("events", []).append({"at": new["updated_at"], **event})
                new["events"] = new["events"][-MAX_EVENTS:]
            if retention_entries(new) != retention_entries(doc):
                sync_retention(self.store, self.index, new)  # before the state: gc never sees a gap
            try:
                self.store.put_if_match(self.key, json_bytes(new), current.etag)
                return new
            except ConflictError:
                time.sleep(0.01 * (1 + attempt % 5))  # someone else wrote (the heartbeat, a status reader)
        raise ConflictError(f"could not update {self.store.describe(self.key)}: it keeps changing under us")

    def _check_lock(self, doc: Mapping[str, Any]) -> None:
        lock = doc.get(LOCK_FIELD) or {}
        if self.runner_id is None or lock.get("lease_id", lock.get("runner_id")) != self.runner_id:
            why = self.lost or (f"it is held by {lock.get('by')} (pid {lock.get('pid')} on {lock.get('host')})"
                                if lock else "nobody holds it")
            raise ConflictError(f"this process does not hold the lock of migration {self.migration_id!r} ({why}); "
                                "stopping without changing anything")

    # --- the runner lock --------------------------------------------------------------------
    def acquire(self, *, by: str, break_lock: bool = False) -> None:
        """Take the runner lock (free, expired, or its process here is dead; ``break_lock``
        takes it regardless) and keep it renewed. ConflictError when another live runner holds it."""
        runner = uuid.uuid4().hex

        def held(holder: dict[str, Any], why: str) -> str:
            return (f"migration {self.migration_id!r} of index {self.index!r} is being run: its lock is held by "
                    f"{holder.get('by')} (pid {holder.get('pid')} on {holder.get('host')}), {why}. Wait for it; if "
                    "that runner is dead, its lock expires by itself, or rerun with --break-lock")

        def write(change: Callable[[dict[str, Any]], None]) -> Any:
            return self.update(change, need_lock=False, event=event)

        event: dict[str, Any] | None = {"event": "runner", "by": by, "pid": os.getpid(), "host": hostname()}
        self.lease = acquire_field_lease(write, LOCK_FIELD, what="migration", index=self.index, ttl_s=self.lock_ttl_s,
                                         info={"lease_id": runner, "runner_id": runner, "by": by,
                                               "migration_id": self.migration_id},
                                         break_lease=break_lock, held_message=held)
        event = None  # renewals and the release are not events
        self._keeper = LeaseKeeper(self.lease).__enter__()

    def release(self) -> None:
        if self._keeper is not None:
            self._keeper.__exit__(None, None, None)  # stops the heartbeat, then releases the lease
            self._keeper = None
        elif self.lease is not None:
            self.lease.release()
        self.lease = None

    @contextmanager
    def locked(self, *, by: str, break_lock: bool = False) -> Iterator[MigrationState]:
        self.acquire(by=by, break_lock=break_lock)
        try:
            yield self
        finally:
            self.release()
