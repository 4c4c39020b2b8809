"""The migration report: a self-contained HTML page from a jinja2 template, kept current in the store; its screenshot."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from markupsafe import Markup

from engine.core.errors import EmbedctlError, NotFoundError
from engine.migrate.state import PHASES, now_iso

if TYPE_CHECKING:
    import jinja2

    from engine.migrate.context import MigrationContext

log = logging.getLogger(__name__)

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
TEMPLATES = Path(__file__).with_name("templates")


# --- filters the template formats numbers with ------------------------------------------------
def _missing(x: Any) -> bool:
    """None, or a key the stored JSON lacks (jinja2's Undefined)."""
    if x is None:
        return True
    import jinja2

    return isinstance(x, jinja2.Undefined)


def fmt(x: Any, digits: int = 4) -> str:
    """A number for a table cell: fixed digits, '—' for missing."""
    if _missing(x):
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return "—" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def fmt_delta(x: Any, digits: int = 4, *, good_if_positive: bool | None = True) -> Markup | str:
    """A signed difference, coloured when ``good_if_positive`` says which way is better."""
    if _missing(x) or (isinstance(x, float) and math.isnan(x)):
        return "—"
    text = f"{x:+.{digits}f}"
    if good_if_positive is None or abs(x) < 10 ** -digits:
        return text
    good = (x > 0) == good_if_positive
    return Markup('<span class="{}">{}</span>').format("good" if good else "bad", text)


def pct(x: Any, digits: int = 1) -> str:
    return "—" if _missing(x) else f"{100 * x:.{digits}f}%"


def pvalue(p: Any) -> str:
    return "—" if _missing(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def pill(status: Any) -> Markup:
    s = "pending" if _missing(status) or not status else status
    return Markup('<span class="pill {0}">{0}</span>').format(s)


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             finalize=lambda x: "" if x is None else x, undefined=jinja2.ChainableUndefined)
    env.filters.update(fmt=fmt, fmt_delta=fmt_delta, pct=pct, pvalue=pvalue, pill=pill)
    return env


# --- the page -----------------------------------------------------------------------------------
def _verdict(data: Mapping[str, Any]) -> tuple[str, str]:
    """(css class, sentence) summarising where the migration stands."""
    state = data["state"]
    status = state.get("status")
    cmp_ = data.get("compare") or {}
    bench = cmp_.get("benchmark") or {}
    k = cmp_.get("k") or (state.get("plan") or {}).get("k", 10)
    if status == "rolled_back":
        return "bad", f"Rolled back to blue: {(state.get('rollback') or {}).get('reason') or 'rolled back'}"
    if status == "abandoned":
        why = (state.get("abandoned") or {}).get("reason") or "no reason given"
        return "bad", f"Abandoned: {why}. The alias serves blue; green may be garbage-collected."
    if status == "cut_over":
        return "ok", f"Cut over: the alias serves green alone; blue is kept until {state.get('retain_until')}."
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
    if state.get("phases", {}).get("calibrate", {}).get("status") != "done":
        parts.append("green is not calibrated yet")
        cls = "warn" if cls == "ok" else cls
    phase = state.get("phase")
    head = f"Phase: {phase}. " if phase else ""
    return cls, head + ("; ".join(parts) if parts else "no comparison yet") + "."


def _metric_rows(cmp_: Mapping[str, Any], base: Mapping[str, Any], k: int) -> list[tuple[str, Any, Any]]:
    """(label, blue, green) for the benchmark metrics and the canary figures."""
    bench = cmp_.get("benchmark") or {}
    rows = [(f"benchmark {key}", bench["blue"].get(key), (bench.get("green") or {}).get(key))
            for key in (bench.get("blue") or {})]
    for key, label in (("canary_recall", f"canary recall@{k}"), ("canary_mrr", f"canary MRR@{k}")):
        b, g = (base.get("canary") or {}).get(key), (cmp_.get("canary") or {}).get(key)
        if b is not None or g is not None:
            rows.append((label, b, g))
    return rows


def _charts(data: Mapping[str, Any], k: int) -> dict[str, str]:
    """The charts the page shows (data: URIs); none before a comparison exists."""
    from engine.migrate import charts

    cmp_ = data.get("compare") or {}
    summ = cmp_.get("summary") or {}
    if not summ:
        return {}
    bench = cmp_.get("benchmark") or {}
    scores = cmp_.get("scores") or {}
    per = cmp_.get("per_query") or {}
    th = {side: ((data.get("calibration") or {}).get(side) or {}).get("absolute", {}).get("threshold")
          for side in ("blue", "green")}
    out = {"overlap": charts.chart_overlap_by_k(summ["overlap_at_k"], summ["jaccard_at_k"]),
           "scores": charts.chart_score_histograms(scores.get("blue") or {}, scores.get("green") or {}, th)}
    if bench.get("blue") and bench.get("green"):
        out["metrics"] = charts.chart_metrics(bench["blue"], bench["green"])
    if per.get("jaccard"):
        out["per_query"] = charts.chart_per_query(per["jaccard"], per.get("spearman") or [], k)
    return out


def report_view(data: Mapping[str, Any], *, charts: bool = True) -> dict[str, Any]:
    """What the template shows, worked out from the stored JSON."""
    state = data["state"]
    plan = state.get("plan") or {}
    blue, green = state.get("blue") or {}, state.get("green") or {}
    cmp_ = data.get("compare") or {}
    k = int(cmp_.get("k") or plan.get("k") or 10)
    verdict_class, verdict = _verdict(data)
    summ = cmp_.get("summary") or {}
    order = {p: i for i, p in enumerate(PHASES)}
    return {
        "title": (f"Migration {state.get('migration_id')}: {state.get('index')}/{state.get('alias')} "
                  f"{blue.get('version', '?')} → {green.get('version', '?')}"),
        "verdict_class": verdict_class, "verdict": verdict, "k": k, "blue": blue, "green": green,
        "bench": cmp_.get("benchmark") or {}, "metric_rows": _metric_rows(cmp_, data.get("baseline") or {}, k),
        "summary": summ, "shift": summ.get("score_shift"), "charts": _charts(data, k) if charts else {},
        "calibration": {"blue": None, "green": None, **(data.get("calibration") or {})},
        "rollout": state.get("rollout") or {}, "disagreements": cmp_.get("disagreements") or [],
        "phases": sorted((state.get("phases") or {}).items(), key=lambda kv: order.get(kv[0], len(order))),
        "plan": [(key, json.dumps(value, sort_keys=True) if isinstance(value, (dict, list, tuple)) else value)
                 for key, value in plan.items()],
    }


def render_migration_report(data: Mapping[str, Any], *, charts: bool = True) -> str:
    """The HTML page for a migration (``templates/report.html.j2``, autoescaped). Nothing on the
    page is fetched (no script, font, stylesheet or image from elsewhere), so it can be mailed,
    attached to a ticket or opened from object storage as it is.

    ``data``: ``{"state": <state.json>, "baseline": <baseline.json> | None, "compare":
    <compare.json> | None, "calibration": {"blue": record | None, "green": record | None},
    "generated_at": str, "engine_version": str, "store": str}``.
    """
    return _environment().get_template("report.html.j2").render(data=data, state=data["state"],
                                                                 v=report_view(data, charts=charts))


# --- kept current in the store ------------------------------------------------------------------
def report_data(ctx: MigrationContext) -> dict[str, Any]:
    """The stored JSON the page is made from: state, baseline, comparison, both calibrations."""
    from engine import __version__
    from engine.quality.calibration_store import load_calibration

    doc = ctx.read()
    baseline = ctx.read_optional("baseline.json")
    cal: dict[str, Any] = {"blue": (baseline or {}).get("calibration"), "green": None}
    if doc.get("green"):
        try:
            cal["green"] = load_calibration(ctx.store, ctx.index, doc["green"]["version"], inherit=False)
        except NotFoundError:
            pass
    return {"state": doc, "baseline": baseline, "compare": ctx.read_optional("compare.json"),
            "calibration": cal, "generated_at": now_iso(), "engine_version": __version__,
            "store": ctx.store.describe()}


def write_report(ctx: MigrationContext, out: str | os.PathLike[str] | None = None) -> str:
    """Render the page into the store (``report.html`` beside the state) and, with ``out``, to a
    local file too. Returns where it is (a path for a local store)."""
    page = render_migration_report(report_data(ctx)).encode("utf-8")
    key = ctx.key("report.html")
    ctx.store.write_bytes(key, page)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(page)
    return ctx.store.describe(key)


def refresh_report(ctx: MigrationContext) -> None:
    """Rewrite the page after a phase, a rollback or an abandon; a failure to render is logged,
    never raised (it must not hide the error that stopped a phase, nor undo a finished one)."""
    try:
        write_report(ctx)
    except Exception:  # noqa: BLE001 - see the docstring
        log.exception("could not rewrite the report of migration %s", ctx.migration_id)


# --- screenshot in a headless browser -----------------------------------------------------------
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
