"""Phase 4, calibrate: recalibrate similarity thresholds for green; refuse to go on without them."""

from __future__ import annotations

from typing import Any

from engine.core.errors import ConfigError, GateError
from engine.migrate.context import MigrationContext
from engine.migrate.evaluation import close_searcher
from engine.migrate.plan import MigrationPlan


def calibration_pairs(ctx: MigrationContext, plan: MigrationPlan,
                      green_searcher: Any | None = None) -> tuple[list[Any], str]:
    """The labelled pairs: the plan's file, else ``quality.make_pairs`` on the benchmark
    (judged relevant docs as positives; judged non-relevant docs, plus 5 unjudged docs from
    each query's top 20 on green, as negatives: the hard negatives a threshold for green
    must reject, under the pooling convention that unjudged means not relevant)."""
    from engine.quality.pairs import make_pairs, read_pairs

    if plan.pairs:
        return read_pairs(ctx.input_path("pairs") or plan.pairs), plan.pairs
    bench = ctx.benchmark()
    if bench is None:
        raise ConfigError("calibration needs labelled pairs: give --pairs (query, doc_id, relevant) or a "
                          "--benchmark to derive them from")
    pairs = make_pairs(bench, searcher=green_searcher, depth=20, unjudged_per_query=5 if green_searcher else 0)
    return pairs, (f"derived from benchmark {bench.benchmark_id} (+5 unjudged negatives per query from green's "
                   "top 20)")


def run_calibrate(ctx: MigrationContext) -> dict[str, Any]:
    from engine.quality import calibration
    from engine.quality.calibration_store import load_calibration

    doc = ctx.read()
    plan = ctx.plan
    green = doc["green"]["version"]
    searcher = ctx.tools.loader(ctx.store, ctx.index, green)
    try:
        pairs, source = calibration_pairs(ctx, plan, searcher)
        ctx.pause("calibrate.pairs")
        record = calibration.calibrate(ctx.store, ctx.index, green, pairs,
                                       calibration.CalibrationConfig(depth=max(100, 3 * plan.k)),
                                       searcher=searcher, pairs_source=source)
    finally:
        close_searcher(searcher)
    own = load_calibration(ctx.store, ctx.index, green, inherit=False)
    threshold = ((own or {}).get("absolute") or {}).get("threshold")
    if own is None or threshold is None:
        raise GateError(f"green ({green}) has no calibrated thresholds after calibration; refusing to roll it out "
                        "with blue's thresholds, which mean nothing for another model. Check the pairs")
    blue_cal = load_calibration(ctx.store, ctx.index, doc["blue"]["version"], inherit=True)
    a = record.get("absolute") or {}
    return {"calibration_id": record.get("calibration_id"), "threshold": a.get("threshold"),
            "precision": a.get("precision"), "recall": a.get("recall"), "f_beta": a.get("f_beta"),
            "pairs": len(pairs), "pairs_source": source,
            "blue_threshold": ((blue_cal or {}).get("absolute") or {}).get("threshold")}
