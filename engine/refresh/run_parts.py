"""Reading a stored run's Parquet parts for a refresh: columns, vectors, chosen rows, chunk ids."""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.core.storage import LocalStore, Store
from engine.embed.parts_index import run_outputs

if TYPE_CHECKING:
    import pyarrow as pa

RUN_COLUMNS = frozenset({"chunk_id", "doc_id", "content_hash", "text", "embedding"})  # in every part

_FILESYSTEMS: weakref.WeakKeyDictionary[Store, Any] = weakref.WeakKeyDictionary()
_FS_LOCK = threading.Lock()


def _filesystem(store: Store) -> Any:
    """One pyarrow filesystem per store object (building an S3 one resolves credentials: ~25 ms)."""
    with _FS_LOCK:
        fs = _FILESYSTEMS.get(store)
        if fs is None:
            fs = _FILESYSTEMS[store] = store.arrow_filesystem()
        return fs


def read_columns(store: Store, key: str, columns: list[str] | None) -> pa.Table:
    """Some columns (None: all) of one Parquet object of the store."""
    import pyarrow.parquet as pq

    with _filesystem(store).open_input_file(store.arrow_path(key)) as f:
        return pq.read_table(f, columns=columns)


def column_vectors(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """A fixed_size_list column as a 2-D array. [rows, dim] (float32 or float16, as stored)"""
    col = table.column(column).combine_chunks()
    dim = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


def unit_vectors(x: np.ndarray) -> np.ndarray:
    """L2-normalised float32 copy of ``x`` [n, dim] (stored fp16 vectors drift off unit length)."""
    from engine.embed.encoders import l2_normalize

    return l2_normalize(x).astype(np.float32)


def chunk_rows(store: Store, run_manifest: dict[str, Any], kind: str = "chunks") -> pa.Table:
    """(chunk_id, doc_id, content_hash) of every chunk of a run, one table."""
    import pyarrow as pa

    cols = ["chunk_id", "doc_id", "content_hash"]
    tables = [read_columns(store, o["key"], cols) for o in run_outputs(store, run_manifest, kind)]
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in cols})
    return pa.concat_tables(tables).combine_chunks()


def read_run_rows(store: Store, run_manifest: dict[str, Any], chunk_ids: set[str] | None = None,
                  limit: int | None = None, seed: int = 0) -> tuple[list[str], list[str], np.ndarray]:
    """(chunk ids, doc ids, vectors [n, dim] float32) of a run's rows: those in ``chunk_ids``, or a seeded
    sample of ``limit`` rows (see ``read_run_table``)."""
    t = read_run_table(store, run_manifest, ["chunk_id", "doc_id", "embedding"], chunk_ids, limit, seed)
    if not t.num_rows:
        return [], [], np.zeros((0, int(run_manifest["dim"])), dtype=np.float32)
    return (t.column("chunk_id").to_pylist(), t.column("doc_id").to_pylist(),
            column_vectors(t).astype(np.float32))


def read_run_table(store: Store, run_manifest: dict[str, Any], columns: list[str], chunk_ids: set[str] | None = None,
                   limit: int | None = None, seed: int = 0) -> pa.Table:
    """Some columns of a run's rows: those in ``chunk_ids``, or a seeded sample of ``limit`` rows, in part order.

    Reads the id column of every embeddings part, the other columns only of parts that hold wanted rows; a
    column a part lacks (a snapshot without it) comes back as nulls."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    outputs = run_outputs(store, run_manifest, "embeddings")
    parts = [o["key"] for o in outputs if int(o.get("rows", 0)) > 0]
    if chunk_ids is None and limit is not None:
        total = sum(int(o["rows"]) for o in outputs)
        rng = np.random.default_rng(seed)
        pick = set(rng.choice(total, size=min(limit, total), replace=False).tolist()) if total else set()
    tables: list[pa.Table] = []
    offset = 0
    for key in parts:
        ids = read_columns(store, key, ["chunk_id"]).column(0)
        if chunk_ids is not None:
            mask = pc.is_in(ids, value_set=pa.array(sorted(chunk_ids), pa.string()))
            rows = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
        else:
            rows = np.array([r - offset for r in range(offset, offset + len(ids)) if r in pick], dtype=np.int64)
        offset += len(ids)
        if not len(rows):
            continue
        present = columns
        if set(columns) - RUN_COLUMNS:  # metadata columns: a snapshot may lack one
            with _filesystem(store).open_input_file(store.arrow_path(key)) as f:
                present = [c for c in columns if c in set(pq.read_schema(f).names)]
        tables.append(read_columns(store, key, present).take(pa.array(rows, pa.int64())))
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns if c != "embedding"})
    return pa.concat_tables(tables, promote_options="default")


def local_copy(store: Store, key: str, path: str) -> str:
    """A local file path holding the object ``key``: the object itself on a local store, else a download."""
    if isinstance(store, LocalStore):
        return str(store.local_path(key))
    store.download_file(key, path)
    return path
