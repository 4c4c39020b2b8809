"""Calibrating a version: labelled pairs scored through its index, thresholds fitted, the record and plot stored."""

from __future__ import annotations

import hashlib
import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.core.errors import ConfigError
from engine.core.storage import Store, join, json_bytes, sha256_bytes
from engine.index.version import read_version_manifest
from engine.quality.calibration_store import calibration_prefix, new_calibration_id, version_identity
from engine.quality.pairs import LabelledPair, score_pairs
from engine.quality.plots import plot_calibration
from engine.quality.prcurve import best_fbeta, best_relative, choose_floor, downsample_curve, point_at, pr_curve
from engine.quality.reports import now_iso
from engine.quality.scoring import Loader, QueryEncoder, close_searcher, open_searcher, query_encoder_for
from engine.quality.thresholds import Rule, Thresholds

log = logging.getLogger(__name__)

CALIBRATION_FORMAT = 1
MAX_REFERENCE_QUERIES = 2000  # reference query embeddings kept for drift


@dataclass(frozen=True)
class CalibrationConfig:
    """How to calibrate: F-beta weight, search depth, the rule search applies, the floor."""

    beta: float = 1.0
    depth: int = 100  # chunks searched per query; a pair outside them is "not retrieved"
    rule: Rule = "absolute"  # what `search --threshold auto` applies by default
    floor: float | None = None  # a fixed floor; None chooses one from floor_recall
    floor_recall: float = 0.99  # the floor keeps this share of the retrieved relevant pairs
    reference_k: int = 10  # top-k whose mean score drift compares
    plot: bool = True

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"--beta must be > 0, got {self.beta}")
        if self.depth < 1:
            raise ConfigError(f"--depth must be >= 1, got {self.depth}")
        if self.rule not in ("absolute", "relative"):
            raise ConfigError(f"--rule must be absolute or relative, got {self.rule!r}")
        if not 0 < self.floor_recall <= 1:
            raise ConfigError(f"--floor-recall must be in (0, 1], got {self.floor_recall}")


def empty_rate(tops: Sequence[float | None], th: Thresholds) -> float:
    """Share of queries whose thresholded answer is empty, from each query's top score."""
    if not tops:
        return 0.0
    empty = sum(1 for t in tops if t is None or (isinstance(t, float) and math.isnan(t)) or t < th.cutoff(t))
    return round(empty / len(tops), 6)


def query_profile(query_top: Mapping[str, Sequence[float]], k: int) -> dict[str, Any]:
    """Per-query top-1 score, mean top-``k`` score and length in words (NaN-free: queries
    with no hit are counted by ``empty``)."""
    top1, topk, lengths = [], [], []
    for q, scores in query_top.items():
        lengths.append(len(q.split()))
        if scores:
            top1.append(round(float(scores[0]), 6))
            topk.append(round(float(np.mean(scores[:k])), 6))
    return {"top1": top1, "topk_mean": topk, "lengths": lengths,
            "no_hits": [sum(1 for s in query_top.values() if not s)]}


def calibrate(store: Store, index: str, version: str, pairs: Sequence[LabelledPair],
              cfg: CalibrationConfig = CalibrationConfig(), *, loader: Loader | None = None,
              searcher: Any = None, query_encoder: QueryEncoder | None = None,
              pairs_source: str | None = None) -> dict[str, Any]:
    """Fit thresholds for ``version`` from labelled pairs and store them beside it.

    Writes ``calibration/<id>.queries.npy`` (reference query embeddings for drift),
    ``<id>.png`` (the curve) and last ``<id>.json`` (the record; its existence commits the
    calibration). Returns the record.
    """
    manifest = read_version_manifest(store, index, version)  # a missing version fails here, before any load
    own = searcher is None and loader is None  # a searcher nobody else holds: closed when done
    if searcher is None:
        searcher = open_searcher(store, index, version, loader)
    try:
        return _fit_and_store(store, index, version, manifest, pairs, cfg, searcher, query_encoder, pairs_source)
    finally:
        if own:
            close_searcher(searcher)


def _fit_and_store(store: Store, index: str, version: str, manifest: Mapping[str, Any],
                   pairs: Sequence[LabelledPair], cfg: CalibrationConfig, searcher: Any,
                   query_encoder: QueryEncoder | None, pairs_source: str | None) -> dict[str, Any]:
    """``calibrate``'s body: score the pairs, fit the three rules, write embeddings, plot and record."""
    sp = score_pairs(searcher, pairs, cfg.depth, query_encoder=query_encoder)
    curve = pr_curve(sp.scores, sp.labels)
    op = best_fbeta(curve, cfg.beta)
    floor = cfg.floor if cfg.floor is not None else choose_floor(sp.scores, sp.labels, cfg.floor_recall)
    rel = best_relative(sp.scores, sp.top_scores, sp.labels, cfg.beta, floor)
    retrieved = ~np.isnan(sp.scores)
    s0 = np.where(retrieved, sp.scores, -np.inf)
    floor_point = point_at(sp.scores, sp.labels, s0 >= (floor if floor is not None else -np.inf), cfg.beta)
    combined = point_at(sp.scores, sp.labels, s0 >= max(op.threshold, floor if floor is not None else -np.inf),
                        cfg.beta)
    cal_id = new_calibration_id()
    prefix = calibration_prefix(index, version)
    th_abs = Thresholds("absolute", op.threshold, rel.threshold, floor)
    th_rel = Thresholds("relative", op.threshold, rel.threshold, floor)
    tops = [s[0] if s else None for s in sp.query_top.values()]
    ref_queries = sp.queries[:MAX_REFERENCE_QUERIES]
    if sp.query_vectors is not None:
        emb = sp.query_vectors[:MAX_REFERENCE_QUERIES]  # [n_ref, dim]
    else:
        emb = np.asarray(query_encoder_for(searcher, manifest)(ref_queries), dtype=np.float32)
    buf = io.BytesIO()
    np.save(buf, emb.astype(np.float16), allow_pickle=False)
    emb_bytes = buf.getvalue()
    emb_key = f"{cal_id}.queries.npy"
    store.write_bytes(join(prefix, emb_key), emb_bytes)
    record: dict[str, Any] = {
        "format": CALIBRATION_FORMAT, "kind": "calibration", "calibration_id": cal_id, "created_at": now_iso(),
        "index": index, **version_identity(manifest),
        "pairs": {"source": pairs_source, "sha256": _pairs_digest(pairs), "n": len(pairs),
                  "relevant": int(sp.labels.sum()), "non_relevant": int((~sp.labels).sum()),
                  "queries": len(sp.queries), "depth": cfg.depth,
                  "relevant_not_retrieved": int((sp.labels & ~retrieved).sum()),
                  "non_relevant_not_retrieved": int((~sp.labels & ~retrieved).sum())},
        "beta": cfg.beta, "rule": cfg.rule,
        "absolute": {**op.to_dict(), "with_floor": combined},
        "relative": {"delta": rel.threshold, **{k: v for k, v in rel.to_dict().items()
                                                          if k not in ("threshold", "at_score")}},
        "floor": {"score": None if floor is None else float(floor),
                  "chosen": "fixed" if cfg.floor is not None else
                  f"keeps {cfg.floor_recall:.0%} of the retrieved relevant pairs",
                  **floor_point},
        "average_precision": round(curve.average_precision(), 6),
        "empty_rate": {"absolute": empty_rate(tops, th_abs), "relative": empty_rate(tops, th_rel)},
        "curve": downsample_curve(curve),
        "reference": {"queries": len(ref_queries), "embeddings": emb_key, "embeddings_sha256": sha256_bytes(emb_bytes),
                      "k": cfg.reference_k, **query_profile(sp.query_top, cfg.reference_k)},
        "plot": None,
    }
    if cfg.plot:
        png = plot_calibration(curve, op, sp.scores, sp.labels, floor=floor,
                               title=f"{index}/{version} calibration {cal_id}")
        store.write_bytes(join(prefix, f"{cal_id}.png"), png)
        record["plot"] = f"{cal_id}.png"
    store.put_if_absent(join(prefix, f"{cal_id}.json"), json_bytes(record))
    log.info("calibrated %s/%s: threshold %.4f (F%.3g %.3f, P %.3f, R %.3f)", index, version, op.threshold,
             cfg.beta, op.f_beta, op.precision, op.recall)
    return record


def _pairs_digest(pairs: Sequence[LabelledPair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(f"{p.query}\x00{p.doc_id}\x00{int(p.relevant)}\n".encode())
    return h.hexdigest()
