"""Retention records: versions a workflow still needs, written by that workflow and read by gc.

A workflow above the publish layer (a migration keeps blue and green while it runs, and blue
until its rollback window ends) says so as data in the store, so garbage collection needs no
import of it. One record per holder: ``indexes/<index>/retention/<holder>.json`` =
``{"format": 1, "holder": ..., "versions": [{"version", "why", "until"}], "updated_at"}``;
``until`` (ISO-8601 UTC, or null = while the record exists) bounds each entry.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from engine.core import layout
from engine.core.errors import NotFoundError
from engine.core.storage import Store, join, json_bytes


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_retention(store: Store, index: str, holder: str, entries: Iterable[Mapping[str, Any]]) -> None:
    """Replace ``holder``'s record with ``entries`` (``version``, ``why``, optional ``until``).
    An empty list deletes the record: the holder needs nothing any more."""
    rows = [{"version": str(e["version"]), "why": str(e.get("why", holder)), "until": e.get("until")}
            for e in entries]
    key = layout.retention_key(index, holder)
    if not rows:
        store.delete(key)
        return
    store.write_bytes(key, json_bytes({"format": 1, "holder": holder, "versions": rows, "updated_at": time.time()}))


def retained_versions(store: Store, index: str, *, now: str | None = None) -> dict[str, str]:
    """version -> why, over every holder's record whose entry has not run out at ``now``."""
    now = now or _now_iso()
    prefix = join(layout.index_prefix(index), "retention")
    out: dict[str, str] = {}
    for key in sorted(store.list(prefix)):
        if not key.endswith(".json"):
            continue
        try:
            doc = json.loads(store.read_bytes(key))
        except (NotFoundError, json.JSONDecodeError):
            continue  # removed meanwhile, or half-written by a crashed holder: nothing to honour
        for row in doc.get("versions") or []:
            until = row.get("until")
            if row.get("version") and (not until or str(until) > now):
                out.setdefault(str(row["version"]), str(row.get("why") or doc.get("holder")))
    return out
