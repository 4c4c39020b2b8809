"""Canaries: known-good queries against an alias, their statistics, the baseline comparison, the gate and Prometheus output."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.errors import ConfigError, GateError, SchemaError
from engine.core.storage import Store
from engine.index.hits import doc_scores
from engine.quality.benchmark import load_benchmark, looks_like_benchmark
from engine.quality.calibration_store import calibration_status, load_calibration
from engine.quality.records import pick, read_records
from engine.quality.reports import delta, now_iso, prometheus_text, score_distribution
from engine.quality.scoring import Loader, close_searcher, open_searcher, search_all
from engine.quality.thresholds import Thresholds

log = logging.getLogger(__name__)

CANARY_FORMAT = 1


@dataclass(frozen=True)
class Canary:
    """A known-good query and the doc ids any of which counts as a correct answer."""

    query: str
    expected: tuple[str, ...]
    id: str = ""


def read_canaries(path: str | os.PathLike[str]) -> list[Canary]:
    """A canary set: rows with ``query`` and ``doc_id`` (or ``expected``: a list), optional ``id``;
    rows sharing a query are merged. A benchmark file works too (its relevant docs are expected)."""
    p = Path(path)
    if p.suffix in (".json", ".gz") and looks_like_benchmark(p):
        bench = load_benchmark(p)
        return [Canary(q["text"], tuple(sorted(bench.relevant(q["query_id"]))), q["query_id"])
                for q in bench.queries if bench.relevant(q["query_id"])]
    merged: dict[str, tuple[str, list[str]]] = {}
    for i, row in enumerate(read_records(p), 1):
        where = f"{p} row {i}"
        q = str(pick(row, ("query", "text"), "query text", where))
        exp = row.get("expected")
        if exp is None:
            exp = [pick(row, ("doc_id", "expected_doc", "docid"), "expected doc id", where)]
        elif isinstance(exp, str):
            exp = [e for e in exp.split("|") if e]
        cid = str(row.get("id") or row.get("query_id") or q)
        entry = merged.setdefault(q, (cid, []))
        entry[1].extend(str(e) for e in exp if str(e) not in entry[1])
    if not merged:
        raise SchemaError(f"{p} holds no canaries")
    return [Canary(q, tuple(docs), cid) for q, (cid, docs) in merged.items()]


@dataclass(frozen=True)
class CanaryLimits:
    """When a canary fails. Drops are absolute differences against the baseline report."""

    max_recall_drop: float = 0.05
    max_mrr_drop: float = 0.05
    max_score_drop: float = 0.05  # mean top-1 score
    max_empty_rate_increase: float = 0.05
    min_recall: float | None = None  # absolute floor, checked with or without a baseline


def canary_stats(canaries: Sequence[Canary], rankings: Sequence[Sequence[tuple[str, float]]], k: int,
                 thresholds: Thresholds | None = None) -> dict[str, Any]:
    """Recall@k, MRR@k, hit rate, top-k and top-1 score distributions and the empty-result rate
    under ``thresholds``, from each canary's document ranking (``doc_scores``; best first)."""
    from engine.quality import metrics
    if len(canaries) != len(rankings):
        raise ValueError(f"{len(canaries)} canaries but {len(rankings)} rankings")
    recalls: list[float] = []
    rrs: list[float] = []
    hits: list[float] = []
    topk_scores: list[float] = []
    top1: list[float] = []
    empty = kept_recall_n = 0
    misses: list[dict[str, Any]] = []
    for c, ranking in zip(canaries, rankings, strict=True):
        docs = [d for d, _ in ranking[:k]]
        expected = set(c.expected)
        gains = {d: 1.0 for d in expected}
        recalls.append(metrics.recall_at_k(docs, gains, k))
        rrs.append(metrics.mrr_at_k(docs, gains, k))
        found = bool(expected & set(docs))
        hits.append(1.0 if found else 0.0)
        topk_scores.extend(s for _, s in ranking[:k])
        if ranking:
            top1.append(ranking[0][1])
        kept = ranking[:k]
        if thresholds is not None and ranking:
            cut = thresholds.cutoff(ranking[0][1])
            kept = [(d, s) for d, s in ranking[:k] if s >= cut]
        if not kept:
            empty += 1
        kept_recall_n += bool(expected & {d for d, _ in kept})
        if not found:
            misses.append({"id": c.id, "query": c.query, "expected": list(c.expected), "got": docs[:3]})
    n = len(canaries)
    return {
        "canaries": n, "k": k,
        f"recall@{k}": round(float(np.mean(recalls)), 6) if n else None,
        f"hit_rate@{k}": round(float(np.mean(hits)), 6) if n else None,
        f"mrr@{k}": round(float(np.mean(rrs)), 6) if n else None,
        "topk_scores": score_distribution(topk_scores),
        "top1_scores": score_distribution(top1),
        "empty_rate": round(empty / n, 6) if n else None,
        "hit_rate_under_threshold": round(kept_recall_n / n, 6) if n else None,
        "thresholds": None if thresholds is None else {**asdict(thresholds)},
        "misses": misses[:20],
        "missed": len(misses),
    }


def compare_canary(current: Mapping[str, Any], baseline: Mapping[str, Any] | None,
                   limits: CanaryLimits) -> tuple[dict[str, Any], list[str]]:
    """Differences to the baseline stats (current - baseline) and the failures they cause."""
    k = current["k"]
    failures: list[str] = []
    rkey, mkey = f"recall@{k}", f"mrr@{k}"
    if limits.min_recall is not None and (current[rkey] or 0.0) < limits.min_recall:
        failures.append(f"{rkey} {current[rkey]:.4f} is below the minimum {limits.min_recall:.4f}")
    if baseline is None:
        return {}, failures
    if baseline.get("k") != k:
        raise ConfigError(f"the baseline was measured at k={baseline.get('k')}, this run at k={k}; use the same --k")
    diff = {
        rkey: delta(current.get(rkey), baseline.get(rkey)),
        mkey: delta(current.get(mkey), baseline.get(mkey)),
        "top1_mean": delta(current["top1_scores"]["mean"], baseline["top1_scores"]["mean"]),
        "topk_mean": delta(current["topk_scores"]["mean"], baseline["topk_scores"]["mean"]),
        "topk_median": delta(current["topk_scores"]["median"], baseline["topk_scores"]["median"]),
        "empty_rate": delta(current.get("empty_rate"), baseline.get("empty_rate")),
    }
    checks = [(rkey, -limits.max_recall_drop, "dropped"), (mkey, -limits.max_mrr_drop, "dropped"),
              ("top1_mean", -limits.max_score_drop, "dropped")]
    for key, limit, verb in checks:
        d = diff[key]
        if d is not None and d < limit - 1e-12:
            failures.append(f"{key} {verb} by {-d:.4f} (limit {-limit:.4f}) against the baseline")
    d = diff["empty_rate"]
    if d is not None and d > limits.max_empty_rate_increase + 1e-12:
        failures.append(f"empty-result rate rose by {d:.4f} (limit {limits.max_empty_rate_increase:.4f})")
    return diff, failures


def _alias_versions(store: Store, index: str, alias: str, version: str | None) -> tuple[list[str], dict[str, Any]]:
    if version:
        return [version], {"version": version, "weighted": None}
    from engine.publish.aliases import read_alias

    state = read_alias(store, index, alias)
    assert state is not None
    return state.target.versions, state.target.to_dict()


def _baseline_stats(baseline: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The stats block of a baseline report (its first version's), or a bare stats block."""
    if baseline is None:
        return None
    if baseline.get("kind") == "canary":
        return baseline["versions"][0]["stats"]
    if "k" in baseline and "top1_scores" in baseline:
        return baseline
    raise SchemaError("the baseline is not a canary report (expected the JSON `embedctl canary` writes)")


def run_canary(store: Store, index: str, canaries: Sequence[Canary], *, alias: str = "live", version: str | None = None,
               k: int = 10, baseline: Mapping[str, Any] | None = None, limits: CanaryLimits = CanaryLimits(),
               loader: Loader | None = None, use_thresholds: bool = True) -> dict[str, Any]:
    """Run the canary set against every version the alias routes to (both, during a weighted
    rollout). Returns the report; ``report["passed"]`` is False when any version fails."""
    if k < 1:
        raise ConfigError(f"--k must be >= 1, got {k}")
    if not canaries:
        raise SchemaError("the canary set is empty")
    versions, target = _alias_versions(store, index, alias, version)
    base = _baseline_stats(baseline)
    results = []
    for v in versions:
        searcher = open_searcher(store, index, v, loader)
        try:
            rankings = [doc_scores(r) for r in search_all(searcher, [c.query for c in canaries], k)]
        finally:
            close_searcher(searcher)
        th = None
        cal: dict[str, Any] = {"calibrated": False}
        warnings: list[str] = []
        if use_thresholds:
            # the thresholds `search --threshold auto` would apply: none when they no longer fit
            cal = calibration_status(store, index, v)
            rec = load_calibration(store, index, v)
            if rec is not None and not cal["needs_recalibration"]:
                th = Thresholds.from_calibration(rec)
            else:
                warnings.append("no calibration fits this version (" + "; ".join(cal["reasons"]) +
                                "): the empty-result rate is about raw hits; recalibrate")
        stats = canary_stats(canaries, rankings, k, th)
        diff, failures = compare_canary(stats, base, limits)
        results.append({"version": v, "stats": stats, "baseline_diff": diff, "failures": failures,
                        "passed": not failures, "warnings": warnings,
                        "calibration": {key: cal.get(key) for key in ("calibrated", "calibration_id", "calibrated_on",
                                                                      "needs_recalibration")}})
    return {"format": CANARY_FORMAT, "kind": "canary", "index": index, "alias": None if version else alias,
            "target": target, "created_at": now_iso(), "k": k, "limits": asdict(limits),
            "baseline": None if base is None else {
                "created_at": (baseline or {}).get("created_at"),
                "version": ((baseline or {}).get("versions") or [{}])[0].get("version")},
            "passed": all(r["passed"] for r in results), "versions": results}


def canary_gate(report: Mapping[str, Any]) -> None:
    """Raise GateError (exit 7) when the canary report failed."""
    if report["passed"]:
        return
    lines = [f"{r['version']}: {f}" for r in report["versions"] for f in r["failures"]]
    raise GateError(f"canary failed on {report['index']}" + (f"/{report['alias']}" if report.get("alias") else "") +
                    ": " + "; ".join(lines))


def canary_prometheus(report: Mapping[str, Any]) -> str:
    k = report["k"]
    ts = datetime.strptime(report["created_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    samples: list[tuple[str, str, Mapping[str, Any], float | None]] = []
    for r in report["versions"]:
        st = r["stats"]
        lab = {"index": report["index"], "alias": report.get("alias") or "", "version": r["version"]}
        labk = {**lab, "k": k}
        samples += [
            ("embedctl_canary_recall", "Canary recall@k (share of expected docs in the top k).", labk,
             st[f"recall@{k}"]),
            ("embedctl_canary_mrr", "Canary mean reciprocal rank within the top k.", labk, st[f"mrr@{k}"]),
            ("embedctl_canary_hit_rate", "Share of canaries with an expected doc in the top k.", labk,
             st[f"hit_rate@{k}"]),
            ("embedctl_canary_empty_rate", "Share of canaries with no result under the stored threshold.", lab,
             st["empty_rate"]),
        ]
        for q in ("mean", "median", "p5", "p95"):
            samples.append(("embedctl_canary_topk_score", "Top-k score distribution of canary queries.",
                            {**labk, "stat": q}, st["topk_scores"][q]))
            samples.append(("embedctl_canary_top1_score", "Top-1 score distribution of canary queries.",
                            {**lab, "stat": q}, st["top1_scores"][q]))
        samples.append(("embedctl_canary_passed", "1 if the canary passed its limits, else 0.", lab,
                        float(r["passed"])))
        samples.append(("embedctl_canary_queries", "Number of canary queries.", lab, float(st["canaries"])))
    samples.append(("embedctl_canary_last_run_timestamp_seconds", "When the canary ran (unix time).",
                    {"index": report["index"], "alias": report.get("alias") or ""}, ts))
    return prometheus_text(samples)
