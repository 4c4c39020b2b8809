"""Recall of an approximate search against exact search (the recall gate's measure)."""

from __future__ import annotations

import numpy as np


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
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
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
