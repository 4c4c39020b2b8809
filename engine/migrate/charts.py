"""Charts of the migration report (matplotlib, Agg backend), each a PNG inlined as a data: URI."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

BLUE = "#2f6db5"
GREEN = "#2e9d5b"


def _figure(width: float = 6.4, height: float = 3.4) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(width, height), dpi=100)


def _png(plt: Any, fig: Any) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def chart_score_histograms(blue: Mapping[str, Sequence[float]], green: Mapping[str, Sequence[float]],
                           thresholds: Mapping[str, float | None] | None = None) -> str:
    """Two panels (top-1 scores, all top-k scores): blue vs green histograms, with each side's
    calibrated threshold as a dashed line when known."""
    import numpy as np

    plt, fig = _figure(9.6, 3.4)
    for i, (key, title) in enumerate((("top1", "top-1 score per query"), ("topk", "all top-k scores"))):
        ax = fig.add_subplot(1, 2, i + 1)
        b = np.asarray(blue.get(key) or [], dtype=float)
        g = np.asarray(green.get(key) or [], dtype=float)
        both = np.concatenate([b, g]) if len(b) + len(g) else np.array([0.0, 1.0])
        lo, hi = float(both.min()), float(both.max())
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 31)
        if len(b):
            ax.hist(b, bins=bins, alpha=0.55, color=BLUE, label=f"blue (n={len(b)})", density=True)
        if len(g):
            ax.hist(g, bins=bins, alpha=0.55, color=GREEN, label=f"green (n={len(g)})", density=True)
        for side, color in (("blue", BLUE), ("green", GREEN)):
            th = (thresholds or {}).get(side)
            if th is not None:
                ax.axvline(float(th), color=color, linestyle="--", linewidth=1.5, label=f"{side} threshold {th:.3f}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("similarity score")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    return _png(plt, fig)


def chart_overlap_by_k(overlap: Mapping[str, float | None], jaccard: Mapping[str, float | None]) -> str:
    """Mean overlap@k and Jaccard@k of blue's and green's top-k, by k."""
    plt, fig = _figure(6.0, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    ks = sorted(int(k) for k in overlap)
    ax.plot(ks, [overlap[str(k)] or 0.0 for k in ks], marker="o", color=BLUE, label="overlap@k")
    ax.plot(ks, [jaccard[str(k)] or 0.0 for k in ks], marker="s", color=GREEN, label="Jaccard@k")
    ax.set_xscale("log") if ks and max(ks) / max(min(ks), 1) >= 10 else None
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("k (documents)")
    ax.set_ylabel("mean over queries")
    ax.set_title("how much of blue's top-k green returns", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(plt, fig)


def chart_per_query(jaccard: Sequence[float], spearman: Sequence[float | None], k: int) -> str:
    """Per-query distributions: Jaccard@k and Spearman's rho."""
    import numpy as np

    plt, fig = _figure(9.6, 3.0)
    ax = fig.add_subplot(1, 2, 1)
    ax.hist(np.asarray(jaccard, dtype=float), bins=np.linspace(0, 1, 21), color=BLUE, alpha=0.8)
    ax.set_title(f"Jaccard@{k} per query", fontsize=10)
    ax.set_xlabel("Jaccard")
    ax.set_ylabel("queries")
    ax = fig.add_subplot(1, 2, 2)
    rho = np.asarray([r for r in spearman if r is not None], dtype=float)
    ax.hist(rho, bins=np.linspace(-1, 1, 21), color=GREEN, alpha=0.8)
    ax.set_title("Spearman rank correlation per query (union of top-k)", fontsize=10)
    ax.set_xlabel("rho")
    ax.set_ylabel("queries")
    return _png(plt, fig)


def chart_metrics(blue: Mapping[str, float | None], green: Mapping[str, float | None]) -> str:
    """Benchmark metrics side by side."""
    import numpy as np

    keys = [k for k in blue if k in green]
    plt, fig = _figure(6.0, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(keys))
    ax.bar(x - 0.18, [blue[k] or 0.0 for k in keys], width=0.36, color=BLUE, label="blue")
    ax.bar(x + 0.18, [green[k] or 0.0 for k in keys], width=0.36, color=GREEN, label="green")
    ax.set_xticks(x)
    ax.set_xticklabels(keys)
    ax.set_ylim(0, 1)
    ax.set_title("benchmark metrics", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(plt, fig)
