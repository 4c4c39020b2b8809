"""Phase 6, cutover: the alias serves green alone; blue is retained for instant rollback."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from engine.core.errors import ConflictError
from engine.migrate.context import MigrationContext
from engine.migrate.state import now_iso


def run_cutover(ctx: MigrationContext) -> dict[str, Any]:
    from engine.publish.aliases import publish_version

    doc = ctx.read()
    plan = ctx.plan
    blue, green = doc["blue"]["version"], doc["green"]["version"]
    alias = ctx.alias()
    if alias.target.weighted is None and alias.version == green:
        generation = alias.generation  # a rerun after a crash right after the swap
    else:
        t = alias.target
        if not (t.weighted is not None and t.weighted.blue == blue and t.weighted.green == green
                and float(t.weighted.green_weight) >= 100):
            raise ConflictError(f"cutover needs the alias at {blue} + {green} at 100% (the last rollout step); it "
                                f"is on {t.describe()}. Run `embedctl migrate rollout` first")
        res = publish_version(ctx.store, ctx.index, green, plan.alias, expect_current=blue,
                              reason=f"migration {ctx.migration_id}: cutover to {green} ({blue} retained "
                                     f"{plan.retention_s / 86400:g} days for rollback)")
        generation = res.generation
    ctx.pause("cutover.swapped")
    retain_until = datetime.fromtimestamp(time.time() + plan.retention_s,
                                          timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def done(d: dict[str, Any]) -> None:
        d["status"] = "cut_over"
        d["retain_until"] = retain_until
        d["cutover"] = {"at": now_iso(), "generation": generation}

    ctx.state.update(done, event={"event": "cutover", "generation": generation})
    ctx.say(f"cutover: {plan.alias} -> {green} (generation {generation}); {blue} is retained until "
            f"{retain_until} for `embedctl migrate rollback`")
    return {"version": green, "generation": generation, "retained": blue, "retain_until": retain_until}
