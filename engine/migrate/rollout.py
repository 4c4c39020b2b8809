"""Phase 5, rollout: weighted alias steps to green, each gated; a failed gate rolls back to blue by itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.core.errors import ConflictError, GateError
from engine.migrate.context import MigrationContext
from engine.migrate.gates import check_step, fmt_num
from engine.migrate.plan import check_weights
from engine.migrate.rollback import rollback_to_blue
from engine.migrate.state import now_iso


def _start(ctx: MigrationContext, steps: Sequence[float]) -> float:
    """Record the steps; returns the weight already passed (0 after a rollback: start again)."""
    doc = ctx.read()
    passed = [s for s in doc["rollout"]["steps"] if s.get("status") == "passed"]
    done_weight = max((float(s["weight"]) for s in passed), default=0.0)
    if doc["status"] == "rolled_back":
        done_weight = 0.0  # a rolled-back rollout starts again from its first step

    def set_weights(d: dict[str, Any]) -> None:
        d["rollout"]["weights"] = list(steps)
        if d["status"] == "rolled_back":
            d["status"] = "running"
            for s in d["rollout"]["steps"]:
                if s.get("status") in ("passed", "checking", "publishing"):
                    s["status"] = "superseded"

    ctx.state.update(set_weights, event={"event": "rollout", "weights": list(steps)})
    return done_weight


def _begin_step(ctx: MigrationContext, w: float) -> None:
    at = now_iso()

    def publishing(d: dict[str, Any]) -> None:
        live = [s for s in d["rollout"]["steps"] if s.get("weight") == w and s["status"] in ("publishing", "checking")]
        if live:
            live[-1]["attempts"] = int(live[-1].get("attempts", 1)) + 1
        else:
            d["rollout"]["steps"].append({"weight": w, "status": "publishing", "started_at": at, "attempts": 1})

    ctx.state.update(publishing, event={"event": "rollout-step", "weight": w})


def update_step(ctx: MigrationContext, weight: float, **fields_: Any) -> None:
    def change(d: dict[str, Any]) -> None:
        for s in reversed(d["rollout"]["steps"]):
            if s.get("weight") == weight and s.get("status") != "superseded":
                s.update(fields_)
                return

    ctx.state.update(change)


def expect_alias_in_rollout(ctx: MigrationContext, blue: str, green: str) -> None:
    """The alias must be where this migration left it: blue alone, or blue + green."""
    alias = ctx.alias()
    t = alias.target
    if t.weighted is None and t.version == blue:
        return
    if t.weighted is not None and t.weighted.blue == blue and t.weighted.green == green:
        return
    raise ConflictError(f"alias {alias.alias} of {ctx.index} is on {t.describe()}, not {blue} (+ {green}) as this "
                        "migration left it: someone else moved it. Nothing was changed; check `embedctl status "
                        f"--index {ctx.index}` and roll back or start a new migration")


def _step(ctx: MigrationContext, w: float, doc: dict[str, Any], baseline: dict[str, Any]) -> None:
    """Publish one weighted step and check its gates; a failure rolls back and raises GateError."""
    from engine.publish.aliases import publish_version

    plan = ctx.plan
    blue, green = doc["blue"]["version"], doc["green"]["version"]
    expect_alias_in_rollout(ctx, blue, green)
    _begin_step(ctx, w)
    res = publish_version(ctx.store, ctx.index, green, plan.alias, weighted={"blue": blue, "green_weight": w},
                          expect_current=blue,
                          reason=f"migration {ctx.migration_id}: rollout step {w:g}% of query keys to {green}")
    update_step(ctx, w, status="checking", generation=res.generation)
    ctx.say(f"rollout: alias {plan.alias} -> {blue} + {green} at {w:g}% (generation {res.generation}); "
            "checking canaries and gates")
    ctx.pause(f"rollout.step-{w:g}")
    gates, failures = check_step(ctx, plan, doc, baseline, w, res.generation)
    if failures:
        reason = f"rollout step {w:g}% failed its gates: " + "; ".join(failures)
        update_step(ctx, w, status="failed", gates=gates, failures=failures, finished_at=now_iso())
        rollback_to_blue(ctx, reason, automatic=True)
        raise GateError(f"migration {ctx.migration_id}: {reason}. The alias is back on {blue}")
    update_step(ctx, w, status="passed", gates=gates, failures=[], finished_at=now_iso())
    ctx.state.update(lambda d: d["rollout"].update(weight=w))
    ctx.say(f"rollout: step {w:g}% passed (green canary recall {fmt_num(gates.get('green_recall'))}, "
            f"error rate {fmt_num(gates.get('error_rate'))} over {gates.get('queries')} queries)")


def run_rollout(ctx: MigrationContext, weights: Sequence[float] | None = None) -> dict[str, Any]:
    """Run (or continue) the weighted rollout; ``weights`` overrides the plan's steps."""
    steps = check_weights(weights) if weights is not None else ctx.plan.weights
    done_weight = _start(ctx, steps)
    doc = ctx.read()
    baseline = ctx.read_optional("baseline.json") or {}
    for w in steps:
        if w > done_weight:
            _step(ctx, w, doc, baseline)
    final = ctx.read()["rollout"]
    return {"weights": list(steps), "weight": final.get("weight"),
            "steps": [{k: s.get(k) for k in ("weight", "status", "generation")} for s in final["steps"]
                      if s.get("status") != "superseded"]}
