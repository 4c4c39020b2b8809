"""Fixed-size, mergeable statistics: score histograms and per-batch counters (never the scores themselves)."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from engine.mining.config import RULES, SOURCES

log = logging.getLogger(__name__)


class ScoreHistogram:
    """Count, mean, std, min, max exactly; quantiles to ``(hi - lo) / bins``."""

    def __init__(self, lo: float = -2.0, hi: float = 2.0, bins: int = 4000):
        self.lo, self.hi, self.bins = lo, hi, bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.n = 0
        self.sum = 0.0
        self.sumsq = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, values: Any) -> None:
        v = np.asarray(values, dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        if not v.size:
            return
        idx = np.clip(((v - self.lo) / (self.hi - self.lo) * self.bins).astype(np.int64), 0, self.bins - 1)
        np.add.at(self.counts, idx, 1)
        self.n += int(v.size)
        self.sum += float(v.sum())
        self.sumsq += float((v * v).sum())
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))

    def merge(self, other: ScoreHistogram) -> None:
        self.counts += other.counts
        self.n += other.n
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float | None:
        if not self.n:
            return None
        target = q * self.n
        i = int(np.searchsorted(np.cumsum(self.counts), max(target, 1), side="left"))
        mid = self.lo + (i + 0.5) * (self.hi - self.lo) / self.bins
        return float(min(max(mid, self.min), self.max))

    def summary(self) -> dict[str, Any]:
        if not self.n:
            return {"count": 0}
        mean = self.sum / self.n
        var = max(0.0, self.sumsq / self.n - mean * mean) * self.n / max(1, self.n - 1)
        return {"count": self.n, "mean": round(mean, 4), "std": round(math.sqrt(var), 4), "min": round(self.min, 4),
                "p25": _r(self.quantile(0.25)), "median": _r(self.quantile(0.5)), "p75": _r(self.quantile(0.75)),
                "max": round(self.max, 4)}

    def to_dict(self) -> dict[str, Any]:
        nz = np.nonzero(self.counts)[0]
        return {"lo": self.lo, "hi": self.hi, "bins": self.bins, "n": self.n, "sum": self.sum, "sumsq": self.sumsq,
                "min": self.min if self.n else None, "max": self.max if self.n else None,
                "idx": nz.tolist(), "cnt": self.counts[nz].tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScoreHistogram:
        h = cls(d["lo"], d["hi"], d["bins"])
        h.counts[np.asarray(d["idx"], dtype=np.int64)] = np.asarray(d["cnt"], dtype=np.int64)
        h.n, h.sum, h.sumsq = int(d["n"]), float(d["sum"]), float(d["sumsq"])
        h.min = math.inf if d["min"] is None else float(d["min"])
        h.max = -math.inf if d["max"] is None else float(d["max"])
        return h


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


HISTOGRAMS = ("positive", "negative", "difference", "difficulty")


@dataclass
class BatchStats:
    """What one batch reports back (small; the driver merges these)."""

    batch: int
    queries: int = 0
    pairs: int = 0
    rows_written: int = 0
    rows_incomplete: int = 0
    queries_incomplete: int = 0
    pairs_unresolved: int = 0
    negatives: int = 0
    candidates: int = 0
    ce_scored: int = 0
    ce_budget_exhausted: int = 0  # queries whose cross-encoder budget ran out before num_negatives passed
    by_source: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SOURCES})
    removed: dict[str, int] = field(default_factory=lambda: {r: 0 for r in RULES})
    hist: dict[str, ScoreHistogram] = field(default_factory=lambda: {h: ScoreHistogram() for h in HISTOGRAMS})
    seconds: dict[str, float] = field(default_factory=lambda: {"encode": 0.0, "search": 0.0, "select": 0.0,
                                                                "cross_encoder": 0.0, "write": 0.0, "total": 0.0})
    part: dict[str, Any] | None = None
    worker: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "hist"}
        d["hist"] = {k: h.to_dict() for k, h in self.hist.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BatchStats:
        d = dict(d)
        hist = {k: ScoreHistogram.from_dict(v) for k, v in d.pop("hist").items()}
        return cls(**d, hist=hist)

    def merge(self, o: BatchStats) -> None:
        for k in ("queries", "pairs", "rows_written", "rows_incomplete", "queries_incomplete", "pairs_unresolved",
                  "negatives", "candidates", "ce_scored", "ce_budget_exhausted"):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        for k, v in o.by_source.items():
            self.by_source[k] = self.by_source.get(k, 0) + v
        for k, v in o.removed.items():
            self.removed[k] = self.removed.get(k, 0) + v
        for k, h in o.hist.items():
            self.hist[k].merge(h)
        for k, sec in o.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + sec
