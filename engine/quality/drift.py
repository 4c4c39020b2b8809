"""Drift: recent queries against the calibration-time queries (embeddings, length, top-1 scores, empty rate), gate and Prometheus output."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.errors import ConfigError, GateError, NotFoundError, SchemaError
from engine.core.storage import Store
from engine.index.hits import doc_scores
from engine.index.version import read_version_manifest
from engine.quality.calibration import empty_rate, query_profile
from engine.quality.calibration_store import (
    calibration_differences,
    calibration_status,
    load_calibration,
    reference_embeddings,
)
from engine.quality.records import open_text, pick, read_records
from engine.quality.reports import delta, now_iso, prometheus_text, score_distribution
from engine.quality.scoring import (
    Loader,
    QueryEncoder,
    close_searcher,
    encode_and_search,
    open_searcher,
    query_encoder_for,
)
from engine.quality.thresholds import Thresholds

log = logging.getLogger(__name__)

DRIFT_FORMAT = 1


def read_query_texts(path: str | os.PathLike[str]) -> list[str]:
    """Recent queries for ``drift``: JSONL/CSV/Parquet with ``text``/``query``, or plain text (one per line)."""
    p = Path(path)
    if p.suffix.lower() in (".txt", ".log") or p.name.endswith((".txt.gz", ".log.gz")):
        with open_text(p) as f:
            out = [line.strip() for line in f if line.strip()]
    else:
        out = [str(pick(r, ("text", "query"), "query text", f"{p} row {i}")) for i, r in enumerate(read_records(p), 1)]
    if not out:
        raise SchemaError(f"{p} holds no queries")
    return out


@dataclass(frozen=True)
class DriftLimits:
    """When drift alerts (exit 7). PSI above 0.25 is the usual "significant shift" rule of thumb."""

    max_score_psi: float = 0.25  # top-1 score distribution
    max_length_psi: float = 0.25  # query length in words
    max_novel_rate: float = 0.25  # share of recent queries far from every reference query (5% expected)
    max_empty_rate_increase: float = 0.10


def psi(reference: Sequence[float], current: Sequence[float], bins: int = 10) -> float | None:
    """Population stability index of ``current`` against ``reference``, on the reference's
    quantile bins (each bin holds ~1/bins of the reference), with half a pseudo-count per bin
    so an empty bin does not blow up the log. Fewer bins for small samples (about 10 values
    per bin). None when either side is empty."""
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    if not ref.size or not cur.size:
        return None
    bins = max(2, min(bins, min(ref.size, cur.size) // 10))
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))  # inner edges
    p = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1) + 0.5
    q = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=len(edges) + 1) + 0.5
    p, q = p / p.sum(), q / q.sum()
    return round(float(np.sum((q - p) * np.log(q / p))), 6)


def psi_noise(n_reference: int, n_current: int, bins: int = 10) -> float:
    """The PSI two samples of these sizes from one distribution show on average
    (≈ (bins - 1) (1/n + 1/m)); its 99th percentile is under three times that."""
    if not n_reference or not n_current:
        return math.inf
    bins = max(2, min(bins, min(n_reference, n_current) // 10))
    return round((bins - 1) * (1 / n_reference + 1 / n_current), 6)


def ks_statistic(reference: Sequence[float], current: Sequence[float]) -> float | None:
    """Two-sample Kolmogorov-Smirnov statistic (``scipy.stats.ks_2samp``): the largest gap between
    the two empirical CDFs, rounded to 6 places; None when either side is empty."""
    from scipy.stats import ks_2samp

    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(current, dtype=np.float64)
    if not a.size or not b.size:
        return None
    return round(float(ks_2samp(a, b).statistic), 6)


def embedding_drift(reference: np.ndarray, current: np.ndarray, novelty_quantile: float = 0.05) -> dict[str, Any]:
    """How far recent query embeddings sit from the reference ones (both [n, dim], L2-normalised).

    ``centroid_similarity``: cosine of the two mean vectors. ``novel_rate``: share of recent
    queries whose nearest reference query is less similar than the ``novelty_quantile`` of the
    reference's own leave-one-out nearest-neighbour similarities (≈ that quantile when nothing
    moved; it grows as queries arrive on topics the reference never covered).
    """
    ref = np.asarray(reference, dtype=np.float32)
    cur = np.asarray(current, dtype=np.float32)
    if ref.shape[0] < 2 or cur.shape[0] < 1 or ref.shape[1] != cur.shape[1]:
        raise SchemaError(f"cannot compare query embeddings of shapes {ref.shape} and {cur.shape} "
                          "(a different model, or fewer than 2 reference queries)")
    c_ref, c_cur = ref.mean(axis=0), cur.mean(axis=0)
    cos = float(c_ref @ c_cur / max(float(np.linalg.norm(c_ref) * np.linalg.norm(c_cur)), 1e-12))
    sims_ref = ref @ ref.T  # [n_ref, n_ref]
    np.fill_diagonal(sims_ref, -np.inf)
    loo = sims_ref.max(axis=1)  # [n_ref] leave-one-out nearest-neighbour similarity
    nn_cur = (cur @ ref.T).max(axis=1)  # [n_cur]
    cutoff = float(np.quantile(loo, novelty_quantile))
    return {"centroid_similarity": round(cos, 6), "novelty_cutoff": round(cutoff, 6),
            "novel_rate": round(float(np.mean(nn_cur < cutoff)), 6), "expected_novel_rate": novelty_quantile,
            "nn_similarity": {"reference": score_distribution(loo.tolist()),
                              "current": score_distribution(nn_cur.tolist())}}


def drift_stats(reference: Mapping[str, Any], ref_embeddings: np.ndarray, current: Mapping[str, Any],
                cur_embeddings: np.ndarray, limits: DriftLimits = DriftLimits()) -> dict[str, Any]:
    """Compare two query profiles (``query_profile`` + ``empty_rate``) and their embeddings."""
    emb = embedding_drift(ref_embeddings, cur_embeddings)
    score: dict[str, Any] = {
             "psi": psi(reference["top1"], current["top1"]), "ks": ks_statistic(reference["top1"], current["top1"]),
             "psi_noise": psi_noise(len(reference["top1"]), len(current["top1"])),
             "reference": score_distribution(reference["top1"]), "current": score_distribution(current["top1"]),
             "topk_mean": {"reference": score_distribution(reference["topk_mean"]),
                           "current": score_distribution(current["topk_mean"])}}
    length: dict[str, Any] = {"psi": psi(reference["lengths"], current["lengths"]),
              "psi_noise": psi_noise(len(reference["lengths"]), len(current["lengths"])),
              "reference": score_distribution(reference["lengths"]), "current": score_distribution(current["lengths"])}
    empty = {"reference": reference.get("empty_rate"), "current": current.get("empty_rate"),
             "delta": delta(current.get("empty_rate"), reference.get("empty_rate"))}
    alerts = []
    # a PSI alerts when it passes the limit and is clearly more than small-sample noise
    if score["psi"] is not None and score["psi"] > max(limits.max_score_psi, 3 * score["psi_noise"]):
        alerts.append(f"top-1 score distribution shifted (PSI {score['psi']:.3f} > {limits.max_score_psi}; "
                      f"mean {score['reference']['mean']} -> {score['current']['mean']})")
    if length["psi"] is not None and length["psi"] > max(limits.max_length_psi, 3 * length["psi_noise"]):
        alerts.append(f"query length distribution shifted (PSI {length['psi']:.3f} > {limits.max_length_psi})")
    if emb["novel_rate"] > limits.max_novel_rate:
        alerts.append(f"{emb['novel_rate']:.1%} of recent queries are unlike any calibration query "
                      f"(limit {limits.max_novel_rate:.0%}; {emb['expected_novel_rate']:.0%} expected without drift)")
    if empty["delta"] is not None and empty["delta"] > limits.max_empty_rate_increase:
        alerts.append(f"empty-result rate under the threshold rose {empty['reference']} -> {empty['current']}")
    return {"queries": {"reference": len(reference["lengths"]), "current": len(current["lengths"])},
            "embedding": emb, "top1_score": score, "query_length": length, "empty_rate": empty,
            "alerts": alerts, "drifted": bool(alerts)}


def run_drift(store: Store, index: str, queries: Sequence[str], *, alias: str = "live", version: str | None = None,
              limits: DriftLimits = DriftLimits(), loader: Loader | None = None,
              query_encoder: QueryEncoder | None = None) -> dict[str, Any]:
    """Recent queries against the version the alias serves (blue during a rollout), compared
    with the queries and scores its calibration saw."""
    if len(queries) < 2:
        raise SchemaError("drift needs at least 2 recent queries")
    if version is None:
        from engine.publish.aliases import read_alias

        state = read_alias(store, index, alias)
        assert state is not None
        version = state.version
    rec = load_calibration(store, index, version)
    if rec is None:
        raise NotFoundError(f"drift compares with calibration time, but {index}/{version} was never calibrated; run "
                            f"`embedctl calibrate --index {index} --version {version} --pairs PAIRS` first")
    manifest = read_version_manifest(store, index, version)
    model_changes = [r for r in calibration_differences(rec, manifest) if r.startswith("model changed")]
    if model_changes:
        raise ConfigError(f"{index}/{version} has no calibration of its own model (the newest is from "
                          f"{rec.get('version_id')}: {model_changes[0]}); queries embedded by two models cannot be "
                          f"compared: run `embedctl calibrate --index {index} --version {version} --pairs PAIRS` first")
    searcher = open_searcher(store, index, version, loader)
    try:
        ref_meta = rec["reference"]
        k = int(ref_meta.get("k", 10))
        unique = list(dict.fromkeys(queries))
        vecs, results = encode_and_search(searcher, unique, max(k, 1), query_encoder)
        query_top = {q: [s for _, s in doc_scores(r)] for q, r in zip(unique, results, strict=True)}
        profile = query_profile(query_top, k)
        th = Thresholds.from_calibration(rec)
        profile["empty_rate"] = empty_rate([s[0] if s else None for s in query_top.values()], th)
        cur_emb = vecs if vecs is not None else np.asarray(query_encoder_for(searcher, manifest)(unique), np.float32)
    finally:
        close_searcher(searcher)
    reference = {**ref_meta, "empty_rate": (rec.get("empty_rate") or {}).get(rec.get("rule", "absolute"))}
    stats = drift_stats(reference, reference_embeddings(store, index, rec), profile, cur_emb, limits)
    status = calibration_status(store, index, version)
    return {"format": DRIFT_FORMAT, "kind": "drift", "index": index, "alias": alias, "version": version,
            "created_at": now_iso(), "calibration_id": rec.get("calibration_id"),
            "calibrated_on": rec.get("version_id"), "calibration_fits": not status["needs_recalibration"],
            "limits": asdict(limits), **stats}


def drift_prometheus(report: Mapping[str, Any]) -> str:
    lab = {"index": report["index"], "alias": report.get("alias") or "", "version": report["version"]}
    return prometheus_text([
        ("embedctl_drift_score_psi", "PSI of the top-1 score distribution vs calibration time.", lab,
         report["top1_score"]["psi"]),
        ("embedctl_drift_score_ks", "KS statistic of the top-1 score distribution vs calibration time.", lab,
         report["top1_score"]["ks"]),
        ("embedctl_drift_length_psi", "PSI of the query length distribution vs calibration time.", lab,
         report["query_length"]["psi"]),
        ("embedctl_drift_novel_rate", "Share of recent queries unlike any calibration query.", lab,
         report["embedding"]["novel_rate"]),
        ("embedctl_drift_centroid_similarity", "Cosine of recent vs calibration query centroids.", lab,
         report["embedding"]["centroid_similarity"]),
        ("embedctl_drift_empty_rate", "Empty-result rate of recent queries under the stored threshold.", lab,
         report["empty_rate"]["current"]),
        ("embedctl_drift_alerting", "1 if any drift limit is exceeded, else 0.", lab, float(report["drifted"])),
    ])


def drift_gate(report: Mapping[str, Any]) -> None:
    if report["drifted"]:
        raise GateError(f"drift on {report['index']}/{report['alias']} ({report['version']}): "
                        + "; ".join(report["alerts"]))
