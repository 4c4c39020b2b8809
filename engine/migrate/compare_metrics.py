"""Blue-vs-green comparison metrics over document rankings (overlap, Jaccard, rank correlation, score shift)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.core.errors import ConfigError
from engine.index.hits import doc_scores

DEFAULT_KS: tuple[int, ...] = (1, 3, 5, 10, 20, 50, 100)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
Sample = Sequence[float] | np.ndarray  # one sample of numbers: ranks or scores


def overlap_at_k(a: Sequence[str], b: Sequence[str], k: int) -> float:
    """|top-k(a) ∩ top-k(b)| / k' with k' = the longer of the two cut lists (1.0 when both are empty)."""
    ta, tb = list(a[:k]), list(b[:k])
    denom = max(len(ta), len(tb))
    return 1.0 if denom == 0 else len(set(ta) & set(tb)) / denom


def jaccard_at_k(a: Sequence[str], b: Sequence[str], k: int) -> float:
    """|A ∩ B| / |A ∪ B| of the two top-k sets (1.0 when both are empty)."""
    sa, sb = set(a[:k]), set(b[:k])
    union = sa | sb
    return 1.0 if not union else len(sa & sb) / len(union)


def _union_ranks(a: Sequence[str], b: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ranks of every doc of top-k(a) ∪ top-k(b) in each list; a doc missing from a list gets
    rank k+1 there (tied last), the usual convention for comparing truncated rankings."""
    ta, tb = list(a[:k]), list(b[:k])
    union = list(dict.fromkeys(ta + tb))
    ra = {d: i + 1 for i, d in enumerate(ta)}
    rb = {d: i + 1 for i, d in enumerate(tb)}
    return (np.array([ra.get(d, k + 1) for d in union], dtype=np.float64),
            np.array([rb.get(d, k + 1) for d in union], dtype=np.float64))


def _comparable(x: Sample, y: Sample) -> tuple[np.ndarray, np.ndarray] | None:
    """Both samples as arrays, or None when a correlation is undefined (n < 2, a constant side);
    checked here so scipy never warns about constant input."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(xa) < 2 or np.all(xa == xa[0]) or np.all(ya == ya[0]):
        return None
    return xa, ya


def spearman(x: Sample, y: Sample) -> float | None:
    """Spearman's rho (``scipy.stats.spearmanr``: Pearson on average ranks); None when undefined."""
    from scipy.stats import spearmanr

    xy = _comparable(x, y)
    return None if xy is None else float(spearmanr(*xy).statistic)


def kendall_tau_b(x: Sample, y: Sample) -> float | None:
    """Kendall's tau-b, tie-corrected (``scipy.stats.kendalltau``); None when undefined."""
    from scipy.stats import kendalltau

    xy = _comparable(x, y)
    return None if xy is None else float(kendalltau(*xy, variant="b").statistic)


def rank_correlations(a: Sequence[str], b: Sequence[str], k: int) -> dict[str, float | None]:
    """Spearman and Kendall between two rankings, on the union of their top-k (missing = rank k+1).
    Both empty, or the same single doc: 1.0 (they agree completely)."""
    ra, rb = _union_ranks(a, b, k)
    if len(ra) == 0 or (len(ra) == 1 and ra[0] == rb[0]):
        return {"spearman": 1.0, "kendall": 1.0}
    return {"spearman": spearman(ra, rb), "kendall": kendall_tau_b(ra, rb)}


def ks_2samp(a: Sample, b: Sample) -> dict[str, float | None]:
    """Two-sample Kolmogorov-Smirnov (``scipy.stats.ks_2samp``, two-sided): the statistic
    D = max |F_a - F_b| and its p-value. ``{"statistic": None, "pvalue": None}`` when a sample is empty."""
    from scipy.stats import ks_2samp as scipy_ks_2samp

    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(xa) == 0 or len(xb) == 0:
        return {"statistic": None, "pvalue": None}
    res = scipy_ks_2samp(xa, xb)
    return {"statistic": float(res.statistic), "pvalue": float(res.pvalue)}


def describe_scores(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, mean, std, min, max and the QUANTILES of a score sample."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None,
                **{f"p{int(q * 100):02d}": None for q in QUANTILES}}
    out: dict[str, float | int | None] = {"n": int(len(x)), "mean": float(x.mean()), "std": float(x.std()),
                                          "min": float(x.min()), "max": float(x.max())}
    for q in QUANTILES:
        out[f"p{int(q * 100):02d}"] = float(np.quantile(x, q))
    return out


def score_shift(blue: Sequence[float], green: Sequence[float]) -> dict[str, Any]:
    """How green's scores moved against blue's: both summaries, green - blue for the mean and each
    quantile, and the KS statistic. Scores of two models live on different scales, which is
    why thresholds must be recalibrated: this says by how much."""
    b, g = describe_scores(blue), describe_scores(green)
    delta: dict[str, float | None] = {}
    for key in ("mean", "std", *[f"p{int(q * 100):02d}" for q in QUANTILES]):
        bv, gv = b[key], g[key]
        delta[key] = None if bv is None or gv is None else float(gv) - float(bv)
    return {"blue": b, "green": g, "delta": delta, "ks": ks_2samp(blue, green)}


def _mean(values: Sequence[float | None]) -> float | None:
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(xs)) if xs else None


@dataclass(frozen=True)
class QueryComparison:
    """One query answered by blue and by green (doc-level rankings)."""

    query_id: str
    text: str
    blue: list[tuple[str, float]]
    green: list[tuple[str, float]]
    overlap: dict[int, float]
    jaccard: dict[int, float]
    top1_agree: bool
    spearman: float | None
    kendall: float | None

    @property
    def disagreement(self) -> float:
        """0 (identical top-k) .. 1 (nothing in common, opposite order)."""
        k = max(self.jaccard)
        rho = self.spearman if self.spearman is not None else 0.0
        return round(1.0 - 0.5 * self.jaccard[k] - 0.25 * (1.0 if self.top1_agree else 0.0) - 0.25 * max(rho, 0.0), 6)


def compare_query(query_id: str, text: str, blue_hits: Sequence[Any], green_hits: Sequence[Any], k: int,
                  ks: Sequence[int] = DEFAULT_KS) -> QueryComparison:
    """Compare one query's answers from blue and green at doc level (``ks`` cut at ``k``).

    Blue and green usually chunk differently (another tokenizer, another max length), so chunk
    ids do not line up between them; documents (each at its best chunk) do."""
    b = doc_scores(blue_hits, k)
    g = doc_scores(green_hits, k)
    bd, gd = [d for d, _ in b], [d for d, _ in g]
    cuts = sorted({c for c in ks if c <= k} | {k})
    rc = rank_correlations(bd, gd, k)
    return QueryComparison(
        query_id=query_id, text=text, blue=b, green=g,
        overlap={c: overlap_at_k(bd, gd, c) for c in cuts}, jaccard={c: jaccard_at_k(bd, gd, c) for c in cuts},
        top1_agree=bool(bd and gd and bd[0] == gd[0]) or (not bd and not gd),
        spearman=rc["spearman"], kendall=rc["kendall"],
    )


def summarize_comparisons(rows: Sequence[QueryComparison], k: int) -> dict[str, Any]:
    """Means over queries, score-distribution shifts (top-1 and all top-k) and the histogram
    inputs the report draws."""
    if not rows:
        raise ConfigError("the comparison query set is empty")
    cuts = sorted(rows[0].overlap)
    top1_b = [r.blue[0][1] for r in rows if r.blue]
    top1_g = [r.green[0][1] for r in rows if r.green]
    all_b = [s for r in rows for _, s in r.blue]
    all_g = [s for r in rows for _, s in r.green]
    return {
        "queries": len(rows), "k": k,
        "overlap_at_k": {str(c): _mean([r.overlap[c] for r in rows]) for c in cuts},
        "jaccard_at_k": {str(c): _mean([r.jaccard[c] for r in rows]) for c in cuts},
        "top1_agreement": _mean([1.0 if r.top1_agree else 0.0 for r in rows]),
        "spearman": _mean([r.spearman for r in rows]),
        "kendall": _mean([r.kendall for r in rows]),
        "empty": {"blue": sum(1 for r in rows if not r.blue), "green": sum(1 for r in rows if not r.green)},
        "score_shift": {"top1": score_shift(top1_b, top1_g), "topk": score_shift(all_b, all_g)},
    }
