"""Embed runs as the index reads them: the run manifest, its embedding parts, vectors by row id."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.core import layout
from engine.core.errors import ConfigError, IntegrityError, NotFoundError, SchemaError
from engine.core.storage import Store, check_key, join
from engine.embed.parts_index import run_outputs

if TYPE_CHECKING:
    import pyarrow as pa

# Columns every chunk row has; any other column of an embeddings part (title, lang, updated_at,
# ...) is metadata an index version can filter on.
CHUNK_COLUMNS = frozenset({"chunk_id", "doc_id", "chunk_index", "text", "char_start", "char_end", "n_tokens",
                           "content_hash", "embedding"})

Mapper = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]


def local_mapper(fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]:
    """Run ``fn`` over ``items`` one after the other in this process (FAISS uses every core)."""
    for item in items:
        yield fn(item)


@dataclass(frozen=True)
class PartRef:
    key: str  # store-relative key of an embeddings Parquet part
    rows: int
    sha256: str | None
    start: int  # global row id of its first row


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    manifest: dict[str, Any]
    manifest_sha256: str
    parts: tuple[PartRef, ...]
    rows: int
    dim: int
    metric: str
    model: dict[str, Any]

    def fingerprint(self) -> list[list[Any]]:
        return [[p.key, p.rows, p.sha256] for p in self.parts]


def read_run(store: Store, run_id: str) -> RunInfo:
    """The embed run's manifest and its embedding parts (in manifest order, with global row offsets)."""
    key = layout.run_manifest_key(run_id)
    try:
        raw = store.read_bytes(key)
    except NotFoundError:
        raise NotFoundError(f"run {run_id!r} not found in {store.describe()} (no {key}); list runs under "
                            f"{store.describe('runs')}") from None
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as err:
        raise IntegrityError(f"{store.describe(key)} is not valid JSON: {err}") from None
    status = manifest.get("status")
    if status != "succeeded":
        raise ConfigError(f"run {run_id!r} is not complete (status {status!r}); rerun its embed command to finish "
                          "it (it resumes), then build the index")
    model = manifest.get("model")
    dim = manifest.get("dim") or (model or {}).get("dim")
    if not isinstance(model, dict) or not dim:
        raise SchemaError(f"run {run_id!r} manifest names no model identity or dimension")
    listed = manifest.get("outputs") or {}
    if "embeddings" not in listed and "parts_index" not in listed:
        raise SchemaError(f"run {run_id!r} manifest lists no embeddings outputs")
    outputs = run_outputs(store, manifest, "embeddings")
    parts: list[PartRef] = []
    start = 0
    for out in outputs:
        rows = int(out.get("rows", 0))
        if rows <= 0:
            continue
        part_key = check_key(str(out["key"]))
        if not part_key.startswith(layout.run_prefix(run_id) + "/"):
            part_key = join(layout.run_prefix(run_id), part_key)
        parts.append(PartRef(part_key, rows, out.get("sha256"), start))
        start += rows
    metric = str(manifest.get("metric") or "cosine")
    if metric not in ("cosine", "ip"):
        raise SchemaError(f"run {run_id!r} has metric {metric!r}; indexes support cosine/ip (normalised vectors)")
    return RunInfo(run_id, manifest, hashlib.sha256(raw).hexdigest(), tuple(parts), start, int(dim), metric, model)


def vectors_from_column(col: pa.ChunkedArray | pa.Array, dim: int, where: str = "") -> np.ndarray:
    """A ``fixed_size_list<float16|float32>[dim]`` column as float32 [n, dim]."""
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not pa.types.is_fixed_size_list(arr.type) or arr.type.list_size != dim:
        raise SchemaError(f"{where}: embedding column has type {arr.type}, expected fixed_size_list<float>[{dim}]")
    if arr.null_count:
        raise SchemaError(f"{where}: {arr.null_count} null embeddings")
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    out = np.array(flat, dtype=np.float32).reshape(len(arr), dim)  # a writable copy
    if not np.isfinite(out).all():
        raise SchemaError(f"{where}: embeddings contain NaN or infinity")
    return out


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise in place (zero rows stay zero): stored fp16 vectors drift off unit length."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, np.maximum(norms, 1e-12), out=x)
    return x


def read_part(store: Store, part: PartRef, dim: int, *, columns: Sequence[str] = ("chunk_id", "doc_id"),
              rows: np.ndarray | slice | None = None) -> tuple[np.ndarray, dict[str, pa.Array]]:
    """Vectors [n, dim] float32 (normalised) and the requested columns of one part (or some of its rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = store.describe(part.key)
    try:
        with store.arrow_filesystem().open_input_file(store.arrow_path(part.key)) as f:
            table = pq.read_table(f, columns=["embedding", *columns])
    except (OSError, pa.ArrowInvalid) as err:
        raise SchemaError(f"cannot read {where}: {err}") from None
    except KeyError as err:
        raise SchemaError(f"{where} lacks a column: {err}") from None
    if table.num_rows != part.rows:
        raise IntegrityError(f"{where} has {table.num_rows} rows, the run manifest says {part.rows}")
    if isinstance(rows, slice):
        table = table.slice(rows.start or 0, (rows.stop or table.num_rows) - (rows.start or 0))
    elif rows is not None:
        table = table.take(pa.array(rows, type=pa.int64()))
    vecs = normalize_rows(vectors_from_column(table.column("embedding"), dim, where))
    return vecs, {c: table.column(c).combine_chunks() for c in columns}


@dataclass(frozen=True)
class _RowsRequest:
    store: Store
    part: PartRef
    dim: int
    rows: tuple[int, ...]  # row positions inside the part


def _read_rows(req: _RowsRequest) -> np.ndarray:
    vecs, _ = read_part(req.store, req.part, req.dim, columns=(), rows=np.asarray(req.rows, dtype=np.int64))
    return vecs


def gather_rows(store: Store, run: RunInfo, ids: np.ndarray, mapper: Mapper = local_mapper) -> np.ndarray:
    """Vectors of the global row ``ids`` (sorted or not), reading only the parts that hold them."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.zeros((len(ids), run.dim), dtype=np.float32)
    if len(ids) == 0:
        return out
    starts = np.array([p.start for p in run.parts], dtype=np.int64)
    part_of = np.searchsorted(starts, ids, side="right") - 1
    reqs, slots = [], []
    for pi in np.unique(part_of):
        sel = np.nonzero(part_of == pi)[0]
        part = run.parts[int(pi)]
        reqs.append(_RowsRequest(store, part, run.dim, tuple(int(i) for i in ids[sel] - part.start)))
        slots.append(sel)
    for sel, vecs in zip(slots, _ordered(mapper, _read_rows, reqs), strict=True):
        out[sel] = vecs
    return out


def _ordered(mapper: Mapper, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """Results in item order whatever order the mapper yields them in."""
    tagged = list(mapper(_Tagged(fn), list(enumerate(items))))
    return [r for _, r in sorted(tagged, key=lambda t: t[0])]


@dataclass(frozen=True)
class _Tagged:
    fn: Callable[[Any], Any]

    def __call__(self, item: tuple[int, Any]) -> tuple[int, Any]:
        return item[0], self.fn(item[1])


def read_run_vectors(store: Store, run_id: str) -> tuple[np.ndarray, list[str], list[str]]:
    """Every vector of a run with its chunk and doc ids (exact baselines, small runs)."""
    run = read_run(store, run_id)
    vecs, chunk_ids, doc_ids = [], [], []
    for part in run.parts:
        v, cols = read_part(store, part, run.dim)
        vecs.append(v)
        chunk_ids += cols["chunk_id"].to_pylist()
        doc_ids += cols["doc_id"].to_pylist()
    mat = np.concatenate(vecs) if vecs else np.zeros((0, run.dim), dtype=np.float32)
    return mat, chunk_ids, doc_ids


def run_columns(store: Store, run: RunInfo) -> dict[str, str]:
    """Column name -> Arrow type (as text) of the run's embeddings parts (its first part's schema)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not run.parts:
        return {}
    part = run.parts[0]
    try:
        with store.arrow_filesystem().open_input_file(store.arrow_path(part.key)) as f:
            schema = pq.read_schema(f)
    except (OSError, pa.ArrowInvalid) as err:
        raise SchemaError(f"cannot read {store.describe(part.key)}: {err}") from None
    return {f.name: str(f.type) for f in schema}


def metadata_columns(columns: dict[str, str]) -> dict[str, str]:
    """The filterable metadata columns among a run's columns (scalar types only, chunk columns left out)."""
    return {name: t for name, t in columns.items()
            if name not in CHUNK_COLUMNS and not t.startswith(("list", "large_list", "fixed_size_list", "struct",
                                                                "map"))}
