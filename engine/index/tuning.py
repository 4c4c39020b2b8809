"""Hybrid search on judged queries: dense/sparse/hybrid side by side, and fusion tuning (candidate lists
once, every fusion of a grid scored, the best recorded beside the version).

The metric comes in as an argument (the quality layer's nDCG, a higher layer than this one).
Queries split deterministically (a hash of the seed and the query id): the fusion is chosen on
one part and reported, beside dense, sparse and untuned RRF, on the held-out rest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.core.errors import ConfigError
from engine.index.fusion import FusionConfig, fuse, save_fusion_record, tune_fusion
from engine.index.retrieve import per_doc, sparse_ids

if TYPE_CHECKING:
    from engine.core.storage import Store
    from engine.index.searcher import Searcher

Metric = Callable[[Sequence[str], Mapping[str, float], int], float]  # (doc ranking, gains, k) -> value
Metrics = Callable[[Sequence[str], Mapping[str, float], int], Mapping[str, float]]  # -> {"ndcg@k": ..., ...}


def compare_modes(searcher: Searcher, queries: Sequence[tuple[str, str]], qrels: Mapping[str, Mapping[str, float]],
                  metrics: Metrics, *, k: int = 10, modes: Sequence[str] = ("dense", "sparse", "hybrid"),
                  ) -> dict[str, dict[str, float]]:
    """Mean metrics of each search mode over the judged ``queries`` ((query_id, text)), documents collapsed to
    their best chunk; hybrid uses the version's default fusion (its tuning record, else RRF k=60)."""
    judged = [(qid, text) for qid, text in queries if qrels.get(qid)]
    if not judged:
        raise ConfigError("no query has a judged relevant document (check that query ids match the qrels file)")
    texts = [t for _, t in judged]
    out: dict[str, dict[str, float]] = {}
    for mode in modes:
        results = searcher.search(texts, k, collapse_docs=True, mode=mode)
        rows = [metrics([h.doc_id for h in hits], qrels[qid], k) for (qid, _), hits in zip(judged, results,
                                                                                              strict=True)]
        out[mode] = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
    return out


MAX_BY_VALUES = 50  # more distinct values than this is an id-like column, not a breakdown


def _where_literal(value: Any) -> str:
    """``value`` written as a ``--where`` literal (strings quoted, quotes doubled)."""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def compare_by(searcher: Searcher, queries: Sequence[tuple[str, str]], qrels: Mapping[str, Mapping[str, float]],
               metrics: Metrics, column: str, *, k: int = 10, modes: Sequence[str] = ("dense",),
               ) -> dict[str, dict[str, Any]]:
    """Metrics per value of a metadata ``column`` (e.g. lang): for each value, the queries with a judged relevant
    document of that value, searched with the filter ``column = value`` (what a per-value index answers) and
    scored against their judgments of that value, in each mode. A document's value is its first chunk's.
    ``{value: {"queries": n, "modes": {mode: {metric: mean}}}}``, values sorted as text."""
    table = searcher.filter.table()
    columns = [c for c in table.column_names if c != "id"]
    if column not in columns:
        raise ConfigError(f"--by: unknown column {column!r}; available columns: {', '.join(sorted(columns))}")
    value_of: dict[str, Any] = {}
    for doc, value in zip(table.column("doc_id").to_pylist(), table.column(column).to_pylist(), strict=True):
        value_of.setdefault(doc, value)
    values = sorted({v for v in value_of.values() if v is not None}, key=str)
    if len(values) > MAX_BY_VALUES:
        raise ConfigError(f"--by {column}: {len(values)} distinct values (at most {MAX_BY_VALUES}); break figures "
                          "down by a column with few values, such as a language or a source")
    out: dict[str, dict[str, Any]] = {}
    for value in values:
        sub = {qid: {d: g for d, g in gains.items() if value_of.get(d) == value} for qid, gains in qrels.items()}
        judged = [(qid, text) for qid, text in queries if any(g > 0 for g in sub.get(qid, {}).values())]
        if not judged:
            continue
        where = f"{column} = {_where_literal(value)}"
        per_mode: dict[str, dict[str, float]] = {}
        for mode in modes:
            results = searcher.search([t for _, t in judged], k, collapse_docs=True, mode=mode, where=where)
            rows = [metrics([h.doc_id for h in hits], sub[qid], k) for (qid, _), hits in zip(judged, results,
                                                                                                strict=True)]
            per_mode[mode] = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
        out[str(value)] = {"queries": len(judged), "where": where, "modes": per_mode}
    return out


def split_queries(query_ids: Sequence[str], share: float, seed: int, fold: int = 0) -> tuple[list[int], list[int]]:
    """(positions to tune on, held-out positions): ``share`` of the queries by a seeded hash of their ids
    (``fold`` 1 swaps the two parts: a 2-fold tuning scores every query with a fusion not tuned on it)."""
    if not 0.0 < share <= 1.0:
        raise ConfigError(f"tuning split must be within (0, 1], got {share}")
    order = sorted(range(len(query_ids)), key=lambda i: hashlib.sha256(f"{seed}:{query_ids[i]}".encode()).digest())
    n = max(1, round(share * len(order)))
    first, rest = sorted(order[:n]), sorted(order[n:])
    return (rest, first) if fold and rest else (first, rest)


def candidate_lists(searcher: Searcher, texts: Sequence[str], depth: int, k: int,
                    ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The dense and the sparse top ``depth`` of every query as document lists (scores, doc codes), what each
    fusion then merges, as ``search(..., collapse_docs=True)`` does."""
    if not searcher.sparse_shards:
        raise ConfigError(f"index {searcher.index}/{searcher.version_id} has no sparse shards to fuse; rebuild it "
                          "with --sparse bm25")
    dense = searcher.search_ids(searcher.encode_queries(list(texts)), depth, depth_k=k)
    sparse = sparse_ids(searcher.sparse_shards, texts, depth, None)
    ds, dc, _ = per_doc(dense[0], dense[1], searcher.doc_codes(dense[1])[0])
    ss, sc, _ = per_doc(sparse[0], sparse[1], searcher.doc_codes(sparse[1])[0])
    return (ds, dc), (ss, sc)


def doc_lookup(searcher: Searcher, codes: np.ndarray) -> dict[int, str]:
    """Doc code -> doc id for every code in ``codes`` (-1 left out)."""
    names = searcher.doc_codes(np.zeros(0, np.int64))[1]
    return {int(c): names[int(c)] for c in np.unique(codes[codes >= 0])}


class DocScorer:
    """Mean metric of fused document rankings (doc codes, -1 = empty) for a set of queries."""

    def __init__(self, doc_of: Mapping[int, str], gains: Sequence[Mapping[str, float]], metric: Metric, k: int):
        self.doc_of, self.gains, self.metric, self.k = doc_of, gains, metric, k

    def __call__(self, ids: np.ndarray) -> float:
        values = []
        for row, gains in zip(ids, self.gains, strict=True):
            ranking: list[str] = []
            for i in row.tolist():
                if i >= 0 and self.doc_of[i] not in ranking:
                    ranking.append(self.doc_of[i])
            values.append(self.metric(ranking, gains, self.k))
        return float(np.mean(values)) if values else 0.0


def _take(pair: tuple[np.ndarray, np.ndarray], rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    return pair[0][list(rows)], pair[1][list(rows)]


def tune_version(searcher: Searcher, store: Store, queries: Sequence[tuple[str, str]],
                 qrels: Mapping[str, Mapping[str, float]], metric: Metric, *, k: int = 10, share: float = 0.5,
                 seed: int = 0, depth: int = 100, save: bool = True, label: str = "", fold: int = 0) -> dict[str, Any]:
    """Tune the fusion of ``searcher``'s version on judged ``queries`` ((query_id, text)) and store the record.

    Returns the record (plus ``key`` when saved): chosen fusion, its value on the tuning part, and
    dense / sparse / RRF-60 / tuned on the held-out part (on the tuning part when nothing is held out)."""
    judged = [(qid, text) for qid, text in queries if qrels.get(qid)]
    if not judged:
        raise ConfigError("no query has a judged relevant document; nothing to tune the fusion on")
    tune_rows, held_rows = split_queries([q for q, _ in judged], share, seed, fold)
    gains = [qrels[q] for q, _ in judged]
    dense, sparse = candidate_lists(searcher, [t for _, t in judged], depth, k)
    doc_of = doc_lookup(searcher, np.concatenate([dense[1], sparse[1]], axis=1))

    def scorer(rows: Sequence[int]) -> DocScorer:
        return DocScorer(doc_of, [gains[r] for r in rows], metric, k)

    tuned = tune_fusion(_take(dense, tune_rows), _take(sparse, tune_rows), scorer(tune_rows), depth=depth)
    chosen = FusionConfig.from_dict(tuned["chosen"])
    report_rows = held_rows or tune_rows
    score = scorer(report_rows)
    d, s = _take(dense, report_rows), _take(sparse, report_rows)
    held = {"dense": score(d[1]), "sparse": score(s[1]),
            "rrf60": score(fuse(d, s, FusionConfig(depth=depth), depth)[1]),
            "tuned": score(fuse(d, s, chosen, depth)[1])}
    record: dict[str, Any] = {
        "metric": f"ndcg@{k}", "chosen": tuned["chosen"], "tuned_value": tuned["value"],
        "benchmark": {"label": label, "queries": len(judged), "split": share, "seed": seed, "fold": fold,
                      "tuned_on": len(tune_rows), "held_out": len(held_rows)},
        "held_out": {name: round(v, 4) for name, v in held.items()}, "grid": tuned["grid"]}
    if save:
        record["key"] = save_fusion_record(store, searcher.index, searcher.version_id, record)
    return record
