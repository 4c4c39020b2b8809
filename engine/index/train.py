"""Training once: the sample (training vectors and held-out gate queries), the quantizer and the int8 ranges."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from engine.core.storage import join
from engine.index.context import BuildContext, load_npz, now_iso, npy_bytes, npz_bytes, upload_bytes
from engine.index.faiss_ops import import_faiss, index_to_bytes, make_binary_index, make_float_index
from engine.index.params import IndexParams
from engine.index.quantize import int8_ranges, pack_sign_bits
from engine.index.runs import gather_rows

TRAINED_KEY = "trained.faiss"
RANGES_KEY = "rescore-ranges.npy"


def sample_ids(rows: int, train_size: int, gate: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Training ids and gate query ids (disjoint when the corpus allows), sorted."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(rows) if rows <= 10_000_000 else None
    if perm is None:  # very large corpora: sample without materialising a full permutation
        chosen = np.unique(rng.integers(0, rows, size=train_size + gate * 2, dtype=np.int64))
        rng.shuffle(chosen)
        perm = chosen
    train = np.sort(perm[:train_size])
    rest = perm[train_size:]
    if len(rest) >= 1:
        g = np.sort(rest[:gate])
        how = "held-out corpus vectors (not in the training sample), the query's own vector excluded"
    else:
        g = np.sort(perm[:gate])
        how = "corpus vectors (the training sample is the whole corpus), the query's own vector excluded"
    return train.astype(np.int64), g.astype(np.int64), how



def sample_vectors(ctx: BuildContext, params: IndexParams, state: dict[str, Any],
                   ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, str]:
    """(training vectors or None when a trained quantizer exists, gate vectors, gate ids, how)."""
    t0 = time.perf_counter()
    gate_n = min(ctx.cfg.gate_queries, params.rows)
    train_ids, gate_ids, how = sample_ids(params.rows, params.train_size, gate_n, ctx.cfg.seed)
    gate_key = join(ctx.state_prefix, "gate.npz")
    need_train = params.train_size > 0 and "trained_at" not in state
    if not need_train and ctx.store.exists(gate_key):
        saved = load_npz(ctx.store.read_bytes(gate_key))
        if np.array_equal(saved["ids"], gate_ids):
            ctx.timings["sample_s"] = time.perf_counter() - t0
            return None, saved["vectors"], gate_ids, how
    want = np.union1d(train_ids, gate_ids) if need_train else gate_ids
    vecs = gather_rows(ctx.store, ctx.run, want, ctx.mapper)
    pos = {int(i): n for n, i in enumerate(want)}
    gate_vecs = vecs[[pos[int(i)] for i in gate_ids]] if len(gate_ids) else np.zeros((0, params.dim), np.float32)
    train_vecs = vecs[[pos[int(i)] for i in train_ids]] if need_train else None
    ctx.store.write_bytes(gate_key, npz_bytes(ids=gate_ids, vectors=gate_vecs))
    ctx.timings["sample_s"] = time.perf_counter() - t0
    ctx.emit("sampled", train=len(train_ids) if need_train else 0, gate=len(gate_ids))
    return train_vecs, gate_vecs, gate_ids, how


def train_quantizer(ctx: BuildContext, params: IndexParams, sample: np.ndarray | None, state: dict[str, Any],
                    prefix: str) -> None:
    """Train the quantizer and calibrate int8 ranges once; both become version artifacts."""
    if sample is None:
        ctx.timings["train_s"] = 0.0
        if "trained_at" in state:
            ctx.emit("trained", reused=True, seconds=0.0)
        return
    t0 = time.perf_counter()
    trained: dict[str, Any] = {}
    binary = params.kind == "binary-rerank"
    if params.trained:
        faiss = import_faiss()
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        index = make_binary_index(params.factory, params.dim) if binary else make_float_index(params.factory,
                                                                                               params.dim)
        index.train(pack_sign_bits(sample) if binary else sample)
        trained["trained"] = {"key": TRAINED_KEY, **upload_bytes(ctx.store, join(prefix, TRAINED_KEY),
                                                                  index_to_bytes(index, binary))}
    if params.rescore == "int8":
        ranges = int8_ranges(sample)
        trained["ranges"] = {"key": RANGES_KEY, **upload_bytes(ctx.store, join(prefix, RANGES_KEY),
                                                                npy_bytes(ranges))}
    state.update(trained)
    state["trained_at"] = now_iso()
    ctx.write_state(state)  # from here on a crash resumes without retraining
    ctx.timings["train_s"] = time.perf_counter() - t0
    ctx.emit("trained", reused=False, seconds=round(ctx.timings["train_s"], 3), vectors=len(sample))
