"""Shard builds: one idempotent task per index shard (read rows, add, write FAISS file + id map + rescore vectors, commit)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.core import layout
from engine.core.errors import IntegrityError, NotFoundError
from engine.core.storage import Store, join
from engine.index.context import BuildContext, load_npz, npz_bytes
from engine.index.faiss_ops import (
    exact_topk,
    id_mode_for,
    import_faiss,
    index_from_bytes,
    make_binary_index,
    make_float_index,
)
from engine.index.params import IndexParams
from engine.index.quantize import encode_rescore, pack_sign_bits
from engine.index.runs import PartRef, RunInfo, metadata_columns, read_part


@dataclass(frozen=True)
class ShardTask:
    """Everything one shard task needs (picklable: it travels to Ray workers)."""

    store: Store
    index: str
    version_id: str
    state_prefix: str  # indexes/<name>/builds/<build key>
    shard: int
    id_start: int
    id_end: int
    parts: tuple[PartRef, ...]  # the parts overlapping [id_start, id_end)
    dim: int
    kind: str
    factory: str
    trained: dict[str, Any] | None  # {"key", "sha256", "bytes"} of the trained empty index
    rescore: str
    ranges: np.ndarray | None  # [2, dim] int8 calibration
    gate_queries: np.ndarray  # [g, dim] float32
    gate_depth: int  # exact neighbours per gate query to return
    threads: int | None = None  # FAISS OpenMP threads inside the task (None: leave as is)
    sparse: str = "none"  # bm25: also a BM25 shard over the same rows
    has_title: bool = False  # the parts have a title column (BM25 indexes title + text)
    sparse_granularity: str = "chunk"  # chunk | doc: one BM25 row per chunk, or per document
    has_offsets: bool = False  # the parts have char_start/char_end (doc granularity cuts chunk overlaps by them)
    meta_columns: tuple[str, ...] = ()  # metadata columns written beside the shard for filters


def shard_base(shard: int) -> str:
    return f"shards/shard-{shard:05d}"


def shard_files(shard: int, rescore: str) -> dict[str, str]:
    base = shard_base(shard)
    files = {"index": f"{base}.faiss", "ids": f"{base}.ids.parquet"}
    if rescore != "none":
        files["rescore"] = f"{base}.rescore.npy"
    return files


def _marker_key(state_prefix: str, shard: int) -> str:
    return join(state_prefix, f"shard-{shard:05d}.json")


def _exact_key(state_prefix: str, shard: int) -> str:
    return join(state_prefix, f"shard-{shard:05d}.exact.npz")


def shard_committed(store: Store, prefix: str, marker: Mapping[str, Any]) -> bool:
    """A shard marker counts only while every file it names is in the store with its size."""
    files = [*marker["files"].values(), *(marker.get("sparse") or {}).values(), *(marker.get("meta") or {}).values()]
    try:
        return all(store.size(join(prefix, f["key"])) == f["bytes"] for f in files)
    except NotFoundError:
        return False


def shard_ranges(rows: int, shards: int) -> list[tuple[int, int]]:
    """[id_start, id_end) of each shard: ``rows`` split into ``shards`` near-equal ranges."""
    if shards == 0:
        return []
    bounds = np.linspace(0, rows, shards + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def parts_for(run: RunInfo, start: int, end: int) -> tuple[PartRef, ...]:
    return tuple(p for p in run.parts if p.start < end and p.start + p.rows > start)


def build_shard(task: ShardTask) -> dict[str, Any]:
    """Build, upload and commit one index shard; idempotent (a committed shard is returned as is).

    Returns the shard's marker: ``{"shard", "rows", "id_start", "id_end", "files": {role: {key,
    bytes, sha256}}, "seconds", "skipped"}`` plus ``"exact": {"scores", "ids"}`` arrays.
    """
    store = task.store
    prefix = layout.version_prefix(task.index, task.version_id)
    mkey = _marker_key(task.state_prefix, task.shard)
    if store.exists(mkey):
        marker = store.read_json(mkey)
        if shard_committed(store, prefix, marker) and store.exists(_exact_key(task.state_prefix, task.shard)):
            exact = load_npz(store.read_bytes(_exact_key(task.state_prefix, task.shard)))
            return {**marker, "exact": exact, "skipped": True}
    faiss = import_faiss()
    if task.threads:
        faiss.omp_set_num_threads(task.threads)
    t0, cpu0 = time.perf_counter(), time.process_time()
    vecs, cols = _read_shard_rows(task)
    ids = np.arange(task.id_start, task.id_end, dtype=np.int64)
    if len(vecs) != len(ids):
        raise IntegrityError(f"shard {task.shard}: read {len(vecs)} vectors for ids [{task.id_start}, {task.id_end})")
    t_read = time.perf_counter() - t0

    # Exact neighbours of the gate queries within this shard (merged by the driver).
    ex_scores, ex_ids = exact_topk(task.gate_queries, vecs, ids, task.gate_depth)

    binary = task.kind == "binary-rerank"
    if task.trained is not None:
        trained = store.read_bytes(join(prefix, task.trained["key"]))
        if hashlib.sha256(trained).hexdigest() != task.trained["sha256"]:
            raise IntegrityError(f"trained quantizer {store.describe(join(prefix, task.trained['key']))} is corrupt")
        index = index_from_bytes(trained, binary)
    else:
        index = make_binary_index(task.factory, task.dim) if binary else make_float_index(task.factory, task.dim)
    t1 = time.perf_counter()
    x = pack_sign_bits(vecs) if binary else vecs
    if id_mode_for(task.kind, task.factory) == "row":
        index.add(x)
    else:
        index.add_with_ids(x, ids)
    t_add = time.perf_counter() - t1
    files = _write_shard_files(task, prefix, index, ids, vecs, cols["chunk_id"], cols["doc_id"])
    extras = _write_shard_extras(task, prefix, ids, cols)
    marker = {"shard": task.shard, "rows": int(len(ids)), "id_start": task.id_start, "id_end": task.id_end,
              "id_mode": id_mode_for(task.kind, task.factory),
              "files": files, "seconds": {"read": round(t_read, 3), "add": round(t_add, 3),
                                          "total": round(time.perf_counter() - t0, 3),
                                          "cpu": round(time.process_time() - cpu0, 3)}, **extras}
    store.write_bytes(_exact_key(task.state_prefix, task.shard), npz_bytes(scores=ex_scores, ids=ex_ids))
    store.write_json(mkey, marker)  # the commit point of this shard
    return {**marker, "exact": {"scores": ex_scores, "ids": ex_ids}, "skipped": False}


def _read_shard_rows(task: ShardTask) -> tuple[np.ndarray, dict[str, list[Any]]]:
    """Vectors [n, dim] of the shard's id range and its columns (column -> one Arrow array per part read)."""
    columns = ["chunk_id", "doc_id"]
    if task.sparse != "none":
        columns += ["text"] + (["title"] if task.has_title else [])
        if task.sparse_granularity == "doc" and task.has_offsets:
            columns += ["char_start", "char_end"]
    columns += [c for c in task.meta_columns if c not in columns]
    vec_parts: list[np.ndarray] = []
    cols: dict[str, list[Any]] = {c: [] for c in columns}
    for part in task.parts:
        lo = max(task.id_start, part.start) - part.start
        hi = min(task.id_end, part.start + part.rows) - part.start
        v, got = read_part(task.store, part, task.dim, columns=columns, rows=slice(lo, hi))
        vec_parts.append(v)
        for c in columns:
            cols[c].append(got[c])
    vecs = np.concatenate(vec_parts) if vec_parts else np.zeros((0, task.dim), dtype=np.float32)
    return vecs, cols


def _write_shard_files(task: ShardTask, prefix: str, index: Any, ids: np.ndarray, vecs: np.ndarray,
                       chunk_parts: list[Any], doc_parts: list[Any]) -> dict[str, dict[str, Any]]:
    """Write the FAISS file, the id map and the rescore vectors; upload them. role -> {key, bytes, sha256}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    faiss = import_faiss()
    binary = task.kind == "binary-rerank"
    names = shard_files(task.shard, task.rescore)
    tmp = tempfile.mkdtemp(prefix="embedctl-shard-")
    try:
        paths = {role: os.path.join(tmp, os.path.basename(key)) for role, key in names.items()}
        (faiss.write_index_binary if binary else faiss.write_index)(index, paths["index"])
        table = pa.table({"id": pa.array(ids, type=pa.int64()),
                          "chunk_id": pa.concat_arrays(chunk_parts) if chunk_parts else pa.array([], pa.string()),
                          "doc_id": pa.concat_arrays(doc_parts) if doc_parts else pa.array([], pa.string())})
        pq.write_table(table, paths["ids"], compression="zstd", write_statistics=True)
        if "rescore" in paths:
            np.save(paths["rescore"], encode_rescore(vecs, task.rescore, task.ranges), allow_pickle=False)
        files = {}
        for role, key in names.items():
            digest = task.store.upload_file(join(prefix, key), paths[role])
            files[role] = {"key": key, "bytes": os.path.getsize(paths[role]), "sha256": digest}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


def _write_shard_extras(task: ShardTask, prefix: str, ids: np.ndarray,
                        cols: dict[str, list[Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """The BM25 shard (``sparse``: file name -> {key, bytes, sha256}) and the metadata file for filters
    (``meta``), when the build asks for them; {} otherwise (a dense-only marker stays as it was)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out: dict[str, dict[str, dict[str, Any]]] = {}
    base = shard_base(task.shard)
    tmp = tempfile.mkdtemp(prefix="embedctl-shard-extra-")
    try:
        if task.sparse == "bm25":
            from engine.index.sparse import Bm25Index

            def column(name: str) -> list[Any] | None:
                return pa.concat_arrays(cols[name]).to_pylist() if cols.get(name) else None

            texts = column("text") or []
            folder = os.path.join(tmp, "bm25")
            os.makedirs(folder)
            names = Bm25Index.build_rows(column("title") or [None] * len(texts), texts, task.sparse_granularity,
                                         doc_ids=column("doc_id") or [], starts=column("char_start"),
                                         ends=column("char_end")).save(folder)
            out["sparse"] = {}
            for name in names:
                key = f"{base}.bm25/{name}"
                path = os.path.join(folder, name)
                digest = task.store.upload_file(join(prefix, key), path)
                out["sparse"][name] = {"key": key, "bytes": os.path.getsize(path), "sha256": digest}
        if task.meta_columns:
            table = pa.table({"id": pa.array(ids, type=pa.int64()),
                              **{c: pa.concat_arrays(cols[c]) for c in task.meta_columns}})
            key = f"{base}.meta.parquet"
            path = os.path.join(tmp, "meta.parquet")
            pq.write_table(table, path, compression="zstd", write_statistics=True)
            digest = task.store.upload_file(join(prefix, key), path)
            out["meta"] = {"meta": {"key": key, "bytes": os.path.getsize(path), "sha256": digest}}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def add_shards(ctx: BuildContext, params: IndexParams, state: dict[str, Any], gate_vecs: np.ndarray,
               ) -> list[dict[str, Any]]:
    prefix = layout.version_prefix(ctx.index, state["version_id"])
    ranges = None
    if params.rescore == "int8":
        data = ctx.store.read_bytes(join(prefix, state["ranges"]["key"]))
        ranges = np.load(io.BytesIO(data), allow_pickle=False)
    depth = 2 * ctx.cfg.gate_k + 1
    columns = ctx.run_columns()
    meta = tuple(sorted(metadata_columns(columns)))
    tasks = [ShardTask(store=ctx.store, index=ctx.index, version_id=state["version_id"],
                       state_prefix=ctx.state_prefix, shard=s, id_start=a, id_end=b,
                       parts=parts_for(ctx.run, a, b), dim=params.dim, kind=params.kind,
                       factory=params.factory, trained=state.get("trained"), rescore=params.rescore,
                       ranges=ranges, gate_queries=gate_vecs, gate_depth=depth, threads=ctx.task_threads,
                       sparse=ctx.cfg.sparse, has_title="title" in columns, meta_columns=meta,
                       sparse_granularity=ctx.cfg.sparse_granularity,
                       has_offsets={"char_start", "char_end"} <= set(columns))
             for s, (a, b) in enumerate(shard_ranges(params.rows, params.shards))]
    t0 = time.perf_counter()
    results: dict[int, dict[str, Any]] = {}
    for res in ctx.mapper(build_shard, tasks):
        results[res["shard"]] = res
        ctx.emit("shard_done", shard=res["shard"], rows=res["rows"], skipped=res["skipped"],
                  done=len(results), total=len(tasks))
    ctx.timings["add_s"] = time.perf_counter() - t0
    built = [r["seconds"] for r in results.values() if not r["skipped"]]
    ctx.timings["add_task_s"] = sum(s["total"] for s in built)  # wall seconds inside the tasks
    ctx.timings["add_task_cpu_s"] = sum(s.get("cpu", 0.0) for s in built)  # their CPU seconds
    missing = [t.shard for t in tasks if t.shard not in results]
    if missing:
        raise IntegrityError(f"shards {missing} returned no result; rerun the build (it resumes)")
    return [results[s] for s in sorted(results)]
