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
