"""The migration report: one self-contained HTML page (inline CSS, charts as base64 PNG) that a
reviewer reads to approve or stop a model migration, and a headless-browser screenshot of it.

``render_migration_report(data)`` takes the JSON the migration stores (state, baseline,
comparison, calibrations) and returns the page. Nothing on the page is fetched: no script,
no font, no stylesheet, no image from elsewhere, so it can be mailed, attached to a ticket or
opened from object storage as it is.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.core.errors import EmbedctlError, NotFoundError

log = logging.getLogger(__name__)

BLUE = "#2f6db5"
GREEN = "#2e9d5b"
RED = "#c0392b"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def fmt(x: Any, digits: int = 4) -> str:
    """A number for a table cell: fixed digits, '—' for missing."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "—"
        return f"{x:.{digits}f}"
    return esc(x)


def fmt_delta(x: float | None, digits: int = 4, *, good_if_positive: bool | None = True) -> str:
    """A signed difference, coloured when ``good_if_positive`` says which way is better."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    text = f"{x:+.{digits}f}"
    if good_if_positive is None or abs(x) < 10 ** -digits:
        return text
    good = (x > 0) == good_if_positive
    return f'<span class="{"good" if good else "bad"}">{text}</span>'


def pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}%"


# ---------------------------------------------------------------------------------------------
# charts (matplotlib, Agg backend, PNG inlined as a data: URI)
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222;
 line-height:1.4;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:14px;margin:16px 0 6px}
.sub{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:6px 0 10px}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f6f8} td.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{border-left:6px solid #888;background:#f7f7f7;padding:10px 14px;margin:14px 0}
.verdict.ok{border-color:#2e9d5b;background:#eef8f1} .verdict.warn{border-color:#d68910;background:#fdf5e6}
.verdict.bad{border-color:#c0392b;background:#fbeeee}
.good{color:#1e7d45;font-weight:600} .bad{color:#b03a2e;font-weight:600}
.pill{display:inline-block;border-radius:10px;padding:1px 8px;font-size:12px;background:#eee}
.pill.done,.pill.passed,.pill.cut_over{background:#d9f2e3} .pill.failed,.pill.rolled_back{background:#f7d9d6}
.pill.running,.pill.publishing,.pill.checking{background:#fdebd0}
img.chart{max-width:100%;border:1px solid #eee;margin:4px 0}
.blue{color:#2f6db5;font-weight:600} .green{color:#2e9d5b;font-weight:600}
.q{font-weight:600} .rel{color:#1e7d45;font-weight:700} .small{font-size:12px;color:#555}
.cols{display:flex;gap:12px;flex-wrap:wrap} .cols>div{flex:1;min-width:300px}
"""


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], num_cols: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(f'<td class="num">{c}</td>' if i in num_cols else f"<td>{c}</td>" for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _pill(status: Any) -> str:
    s = esc(status or "pending")
    return f'<span class="pill {s}">{s}</span>'


def _verdict(data: Mapping[str, Any]) -> tuple[str, str]:
    """(css class, sentence) summarising where the migration stands."""
    state = data["state"]
    status = state.get("status")
    cmp_ = data.get("compare") or {}
    bench = cmp_.get("benchmark") or {}
    k = cmp_.get("k") or (state.get("plan") or {}).get("k", 10)
    if status == "rolled_back":
        why = (state.get("rollback") or {}).get("reason") or "rolled back"
        return "bad", f"Rolled back to blue: {esc(why)}"
    if status == "abandoned":
        why = (state.get("abandoned") or {}).get("reason") or "no reason given"
        return "bad", f"Abandoned: {esc(why)}. The alias serves blue; green may be garbage-collected."
    if status == "cut_over":
        return "ok", f"Cut over: the alias serves green alone; blue is kept until {esc(state.get('retain_until'))}."
    parts = []
    cls = "ok"
    nd = f"ndcg@{k}"
    if bench.get("blue") and bench.get("green") and bench["blue"].get(nd) is not None:
        d = bench["green"][nd] - bench["blue"][nd]
        parts.append(f"green nDCG@{k} {bench['green'][nd]:.4f} vs blue {bench['blue'][nd]:.4f} ({d:+.4f})")
        if d < -0.01:
            cls = "warn"
    summ = cmp_.get("summary") or {}
    if summ:
        parts.append(f"top-1 agreement {pct(summ.get('top1_agreement'))}, overlap@{k} "
                     f"{pct((summ.get('overlap_at_k') or {}).get(str(k)))}")
    cal = state.get("phases", {}).get("calibrate", {})
    if cal.get("status") != "done":
        parts.append("green is not calibrated yet")
        cls = "warn" if cls == "ok" else cls
    phase = state.get("phase")
    head = f"Phase: {esc(phase)}. " if phase else ""
    return cls, head + ("; ".join(parts) if parts else "no comparison yet") + "."


def render_migration_report(data: Mapping[str, Any], *, charts: bool = True) -> str:
    """The HTML page for a migration.

    ``data``: ``{"state": <state.json>, "baseline": <baseline.json> | None, "compare":
    <compare.json> | None, "calibration": {"blue": record | None, "green": record | None},
    "generated_at": str, "engine_version": str, "store": str}``.
    """
    state = data["state"]
    plan = state.get("plan") or {}
    blue = state.get("blue") or {}
    green = state.get("green") or {}
    cmp_ = data.get("compare") or {}
    base = data.get("baseline") or {}
    k = int(cmp_.get("k") or plan.get("k") or 10)
    title = (f"Migration {state.get('migration_id')}: {state.get('index')}/{state.get('alias')} "
             f"{blue.get('version', '?')} → {green.get('version', '?')}")
    out: list[str] = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<div class="sub">status {_pill(state.get("status"))} · created {esc(state.get("created_at"))} by '
        f'{esc(state.get("created_by"))} · report generated {esc(data.get("generated_at"))} · store '
        f'{esc(data.get("store"))} · embedctl {esc(data.get("engine_version"))}</div>',
    ]
    cls, sentence = _verdict(data)
    out.append(f'<div class="verdict {cls}">{sentence}</div>')

    # --- versions -----------------------------------------------------------------------------
    out.append("<h2>Versions</h2>")
    rows = []
    for side, v in (("blue", blue), ("green", green)):
        model = v.get("model") or {}
        rows.append([f'<span class="{side}">{side}</span>', esc(v.get("version")), esc(model.get("name")),
                     fmt(v.get("dim")), esc(model.get("truncate_dim") or "—"),
                     esc((model.get("fingerprint") or "")[:12]), esc(v.get("kind")), esc(v.get("source_run")),
                     fmt(v.get("rows"))])
    out.append(_table(["", "version", "model", "dim", "truncated to", "model fingerprint", "index", "embed run",
                       "vectors"], rows, num_cols=(3, 8)))
    out.append('<p class="small">Each version embeds its queries with its own model: dimensions may differ '
               "(a query is never embedded by the other side's model).</p>")

    # --- metrics ------------------------------------------------------------------------------
    out.append("<h2>Metrics</h2>")
    bench = cmp_.get("benchmark") or {}
    metric_rows = []
    if bench.get("blue"):
        for key in bench["blue"]:
            b, g = bench["blue"].get(key), (bench.get("green") or {}).get(key)
            metric_rows.append([f"benchmark {esc(key)}", fmt(b), fmt(g),
                                fmt_delta(None if b is None or g is None else g - b)])
    for key, label in (("canary_recall", f"canary recall@{k}"), ("canary_mrr", f"canary MRR@{k}")):
        b = (base.get("canary") or {}).get(key)
        g = (cmp_.get("canary") or {}).get(key)
        if b is not None or g is not None:
            metric_rows.append([label, fmt(b), fmt(g), fmt_delta(None if b is None or g is None else g - b)])
    if metric_rows:
        out.append(_table(["metric", '<span class="blue">blue</span>', '<span class="green">green</span>',
                           "green − blue"], metric_rows, num_cols=(1, 2, 3)))
        if bench.get("queries"):
            out.append(f'<p class="small">Benchmark: {esc(bench.get("name"))}, {bench["queries"]} judged queries; '
                       "metrics at document level (a document's best chunk).</p>")
    summ = cmp_.get("summary") or {}
    if summ:
        agree = [["queries compared", fmt(summ.get("queries"))],
                 [f"overlap@{k} (mean)", fmt((summ.get("overlap_at_k") or {}).get(str(k)))],
                 [f"Jaccard@{k} (mean)", fmt((summ.get("jaccard_at_k") or {}).get(str(k)))],
                 ["top-1 agreement", pct(summ.get("top1_agreement"))],
                 ["Spearman rho (mean, union of top-k)", fmt(summ.get("spearman"))],
                 ["Kendall tau-b (mean, union of top-k)", fmt(summ.get("kendall"))],
                 ["empty answers (blue / green)", f"{(summ.get('empty') or {}).get('blue', 0)} / "
                                                  f"{(summ.get('empty') or {}).get('green', 0)}"]]
        out.append("<h3>Agreement between blue and green</h3>")
        out.append(_table(["measure", "value"], agree, num_cols=(1,)))
        if charts and bench.get("blue") and bench.get("green"):
            chart = chart_metrics(bench["blue"], bench["green"])
            out.append(f'<img class="chart" alt="benchmark metrics" src="{chart}">')

    # --- charts -------------------------------------------------------------------------------
    if summ and charts:
        out.append("<h2>Charts</h2>")
        out.append(f'<img class="chart" alt="overlap@k by k" '
                   f'src="{chart_overlap_by_k(summ["overlap_at_k"], summ["jaccard_at_k"])}">')
        scores = cmp_.get("scores") or {}
        th = {side: ((data.get("calibration") or {}).get(side) or {}).get("absolute", {}).get("threshold")
              for side in ("blue", "green")}
        out.append(f'<img class="chart" alt="score histograms" src="'
                   f'{chart_score_histograms(scores.get("blue") or {}, scores.get("green") or {}, th)}">')
        per = cmp_.get("per_query") or {}
        if per.get("jaccard"):
            out.append(f'<img class="chart" alt="per-query agreement" '
                       f'src="{chart_per_query(per["jaccard"], per.get("spearman") or [], k)}">')

    # --- score shift --------------------------------------------------------------------------
    shift = summ.get("score_shift") if summ else None
    if shift:
        out.append("<h2>Score-distribution shift</h2>")
        out.append('<p class="small">Scores of two models live on different scales: a threshold tuned for blue '
                   "means something else for green. This is why green is recalibrated.</p>")
        for key, label in (("top1", "top-1 score per query"), ("topk", f"all top-{k} scores")):
            s = shift[key]
            stats = ["mean", "std", "p05", "p25", "p50", "p75", "p95"]
            rows = [[esc(st), fmt(s["blue"].get(st)), fmt(s["green"].get(st)),
                     fmt_delta(s["delta"].get(st), good_if_positive=None)] for st in stats]
            ks = s.get("ks") or {}
            pv = ks.get("pvalue")
            pv_text = "—" if pv is None else (f"{pv:.3f}" if pv >= 0.001 else f"{pv:.1e}")
            rows.append(["KS statistic (p-value)", "", "", f"{fmt(ks.get('statistic'))} ({pv_text})"])
            out.append(f"<h3>{esc(label)}</h3>")
            out.append(_table(["", "blue", "green", "green − blue"], rows, num_cols=(1, 2, 3)))

    # --- calibration --------------------------------------------------------------------------
    cal = data.get("calibration") or {}
    out.append("<h2>Thresholds</h2>")
    if cal.get("blue") or cal.get("green"):
        rows = []
        for side in ("blue", "green"):
            rec = cal.get(side)
            if not rec:
                rows.append([f'<span class="{side}">{side}</span>', "not calibrated", "", "", "", "", ""])
                continue
            a = rec.get("absolute") or {}
            rows.append([f'<span class="{side}">{side}</span>', esc(rec.get("calibration_id")), fmt(a.get("threshold")),
                         fmt((rec.get("relative") or {}).get("delta")), fmt(a.get("precision")), fmt(a.get("recall")),
                         fmt(a.get("f_beta"))])
        out.append(_table(["", "calibration", "absolute threshold", "relative delta", "precision", "recall",
                           "F-beta"], rows, num_cols=(2, 3, 4, 5, 6)))
    else:
        out.append("<p>Not calibrated yet (phase <code>calibrate</code>).</p>")

    # --- rollout ------------------------------------------------------------------------------
    rollout = state.get("rollout") or {}
    out.append("<h2>Rollout</h2>")
    if rollout.get("steps"):
        rows = []
        for st in rollout["steps"]:
            gates = st.get("gates") or {}
            failures = "; ".join(esc(f) for f in (st.get("failures") or [])) or "—"
            rows.append([fmt(st.get("weight"), 0) + "%", _pill(st.get("status")), fmt(st.get("generation")),
                         fmt(gates.get("green_recall")), fmt(gates.get("blue_recall")),
                         fmt(gates.get("error_rate")), fmt(gates.get("queries")), failures,
                         esc(st.get("finished_at") or st.get("started_at"))])
        out.append(_table(["green weight", "status", "alias generation", f"green canary recall@{k}",
                           f"blue baseline recall@{k}", "error rate", "probe queries", "gate failures", "when"],
                          rows, num_cols=(2, 3, 4, 5, 6)))
    else:
        out.append("<p>Not started: the alias still serves blue alone.</p>")
    if state.get("rollback"):
        rb = state["rollback"]
        out.append(f'<div class="verdict bad">Rolled back at {esc(rb.get("at"))}: {esc(rb.get("reason"))}</div>')

    # --- disagreements ------------------------------------------------------------------------
    dis = cmp_.get("disagreements") or []
    out.append(f"<h2>Queries that disagree most ({len(dis)})</h2>")
    if dis:
        out.append('<p class="small">Ranked by disagreement (1 − ½·Jaccard − ¼·top-1 agreement − ¼·max(rho, 0)). '
                   '<span class="rel">✓</span> marks a document judged relevant in the benchmark.</p>')
        for i, d in enumerate(dis, 1):
            out.append(f'<h3>{i}. <span class="q">{esc(d.get("text"))}</span> <span class="small">(query '
                       f'{esc(d.get("query_id"))}; Jaccard@{k} {fmt(d.get("jaccard"), 3)}, top-1 '
                       f'{"agree" if d.get("top1_agree") else "differ"}, rho {fmt(d.get("spearman"), 3)}'
                       + (f", nDCG blue {fmt(d.get('ndcg_blue'), 3)} / green {fmt(d.get('ndcg_green'), 3)}"
                          if d.get("ndcg_blue") is not None else "") + ")</span></h3>")
            cols = []
            for side in ("blue", "green"):
                rows = []
                for rank, hit in enumerate(d.get(side) or [], 1):
                    mark = '<span class="rel">✓</span> ' if hit.get("relevant") else ""
                    rows.append([str(rank), mark + esc(hit.get("doc_id")), esc(hit.get("title") or ""),
                                 fmt(hit.get("score"))])
                cols.append(f'<div><span class="{side}">{side}</span>'
                            f'{_table(["#", "doc", "title", "score"], rows, num_cols=(0, 3))}</div>')
            out.append(f'<div class="cols">{"".join(cols)}</div>')
    else:
        out.append("<p>No comparison yet (phase <code>compare</code>).</p>")

    # --- phases -------------------------------------------------------------------------------
    out.append("<h2>Phases</h2>")
    rows = []
    order = ("baseline", "build", "compare", "calibrate", "rollout", "cutover")
    phases = state.get("phases") or {}
    for name, ph in sorted(phases.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        rows.append([esc(name), _pill(ph.get("status")), fmt(ph.get("attempts")), esc(ph.get("started_at")),
                     esc(ph.get("finished_at")), fmt(ph.get("seconds"), 1), esc(ph.get("error") or "")])
    out.append(_table(["phase", "status", "attempts", "started", "finished", "seconds", "error"], rows,
                      num_cols=(2, 5)))
    out.append(_plan_table(plan))
    out.append("</body></html>")
    return "\n".join(out)


def _plan_table(plan: Mapping[str, Any]) -> str:
    rows = []
    for key, value in plan.items():
        if isinstance(value, (dict, list, tuple)):
            import json

            value = json.dumps(value, sort_keys=True)
        rows.append([esc(key), f"<code>{esc(value)}</code>"])
    return "<h3>Plan</h3>" + _table(["setting", "value"], rows)


# ---------------------------------------------------------------------------------------------
# screenshot in a headless browser
# ---------------------------------------------------------------------------------------------


def find_chromium() -> str | None:
    """A headless-capable Chromium/Chrome on PATH (or ``EMBEDCTL_CHROMIUM``), or None."""
    env = os.environ.get("EMBEDCTL_CHROMIUM")
    if env:
        return env if Path(env).exists() or shutil.which(env) else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(html_path: str | os.PathLike[str], png_path: str | os.PathLike[str], *, width: int = 1280,
               height: int = 2000, timeout_s: float = 90.0, browser: str | None = None) -> Path:
    """Render ``html_path`` in headless Chromium and save a PNG (no network: the page is
    self-contained, and the browser's own background traffic is switched off)."""
    exe = browser or find_chromium()
    if exe is None:
        raise NotFoundError("no Chromium found for the screenshot: install it (Debian: apt-get install -y chromium) "
                            "or set EMBEDCTL_CHROMIUM to its path")
    src = Path(html_path).resolve()
    dst = Path(png_path).resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="embedctl-chromium-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--screenshot={dst}",
               f"--window-size={width},{height}", src.as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as err:
            raise EmbedctlError(f"{exe} did not finish the screenshot within {timeout_s:.0f} s") from err
    if not dst.exists() or dst.stat().st_size == 0:
        raise EmbedctlError(f"{exe} wrote no screenshot (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return dst
