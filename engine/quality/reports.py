"""Pieces shared by the canary and drift reports: timestamps, score distributions, differences, Prometheus text, atomic writes."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def score_distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    """mean, median, p5, p95 (and n) of a list of scores; None values when empty."""
    if not len(values):
        return {"n": 0, "mean": None, "median": None, "p5": None, "p95": None}
    a = np.asarray(values, dtype=np.float64)
    return {"n": int(a.size), "mean": round(float(a.mean()), 6), "median": round(float(np.median(a)), 6),
            "p5": round(float(np.percentile(a, 5)), 6), "p95": round(float(np.percentile(a, 95)), 6)}


def delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(float(a) - float(b), 6)


def _prom_label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus_text(samples: Sequence[tuple[str, str, Mapping[str, Any], float | None]]) -> str:
    """Prometheus text exposition (0.0.4) of gauges: ``(name, help, labels, value)`` samples,
    grouped so each metric's samples follow its one HELP/TYPE header (the format requires a
    family to be contiguous); None values are skipped."""
    families: dict[str, tuple[str, list[str]]] = {}
    for name, help_text, labels, value in samples:
        if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name):
            raise ValueError(f"invalid Prometheus metric name {name!r}")
        if value is None:
            continue
        lab = ",".join(f'{k}="{_prom_label(v)}"' for k, v in labels.items())
        v = float(value)
        text = "NaN" if math.isnan(v) else ("+Inf" if v == math.inf else "-Inf" if v == -math.inf else repr(v))
        families.setdefault(name, (help_text, []))[1].append(f"{name}{{{lab}}} {text}" if lab else f"{name} {text}")
    lines: list[str] = []
    for name, (help_text, rows) in families.items():
        lines.append(f"# HELP {name} {help_text.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}")
        lines.append(f"# TYPE {name} gauge")
        lines.extend(rows)
    return "\n".join(lines) + "\n"


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write via a temp file + rename, so a textfile collector never reads half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)
