"""Retrieval metrics checked against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.index.recall import knn_recall
from engine.quality.judgments import GAINS
from engine.quality.metrics import dcg, mean_metrics, mrr_at_k, ndcg_at_k, query_metrics, recall_at_k


def test_recall_at_k_by_hand():
    gains = {"a": 3, "c": 1, "e": 2}
    assert recall_at_k(["a", "b", "c", "d"], gains, 2) == pytest.approx(1 / 3)
    assert recall_at_k(["a", "b", "c", "d"], gains, 4) == pytest.approx(2 / 3)
    assert recall_at_k(["x"], {}, 10) == 0.0
    assert recall_at_k(["a"], {"a": 0}, 1) == 0.0  # zero gain is not relevant


def test_mrr_at_k_by_hand():
    assert mrr_at_k(["x", "y", "c"], {"c": 1}, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(["x", "y", "c"], {"c": 1}, 2) == 0.0  # outside the cut-off
    assert mrr_at_k(["c", "x"], {"c": 4, "x": 1}, 10) == 1.0


def test_ndcg_at_k_by_hand():
    gains = {"a": 3, "b": 1, "c": 2}
    # DCG = 1/log2(2) + 3/log2(3) + 2/log2(4) = 1 + 1.892789 + 1 = 3.892789
    # IDCG = 3/log2(2) + 2/log2(3) + 1/log2(4) = 3 + 1.261860 + 0.5 = 4.761860
    assert dcg([1, 3, 2]) == pytest.approx(3.892789, abs=1e-6)
    assert ndcg_at_k(["b", "a", "c"], gains, 3) == pytest.approx(3.892789 / 4.761860, abs=1e-6)
    assert ndcg_at_k(["a", "c", "b"], gains, 3) == pytest.approx(1.0)
    # The ideal ranking uses every judged document: a relevant doc the ranking misses costs.
    assert ndcg_at_k(["a", "x"], {"a": 1, "b": 1}, 2) == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert ndcg_at_k(["a"], {"a": 1, "b": 1}, 1) == pytest.approx(1.0)
    assert ndcg_at_k(["x"], {}, 5) == 0.0
    with pytest.raises(ValueError):
        ndcg_at_k(["a"], gains, 0)


def test_query_and_mean_metrics():
    row = query_metrics(["b", "a"], {"a": 1}, 2)
    assert row == {"recall@2": 1.0, "mrr@2": 0.5, "ndcg@2": pytest.approx(1 / math.log2(3))}
    assert mean_metrics([{"m": 1.0}, {"m": 0.0}]) == {"m": 0.5}
    assert mean_metrics([]) == {}


def test_cranfield_gain_mapping():
    g = GAINS["cranfield"]
    assert [g(x) for x in (1, 2, 3, 4, -1, 0, 5)] == [4, 3, 2, 1, 0, 0, 0]
    assert GAINS["linear"](3) == 3 and GAINS["linear"](-1) == 0
    assert GAINS["binary"](4) == 1 and GAINS["binary"](0) == 0


def test_knn_recall_counts_ties_and_padding():
    exact_ids = np.array([[1, 2, 3, -1], [5, 6, -1, -1]])
    exact_scores = np.array([[0.9, 0.8, 0.8, -np.inf], [0.7, 0.6, -np.inf, -np.inf]])
    # query 0: id 3 ties with id 2 at the k-th score, so [1, 3] is as good as [1, 2]
    assert knn_recall(np.array([[1, 3], [5, 6]]), exact_ids, exact_scores, 2).tolist() == [1.0, 1.0]
    assert knn_recall(np.array([[1, 4], [6, -1]]), exact_ids, exact_scores, 2).tolist() == [0.5, 0.5]
    # fewer exact neighbours than k: scored on what exists
    assert knn_recall(np.array([[5, 6, 7]]), exact_ids[1:], exact_scores[1:], 3).tolist() == [1.0]
    # nothing to find: perfect
    assert knn_recall(np.array([[-1]]), np.array([[-1]]), np.array([[-np.inf]]), 1).tolist() == [1.0]
