"""Calibration math: the precision-recall curve, the F-beta optimum, the relative-to-best margin and the floor."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from engine.core.errors import ConfigError, SchemaError

log = logging.getLogger(__name__)

MAX_CURVE_POINTS = 256


@dataclass(frozen=True)
class PRCurve:
    """Precision and recall of the rule ``score >= t`` at every distinct score ``t``.

    Pairs whose score is NaN were not retrieved (outside the search depth): no threshold can
    return them, so they count as predicted negative at every ``t`` (a relevant one lowers
    recall everywhere). Arrays are aligned, thresholds descending.
    """

    thresholds: np.ndarray  # [m] distinct retrieved scores, descending
    precision: np.ndarray  # [m]
    recall: np.ndarray  # [m]
    tp: np.ndarray  # [m] int
    fp: np.ndarray  # [m] int
    positives: int  # all relevant pairs, retrieved or not
    negatives: int

    def f_beta(self, beta: float = 1.0) -> np.ndarray:
        return f_beta(self.precision, self.recall, beta)

    def average_precision(self) -> float:
        """Area under the step PR curve (sum of precision x recall increments), as sklearn computes it."""
        if not len(self.recall):
            return 0.0
        prev = np.concatenate([[0.0], self.recall[:-1]])
        return float(np.sum((self.recall - prev) * self.precision))


def f_beta(precision: np.ndarray | float, recall: np.ndarray | float, beta: float = 1.0) -> np.ndarray:
    """(1 + b^2) P R / (b^2 P + R), 0 where both are 0. ``beta > 1`` weighs recall more."""
    if beta <= 0:
        raise ConfigError(f"beta must be > 0, got {beta!r}")
    p = np.asarray(precision, dtype=np.float64)
    r = np.asarray(recall, dtype=np.float64)
    b2 = beta * beta
    denom = b2 * p + r
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (1 + b2) * p * r / np.where(denom > 0, denom, 1.0), 0.0)


def pr_curve(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> PRCurve:
    """The precision-recall curve of ``score >= t`` over labelled pairs (NaN score = not retrieved).

    ``sklearn.metrics.precision_recall_curve`` computes the curve over the retrieved pairs (one
    point per distinct score: tied scores move together, a threshold cannot split them). The
    project's rule differs in one way, which this wrapper adds: a pair the index did not
    retrieve (NaN) can pass no threshold, so recall is over *all* relevant pairs
    (``tp / positives``, sklearn's recall scaled by retrieved/all relevant) and the counts
    include them as misses. The points come back descending, without sklearn's closing
    (precision 1, recall 0) point, with the tp/fp counts at each threshold.
    """
    s = np.asarray(scores, dtype=np.float64)  # [n]
    y = np.asarray(labels, dtype=bool)  # [n]
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must be 1-d and aligned")
    positives, negatives = int(y.sum()), int((~y).sum())
    keep = ~np.isnan(s)
    s, y = s[keep], y[keep]  # [m] the retrieved pairs
    if not len(s):
        empty = np.zeros(0, dtype=np.float64)
        return PRCurve(empty, empty, empty, np.zeros(0, np.int64), np.zeros(0, np.int64), positives, negatives)
    thresholds = np.unique(s)[::-1]  # [t] distinct scores, descending
    kept = len(s) - np.searchsorted(np.sort(s), thresholds, side="left")  # [t] pairs with score >= threshold
    retrieved_pos = int(y.sum())
    if retrieved_pos == 0:  # sklearn warns and calls recall 1 here; no threshold finds a relevant pair
        tp = np.zeros(len(thresholds), dtype=np.int64)
        precision = np.zeros(len(thresholds), dtype=np.float64)
    else:
        from sklearn.metrics import precision_recall_curve

        p_sk, r_sk, t_sk = precision_recall_curve(y, s)  # ascending thresholds, plus a closing (1, 0) point
        assert np.array_equal(t_sk[::-1], thresholds), "sklearn's thresholds are the distinct retrieved scores"
        precision = p_sk[:-1][::-1].astype(np.float64)
        tp = np.rint(r_sk[:-1][::-1] * retrieved_pos).astype(np.int64)
    recall = tp / positives if positives else np.zeros(len(tp))
    return PRCurve(thresholds=thresholds, precision=precision, recall=recall.astype(np.float64), tp=tp,
                   fp=(kept - tp).astype(np.int64), positives=positives, negatives=negatives)


@dataclass(frozen=True)
class OperatingPoint:
    """A chosen threshold and what it gives on the calibration pairs."""

    threshold: float  # the decision boundary: keep scores >= threshold
    precision: float
    recall: float
    f_beta: float
    beta: float
    tp: int
    fp: int
    fn: int
    at_score: float  # the lowest kept calibration score (threshold is between it and the next lower one)

    def to_dict(self) -> dict[str, Any]:
        # the boundary keeps full precision: rounding could move it across a calibration score
        return {k: (round(v, 6) if isinstance(v, float) and k not in ("threshold", "at_score") else v)
                for k, v in asdict(self).items()}


def best_fbeta(curve: PRCurve, beta: float = 1.0) -> OperatingPoint:
    """The threshold maximising F-beta on the curve.

    Ties in F-beta go to the highest threshold (fewer results for the same quality). The
    stored boundary is the midpoint between the chosen score and the next lower calibration
    score, so it sits in the gap rather than on a training example; both give the same
    partition of the calibration pairs.
    """
    if not len(curve.thresholds):
        raise SchemaError("no calibration pair was retrieved by the index: nothing to calibrate on "
                          "(raise --depth, or check that the pairs' doc ids exist in this index)")
    f = curve.f_beta(beta)
    i = int(np.flatnonzero(f >= f.max() - 1e-12)[0])  # highest threshold among (float-)ties
    at = float(curve.thresholds[i])
    boundary = (at + float(curve.thresholds[i + 1])) / 2 if i + 1 < len(curve.thresholds) else at
    tp, fp = int(curve.tp[i]), int(curve.fp[i])
    return OperatingPoint(threshold=boundary, precision=float(curve.precision[i]), recall=float(curve.recall[i]),
                          f_beta=float(f[i]), beta=beta, tp=tp, fp=fp, fn=curve.positives - tp, at_score=at)


def relative_margins(scores: np.ndarray, top_scores: np.ndarray) -> np.ndarray:
    """``top score of the pair's query - pair score`` (>= 0; NaN where the pair was not retrieved)."""
    return np.asarray(top_scores, dtype=np.float64) - np.asarray(scores, dtype=np.float64)


def best_relative(scores: np.ndarray, top_scores: np.ndarray, labels: np.ndarray, beta: float = 1.0,
                  floor: float | None = None) -> OperatingPoint:
    """The margin ``delta`` for "keep hits within ``delta`` of the query's top score" maximising
    F-beta, with the floor applied first (as search applies it). ``threshold`` holds ``delta``."""
    s = np.asarray(scores, dtype=np.float64)
    m = relative_margins(s, top_scores)
    if floor is not None:
        m = np.where(s >= floor, m, np.nan)
    curve = pr_curve(-m, labels)  # keep iff -margin >= -delta
    op = best_fbeta(curve, beta)
    return OperatingPoint(threshold=max(0.0, -op.threshold), precision=op.precision, recall=op.recall,
                          f_beta=op.f_beta, beta=beta, tp=op.tp, fp=op.fp, fn=op.fn, at_score=-op.at_score)


def choose_floor(scores: np.ndarray, labels: np.ndarray, floor_recall: float = 0.99) -> float | None:
    """The highest score floor that still keeps ``floor_recall`` of the retrieved relevant pairs:
    a safety net under the relative rule that removes only garbage."""
    if not 0 < floor_recall <= 1:
        raise ConfigError(f"floor recall must be in (0, 1], got {floor_recall!r}")
    s = np.asarray(scores, dtype=np.float64)
    pos = np.sort(s[np.asarray(labels, dtype=bool) & ~np.isnan(s)])  # ascending
    if not len(pos):
        return None
    drop = int(math.floor((1 - floor_recall) * len(pos) + 1e-9))  # relevant pairs we may lose
    return float(pos[min(drop, len(pos) - 1)])


def point_at(scores: np.ndarray, labels: np.ndarray, keep: np.ndarray, beta: float = 1.0) -> dict[str, float]:
    """Precision/recall/F-beta of an arbitrary keep-mask over the pairs."""
    y = np.asarray(labels, dtype=bool)
    k = np.asarray(keep, dtype=bool)
    tp, fp = int((k & y).sum()), int((k & ~y).sum())
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / int(y.sum()) if y.sum() else 0.0
    return {"precision": round(p, 6), "recall": round(r, 6), "f_beta": round(float(f_beta(p, r, beta)), 6),
            "tp": tp, "fp": fp, "fn": int(y.sum()) - tp}


def downsample_curve(curve: PRCurve, max_points: int = MAX_CURVE_POINTS) -> dict[str, list[float]]:
    """At most ``max_points`` points of the curve, evenly spaced in rank, ends kept."""
    m = len(curve.thresholds)
    idx = np.unique(np.linspace(0, m - 1, min(m, max_points)).round().astype(int)) if m else np.zeros(0, dtype=int)
    return {"threshold": [round(float(x), 6) for x in curve.thresholds[idx]],
            "precision": [round(float(x), 6) for x in curve.precision[idx]],
            "recall": [round(float(x), 6) for x in curve.recall[idx]]}
