"""Phase 3, compare: dual-run the query set on blue and green, store the figures and the queries that disagree most."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from engine.migrate.compare_metrics import QueryComparison, compare_query, summarize_comparisons
from engine.migrate.context import MigrationContext
from engine.migrate.evaluation import (
    benchmark_metrics,
    canary_figures,
    close_searcher,
    doc_rankings,
    doc_titles,
    search_hits,
)
from engine.migrate.state import now_iso

SHOWN_PER_SIDE = 5  # documents of each side shown for a disagreeing query


def _search_both(ctx: MigrationContext, versions: Mapping[str, str], queries: Sequence[Mapping[str, Any]],
                 canaries: Sequence[Any], k: int) -> tuple[dict[str, list[list[Any]]], dict[str, Any]]:
    """Chunk hits per side for the queries, and doc rankings per side for the canaries. One side
    at a time: each searcher (and its model) is loaded, used and closed in turn."""
    results: dict[str, list[list[Any]]] = {}
    canary_rankings: dict[str, Any] = {}
    for side, version in versions.items():
        searcher = ctx.tools.loader(ctx.store, ctx.index, version)
        try:
            # Canaries are often the benchmark's own queries: embed each distinct text once.
            texts = list(dict.fromkeys([str(q["text"]) for q in queries] + [c.query for c in canaries]))
            by_text = dict(zip(texts, search_hits(searcher, texts, k), strict=True))
            results[side] = [by_text[str(q["text"])] for q in queries]
            if canaries:
                canary_rankings[side] = doc_rankings([by_text[c.query] for c in canaries], k)
        finally:
            close_searcher(searcher)
        ctx.pause(f"compare.searched-{side}")
    return results, canary_rankings


def _side(r: QueryComparison, side: str) -> list[tuple[str, float]]:
    return r.blue if side == "blue" else r.green


def run_compare(ctx: MigrationContext) -> dict[str, Any]:
    doc = ctx.read()
    plan = ctx.plan
    k = plan.k
    bench = ctx.benchmark()
    queries = ctx.queries(bench)
    canaries = ctx.canaries(bench)
    versions = {"blue": doc["blue"]["version"], "green": doc["green"]["version"]}
    out: dict[str, Any] = {"k": k, **versions, "created_at": now_iso()}
    results, canary_rankings = _search_both(ctx, versions, queries, canaries, k)
    rows = [compare_query(str(q["query_id"]), str(q["text"]), b, g, k)
            for q, b, g in zip(queries, results["blue"], results["green"], strict=True)]
    summary = summarize_comparisons(rows, k)
    out["summary"] = summary
    per_ndcg: dict[str, dict[str, dict[str, float]]] = {}
    if bench is not None:
        means = {}
        for side in ("blue", "green"):
            rankings = {r.query_id: [d for d, _ in _side(r, side)] for r in rows}
            means[side], per_ndcg[side] = benchmark_metrics(bench, rankings, k)
        out["benchmark"] = {"name": bench.name, "benchmark_id": bench.benchmark_id,
                            "queries": len(bench.judged_queries()), **means}
    if canaries:
        out["canary"] = canary_figures(canaries, canary_rankings["green"], k)
        out["canary_blue"] = canary_figures(canaries, canary_rankings["blue"], k)
    out["scores"] = {}  # histogram inputs: each query's top-1 score, and every top-k score
    for side in ("blue", "green"):
        ranked = [_side(r, side) for r in rows]
        out["scores"][side] = {"top1": [round(x[0][1], 5) for x in ranked if x],
                               "topk": [round(sc, 5) for x in ranked for _, sc in x]}
    out["per_query"] = {"query_id": [r.query_id for r in rows], "jaccard": [r.jaccard[k] for r in rows],
                        "overlap": [r.overlap[k] for r in rows], "top1_agree": [r.top1_agree for r in rows],
                        "spearman": [r.spearman for r in rows], "kendall": [r.kendall for r in rows]}
    out["disagreements"] = disagreements(ctx, rows, bench, per_ndcg, k, plan.disagreements, doc)
    ctx.store.write_json(ctx.key("compare.json"), out)
    result = {"queries": summary["queries"], f"overlap@{k}": summary["overlap_at_k"][str(k)],
              f"jaccard@{k}": summary["jaccard_at_k"][str(k)], "top1_agreement": summary["top1_agreement"],
              "spearman": summary["spearman"], "kendall": summary["kendall"],
              "ks_top1": summary["score_shift"]["top1"]["ks"]["statistic"],
              "mean_top1_delta": summary["score_shift"]["top1"]["delta"]["mean"],
              "report": ctx.store.describe(ctx.key("report.html"))}
    if bench is not None:
        result["benchmark"] = {side: out["benchmark"][side] for side in ("blue", "green")}
    return result


def disagreements(ctx: MigrationContext, rows: Sequence[QueryComparison], bench: Any | None,
                  per_ndcg: Mapping[str, Mapping[str, Mapping[str, float]]], k: int, limit: int,
                  doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``limit`` queries that disagree most, each side's top documents with titles and
    whether the benchmark judged them relevant."""
    worst = sorted(rows, key=lambda r: (-r.disagreement, r.query_id))[:limit]
    docs = {d for r in worst for d, _ in (r.blue[:SHOWN_PER_SIDE] + r.green[:SHOWN_PER_SIDE])}
    titles = doc_titles(ctx.store, (doc.get("green") or {}).get("run_id"), docs)
    if len(titles) < len(docs):
        titles = {**doc_titles(ctx.store, (doc.get("blue") or {}).get("source_run"), docs - set(titles)), **titles}
    out = []
    for r in worst:
        relevant = bench.relevant(r.query_id) if bench is not None else set()
        item: dict[str, Any] = {
            "query_id": r.query_id, "text": r.text, "disagreement": r.disagreement, "jaccard": r.jaccard[k],
            "overlap": r.overlap[k], "top1_agree": r.top1_agree, "spearman": r.spearman, "kendall": r.kendall,
        }
        for side in ("blue", "green"):
            item[side] = [{"doc_id": d, "score": round(s, 5), "title": titles.get(d), "relevant": d in relevant}
                          for d, s in _side(r, side)[:SHOWN_PER_SIDE]]
            m = (per_ndcg.get(side) or {}).get(r.query_id)
            item[f"ndcg_{side}"] = None if m is None else m.get(f"ndcg@{k}")
        out.append(item)
    return out
