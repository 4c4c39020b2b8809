"""The maintained libraries that replaced hand-written code in engine.quality give today's results.

Each check compares with the hand-written version as it was before the change (kept here as the
reference, or its output captured then): scipy's two-sample KS statistic, sklearn's precision-
recall curve (wrapped: unretrieved pairs count as misses), and prometheus_client's text format
(same metric names, labels, help and values)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.quality.canary import Canary, canary_prometheus, canary_stats
from engine.quality.drift import drift_prometheus, ks_statistic
from engine.quality.prcurve import PRCurve, best_fbeta, pr_curve

# ---------------------------------------------------------------------------------------------
# the hand-written versions, as they were before the change
# ---------------------------------------------------------------------------------------------


def old_ks_statistic(reference, current):
    a = np.sort(np.asarray(reference, dtype=np.float64))
    b = np.sort(np.asarray(current, dtype=np.float64))
    if not a.size or not b.size:
        return None
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / a.size
    cdf_b = np.searchsorted(b, grid, side="right") / b.size
    return round(float(np.max(np.abs(cdf_a - cdf_b))), 6)


def old_pr_curve(scores, labels):
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    positives = int(y.sum())
    keep = ~np.isnan(s)
    s, y = s[keep], y[keep]
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.flatnonzero(np.concatenate([s[1:] != s[:-1], [True]])) if len(s) else np.zeros(0, dtype=int)
    tp = np.cumsum(y)[last] if len(s) else np.zeros(0, dtype=int)
    fp = (last + 1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
    recall = tp / positives if positives else np.zeros(len(tp))
    return s[last], precision, recall, tp, fp


# Captured from engine.quality.loop.canary_prometheus / drift_prometheus (hand-written text format)
# before prometheus_client replaced it, for the reports built in ``canary_report``/``drift_report``.
OLD_CANARY_PROM = (
    "# HELP embedctl_canary_recall Canary recall@k (share of expected docs in the top k).\n"
    "# TYPE embedctl_canary_recall gauge\n"
    "embedctl_canary_recall{index=\"do\\\"cs\",alias=\"live\",version=\"v1\",k=\"3\"} 0.5\n"
    "embedctl_canary_recall{index=\"do\\\"cs\",alias=\"live\",version=\"v2\",k=\"3\"} 0.5\n"
    "# HELP embedctl_canary_mrr Canary mean reciprocal rank within the top k.\n"
    "# TYPE embedctl_canary_mrr gauge\n"
    "embedctl_canary_mrr{index=\"do\\\"cs\",alias=\"live\",version=\"v1\",k=\"3\"} 0.5\n"
    "embedctl_canary_mrr{index=\"do\\\"cs\",alias=\"live\",version=\"v2\",k=\"3\"} 0.5\n"
    "# HELP embedctl_canary_hit_rate Share of canaries with an expected doc in the top k.\n"
    "# TYPE embedctl_canary_hit_rate gauge\n"
    "embedctl_canary_hit_rate{index=\"do\\\"cs\",alias=\"live\",version=\"v1\",k=\"3\"} 0.666667\n"
    "embedctl_canary_hit_rate{index=\"do\\\"cs\",alias=\"live\",version=\"v2\",k=\"3\"} 0.666667\n"
    "# HELP embedctl_canary_empty_rate Share of canaries with no result under the stored threshold.\n"
    "# TYPE embedctl_canary_empty_rate gauge\n"
    "embedctl_canary_empty_rate{index=\"do\\\"cs\",alias=\"live\",version=\"v1\"} 0.0\n"
    "embedctl_canary_empty_rate{index=\"do\\\"cs\",alias=\"live\",version=\"v2\"} 0.0\n"
    "# HELP embedctl_canary_topk_score Top-k score distribution of canary queries.\n"
    "# TYPE embedctl_canary_topk_score gauge\n"
    "embedctl_canary_topk_score{index=\"do\\\"cs\",alias=\"live\",version=\"v1\",k=\"3\",stat=\"mean\"} 0.572222\n"
    "embedctl_canary_topk_score{index=\"do\\\"cs\",alias=\"live\",version=\"v1\",k=\"3\",stat=\"median\"} 0.5\n"
    "embedctl_canary_topk_score{index=\"do\\\"cs\",alias=\"live\",version=\"v1\",k=\"3\",stat=\"p5\"} 0.34\n"
    "embedctl_canary_topk_score{index=\"do\\\"cs\",alias=\"live\",version=\"v1\",k=\"3\",stat=\"p95\"} 0.86\n"
    "embedctl_canary_topk_score{index=\"do\\\"cs\",alias=\"live\",version=\"v2\",k=\"3\",stat=\"mean\"} 0.572222\n"
    "embedctl_canary_topk_score{index=\"do\\\"cs\",alias=\"live\",version=\"v2\",k=\"3\",stat=\"median\"} 0.5\n"
    "embedctl_canary_topk_score{index=\"do\\\"cs\",alias=\"live\",version=\"v2\",k=\"3\",stat=\"p5\"} 0.34\n"
    "embedctl_canary_topk_score{index=\"do\\\"cs\",alias=\"live\",version=\"v2\",k=\"3\",stat=\"p95\"} 0.86\n"
    "# HELP embedctl_canary_top1_score Top-1 score distribution of canary queries.\n"
    "# TYPE embedctl_canary_top1_score gauge\n"
    "embedctl_canary_top1_score{index=\"do\\\"cs\",alias=\"live\",version=\"v1\",stat=\"mean\"} 0.766667\n"
    "embedctl_canary_top1_score{index=\"do\\\"cs\",alias=\"live\",version=\"v1\",stat=\"median\"} 0.8\n"
    "embedctl_canary_top1_score{index=\"do\\\"cs\",alias=\"live\",version=\"v1\",stat=\"p5\"} 0.62\n"
    "embedctl_canary_top1_score{index=\"do\\\"cs\",alias=\"live\",version=\"v1\",stat=\"p95\"} 0.89\n"
    "embedctl_canary_top1_score{index=\"do\\\"cs\",alias=\"live\",version=\"v2\",stat=\"mean\"} 0.766667\n"
    "embedctl_canary_top1_score{index=\"do\\\"cs\",alias=\"live\",version=\"v2\",stat=\"median\"} 0.8\n"
    "embedctl_canary_top1_score{index=\"do\\\"cs\",alias=\"live\",version=\"v2\",stat=\"p5\"} 0.62\n"
    "embedctl_canary_top1_score{index=\"do\\\"cs\",alias=\"live\",version=\"v2\",stat=\"p95\"} 0.89\n"
    "# HELP embedctl_canary_passed 1 if the canary passed its limits, else 0.\n"
    "# TYPE embedctl_canary_passed gauge\n"
    "embedctl_canary_passed{index=\"do\\\"cs\",alias=\"live\",version=\"v1\"} 1.0\n"
    "embedctl_canary_passed{index=\"do\\\"cs\",alias=\"live\",version=\"v2\"} 0.0\n"
    "# HELP embedctl_canary_queries Number of canary queries.\n"
    "# TYPE embedctl_canary_queries gauge\n"
    "embedctl_canary_queries{index=\"do\\\"cs\",alias=\"live\",version=\"v1\"} 3.0\n"
    "embedctl_canary_queries{index=\"do\\\"cs\",alias=\"live\",version=\"v2\"} 3.0\n"
    "# HELP embedctl_canary_last_run_timestamp_seconds When the canary ran (unix time).\n"
    "# TYPE embedctl_canary_last_run_timestamp_seconds gauge\n"
    "embedctl_canary_last_run_timestamp_seconds{index=\"do\\\"cs\",alias=\"live\"} 1796360400.0\n"
)
OLD_DRIFT_PROM = (
    "# HELP embedctl_drift_score_psi PSI of the top-1 score distribution vs calibration time.\n"
    "# TYPE embedctl_drift_score_psi gauge\n"
    "embedctl_drift_score_psi{index=\"docs\",alias=\"live\",version=\"v1\"} 0.31\n"
    "# HELP embedctl_drift_score_ks KS statistic of the top-1 score distribution vs calibration time.\n"
    "# TYPE embedctl_drift_score_ks gauge\n"
    "embedctl_drift_score_ks{index=\"docs\",alias=\"live\",version=\"v1\"} 0.25\n"
    "# HELP embedctl_drift_novel_rate Share of recent queries unlike any calibration query.\n"
    "# TYPE embedctl_drift_novel_rate gauge\n"
    "embedctl_drift_novel_rate{index=\"docs\",alias=\"live\",version=\"v1\"} 0.05\n"
    "# HELP embedctl_drift_centroid_similarity Cosine of recent vs calibration query centroids.\n"
    "# TYPE embedctl_drift_centroid_similarity gauge\n"
    "embedctl_drift_centroid_similarity{index=\"docs\",alias=\"live\",version=\"v1\"} 0.987654321\n"
    "# HELP embedctl_drift_empty_rate Empty-result rate of recent queries under the stored threshold.\n"
    "# TYPE embedctl_drift_empty_rate gauge\n"
    "embedctl_drift_empty_rate{index=\"docs\",alias=\"live\",version=\"v1\"} 0.0\n"
    "# HELP embedctl_drift_alerting 1 if any drift limit is exceeded, else 0.\n"
    "# TYPE embedctl_drift_alerting gauge\n"
    "embedctl_drift_alerting{index=\"docs\",alias=\"live\",version=\"v1\"} 1.0\n"
)


def canary_report():
    canaries = [Canary("q1", ("a",), "c1"), Canary("q2", ("b", "x"), "c2"), Canary("q3", ("z",), "c3")]
    rankings = [[("a", 0.9), ("b", 0.5), ("c", 0.4)], [("c", 0.8), ("b", 0.7), ("d", 0.3)],
                [("q", 0.6), ("r", 0.5), ("s", 0.45)]]
    st = canary_stats(canaries, rankings, k=3)
    return {"index": 'do"cs', "alias": "live", "k": 3, "created_at": "2026-12-04T05:00:00Z",
            "versions": [{"version": "v1", "stats": st, "passed": True}, {"version": "v2", "stats": st, "passed": False}]}


def drift_report():
    return {"index": "docs", "alias": "live", "version": "v1", "top1_score": {"psi": 0.31, "ks": 0.25},
            "query_length": {"psi": None}, "embedding": {"novel_rate": 0.05, "centroid_similarity": 0.987654321},
            "empty_rate": {"current": 0.0}, "drifted": True}


def families(text):
    """[(name, type, help, [(sample name, labels, value)])] in the order the text lists them."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(f.name, f.type, f.documentation, [(s.name, s.labels, s.value) for s in f.samples])
            for f in text_string_to_metric_families(text)]


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------


def test_ks_statistic_is_scipys_and_matches_the_hand_written_one():
    rng = np.random.default_rng(11)
    cases = [(rng.normal(0.6, 0.05, 400), rng.normal(0.62, 0.05, 250)),
             (rng.normal(0, 1, 37), rng.normal(0.5, 2, 1000)),
             (rng.integers(0, 5, 300).astype(float), rng.integers(0, 6, 120).astype(float)),  # many ties
             (np.round(rng.uniform(0, 1, 200), 2), np.round(rng.uniform(0.1, 1, 90), 2)),
             ([1, 2, 3], [4, 5, 6]), ([1, 2], [1, 2]), ([0.5], [0.5, 0.7])]
    for a, b in cases:
        assert ks_statistic(a, b) == old_ks_statistic(a, b)
    assert ks_statistic([], [1.0]) is None and ks_statistic([1.0], []) is None


def pr_cases():
    rng = np.random.default_rng(3)
    out = []
    for n, nan_share, tie_decimals in ((200, 0.2, 2), (60, 0.0, 1), (500, 0.5, 3), (30, 0.1, None)):
        labels = rng.random(n) < 0.35
        scores = rng.normal(0.5, 0.1, n) + 0.15 * labels
        if tie_decimals is not None:
            scores = np.round(scores, tie_decimals)  # tied scores across relevant and non-relevant pairs
        scores[rng.random(n) < nan_share] = np.nan  # not retrieved
        out.append((scores, labels))
    out.append((np.array([0.9, np.nan, 0.4, 0.4]), np.array([False, True, False, False])))  # no retrieved positive
    out.append((np.array([0.9, 0.8, 0.8]), np.array([True, True, True])))  # no negative
    out.append((np.array([np.nan, np.nan]), np.array([True, False])))  # nothing retrieved
    return out


@pytest.mark.parametrize("case", range(7))
def test_pr_curve_is_sklearns_wrapped_and_matches_the_hand_written_one(case):
    scores, labels = pr_cases()[case]
    curve = pr_curve(scores, labels)
    thresholds, precision, recall, tp, fp = old_pr_curve(scores, labels)
    np.testing.assert_array_equal(curve.thresholds, thresholds)
    np.testing.assert_array_equal(curve.tp, tp)
    np.testing.assert_array_equal(curve.fp, fp)
    np.testing.assert_allclose(curve.precision, precision, rtol=0, atol=1e-12)
    np.testing.assert_allclose(curve.recall, recall, rtol=0, atol=1e-12)
    if len(thresholds):  # so the chosen operating point is the same
        old = PRCurve(thresholds, precision.astype(np.float64), recall.astype(np.float64), tp, fp,
                      int(labels.sum()), int((~labels).sum()))
        assert best_fbeta(curve, 2.0) == best_fbeta(old, 2.0) and best_fbeta(curve) == best_fbeta(old)


def test_prometheus_output_keeps_names_labels_and_values():
    """prometheus_client writes numbers its own way (e.g. 1.7963604e+09): compare the parsed
    families, which is what a scraper sees, and the order of the families."""
    assert families(canary_prometheus(canary_report())) == families(OLD_CANARY_PROM)
    assert families(drift_prometheus(drift_report())) == families(OLD_DRIFT_PROM)
    # textually, every line but the numbers is as before: HELP/TYPE lines, names, labels in their order
    for new_text, old_text in ((canary_prometheus(canary_report()), OLD_CANARY_PROM),
                               (drift_prometheus(drift_report()), OLD_DRIFT_PROM)):
        assert [ln.rsplit(" ", 1)[0] if not ln.startswith("#") else ln for ln in new_text.splitlines()] == \
            [ln.rsplit(" ", 1)[0] if not ln.startswith("#") else ln for ln in old_text.splitlines()]
    new = canary_prometheus(canary_report())
    assert new.count("# TYPE embedctl_canary_recall gauge") == 1 and 'index="do\\"cs"' in new
    assert "embedctl_drift_length_psi" not in drift_prometheus(drift_report())  # None values are left out
    assert math.isclose([v for n, _, _, s in families(new) if n == "embedctl_canary_last_run_timestamp_seconds"
                         for _, _, v in s][0], 1796360400.0)


def test_prometheus_labels_keep_their_order_whatever_their_values():
    from prometheus_client.parser import text_string_to_metric_families

    from engine.quality.reports import prometheus_text

    odd = 'a,}"=\\ b\nc'
    text = prometheus_text([("embedctl_x", "An x.", {"version": odd, "index": "i", "alias": "l"}, 2.5)])
    assert text.splitlines()[2].startswith('embedctl_x{version="a,}\\"=\\\\ b\\nc",index="i",alias="l"} ')
    [fam] = text_string_to_metric_families(text)
    assert fam.samples[0].labels == {"version": odd, "index": "i", "alias": "l"} and fam.samples[0].value == 2.5
    with pytest.raises(ValueError, match="label names"):
        prometheus_text([("embedctl_x", "An x.", {"bad-label": "v"}, 1.0)])
