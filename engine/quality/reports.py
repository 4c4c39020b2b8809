"""Pieces shared by the canary and drift reports: timestamps, score distributions, differences, Prometheus text, atomic writes."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
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


PromSample = tuple[str, str, Mapping[str, Any], float | None]  # (metric name, help, labels, value)
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')  # name="escaped value"


def prometheus_text(samples: Sequence[PromSample]) -> str:
    """Prometheus text exposition (0.0.4) of gauges from ``(name, help, labels, value)`` samples,
    written by ``prometheus_client`` (a private ``CollectorRegistry`` and ``generate_latest``: its
    escaping, number format and HELP/TYPE lines). Each metric's samples follow its one header, in
    first-seen order; None values are skipped (a metric with none left is left out).

    Two things the client does not do for us: names must be classic Prometheus names (the client
    also takes UTF-8 names that textfile collectors and older servers refuse), and each sample's
    labels keep the order the report gives them (``index, alias, version, ...``: the client sorts
    them; Prometheus ignores the order, but these files have always been written this way and
    people grep them)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric

    families: dict[str, Metric] = {}
    orders: list[list[str]] = []  # label order per sample, in output order (family by family)
    per_family: dict[str, list[list[str]]] = {}
    for name, help_text, labels, value in samples:
        if not _METRIC_NAME.fullmatch(name):
            raise ValueError(f"invalid Prometheus metric name {name!r}")
        bad = [k for k in labels if not _LABEL_NAME.fullmatch(str(k))]
        if bad:
            raise ValueError(f"invalid Prometheus label names {bad!r} on {name}")
        if value is None:
            continue
        family = families.setdefault(name, Metric(name, help_text, "gauge"))
        family.add_sample(name, {str(k): str(v) for k, v in labels.items()}, float(value))
        per_family.setdefault(name, []).append([str(k) for k in labels])
    for name in families:
        orders.extend(per_family[name])

    class _Report:  # a one-shot collector over the families built above
        def collect(self) -> Iterator[Metric]:
            return iter(families.values())

    registry = CollectorRegistry(auto_describe=False)  # private: nothing process-wide is touched
    registry.register(_Report())
    lines = generate_latest(registry).decode("utf-8").splitlines()
    order = iter(orders)
    out = [line if line.startswith("#") else _labels_in_order(line, next(order)) for line in lines]
    return "\n".join(out) + "\n"


def _labels_in_order(line: str, order: Sequence[str]) -> str:
    """``name{b="2",a="1"} v`` with its (escaped) label pairs put back in ``order``."""
    head, brace, rest = line.partition("{")
    if not brace or not order:
        return line
    body, _, tail = rest.rpartition("}")  # the value after the last brace holds none
    pairs = dict(_LABEL_PAIR.findall(body))
    return head + "{" + ",".join(f'{k}="{pairs[k]}"' for k in order) + "}" + tail


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write via a temp file + rename, so a textfile collector never reads half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)
