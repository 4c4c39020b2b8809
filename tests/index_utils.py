"""Test helpers for index builds: embed runs written straight from arrays (the run contract of
engine/layout.py), and seeded clustered vectors that an ANN index can search meaningfully."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from engine.core import layout
from engine.core.storage import Store, json_bytes
from engine.embed.encoders import load_encoder
from engine.embed.pipeline import write_part


def clustered_vectors(n: int, dim: int, *, clusters: int = 32, spread: float = 0.35, seed: int = 0,
                      sample_seed: int | None = None) -> np.ndarray:
    """``n`` L2-normalised vectors around ``clusters`` random centres (fixed by ``seed``): [n, dim] float32.

    A different ``sample_seed`` draws other points around the same centres (queries that look
    like the corpus)."""
    centres = np.random.default_rng(seed).standard_normal((clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed if sample_seed is None else (seed, sample_seed))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def hash_identity(dim: int) -> dict[str, Any]:
    """The model identity of the deterministic ``hash:DIM`` encoder (what a real run records)."""
    return load_encoder(f"hash:{dim}").identity


def make_run(store: Store, run_id: str, vectors: np.ndarray, *, parts: int = 3, model: dict[str, Any] | None = None,
             doc_of: Any = None, dtype: str = "float32", chunk_ids: list[str] | None = None,
             doc_ids: list[str] | None = None, status: str = "succeeded", texts: list[str] | None = None,
             columns: dict[str, pa.Array] | None = None) -> dict[str, Any]:
    """Write ``vectors`` as an embed run of ``parts`` Parquet parts; returns the run manifest.

    chunk ``c<i>`` belongs to doc ``d<doc_of(i)>`` (default: two chunks per doc); ``texts`` replace
    the ``text <i>`` chunk texts; ``columns`` (name -> Arrow array of n rows) are metadata columns."""
    n, dim = vectors.shape if vectors.ndim == 2 else (0, 0)
    doc_of = doc_of or (lambda i: i // 2)
    chunk_ids = chunk_ids or [f"c{i:06d}" for i in range(n)]
    doc_ids = doc_ids or [f"d{doc_of(i):06d}" for i in range(n)]
    model = model or hash_identity(dim)
    outputs = []
    bounds = np.linspace(0, n, parts + 1).round().astype(int) if n else np.zeros(parts + 1, dtype=int)
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    for p, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        rows = vectors[a:b].astype(np.float16 if dtype == "float16" else np.float32)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), type=value_type), model["dim"])
        table = pa.table({
            "chunk_id": pa.array(chunk_ids[a:b], pa.string()),
            "doc_id": pa.array(doc_ids[a:b], pa.string()),
            "chunk_index": pa.array([0] * (b - a), pa.int32()),
            "text": pa.array(texts[a:b] if texts is not None else [f"text {i}" for i in range(a, b)], pa.string()),
            **{name: col.slice(int(a), int(b - a)) for name, col in (columns or {}).items()},
            "embedding": emb,
        })
        outputs.append(write_part(store, layout.run_part_key(run_id, "embeddings", f"{p:05d}"), table))
    manifest = {"kind": "embed", "run_id": run_id, "status": status, "model": model, "dim": model["dim"],
                "metric": "cosine", "outputs": {"embeddings": outputs, "chunks": [], "rejects": []},
                "counts": {"chunks": n}}
    store.write_bytes(layout.run_manifest_key(run_id), json_bytes(manifest))
    return manifest


def brute_force(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k: (scores [q, k], row ids [q, k])."""
    sims = queries @ vectors.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order
