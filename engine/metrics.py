"""Retrieval metrics: recall@k, MRR@k, graded nDCG@k against judgments, and ANN recall against exact search.

All functions are pure and work on one query at a time (``ranking`` is a list of ids, best
first; ``gains`` maps a relevant id to its gain > 0). Averages over queries are left to the
caller, who decides what to do with queries that have no relevant document (we skip them).

Formulas (the trec_eval conventions, linear gain):

- recall@k = |relevant ∩ top-k| / |relevant|
- MRR@k    = 1 / rank of the first relevant id in the top k (0 if none)
- nDCG@k   = DCG@k / IDCG@k, DCG@k = sum_{i=1..k} gain(ranking[i]) / log2(i + 1); IDCG@k is the
  DCG of the ideal ordering of *all* judged gains (so a query with more relevant documents
  than k can still reach 1.0, and a missing relevant document costs what it would have given).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")


def recall_at_k(ranking: Sequence[Any], gains: Mapping[Any, float], k: int) -> float:
    """Share of the relevant ids (gain > 0) found in the top ``k``; 0.0 if nothing is relevant."""
    _check_k(k)
    relevant = {d for d, g in gains.items() if g > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranking[:k])) / len(relevant)


def mrr_at_k(ranking: Sequence[Any], gains: Mapping[Any, float], k: int) -> float:
    """Reciprocal rank of the first relevant id within the top ``k`` (0.0 when none is)."""
    _check_k(k)
    for rank, doc in enumerate(ranking[:k], start=1):
        if gains.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


def dcg(gains_in_order: Sequence[float]) -> float:
    """sum_i gain_i / log2(i + 1), with i starting at 1."""
    return float(sum(g / math.log2(i + 2) for i, g in enumerate(gains_in_order)))


def ndcg_at_k(ranking: Sequence[Any], gains: Mapping[Any, float], k: int) -> float:
    """Graded nDCG@k with linear gains; 0.0 when the query has no positive gain."""
    _check_k(k)
    ideal = sorted((g for g in gains.values() if g > 0), reverse=True)[:k]
    if not ideal:
        return 0.0
    got = [max(float(gains.get(doc, 0)), 0.0) for doc in ranking[:k]]
    return dcg(got) / dcg(ideal)


def query_metrics(ranking: Sequence[Any], gains: Mapping[Any, float], k: int) -> dict[str, float]:
    """``{"recall@k", "mrr@k", "ndcg@k"}`` for one query."""
    return {f"recall@{k}": recall_at_k(ranking, gains, k), f"mrr@{k}": mrr_at_k(ranking, gains, k),
            f"ndcg@{k}": ndcg_at_k(ranking, gains, k)}


def mean_metrics(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per-key mean over queries (keys of the first row); {} for no rows."""
    if not rows:
        return {}
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}


# ---------------------------------------------------------------------------------------------
# approximate search against exact search
# ---------------------------------------------------------------------------------------------


def knn_recall(found: np.ndarray, exact_ids: np.ndarray, exact_scores: np.ndarray, k: int,
               *, tol: float = 1e-5) -> np.ndarray:
    """Per query, the share of the exact top ``k`` that an approximate search found (recall@k).

    ``found`` [q, >=k] are the approximate ids (-1 = empty slot); ``exact_ids`` / ``exact_scores``
    [q, m >= k] are the exact neighbours, best first (higher score = closer, -1 = none). Ties are
    honoured: an id counts as a hit when its exact score reaches the k-th exact score (minus
    ``tol``), so a corpus with duplicate vectors does not punish the index for picking the
    "other" copy. A query whose exact list holds fewer than k ids is scored on what exists.
    Returns [q] float64 in [0, 1].
    """
    _check_k(k)
    found = np.asarray(found)
    exact_ids = np.asarray(exact_ids)
    exact_scores = np.asarray(exact_scores, dtype=np.float64)
    if found.shape[0] != exact_ids.shape[0]:
        raise ValueError(f"found has {found.shape[0]} queries, exact has {exact_ids.shape[0]}")
    out = np.ones(found.shape[0], dtype=np.float64)
    for qi in range(found.shape[0]):
        valid = exact_ids[qi] >= 0
        ids, scores = exact_ids[qi][valid], exact_scores[qi][valid]
        need = min(k, len(ids))
        if need == 0:
            continue  # nothing to find: trivially perfect
        kth = scores[need - 1]
        acceptable = set(ids[scores >= kth - tol].tolist())
        hits = sum(1 for i in found[qi][:k].tolist() if i >= 0 and i in acceptable)
        out[qi] = min(hits, need) / need
    return out
