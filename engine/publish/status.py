"""What an index holds: versions (complete or not, size, age), aliases, weights and history."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from engine.core import layout
from engine.core.errors import NotFoundError
from engine.core.names import check_name
from engine.core.storage import (
    Store,
    join,
)
from engine.publish.aliases import alias_history, list_aliases, read_alias

log = logging.getLogger(__name__)


def versions_on_store(store: Store, index: str) -> dict[str, list[Any]]:
    """version id -> its objects (ObjectInfo), from one listing."""
    prefix = join(layout.index_prefix(index), "versions")
    out: dict[str, list[Any]] = {}
    for info in store.list_info(prefix):
        rest = info.key[len(prefix) + 1:]
        vid = rest.split("/", 1)[0]
        out.setdefault(vid, []).append(info)
    return out


def index_status(store: Store, index: str, *, history_limit: int | None = 20,
                 calibration: Callable[[Store, str, str], Any] | None = None) -> dict[str, Any]:
    """Versions (complete or not, size, age, which aliases route to them), aliases (target,
    weights, generation) and each alias's history (newest first, at most ``history_limit``).
    ``calibration(store, index, version)``, when given, fills each complete version's
    ``calibration`` (the quality layer's staleness report; passed in, since it sits above)."""
    check_name("index", index)
    versions = versions_on_store(store, index)
    aliases: dict[str, Any] = {}
    routed: dict[str, list[str]] = {}
    for name in list_aliases(store, index):
        state = read_alias(store, index, name)
        assert state is not None
        history = alias_history(store, index, name)[::-1]
        if not history or int(history[0].get("generation", 0)) < state.generation:
            # A crash between the swap and its record: show the record the next publish or
            # rollback will write (status itself never writes).
            history.insert(0, {**state.history_record(), "recorded": False})
        aliases[name] = {**state.to_dict(), "history": history[:history_limit] if history_limit else history,
                         "history_count": len(history)}
        for v in state.target.versions:
            routed.setdefault(v, []).append(name)
    now = time.time()
    rows = []
    for vid in sorted(set(versions) | set(routed)):
        objs = versions.get(vid, [])
        complete = any(o.key == layout.version_manifest_key(index, vid) for o in objs)
        row: dict[str, Any] = {
            "version": vid, "complete": complete, "objects": len(objs), "bytes": sum(o.size for o in objs),
            "age_s": round(now - max((o.mtime for o in objs), default=now), 1), "aliases": sorted(routed.get(vid, [])),
        }
        if complete:
            try:
                m = store.read_json(layout.version_manifest_key(index, vid))
                row.update({k: m.get(k) for k in ("created_at", "kind", "dim", "metric", "parent_version")})
                model = m.get("model") or {}
                row["model"] = model.get("name") if isinstance(model, Mapping) else model
                if calibration is not None:
                    row["calibration"] = calibration(store, index, vid)
            except Exception as err:  # noqa: BLE001 - status reports, it does not fail
                row["error"] = str(err)
        elif vid in routed:
            row["error"] = "an alias routes here but the version has no manifest"
        rows.append(row)
    if not rows and not aliases:
        raise NotFoundError(f"index {index!r} has no versions and no aliases in {store.describe()}")
    return {"index": index, "store": store.describe(), "versions": rows, "aliases": aliases}
