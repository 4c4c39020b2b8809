"""FAISS helpers: a lazy import, index construction and (de)serialisation, exact top-k and the shard merge."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import faiss


def import_faiss() -> Any:
    """``import faiss``, with OpenMP threads that sleep instead of spinning while they wait.

    On a machine shared with other busy processes (CI, a Ray node), spinning OpenMP threads
    turned a 0.8 s PQ training into 40 s here; passive waiting costs little when the machine is
    idle. Effective only if set before libgomp loads; an explicit OMP_WAIT_POLICY wins.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import faiss

    return faiss


def make_float_index(factory: str, dim: int) -> faiss.Index:
    faiss = import_faiss()
    if factory == "Flat":
        return faiss.IndexIDMap(faiss.IndexFlatIP(dim))
    idx = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(idx)
    if ivf is not None:
        ivf = faiss.downcast_index(ivf)
        if hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False  # minutes of training for a search mode we never use
    return idx


def make_binary_index(factory: str, dim: int) -> faiss.IndexBinary:
    """``BFlat``: a bare IndexBinaryFlat holding only the codes — its result positions are rows of
    the shard's id map (``id_mode: row``), which saves the 8-byte id per vector an IDMap would
    keep in RAM (1/7 of a 384-bit code). Other factories keep global ids."""
    faiss = import_faiss()
    bits = binary_bits(dim)
    if factory == "BFlat":
        return faiss.IndexBinaryFlat(bits)
    return faiss.index_binary_factory(bits, factory)


def id_mode_for(kind: str, factory: str) -> str:
    """``row``: the FAISS file returns positions in the shard's id map; ``global``: it returns ids."""
    return "row" if kind == "binary-rerank" and factory == "BFlat" else "global"


def index_to_bytes(index: Any, binary: bool) -> bytes:
    faiss = import_faiss()
    arr = faiss.serialize_index_binary(index) if binary else faiss.serialize_index(index)
    return arr.tobytes()


def index_from_bytes(data: bytes, binary: bool) -> Any:
    faiss = import_faiss()
    arr = np.frombuffer(data, dtype=np.uint8)
    return faiss.deserialize_index_binary(arr) if binary else faiss.deserialize_index(arr)



def binary_bits(dim: int) -> int:
    """FAISS binary indexes need a multiple of 8 bits; ``np.packbits`` pads with zeros."""
    return ((dim + 7) // 8) * 8


def exact_topk(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top ``depth``: (scores [q, depth] float32, ids [q, depth] int64, -1 padded)."""
    q = len(queries)
    scores = np.full((q, depth), -np.inf, dtype=np.float32)
    out = np.full((q, depth), -1, dtype=np.int64)
    if q == 0 or len(vectors) == 0:
        return scores, out
    faiss = import_faiss()
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
    kk = min(depth, len(vectors))
    d, i = flat.search(np.ascontiguousarray(queries, dtype=np.float32), kk)
    scores[:, :kk] = d
    out[:, :kk] = np.where(i >= 0, ids[np.clip(i, 0, None)], -1)
    return scores, out


def merge_topk(scores: Sequence[np.ndarray], ids: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard results [q, k_s] into the global top ``k`` (ties broken by smaller id)."""
    s = np.concatenate(scores, axis=1) if scores else np.zeros((0, 0), dtype=np.float32)
    i = np.concatenate(ids, axis=1) if ids else np.zeros((0, 0), dtype=np.int64)
    s = np.where(i >= 0, s, -np.inf)
    order = np.lexsort((i, -s), axis=-1)[:, :k]
    s_top = np.take_along_axis(s, order, axis=1)
    i_top = np.take_along_axis(i, order, axis=1)
    if s_top.shape[1] < k:
        pad = k - s_top.shape[1]
        s_top = np.pad(s_top, ((0, 0), (0, pad)), constant_values=-np.inf)
        i_top = np.pad(i_top, ((0, 0), (0, pad)), constant_values=-1)
    return s_top.astype(np.float32), i_top.astype(np.int64)

