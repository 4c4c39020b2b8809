"""Vector pseudo-relevance feedback for hybrid search: the query vector moved toward its best fused hits (Rocchio).

A hybrid search with ``FusionConfig.feedback_docs`` m > 0 runs twice: the first fused ranking's
top m hits (documents when collapsing) lend their stored vectors, the query vector becomes
``normalise(q + feedback_weight * mean(v_1..v_m))``, and the dense list is searched again with it
and fused with the same BM25 list. Fused feedback is what helps: the first pass already agrees
with BM25, so the second dense list finds documents near both (vector PRF as in Rocchio 1971,
Li et al. 2021 "Pseudo relevance feedback with deep language models and dense retrievers").
On Cranfield it lifts nDCG@10 from 0.42 to 0.43+ (benchmarks/hybrid_cranfield.py).

The vectors come from what the version stores: the rescore vectors when it keeps them (int8
dequantised), else the FAISS index's own reconstruction (exact for flat, the PQ code for ivfpq).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.core.errors import IntegrityError
from engine.index.quantize import dequantize_int8

if TYPE_CHECKING:
    from engine.index.fusion import FusionConfig


def _reconstruct(shard: Any, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """[n, dim] float32 vectors of a shard's ``rows`` (global ``ids``) from its FAISS index."""
    from engine.index.faiss_ops import import_faiss

    faiss = import_faiss()
    index = faiss.downcast_index(shard.index)
    if isinstance(index, faiss.IndexIDMap):  # flat: the inner index holds the vectors in row (= add) order
        inner = faiss.downcast_index(index.index)
        return np.stack([inner.reconstruct(int(r)) for r in rows]).astype(np.float32)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        raise IntegrityError(f"shard {shard.number}: its index ({type(index).__name__}) cannot give back vectors "
                             "for query feedback; search without feedback (feedback_docs 0)")
    ivf = faiss.downcast_index(ivf)
    if ivf.direct_map.type == faiss.DirectMap.NoMap:  # once per loaded shard: id -> (list, offset)
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    return np.stack([index.reconstruct(int(i)) for i in ids]).astype(np.float32)


def stored_vectors(searcher: Any, ids: np.ndarray) -> np.ndarray:
    """[n, dim] float32 stored vectors of global ``ids`` ([n] int64, every id in the version) of a loaded
    ``engine.index.searcher.Searcher`` (its shards, ``dim``, ``rescore_dtype`` and int8 ``ranges``)."""
    out = np.zeros((len(ids), searcher.dim), dtype=np.float32)
    for shard in searcher._shards:  # the loaded shards' vectors (no public accessor on Searcher yet)
        pos = np.searchsorted(shard.ids, ids)
        hit = (pos < len(shard.ids)) & (shard.ids[np.minimum(pos, len(shard.ids) - 1)] == ids) if len(shard.ids) \
            else np.zeros(len(ids), bool)
        if not hit.any():
            continue
        rows = pos[hit]
        if shard.rescore is not None:
            vec = np.asarray(shard.rescore[rows])  # [n, dim] int8 or float16/32
            out[hit] = dequantize_int8(vec, searcher.ranges) if searcher.rescore_dtype == "int8" \
                else vec.astype(np.float32)
        else:
            out[hit] = _reconstruct(shard, rows, ids[hit])
    return out


def feedback_queries(vectors: np.ndarray, fused_ids: np.ndarray, cfg: FusionConfig,
                     lookup: Any) -> np.ndarray:
    """The second pass's query vectors [q, dim]: each normalised query plus ``cfg.feedback_weight`` x the mean
    of the stored vectors of its first ``cfg.feedback_docs`` fused hits (``fused_ids`` [q, >= m] global ids,
    -1 = none), normalised. A query with no fused hit (or feedback that cancels it) keeps its vector. ``lookup(ids) -> [n, dim]``."""
    q = np.asarray(vectors, dtype=np.float32)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    m = cfg.feedback_docs
    top = fused_ids[:, :m]
    want = np.unique(top[top >= 0])
    if m == 0 or len(want) == 0:
        return q
    vecs = lookup(want)  # [u, dim]
    out = q.copy()
    for row in range(len(q)):
        ids = top[row][top[row] >= 0]
        if len(ids):
            out[row] = q[row] + cfg.feedback_weight * vecs[np.searchsorted(want, ids)].mean(axis=0)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    # feedback that cancels the query (a hit opposite to it) leaves no direction: keep the query
    return np.where(norms > 1e-6, out / np.maximum(norms, 1e-12), q)


def feedback_grid(base: Sequence[FusionConfig], docs: Sequence[int] = (2, 3, 5),
                  weights: Sequence[float] = (0.5, 1.0, 2.0)) -> list[FusionConfig]:
    """Every fusion of ``base`` with every feedback setting (docs x weight)."""
    import dataclasses

    return [dataclasses.replace(c, feedback_docs=m, feedback_weight=w) for m in docs for w in weights for c in base]
