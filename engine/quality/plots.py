"""The calibration plot: precision-recall curve with the chosen point, and score histograms (PNG)."""

from __future__ import annotations

import io
import logging

import numpy as np

from engine.quality.prcurve import OperatingPoint, PRCurve

log = logging.getLogger(__name__)


def plot_calibration(curve: PRCurve, op: OperatingPoint, scores: np.ndarray, labels: np.ndarray, *,
                     floor: float | None = None, title: str = "calibration") -> bytes:
    """PNG: the precision-recall curve with the chosen point and its iso-F-beta line, and the
    score histograms of relevant vs non-relevant pairs with the threshold and floor marked."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    try:
        ax1.step(curve.recall, curve.precision, where="post", color="tab:blue", label="precision-recall")
        r = np.linspace(0.01, 1, 200)
        b2 = op.beta ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            p_iso = op.f_beta * r / ((1 + b2) * r - b2 * op.f_beta)  # P on the F-beta isoline through the point
        ok = (p_iso > 0) & (p_iso <= 1)
        ax1.plot(r[ok], p_iso[ok], ls=":", color="grey", label=f"F{op.beta:g} = {op.f_beta:.3f}")
        ax1.scatter([op.recall], [op.precision], color="tab:red", zorder=5,
                    label=f"threshold {op.threshold:.3f} (P {op.precision:.2f}, R {op.recall:.2f})")
        ax1.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02), title="precision-recall")
        ax1.legend(loc="lower left", fontsize=8)
        ax1.grid(alpha=0.3)
        s = np.asarray(scores, dtype=np.float64)
        y = np.asarray(labels, dtype=bool)
        ok_s = ~np.isnan(s)
        if ok_s.any():
            bins = np.linspace(np.nanmin(s), np.nanmax(s), 40)
            ax2.hist(s[ok_s & ~y], bins=bins, alpha=0.55, color="tab:grey",
                     label=f"non-relevant ({int((ok_s & ~y).sum())})")
            ax2.hist(s[ok_s & y], bins=bins, alpha=0.55, color="tab:green", label=f"relevant ({int((ok_s & y).sum())})")
        ax2.axvline(op.threshold, color="tab:red", label=f"threshold {op.threshold:.3f}")
        if floor is not None:
            ax2.axvline(floor, color="tab:orange", ls="--", label=f"floor {floor:.3f}")
        missed = int((~ok_s & y).sum())
        ax2.set(xlabel="score", ylabel="pairs", title=f"scores ({missed} relevant pairs not retrieved)")
        ax2.legend(fontsize=8)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)
