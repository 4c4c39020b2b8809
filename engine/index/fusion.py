"""Hybrid fusion of a dense and a sparse ranking (RRF or a weighted sum of normalised scores), and its tuning record.

- ``rrf``: ``w / (rrf_k + rank_dense) + (1 - w) / (rrf_k + rank_sparse)`` (rank from 1; a list
  that misses a chunk adds nothing). With ``dense_weight`` 0.5 this ranks exactly as the
  classic unweighted RRF (Cormack et al. 2009, k = 60).
- ``weighted``: ``w * dense' + (1 - w) * sparse'`` where ``'`` normalises each list's scores per
  query: ``norm`` minmax (a list's best candidate 1, its worst 0; missing = 0) or zscore (minus
  the list's mean, over its standard deviation, shifted so its worst candidate is 0; missing = 0).
- ``feedback_docs`` m > 0 (either method): a second pass. The query vector moves toward the stored
  vectors of the first fused ranking's top m hits (``feedback_weight``), the dense list is searched
  again with it and fused with the same BM25 list (``engine/index/feedback.py``). Off by default.

A tuning (``engine/index/tuning.py``) scores a grid of all of these on judged queries and stores
the best as a record beside the version (``versions/<id>/fusion/<record>.json``, never inside the
immutable manifest); a searcher of that version uses the newest record as its default fusion.
Records written before a key existed load with its default (``norm`` minmax, ``feedback_docs`` 0).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from engine.core import layout
from engine.core.errors import ConfigError, NotFoundError
from engine.core.storage import Store, join, json_bytes

log = logging.getLogger(__name__)

FUSION_METHODS = ("rrf", "weighted")
NORMS = ("minmax", "zscore")
FUSION_DIR = "fusion"
RRF_KS = (5, 10, 20, 30, 45, 60, 80, 100, 150)
WEIGHTS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@dataclass(frozen=True)
class FusionConfig:
    """How hybrid search merges its two candidate lists."""

    method: str = "rrf"  # rrf | weighted
    rrf_k: int = 60
    dense_weight: float = 0.5  # share of the dense list (1 - w for the sparse one)
    depth: int = 100  # candidates taken from each list per query
    norm: str = "minmax"  # weighted only: minmax | zscore (records without it are minmax)
    source: str = "default"  # default | given | tuned:<record id>
    # > 0: a second dense pass from the query vector moved toward the top fused hits (engine/index/feedback.py);
    # records written before it existed have no such key and load as 0 (one pass, as they were tuned)
    feedback_docs: int = 0
    feedback_weight: float = 1.0  # share of the feedback hits' mean vector added to the query vector

    def validate(self) -> FusionConfig:
        if self.method not in FUSION_METHODS:
            raise ConfigError(f"fusion must be one of {', '.join(FUSION_METHODS)}, got {self.method!r}")
        if self.rrf_k < 0:
            raise ConfigError(f"rrf_k must be >= 0, got {self.rrf_k}")
        if not 0.0 <= self.dense_weight <= 1.0:
            raise ConfigError(f"dense_weight must be within [0, 1], got {self.dense_weight}")
        if self.norm not in NORMS:
            raise ConfigError(f"fusion norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.depth < 1:
            raise ConfigError(f"fusion depth must be >= 1, got {self.depth}")
        if not 0 <= self.feedback_docs <= self.depth:
            raise ConfigError(f"feedback_docs must be within [0, depth={self.depth}], got {self.feedback_docs}")
        if not 0.0 <= self.feedback_weight <= 100.0:
            raise ConfigError(f"feedback_weight must be within [0, 100], got {self.feedback_weight}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FusionConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names}).validate()


def _rank_weights(ids: np.ndarray, rrf_k: int) -> np.ndarray:
    """[q, d] reciprocal-rank contributions 1 / (rrf_k + rank), 0 where the slot is empty (-1)."""
    ranks = np.arange(1, ids.shape[1] + 1, dtype=np.float64)[None, :]
    return np.where(ids >= 0, 1.0 / (rrf_k + ranks), 0.0)


def _minmax(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per-query min-max normalisation of the valid slots ([q, d]); a single-valued list scores 1."""
    valid = ids >= 0
    s = np.where(valid, scores.astype(np.float64), np.nan)
    with np.errstate(all="ignore"):
        lo = np.nanmin(np.where(valid.any(axis=1, keepdims=True), s, 0.0), axis=1, keepdims=True)
        hi = np.nanmax(np.where(valid.any(axis=1, keepdims=True), s, 0.0), axis=1, keepdims=True)
        span = hi - lo
        out = np.where(span > 0, (s - lo) / np.where(span > 0, span, 1.0), 1.0)
    return np.where(valid, out, 0.0)


def _zscore(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per-query z-scores of the valid slots ([q, d]), shifted so the list's worst candidate is 0 (what a
    candidate the list missed adds too: it ranks as the list's worst, not its average); empty slots 0."""
    valid = ids >= 0
    s = np.where(valid, scores.astype(np.float64), 0.0)
    n = np.maximum(valid.sum(axis=1, keepdims=True), 1)
    mean = s.sum(axis=1, keepdims=True) / n
    sd = np.sqrt((np.where(valid, s - mean, 0.0) ** 2).sum(axis=1, keepdims=True) / n)
    z = np.where(sd > 0, (s - mean) / np.where(sd > 0, sd, 1.0), 0.0)
    low = np.where(valid, z, np.inf).min(axis=1, keepdims=True)
    return np.where(valid, z - np.where(np.isfinite(low), low, 0.0), 0.0)


def fuse(dense: tuple[np.ndarray, np.ndarray], sparse: tuple[np.ndarray, np.ndarray], cfg: FusionConfig,
         k: int) -> tuple[np.ndarray, np.ndarray]:
    """Fuse two best-first lists (scores [q, d], ids [q, d], -1 = empty) into the top ``k``: (scores, ids),
    -inf / -1 padded, ties broken by smaller id."""
    (ds, di), (ss, si) = dense, sparse
    if cfg.method == "rrf":
        dc, sc = _rank_weights(di, cfg.rrf_k), _rank_weights(si, cfg.rrf_k)
    else:
        norm = _zscore if cfg.norm == "zscore" else _minmax
        dc, sc = norm(ds, di), norm(ss, si)
    w = cfg.dense_weight
    q = di.shape[0]
    out_s = np.full((q, k), -np.inf, dtype=np.float32)
    out_i = np.full((q, k), -1, dtype=np.int64)
    for row in range(q):
        ids = np.concatenate([di[row], si[row]])
        contrib = np.concatenate([w * dc[row], (1.0 - w) * sc[row]])
        keep = ids >= 0
        uniq, inv = np.unique(ids[keep], return_inverse=True)
        total = np.zeros(len(uniq), dtype=np.float64)
        np.add.at(total, inv, contrib[keep])
        order = np.lexsort((uniq, -total))[:k]
        out_s[row, :len(order)] = total[order]
        out_i[row, :len(order)] = uniq[order]
    return out_s, out_i


# --- tuning ---------------------------------------------------------------------------------------------


def fusion_grid(depth: int = 100) -> list[FusionConfig]:
    """Every RRF k x dense weight, and every weighted-sum weight under each normalisation."""
    out = [FusionConfig("rrf", rrf_k=rk, dense_weight=w, depth=depth) for rk in RRF_KS for w in WEIGHTS]
    out += [FusionConfig("weighted", dense_weight=w, depth=depth, norm=n) for n in NORMS for w in (0.1, *WEIGHTS, 0.9)]
    return out


def tune_fusion(dense: tuple[np.ndarray, np.ndarray], sparse: tuple[np.ndarray, np.ndarray],
                score: Callable[[np.ndarray], float], *, depth: int = 100,
                grid: Sequence[FusionConfig] | None = None) -> dict[str, Any]:
    """Score every fusion of the grid on the same candidate lists with ``score`` (fused ids [q, depth] ->
    the mean metric, e.g. nDCG@10 over documents); the best (first on ties) and the whole curve."""
    return tune_grid(lambda cfg: fuse(dense, sparse, cfg, depth)[1], score, grid or fusion_grid(depth))


def tune_grid(fused: Callable[[FusionConfig], np.ndarray], score: Callable[[np.ndarray], float],
              grid: Sequence[FusionConfig]) -> dict[str, Any]:
    """``score(fused(cfg))`` for every fusion of ``grid`` (``fused``: the ranking a fusion gives, ids [q, d]); the
    best (first on ties) and the whole curve."""
    results = [(score(fused(cfg)), cfg) for cfg in grid]
    best_value, best = max(results, key=lambda r: r[0])  # max keeps the first of equal values
    return {"chosen": dataclasses.replace(best, source="tuned").to_dict(), "value": round(best_value, 4),
            "grid": [{**c.to_dict(), "value": round(v, 4)} for v, c in results]}


def fusion_prefix(index: str, version_id: str) -> str:
    return join(layout.version_prefix(index, version_id), FUSION_DIR)


def save_fusion_record(store: Store, index: str, version_id: str, record: Mapping[str, Any]) -> str:
    """Store a tuning record beside the version (create-only); its key."""
    now = datetime.now(timezone.utc)
    rid = now.strftime("%Y%m%dT%H%M%S.%fZ")
    key = join(fusion_prefix(index, version_id), f"{rid}.json")
    doc = {"format": 1, "kind": "fusion-tuning", "record_id": rid, "index": index, "version_id": version_id,
           "created_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"), **record}
    store.put_if_absent(key, json_bytes(doc))
    return key


def latest_fusion_record(store: Store, index: str, version_id: str) -> dict[str, Any] | None:
    """The newest tuning record of a version, or None."""
    keys = sorted(k for k in store.list(fusion_prefix(index, version_id)) if k.endswith(".json"))
    if not keys:
        return None
    try:
        doc = store.read_json(keys[-1])
    except (NotFoundError, json.JSONDecodeError):
        log.warning("fusion record %s is unreadable; using the default fusion", keys[-1])
        return None
    return doc if isinstance(doc, dict) else None


def default_fusion(record: Mapping[str, Any] | None) -> FusionConfig:
    """The fusion a version searches with by default: its newest tuning, else RRF k=60."""
    if not record or not isinstance(record.get("chosen"), Mapping):
        return FusionConfig()
    cfg = FusionConfig.from_dict(record["chosen"])
    return dataclasses.replace(cfg, source=f"tuned:{record.get('record_id')}")
