"""Evaluation: recall@k, MRR@k and graded nDCG@k of an index version on judged queries, beside exact search.

``evaluate_version`` embeds the queries with the version's model, searches the index (chunks
collapsed to documents: best chunk per document, since judgments are per document), and runs
exact inner-product search over the *same vectors* (the version's source run), so the cost of
the index's approximation shows as the difference between the two. Per-query results go to a
JSON-lines file.

Inputs: queries JSONL ``{"query_id", "text"}``; qrels TSV ``query_id  doc_id  grade`` with a
header line. How grades become gains is a named mapping (``GAINS``); the default ``cranfield``
follows the Cranfield collection, where grade 1 is the best (complete answer) and 4 the least
(minimum interest), -1 judged non-relevant: gain = 5 - grade for grades 1..4, else 0.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.core.errors import ConfigError, SchemaError
from engine.index.hits import doc_ids_of_rows
from engine.index.recall import knn_recall
from engine.quality.metrics import mean_metrics, query_metrics

if TYPE_CHECKING:
    from engine.core.storage import Store
    from engine.index.searcher import Searcher

log = logging.getLogger(__name__)


def _gain_cranfield(grade: float) -> float:
    return 5.0 - grade if 1 <= grade <= 4 else 0.0


def _gain_linear(grade: float) -> float:
    return float(grade) if grade > 0 else 0.0


def _gain_binary(grade: float) -> float:
    return 1.0 if grade > 0 else 0.0


# name -> grade -> gain. "linear": the grade is the gain (TREC style: higher = more relevant);
# "binary": any positive grade is relevant with gain 1.
GAINS: dict[str, Callable[[float], float]] = {"cranfield": _gain_cranfield, "linear": _gain_linear,
                                               "binary": _gain_binary}


@dataclass(frozen=True)
class Query:
    query_id: str
    text: str


def load_queries(path: str | os.PathLike[str]) -> list[Query]:
    """Queries from JSON lines ``{"query_id", "text"}`` (``_id``/``id`` and ``query`` accepted too)."""
    out: list[Query] = []
    seen: set[str] = set()
    try:
        fh = open(path, encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read queries file {os.fspath(path)!r}: {err.strerror}") from None
    with fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SchemaError(f"{os.fspath(path)}:{n}: not JSON ({err.msg})") from None
            qid = next((row[k] for k in ("query_id", "_id", "id") if k in row), None)
            text = next((row[k] for k in ("text", "query") if k in row), None)
            if qid is None or not isinstance(text, str):
                raise SchemaError(f"{os.fspath(path)}:{n}: a query needs 'query_id' and 'text'")
            qid = str(qid)
            if qid in seen:
                raise SchemaError(f"{os.fspath(path)}:{n}: duplicate query_id {qid!r}")
            seen.add(qid)
            out.append(Query(qid, text))
    if not out:
        raise SchemaError(f"queries file {os.fspath(path)!r} holds no queries")
    return out


def load_qrels(path: str | os.PathLike[str], gain: str = "cranfield") -> dict[str, dict[str, float]]:
    """``query_id -> {doc_id: gain}`` from a TSV with a header (``query_id doc_id grade``); zero gains dropped."""
    if gain not in GAINS:
        raise ConfigError(f"gain mapping must be one of {', '.join(GAINS)}, got {gain!r}")
    to_gain = GAINS[gain]
    out: dict[str, dict[str, float]] = {}
    try:
        fh = open(path, encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read qrels file {os.fspath(path)!r}: {err.strerror}") from None
    with fh:
        lines = [ln.rstrip("\n") for ln in fh if ln.strip()]
    if not lines:
        raise SchemaError(f"qrels file {os.fspath(path)!r} is empty")
    header = lines[0].split("\t") if "\t" in lines[0] else lines[0].split()
    cols = [h.strip().lower() for h in header]
    if not {"query_id", "doc_id"} <= set(cols) or not ({"grade", "score", "relevance"} & set(cols)):
        raise SchemaError(f"qrels file {os.fspath(path)!r} needs a header 'query_id doc_id grade' (got {header})")
    qi, di = cols.index("query_id"), cols.index("doc_id")
    gi = next(cols.index(c) for c in ("grade", "score", "relevance") if c in cols)
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split("\t") if "\t" in line else line.split()
        try:
            q, d, g = parts[qi].strip(), parts[di].strip(), float(parts[gi])
        except (IndexError, ValueError):
            raise SchemaError(f"{os.fspath(path)}:{n}: expected 'query_id doc_id grade', got {line!r}") from None
        value = to_gain(g)
        if value > 0:
            out.setdefault(q, {})[d] = max(value, out.get(q, {}).get(d, 0.0))
    return out


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


def evaluate_searcher(searcher: Searcher, queries: Sequence[Query], qrels: Mapping[str, Mapping[str, float]],
                      cfg: EvalConfig = EvalConfig(), *, store: Store | None = None,
                      per_query_path: str | os.PathLike[str] | None = None,
                      query_vectors: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics of ``searcher`` (and of exact search over its source run in ``store``) on judged queries."""
    from engine.index.runs import read_run_vectors

    if cfg.k < 1:
        raise ConfigError(f"k must be >= 1, got {cfg.k}")
    k = cfg.k
    t0 = time.perf_counter()
    qv = query_vectors if query_vectors is not None else searcher.encode_queries([q.text for q in queries])
    t_embed = time.perf_counter() - t0
    t1 = time.perf_counter()
    index_hits = []
    for i in range(0, len(queries), cfg.batch):
        index_hits += searcher.search_vectors(qv[i:i + cfg.batch], k, nprobe=cfg.nprobe,
                                              rescore_multiplier=cfg.rescore_multiplier, collapse_docs=True)
    t_search = time.perf_counter() - t1
    index_docs = [[h.doc_id for h in hits] for hits in index_hits]

    exact_docs: list[list[str]] | None = None
    chunk_recall: np.ndarray | None = None
    t_exact = 0.0
    if cfg.exact:
        if store is None:
            raise ConfigError("exact search needs the store holding the version's source run")
        run_id = searcher.manifest.get("source_run")
        if not run_id:
            raise SchemaError(f"version {searcher.version_id} records no source run; use --no-exact")
        t2 = time.perf_counter()
        vectors, _chunk_ids, doc_ids = read_run_vectors(store, str(run_id))
        exact_docs, ex_scores, ex_rows = exact_doc_rankings(qv, vectors, doc_ids, k)
        # Chunk-level recall@k of the index against exact search (rows are global ids).
        _, found = searcher.search_ids(qv, k, nprobe=cfg.nprobe, rescore_multiplier=cfg.rescore_multiplier)
        chunk_recall = knn_recall(found, ex_rows, ex_scores, k) if len(vectors) else np.ones(len(queries))
        t_exact = time.perf_counter() - t2

    rows_index, rows_exact, per_query = [], [], []
    skipped = 0
    for n, q in enumerate(queries):
        gains = qrels.get(q.query_id, {})
        rec: dict[str, Any] = {"query_id": q.query_id, "text": q.text, "relevant": len(gains)}
        if not gains:
            skipped += 1
            rec["skipped"] = "no relevant documents judged"
            per_query.append(rec)
            continue
        m_index = query_metrics(index_docs[n], gains, k)
        rows_index.append(m_index)
        rec["index"] = {**m_index, "docs": index_docs[n], "scores": [round(h.score, 6) for h in index_hits[n]]}
        if exact_docs is not None:
            m_exact = query_metrics(exact_docs[n], gains, k)
            rows_exact.append(m_exact)
            rec["exact"] = {**m_exact, "docs": exact_docs[n]}
            assert chunk_recall is not None
            rec[f"recall_vs_exact@{k}"] = float(chunk_recall[n])
        per_query.append(rec)
    if not rows_index:
        raise SchemaError("no query has a judged relevant document (check that query ids match the qrels file)")
    summary: dict[str, Any] = {
        "index": searcher.index, "version": searcher.version_id, "kind": searcher.kind, "k": k, "gain": cfg.gain,
        "queries": len(queries), "evaluated": len(rows_index), "skipped_no_judgments": skipped,
        "metrics": {"index": mean_metrics(rows_index)},
        "timings": {"embed_s": round(t_embed, 3), "search_s": round(t_search, 3), "exact_s": round(t_exact, 3),
                    "search_ms_per_query": round(t_search * 1000 / max(len(queries), 1), 3)},
    }
    if rows_exact:
        exact = mean_metrics(rows_exact)
        summary["metrics"]["exact"] = exact
        summary["metrics"]["retained"] = {key: (summary["metrics"]["index"][key] / v if v else None)
                                          for key, v in exact.items()}
        assert chunk_recall is not None
        summary["metrics"][f"recall_vs_exact@{k}"] = float(chunk_recall.mean())
    if per_query_path is not None:
        with open(per_query_path, "w", encoding="utf-8") as f:
            for rec in per_query:
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
