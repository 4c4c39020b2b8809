"""Rollback (any time: from a rollout step or after cutover) and abandon: the alias back on blue alone."""

from __future__ import annotations

import logging
from typing import Any

from engine.core.errors import ConfigError, ConflictError
from engine.migrate.context import MigrationContext
from engine.migrate.state import PHASES, now_iso

log = logging.getLogger(__name__)


def _move_alias_back(ctx: MigrationContext, doc: dict[str, Any], reason: str) -> tuple[str, int, bool]:
    """Put the alias on blue alone if this migration moved it; (before, generation, changed)."""
    from engine.publish.aliases import rollback_alias

    blue = doc["blue"]["version"]
    green = (doc.get("green") or {}).get("version")
    alias = ctx.alias()
    before = alias.target.describe()
    if alias.target.weighted is None and alias.version == blue:
        return before, alias.generation, False
    ours = alias.target.versions == [green] or (alias.target.weighted is not None and
                                                 alias.target.weighted.blue == blue and
                                                 alias.target.weighted.green == green)
    if not ours:
        raise ConflictError(f"alias {doc['alias']} is on {before}, which this migration did not put there; "
                            "refusing to move it. Use `embedctl rollback` if you mean it")
    if doc.get("retain_until") and doc["retain_until"] < now_iso()[:20]:
        log.warning("rolling back after the retention period (%s): %s may have been garbage-collected",
                    doc["retain_until"], blue)
    res = rollback_alias(ctx.store, ctx.index, doc["alias"], to=blue, expect_current=alias.version,
                         reason=f"migration {ctx.migration_id}: {reason}")
    return before, res.generation, res.changed


def rollback_to_blue(ctx: MigrationContext, reason: str, *, automatic: bool) -> dict[str, Any]:
    """Put the alias back on blue alone and mark the migration rolled back (``migrate rollout``
    may retry it later)."""
    doc = ctx.read()
    if not doc.get("blue"):
        raise ConfigError(f"migration {ctx.migration_id} has no baseline yet: the alias was never touched")
    blue = doc["blue"]["version"]
    before, generation, changed = _move_alias_back(ctx, doc, reason)
    at = now_iso()

    def mark(d: dict[str, Any]) -> None:
        d["status"] = "rolled_back"
        d["rollback"] = {"at": at, "reason": reason, "from": before, "generation": generation,
                         "automatic": automatic}
        for p in ("rollout", "cutover"):
            if d["phases"][p]["status"] in ("done", "running"):
                d["phases"][p]["status"] = "pending"
        d["phase"] = next((q for q in PHASES if d["phases"][q]["status"] != "done"), None)
        d["rollout"]["weight"] = 0
        d["retain_until"] = None

    ctx.state.update(mark, event={"event": "rollback", "reason": reason, "from": before})
    ctx.say(f"rollback: {doc['alias']} {before} -> {blue} (generation {generation}): {reason}")
    return {"version": blue, "from": before, "generation": generation, "changed": changed, "reason": reason}


def abandon(ctx: MigrationContext, reason: str | None) -> dict[str, Any]:
    """Give the migration up: only while the alias serves blue alone (roll back first). Its green
    version stops being protected from gc; the state stays as a record."""
    doc = ctx.read()
    if doc.get("blue"):
        alias = ctx.alias()
        if alias.target.weighted is not None or alias.version != doc["blue"]["version"]:
            raise ConflictError(f"alias {doc['alias']} is on {alias.target.describe()}, not blue "
                                f"({doc['blue']['version']}) alone: run `embedctl migrate rollback` first")

    def mark(d: dict[str, Any]) -> None:
        d["status"] = "abandoned"
        d["phase"] = None
        d["abandoned"] = {"at": now_iso(), "reason": reason, "by": ctx.by}

    ctx.state.update(mark, event={"event": "abandoned", "reason": reason})
    ctx.say(f"migration {ctx.migration_id} abandoned" + (f": {reason}" if reason else ""))
    return {"migration_id": ctx.migration_id, "status": "abandoned", "reason": reason}
