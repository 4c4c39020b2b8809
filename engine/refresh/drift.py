"""Quantizer drift: how much worse the live version's trained quantizer fits the vectors a refresh adds."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from engine.core import layout
from engine.core.storage import Store
from engine.refresh.diff import RefreshDiff
from engine.refresh.run_parts import local_copy, read_run_rows

MIN_DRIFT_SAMPLE = 50  # fewer added vectors than this cannot make the drift check call for a rebuild
DRIFT_SAMPLE = 2048  # vectors per side measured by the drift check


def quantizer_drift(store: Store, index: str, vman: dict[str, Any], run_manifest: dict[str, Any],
                    diff: RefreshDiff) -> dict[str, Any]:
    """How much worse the trained quantizer encodes the added vectors than the ones it already holds.

    Measured with the version's own trained index (``trained.faiss``): mean squared reconstruction error
    (IVF-PQ: ``sa_encode``/``sa_decode``; IVF-Flat: distance to the nearest list centroid; binary IVF: Hamming
    distance to the nearest centroid), added vectors vs a sample of unchanged ones; plus, with int8 rescore
    vectors, the share of components clipped by the stored int8 ranges. ``ratio`` = added / unchanged."""
    import tempfile

    files = vman.get("files") or {}
    out: dict[str, Any] = {"ratio": None, "added": len(diff.add_ids)}
    if not diff.add_ids or (not files.get("trained") and not files.get("rescore_ranges")):
        out["measure"] = "nothing to measure" if diff.add_ids else "no added vectors"
        return out
    added_ids = set(diff.add_ids)
    rng = np.random.default_rng(0)
    if len(added_ids) > DRIFT_SAMPLE:
        added_ids = set(rng.choice(sorted(added_ids), size=DRIFT_SAMPLE, replace=False).tolist())
    _c, _d, added = read_run_rows(store, run_manifest, added_ids)
    cids, _d2, base = read_run_rows(store, run_manifest, limit=DRIFT_SAMPLE + len(diff.add_ids), seed=1)
    keep = [i for i, c in enumerate(cids) if c not in set(diff.add_ids)][:DRIFT_SAMPLE]
    base = base[keep]
    out["baseline"] = len(base)
    if not len(base) or not len(added):
        out["measure"] = "too few vectors"
        return out
    prefix = layout.version_prefix(index, str(vman["version_id"]))
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="embedctl-drift-") as tmp:
        if files.get("trained"):
            import faiss

            path = local_copy(store, layout.join(prefix, files["trained"]), os.path.join(tmp, "trained.faiss"))
            binary = vman.get("kind") == "binary-rerank"
            trained = faiss.read_index_binary(path) if binary else faiss.read_index(path)
            err_a, err_b = _quantization_error(trained, added, binary), _quantization_error(trained, base, binary)
            out.update(added_error=round(err_a, 6), baseline_error=round(err_b, 6))
            if err_b > 1e-9:
                ratios["quantizer"] = err_a / err_b
        if files.get("rescore_ranges"):
            path = local_copy(store, layout.join(prefix, files["rescore_ranges"]), os.path.join(tmp, "ranges.npy"))
            ranges = np.load(path, allow_pickle=False).astype(np.float32)  # [2, dim] lo, hi
            clip_a, clip_b = _clip_rate(added, ranges), _clip_rate(base, ranges)
            out.update(added_int8_clipped=round(clip_a, 6), baseline_int8_clipped=round(clip_b, 6))
            ratios["int8 ranges"] = clip_a / max(clip_b, 1e-3)  # a 0.1% floor: a clean baseline is not a 0 divisor
    if ratios:
        worst = max(ratios, key=lambda k: ratios[k])
        out.update(ratio=round(ratios[worst], 4), measure=worst, ratios={k: round(v, 4) for k, v in ratios.items()})
    else:
        out["measure"] = "nothing trained"
    return out


def _quantization_error(trained: Any, x: np.ndarray, binary: bool) -> float:
    """Mean squared reconstruction error of ``x`` [n, dim] under a trained index (see ``quantizer_drift``).

    Computed from the parts (pre-transform, coarse centroid, then the product quantizer on the residual)
    rather than ``sa_encode``/``sa_decode``, which crash on a deserialised IVF-PQ fast-scan index."""
    import faiss

    from engine.index.quantize import pack_sign_bits

    if binary:
        ivf_b = faiss.downcast_IndexBinary(trained)
        if not hasattr(ivf_b, "quantizer"):
            return 0.0
        d, _ = ivf_b.quantizer.search(pack_sign_bits(x), 1)
        return float(np.mean(d))
    x = np.ascontiguousarray(x, dtype=np.float32)
    extracted = faiss.try_extract_index_ivf(trained)
    if extracted is None:
        return 0.0
    ivf: Any = faiss.downcast_index(extracted)
    xt = x
    if isinstance(trained, faiss.IndexPreTransform):  # OPQ / PCA: the lists live in the transformed space
        for i in range(trained.chain.size()):  # type: ignore[attr-defined]
            vt = faiss.downcast_VectorTransform(trained.chain.at(i))  # type: ignore[attr-defined]
            xt = np.ascontiguousarray(vt.apply(xt), dtype=np.float32)
    _, assign = ivf.quantizer.search(xt, 1)  # [n, 1] nearest list
    residual = xt - ivf.quantizer.reconstruct_batch(assign.ravel()) if getattr(ivf, "by_residual", True) else xt
    pq = getattr(ivf, "pq", None)
    if pq is None:  # IVF-Flat: the list centroid is all the quantization there is
        return float(np.mean((residual ** 2).sum(1)))
    residual = np.ascontiguousarray(residual, dtype=np.float32)
    rec = pq.decode(pq.compute_codes(residual))  # [n, d'] the residual as the PQ code gives it back
    return float(np.mean(((residual - rec) ** 2).sum(1)))


def _clip_rate(x: np.ndarray, ranges: np.ndarray) -> float:
    lo, hi = ranges[0], ranges[1]
    return float(np.mean((x < lo) | (x > hi)))
