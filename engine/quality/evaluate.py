"""Evaluation: recall@k, MRR@k and graded nDCG@k of an index version on judged queries, beside exact search.

``evaluate_version`` embeds the queries with the version's model, searches the index (chunks
collapsed to documents: best chunk per document, since judgments are per document), and runs
exact inner-product search over the *same vectors* (the version's source run), so the cost of
the index's approximation shows as the difference between the two. Per-query results go to a
JSON-lines file.

Inputs are read by ``engine.quality.judgments`` (queries JSONL ``{"query_id", "text"}``, qrels
``query_id  doc_id  grade`` with a header, TREC qrels, CSV or Parquet). How grades become gains
is a named mapping (``judgments.GAINS``); the default ``cranfield`` follows the Cranfield
collection, where grade 1 is the best (complete answer) and 4 the least (minimum interest), -1
judged non-relevant: gain = 5 - grade for grades 1..4, else 0.

The steps: ``search_index`` (the version's own ranking), ``search_exact`` (the same vectors,
searched exactly), ``score_rankings`` (per-query metrics of each side) and ``summarize``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.core.errors import ConfigError, SchemaError
from engine.index.hits import doc_ids_of_rows
from engine.index.recall import knn_recall
from engine.quality.judgments import Query, load_qrels, load_queries
from engine.quality.metrics import mean_metrics, query_metrics

if TYPE_CHECKING:
    from engine.core.storage import Store
    from engine.index.searcher import Searcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    k: int = 10
    gain: str = "cranfield"
    exact: bool = True  # also run exact search over the version's source vectors
    nprobe: int | None = None
    rescore_multiplier: int | None = None
    batch: int = 256


def exact_doc_rankings(queries: np.ndarray, vectors: np.ndarray, doc_ids: Sequence[str], k: int,
                       ) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
    """Exact search: per query the top-``k`` documents, plus chunk-level (scores, row ids) [q, depth]."""
    from engine.index.faiss_ops import exact_topk

    n_docs = len(set(doc_ids))
    depth = len(doc_ids) if n_docs <= k else min(len(doc_ids), k * 8)
    while True:
        scores, rows = exact_topk(queries, vectors, np.arange(len(vectors), dtype=np.int64), max(depth, 1))
        ranked = [doc_ids_of_rows(r.tolist(), doc_ids, k) for r in rows]
        if depth >= len(doc_ids) or all(len(r) >= min(k, n_docs) for r in ranked):
            return ranked, scores, rows
        depth = min(len(doc_ids), depth * 4)


@dataclass
class Side:
    """One side of an evaluation (the index, or exact search): per query its ranked doc ids."""

    docs: list[list[str]]  # [n_queries][<= k] doc ids, best first
    scores: list[list[float]] | None = None  # [n_queries][<= k] the docs' scores, when kept per query
    seconds: float = 0.0
    chunk_recall: np.ndarray | None = None  # [n_queries] chunk-level recall@k against exact search


def search_index(searcher: Searcher, qv: np.ndarray, cfg: EvalConfig) -> Side:
    """The version's own top-``k`` documents per query (one hit per document), in batches."""
    t0 = time.perf_counter()
    hits: list[Any] = []
    for i in range(0, len(qv), cfg.batch):
        hits += searcher.search_vectors(qv[i:i + cfg.batch], cfg.k, nprobe=cfg.nprobe,
                                        rescore_multiplier=cfg.rescore_multiplier, collapse_docs=True)
    return Side(docs=[[h.doc_id for h in r] for r in hits], scores=[[round(h.score, 6) for h in r] for r in hits],
                seconds=time.perf_counter() - t0)


def search_exact(searcher: Searcher, store: Store | None, qv: np.ndarray, cfg: EvalConfig) -> Side:
    """Exact search over the version's source vectors, and the index's chunk-level recall against it."""
    from engine.index.runs import read_run_vectors

    if store is None:
        raise ConfigError("exact search needs the store holding the version's source run")
    run_id = searcher.manifest.get("source_run")
    if not run_id:
        raise SchemaError(f"version {searcher.version_id} records no source run; use --no-exact")
    t0 = time.perf_counter()
    vectors, _chunk_ids, doc_ids = read_run_vectors(store, str(run_id))
    docs, ex_scores, ex_rows = exact_doc_rankings(qv, vectors, doc_ids, cfg.k)
    # Chunk-level recall@k of the index against exact search (rows are global ids).
    _, found = searcher.search_ids(qv, cfg.k, nprobe=cfg.nprobe, rescore_multiplier=cfg.rescore_multiplier)
    recall = knn_recall(found, ex_rows, ex_scores, cfg.k) if len(vectors) else np.ones(len(qv))
    return Side(docs=docs, seconds=time.perf_counter() - t0, chunk_recall=recall)


def score_rankings(queries: Sequence[Query], qrels: Mapping[str, Mapping[str, float]], sides: Mapping[str, Side],
                   k: int) -> tuple[dict[str, list[dict[str, float]]], list[dict[str, Any]], int]:
    """Per-query metrics of each side: (metric rows per side, per-query records, queries skipped).
    A query with no relevant judged document is skipped (and counted)."""
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    per_query: list[dict[str, Any]] = []
    skipped = 0
    for n, q in enumerate(queries):
        gains = qrels.get(q.query_id, {})
        rec: dict[str, Any] = {"query_id": q.query_id, "text": q.text, "relevant": len(gains)}
        per_query.append(rec)
        if not gains:
            skipped += 1
            rec["skipped"] = "no relevant documents judged"
            continue
        for name, side in sides.items():
            m = query_metrics(side.docs[n], gains, k)
            rows[name].append(m)
            rec[name] = {**m, "docs": side.docs[n]}
            if side.scores is not None:
                rec[name]["scores"] = side.scores[n]
            if side.chunk_recall is not None:
                rec[f"recall_vs_exact@{k}"] = float(side.chunk_recall[n])
    return rows, per_query, skipped


def summarize(searcher: Searcher, cfg: EvalConfig, n_queries: int, rows: Mapping[str, list[dict[str, float]]],
              skipped: int, sides: Mapping[str, Side], embed_s: float) -> dict[str, Any]:
    """The summary ``evaluate`` prints: mean metrics per side, what exact search retains, timings."""
    k = cfg.k
    summary: dict[str, Any] = {
        "index": searcher.index, "version": searcher.version_id, "kind": searcher.kind, "k": k, "gain": cfg.gain,
        "queries": n_queries, "evaluated": len(rows["index"]), "skipped_no_judgments": skipped,
        "metrics": {"index": mean_metrics(rows["index"])},
        "timings": {"embed_s": round(embed_s, 3), "search_s": round(sides["index"].seconds, 3),
                    "exact_s": round(sides["exact"].seconds if "exact" in sides else 0.0, 3),
                    "search_ms_per_query": round(sides["index"].seconds * 1000 / max(n_queries, 1), 3)},
    }
    if rows.get("exact"):
        exact = mean_metrics(rows["exact"])
        summary["metrics"]["exact"] = exact
        summary["metrics"]["retained"] = {key: (summary["metrics"]["index"][key] / v if v else None)
                                          for key, v in exact.items()}
        recall = sides["exact"].chunk_recall
        assert recall is not None
        summary["metrics"][f"recall_vs_exact@{k}"] = float(recall.mean())
    return summary


def evaluate_searcher(searcher: Searcher, queries: Sequence[Query], qrels: Mapping[str, Mapping[str, float]],
                      cfg: EvalConfig = EvalConfig(), *, store: Store | None = None,
                      per_query_path: str | os.PathLike[str] | None = None,
                      query_vectors: np.ndarray | None = None,
                      per_query: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Metrics of ``searcher`` (and of exact search over its source run in ``store``) on judged
    queries. Per-query records go to ``per_query_path`` (JSON lines) and/or are appended to
    ``per_query``."""
    if cfg.k < 1:
        raise ConfigError(f"k must be >= 1, got {cfg.k}")
    t0 = time.perf_counter()
    qv = query_vectors if query_vectors is not None else searcher.encode_queries([q.text for q in queries])
    embed_s = time.perf_counter() - t0
    sides = {"index": search_index(searcher, qv, cfg)}
    if cfg.exact:
        sides["exact"] = search_exact(searcher, store, qv, cfg)
    rows, records, skipped = score_rankings(queries, qrels, sides, cfg.k)
    if not rows["index"]:
        raise SchemaError("no query has a judged relevant document (check that query ids match the qrels file)")
    summary = summarize(searcher, cfg, len(queries), rows, skipped, sides, embed_s)
    if per_query is not None:
        per_query.extend(records)
    if per_query_path is not None:
        with open(per_query_path, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
        summary["per_query_path"] = os.fspath(per_query_path)
    return summary


def evaluate_version(store: Store, index: str, version_id: str, queries_path: str | os.PathLike[str],
                     qrels_path: str | os.PathLike[str], cfg: EvalConfig = EvalConfig(), *,
                     per_query_path: str | os.PathLike[str] | None = None, device: str = "cpu",
                     searcher: Searcher | None = None) -> dict[str, Any]:
    """Load (verified) and evaluate one version; see ``evaluate_searcher``."""
    from engine.index.searcher import Searcher

    queries = load_queries(queries_path)
    qrels = load_qrels(qrels_path, cfg.gain)
    own = searcher is None
    s = searcher or Searcher.load(store, index, version_id, verify=True, device=device)
    try:
        return evaluate_searcher(s, queries, qrels, cfg, store=store, per_query_path=per_query_path)
    finally:
        if own:
            s.close()
