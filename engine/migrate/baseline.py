"""Phase 1, baseline: evaluate the live (blue) version on the benchmark and canaries and store the figures."""

from __future__ import annotations

from typing import Any

from engine.core import layout
from engine.core.errors import ConflictError
from engine.migrate.context import MigrationContext
from engine.migrate.evaluation import (
    benchmark_metrics,
    canary_figures,
    close_searcher,
    doc_rankings,
    search_hits,
    version_facts,
)
from engine.migrate.state import now_iso


def blue_version(ctx: MigrationContext, doc: dict[str, Any]) -> str:
    """The version the alias serves alone (a rerun: the one recorded, which must still be live)."""
    alias = ctx.alias()
    if doc.get("blue"):
        blue = str(doc["blue"]["version"])
        if alias.version != blue or (alias.weighted and alias.weighted.blue != blue):
            raise ConflictError(f"alias {doc['alias']} moved from {blue} to {alias.target.describe()} since this "
                                "migration's baseline; its figures no longer describe what is live. Start a new "
                                "migration (--migration NEW_ID)")
        return blue
    if alias.weighted is not None:
        raise ConflictError(f"alias {doc['alias']} of {ctx.index} is in a weighted rollout "
                            f"({alias.target.describe()}); finish or roll back that one first")
    return str(alias.version)


def run_baseline(ctx: MigrationContext) -> dict[str, Any]:
    doc = ctx.read()
    plan = ctx.plan
    blue = blue_version(ctx, doc)
    facts = version_facts(ctx.store.read_json(layout.version_manifest_key(ctx.index, blue)))
    ctx.state.update(lambda d: d.update(blue=facts))
    ctx.say(f"baseline: blue is {blue} ({facts['model'].get('name')}, {facts['dim']} dims)")
    bench = ctx.benchmark()
    canaries = ctx.canaries(bench)
    searcher = ctx.tools.loader(ctx.store, ctx.index, blue)
    try:
        out: dict[str, Any] = {"version": blue, "k": plan.k, "created_at": now_iso()}
        if bench is not None:
            judged = bench.judged_queries()
            hits = doc_rankings(search_hits(searcher, [q["text"] for q in judged], plan.k), plan.k)
            rankings = {q["query_id"]: [d for d, _ in h] for q, h in zip(judged, hits, strict=True)}
            means, _per = benchmark_metrics(bench, rankings, plan.k)
            out["benchmark"] = {"name": bench.name, "benchmark_id": bench.benchmark_id,
                                "queries": len(judged), "metrics": means}
        ctx.pause("baseline.searched")
        if canaries:
            hits = search_hits(searcher, [c.query for c in canaries], plan.k)
            out["canary"] = canary_figures(canaries, doc_rankings(hits, plan.k), plan.k)
    finally:
        close_searcher(searcher)
    from engine.quality.calibration_store import load_calibration

    out["calibration"] = load_calibration(ctx.store, ctx.index, blue, inherit=True)
    ctx.store.write_json(ctx.key("baseline.json"), out)
    return {"version": blue, "benchmark": (out.get("benchmark") or {}).get("metrics"),
            "canary_recall": (out.get("canary") or {}).get("canary_recall"),
            "calibrated": out["calibration"] is not None}
