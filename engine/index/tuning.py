"""Hybrid search on judged queries: dense/sparse/hybrid side by side, and fusion tuning (candidate lists
once, every fusion of a grid scored, the best recorded beside the version).

The metric comes in as an argument (the quality layer's nDCG, a higher layer than this one).
Queries split deterministically (a hash of the seed and the query id): the fusion is chosen on
one part and reported, beside dense, sparse and untuned RRF, on the held-out rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.core.errors import ConfigError
from engine.index.feedback import feedback_grid, feedback_queries, stored_vectors
from engine.index.fusion import FusionConfig, fusion_grid, save_fusion_record, tune_grid
from engine.index.retrieve import fuse_docs, sparse_ids

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


class DocScorer:
    """Mean metric of fused document rankings (doc codes, -1 = empty) for a set of queries."""

    def __init__(self, doc_of: Mapping[int, str] | Sequence[str], gains: Sequence[Mapping[str, float]],
                 metric: Metric, k: int):
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


class HybridLists:
    """The dense and BM25 candidate lists of judged queries, searched once; ``fused(cfg, rows)`` ranks documents
    as ``search(..., mode="hybrid", collapse_docs=True)`` does with that fusion, its feedback pass included (the
    second dense search memoised: fusions with the same top hits share it)."""

    def __init__(self, searcher: Searcher, texts: Sequence[str], depth: int, k: int):
        if not searcher.sparse_shards:
            raise ConfigError(f"index {searcher.index}/{searcher.version_id} has no sparse shards to fuse; rebuild "
                              "it with --sparse bm25")
        self.searcher, self.depth, self.k = searcher, depth, k
        self.vectors = searcher.encode_queries(list(texts))  # [q, dim]
        self.dense = searcher.search_ids(self.vectors, depth, depth_k=k)  # chunk lists [q, depth]
        self.sparse = sparse_ids(searcher.sparse_shards, texts, depth, None)
        self._first: dict[tuple[FusionConfig, tuple[int, ...]], np.ndarray] = {}
        self._second: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}

    def fused(self, cfg: FusionConfig, rows: Sequence[int]) -> np.ndarray:
        """Doc codes [len(rows), depth] of the fused ranking of the queries at ``rows`` (-1 = empty)."""
        s = self.searcher
        sparse = _take(self.sparse, rows)
        # the first pass of every feedback setting of one fusion is that fusion's one-pass ranking: fuse it once
        first = (dataclasses.replace(cfg, feedback_docs=0, feedback_weight=1.0, source=""), tuple(rows))
        if first not in self._first:
            self._first[first] = fuse_docs(s, _take(self.dense, rows), sparse, cfg, self.depth)[1]
        ids = self._first[first]
        if cfg.feedback_docs:
            q2 = feedback_queries(self.vectors[list(rows)], ids, cfg, lambda i: stored_vectors(s, i))
            key = hashlib.sha256(q2.tobytes()).digest()
            if key not in self._second:
                self._second[key] = s.search_ids(q2, self.depth, depth_k=self.k)
            ids = fuse_docs(s, self._second[key], sparse, cfg, self.depth)[1]
        return s.doc_codes(ids)[0]


def _take(pair: tuple[np.ndarray, np.ndarray], rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    return pair[0][list(rows)], pair[1][list(rows)]


def tuning_grid(depth: int = 100, feedback: bool = True) -> list[FusionConfig]:
    """The fusions ``tune-fusion`` tries: every RRF and weighted-sum setting, each also with every feedback setting."""
    base = fusion_grid(depth)
    return base + (feedback_grid(base) if feedback else [])


def tune_version(searcher: Searcher, store: Store, queries: Sequence[tuple[str, str]],
                 qrels: Mapping[str, Mapping[str, float]], metric: Metric, *, k: int = 10, share: float = 0.5,
                 seed: int = 0, depth: int = 100, save: bool = True, label: str = "", fold: int = 0,
                 feedback: bool = True) -> dict[str, Any]:
    """Tune the fusion of ``searcher``'s version on judged ``queries`` ((query_id, text)) and store the record.

    Returns the record (plus ``key`` when saved): chosen fusion, its value on the tuning part, and
    dense / sparse / RRF-60 / tuned on the held-out part (on the tuning part when nothing is held out).
    ``feedback`` False leaves the feedback pass out of the grid."""
    judged = [(qid, text) for qid, text in queries if qrels.get(qid)]
    if not judged:
        raise ConfigError("no query has a judged relevant document; nothing to tune the fusion on")
    tune_rows, held_rows = split_queries([q for q, _ in judged], share, seed, fold)
    gains = [qrels[q] for q, _ in judged]
    lists = HybridLists(searcher, [t for _, t in judged], depth, k)
    names = searcher.doc_codes(np.zeros(0, np.int64))[1]

    def scorer(rows: Sequence[int]) -> DocScorer:
        return DocScorer(names, [gains[r] for r in rows], metric, k)

    tuned = tune_grid(lambda cfg: lists.fused(cfg, tune_rows), scorer(tune_rows), tuning_grid(depth, feedback))
    chosen = FusionConfig.from_dict(tuned["chosen"])
    report_rows = held_rows or tune_rows
    score = scorer(report_rows)
    codes = searcher.doc_codes(np.concatenate([lists.dense[1], lists.sparse[1]], axis=1)[list(report_rows)])[0]
    d, s = np.split(codes, 2, axis=1)
    held = {"dense": score(d), "sparse": score(s), "rrf60": score(lists.fused(FusionConfig(depth=depth), report_rows)),
            "tuned": score(lists.fused(chosen, report_rows))}
    record: dict[str, Any] = {
        "metric": f"ndcg@{k}", "chosen": tuned["chosen"], "tuned_value": tuned["value"],
        "benchmark": {"label": label, "queries": len(judged), "split": share, "seed": seed, "fold": fold,
                      "tuned_on": len(tune_rows), "held_out": len(held_rows), "feedback": feedback},
        "held_out": {name: round(v, 4) for name, v in held.items()}, "grid": tuned["grid"]}
    if save:
        record["key"] = save_fusion_record(store, searcher.index, searcher.version_id, record)
    return record
