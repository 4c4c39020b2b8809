"""Garbage collection: delete only versions that no alias, retained history or retention record can reach."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.core import layout
from engine.core.errors import ConfigError, IntegrityError, NotFoundError
from engine.core.names import check_name
from engine.core.retention import retained_versions
from engine.core.storage import (
    Store,
    join,
)
from engine.publish.aliases import DEFAULT_GRACE_S, alias_history, list_aliases, read_alias
from engine.publish.status import versions_on_store

log = logging.getLogger(__name__)


@dataclass
class GcReport:
    index: str
    keep: int
    dry_run: bool
    deleted: list[dict[str, Any]] = field(default_factory=list)  # or "would delete" on a dry run
    kept: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _protected(store: Store, index: str, keep: int) -> tuple[dict[str, str], set[str]]:
    """(version -> why it is kept, versions ever named by any alias or history record)."""
    keep_why: dict[str, str] = {}
    ever: set[str] = set()
    for name in list_aliases(store, index):
        state = read_alias(store, index, name)
        assert state is not None
        for v in state.target.versions:
            keep_why.setdefault(v, f"alias {name} routes to it")
        if state.previous is not None:
            ever.update(state.previous.versions)
        history = alias_history(store, index, name)[::-1]  # newest first
        for i, rec in enumerate(history):
            named = [str(rec[k]) for k in ("from", "to") if rec.get(k)]
            for k in ("from_weighted", "to_weighted"):
                if rec.get(k):
                    named += [str(rec[k]["blue"]), str(rec[k]["green"])]
            ever.update(named)
            if i < keep:
                for v in named:
                    keep_why.setdefault(v, f"retained history of alias {name} (generation {rec.get('generation')})")
        ever.update(state.target.versions)
    # workflows above this layer (migrations keep blue and green) say what they need as records
    for v, why in retained_versions(store, index).items():
        keep_why.setdefault(v, why)
        ever.add(v)
    return keep_why, ever


def _build_activity(store: Store, index: str) -> dict[str, float]:
    """version id -> newest mtime under the build-state folder that names it (engine.index.build
    keeps ``indexes/<index>/builds/<key>/state.json`` with a ``version_id``)."""
    prefix = join(layout.index_prefix(index), "builds")
    folders: dict[str, list[Any]] = {}
    for info in store.list_info(prefix):
        folders.setdefault(info.key[len(prefix) + 1:].split("/", 1)[0], []).append(info)
    out: dict[str, float] = {}
    for key, infos in folders.items():
        try:
            state = store.read_json(join(prefix, key, "state.json"))
        except (NotFoundError, IntegrityError):
            continue
        vid = state.get("version_id") if isinstance(state, dict) else None
        if isinstance(vid, str):
            out[vid] = max(out.get(vid, 0.0), max(i.mtime for i in infos))
    return out


def gc_index(store: Store, index: str, *, keep: int, dry_run: bool = False, grace_s: float = DEFAULT_GRACE_S,
             now: float | None = None) -> GcReport:
    """Delete the versions of ``index`` that no alias and none of the ``keep`` newest history
    records of any alias can point to. Nothing else is ever deleted (no alias, no history).

    A version that no alias or history record has *ever* named may be a build or upload in
    progress: it is kept until its last activity is ``grace_s`` old (default one hour; 0
    removes crash leftovers at once). Activity is the newest object of the version, or of the
    index builder's state folder (``builds/<key>/``, whose ``state.json`` names the version:
    shard markers land there while a build runs). A dry run reports and deletes nothing.
    """
    check_name("index", index)
    if keep < 0:
        raise ConfigError(f"--keep must be >= 0, got {keep}")
    report = GcReport(index=index, keep=keep, dry_run=dry_run)
    now = time.time() if now is None else now
    versions = versions_on_store(store, index)
    keep_why, ever = _protected(store, index, keep)
    building = _build_activity(store, index)
    for vid in sorted(versions):
        objs = versions[vid]
        age = now - max([o.mtime for o in objs] + [building.get(vid, 0.0)])
        if vid in keep_why:
            report.kept.append({"version": vid, "why": keep_why[vid]})
            continue
        if vid not in ever and age < grace_s:
            report.kept.append({"version": vid, "why": f"never published and only {age:.0f}s old (grace "
                                                       f"{grace_s:.0f}s): may be a build in progress"})
            continue
        row = {"version": vid, "objects": len(objs), "bytes": sum(o.size for o in objs),
               "why": "no alias or retained history points to it" if vid in ever else
               "never published (an orphan upload or an abandoned build)"}
        if not dry_run:
            # Re-read right before deleting: an alias may have moved onto it since we looked.
            fresh_keep, _ = _protected(store, index, keep)
            if vid in fresh_keep:
                report.kept.append({"version": vid, "why": fresh_keep[vid]})
                continue
            prefix = layout.version_prefix(index, vid)
            # The manifest goes first: from here on the version is incomplete, and a
            # concurrent publish or searcher load of it fails verification instead of
            # serving a half-deleted version.
            store.delete(layout.version_manifest_key(index, vid))
            store.delete_prefix(prefix)
            log.info("gc: deleted %s/%s (%d objects)", index, vid, len(objs))
        report.deleted.append(row)
    return report
