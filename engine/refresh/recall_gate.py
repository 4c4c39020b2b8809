"""The recall gate of an incrementally updated version: recall@k against exact search over its run."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from engine.core.storage import Store
from engine.embed.parts_index import run_outputs
from engine.refresh.run_parts import column_vectors, read_columns, read_run_rows, unit_vectors

GATE_QUERIES = 256


def measure_recall(store: Store, index: str, manifest: dict[str, Any], run_manifest: dict[str, Any], *, k: int,
                   threshold: float | None, queries: int = GATE_QUERIES, seed: int = 0) -> dict[str, Any]:
    """Recall@k of the (not yet committed) version against exact search over every vector of its run.

    Gate queries are vectors sampled from the run (their own chunk excluded), like the builder's gate;
    exact neighbours are computed part by part, so memory stays at one part."""
    from engine.index.faiss_ops import exact_topk, merge_topk
    from engine.index.searcher import Searcher

    t0 = time.perf_counter()
    qcids, _qd, qvecs = read_run_rows(store, run_manifest, limit=queries, seed=seed)
    qvecs = unit_vectors(qvecs)
    if not len(qvecs):
        return {"k": k, "queries": 0, "recall": None, "threshold": threshold, "passed": True,
                "note": "no vectors: nothing to measure"}
    depth = k + 1
    best_s, best_i, all_cids = [], [], []
    offset = 0
    for o in run_outputs(store, run_manifest, "embeddings"):
        if not int(o.get("rows", 0)):
            continue
        t = read_columns(store, o["key"], ["chunk_id", "embedding"])
        v = unit_vectors(column_vectors(t).astype(np.float32))
        ids = np.arange(offset, offset + len(v), dtype=np.int64)
        s, i = exact_topk(qvecs, v, ids, depth)
        best_s.append(s)
        best_i.append(i)
        all_cids += t.column("chunk_id").to_pylist()
        offset += len(v)
        s_m, i_m = merge_topk(best_s, best_i, depth)
        best_s, best_i = [s_m], [i_m]
    ex_s, ex_i = best_s[0], best_i[0]
    row_of = {c: r for r, c in enumerate(all_cids)}
    self_rows = np.array([row_of[c] for c in qcids], dtype=np.int64)
    searcher = Searcher.load_manifest(store, index, manifest, verify=True)
    try:
        s_f, i_f = searcher.search_ids(qvecs, depth)
        hits = searcher._hits(s_f, i_f)  # version ids -> chunk ids
    finally:
        searcher.close()
    found = np.full((len(qvecs), depth), -1, dtype=np.int64)
    for q, row in enumerate(hits):
        for j, h in enumerate(row[:depth]):
            found[q, j] = row_of.get(h.chunk_id, -2)
    from engine.index.gate import drop_self, knn_recall_mean

    _s1, f_k = drop_self(np.where(found >= 0, 0.0, -np.inf).astype(np.float32), found, self_rows, k)
    e_s, e_k = drop_self(ex_s, ex_i, self_rows, k)
    recall = knn_recall_mean(f_k, e_k, e_s, k)
    return {"k": k, "queries": int(len(qvecs)), "query_source": "vectors sampled from the refresh run, the query's "
            "own chunk excluded; exact neighbours over the whole run", "recall": round(recall, 4),
            "threshold": threshold, "passed": threshold is None or recall >= threshold,
            "seconds": round(time.perf_counter() - t0, 3),
            "nprobe": (manifest.get("params") or {}).get("nprobe"),
            "rescore_multiplier": (manifest.get("params") or {}).get("rescore_multiplier")}
