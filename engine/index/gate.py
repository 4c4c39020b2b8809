"""The recall gate: tune the default nprobe / rescore multiplier on held-out queries and measure recall@k vs exact."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from engine.index.context import BuildContext
from engine.index.faiss_ops import merge_topk
from engine.index.params import DEFAULT_RESCORE_MULTIPLIER, PLATEAU, RESCORE_MULTIPLIERS, IndexParams
from engine.index.searcher import Searcher


def run_gate(ctx: BuildContext, params: IndexParams, manifest: dict[str, Any], shard_results: list[dict[str, Any]],
             gate_vecs: np.ndarray, gate_ids: np.ndarray, how: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tune the default nprobe / rescore multiplier and measure recall@k; (recall_gate, tuning)."""
    t0 = time.perf_counter()
    k = ctx.cfg.gate_k
    depth = 2 * k + 1
    if not shard_results or len(gate_ids) == 0:
        return {"k": k, "queries": 0, "recall": None, "threshold": ctx.cfg.gate_recall, "passed": True,
                "note": "no vectors: nothing to measure"}, {}
    ex = merge_topk([r["exact"]["scores"] for r in shard_results], [r["exact"]["ids"] for r in shard_results],
                    depth)
    ex_scores, ex_ids = drop_self(ex[0], ex[1], gate_ids, depth - 1)
    searcher = Searcher.load_manifest(ctx.store, ctx.index, manifest, verify=True)
    try:
        def recall(**knobs: Any) -> float:
            s, i = searcher.search_ids(gate_vecs, k + 1, **knobs)
            _, found = drop_self(s, i, gate_ids, k)
            return float(knn_recall_mean(found, ex_ids, ex_scores, k))

        aim = max(ctx.cfg.target_recall, ctx.cfg.gate_recall or 0.0)
        tuning: dict[str, Any] = {}
        knobs: dict[str, Any] = {}
        # First the candidate depth, with every list probed (so only the depth limits recall);
        # then the fewest lists that keep that recall.
        if params.nlist is not None:
            knobs["nprobe"] = params.nprobe or params.nlist
        if params.rescore != "none":
            knobs["rescore_multiplier"] = params.rescore_multiplier or DEFAULT_RESCORE_MULTIPLIER[params.kind]
            if params.rescore_multiplier is None:
                knobs["rescore_multiplier"], tuning["rescore_multiplier"] = _tune(
                    recall, "rescore_multiplier", RESCORE_MULTIPLIERS, knobs, aim)
        if params.nlist is not None and params.nprobe is None:
            m_curve = tuning.get("rescore_multiplier", {}).get("curve", [])
            reached = next((c["recall"] for c in m_curve if c["rescore_multiplier"] == knobs.get(
                "rescore_multiplier")), aim)
            knobs["nprobe"], tuning["nprobe"] = _tune(recall, "nprobe", _nprobe_candidates(params.nlist), knobs,
                                                      min(aim, reached))
        measured = recall(**knobs)
    finally:
        searcher.close()
    threshold = ctx.cfg.gate_recall
    gate = {"k": k, "queries": int(len(gate_ids)), "query_source": how, "recall": round(measured, 4),
            "threshold": threshold, "passed": threshold is None or measured >= threshold,
            "seconds": round(time.perf_counter() - t0, 3), **knobs}
    ctx.timings["gate_s"] = time.perf_counter() - t0
    return gate, tuning


def knn_recall_mean(found: np.ndarray, exact_ids: np.ndarray, exact_scores: np.ndarray, k: int) -> float:
    from engine.index.recall import knn_recall

    return float(knn_recall(found, exact_ids, exact_scores, k).mean()) if len(found) else 1.0


def drop_self(scores: np.ndarray, ids: np.ndarray, self_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own id from its result row and keep the first ``k`` of the rest."""
    keep = ids != self_ids[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    s = np.take_along_axis(np.where(keep, scores, -np.inf), order, axis=1)
    i = np.take_along_axis(np.where(keep, ids, -1), order, axis=1)
    return s, i


def _tune(recall: Callable[..., float], knob: str, candidates: Sequence[int], knobs: Mapping[str, Any],
          aim: float) -> tuple[int, dict[str, Any]]:
    """The smallest candidate whose recall reaches ``aim``, or where recall stops improving
    (another doubling gains < ``PLATEAU`` — the rescore precision, not the candidates, is then
    the limit); the largest otherwise. Returns it with the curve measured."""
    curve: list[dict[str, Any]] = []
    chosen = candidates[-1]
    prev: tuple[int, float] | None = None
    for value in candidates:
        r = recall(**{**knobs, knob: value})
        curve.append({knob: value, "recall": round(r, 4)})
        if r >= aim:
            chosen = value
            break
        if prev is not None and r - prev[1] < PLATEAU:
            chosen = prev[0]
            break
        prev = (value, r)
    return chosen, {"target": aim, "curve": curve, "chosen": chosen}


def _nprobe_candidates(nlist: int) -> list[int]:
    out, n = [], 1
    while n < nlist:
        out.append(n)
        n *= 2
    return out + [nlist]

