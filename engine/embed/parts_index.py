"""A run's output parts: read from the manifest (inline lists) or its Parquet parts index; where units ran.

A run with few units lists every part in ``manifest["outputs"]`` (the original form, kept for
small runs and for runs written before the index existed). A run with many units would make
that JSON document huge (a 1B-document corpus is ~500k units), so above ``INLINE_PARTS_LIMIT``
units the manifest keeps only a summary and points to ``runs/<id>/parts.parquet``: one row per
part (kind, key, rows, bytes, sha256, unit, node_id, node_ip). The index is written for every
run, small or not, so a user can always see which node ran which unit.

Every reader of a run's parts goes through ``run_outputs`` (both forms).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from engine.core.layout import run_prefix

if TYPE_CHECKING:
    from engine.core.storage import Store

log = logging.getLogger(__name__)

KINDS = ("chunks", "embeddings", "rejects")
INLINE_PARTS_LIMIT = 2000  # units; above this the manifest points to the parts index instead of listing parts
MARKER_READ_THREADS = 16  # commit markers read in parallel (S3 latency, not CPU, is the limit)
_FILE_FIELD = {"chunks": "chunk_file", "embeddings": "embedding_file", "rejects": "reject_file"}


def parts_index_key(run_id: str) -> str:
    return f"{run_prefix(run_id)}/parts.parquet"


def worker_location() -> dict[str, Any]:
    """Where this process runs: pid, and the Ray node id and IP inside a Ray worker (for per-unit records)."""
    import sys

    out: dict[str, Any] = {"pid": os.getpid()}
    ray = sys.modules.get("ray")  # only a process that already runs Ray has a node
    if ray is None:
        return out
    try:
        if ray.is_initialized():
            out["node_id"] = ray.get_runtime_context().get_node_id()
            out["node_ip"] = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - a record, never a failure
        log.debug("no Ray node id here", exc_info=True)
    return out


def read_markers(store: Store, keys: list[str], threads: int = MARKER_READ_THREADS) -> list[dict[str, Any]]:
    """Unit commit markers, read in parallel (one GET each)."""
    if len(keys) < 8:
        return [store.read_json(k) for k in keys]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(keys)))) as pool:
        return list(pool.map(store.read_json, keys))


def _marker_node(m: dict[str, Any]) -> dict[str, Any]:
    """The node that committed (wrote) a unit; the embedding worker's node when the writer's is unknown."""
    return m.get("write_worker") or m.get("embed_worker") or {}


def write_parts_index(store: Store, run_id: str, markers: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One Parquet row per output part of every committed unit; returns ``{key, rows, bytes, sha256}``."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list[Any]] = {c: [] for c in ("kind", "unit", "key", "rows", "bytes", "sha256", "node_id",
                                                   "node_ip", "embed_node_id")}
    for m in markers:
        node, embed = _marker_node(m), m.get("embed_worker") or {}
        for kind in KINDS:
            part = m[_FILE_FIELD[kind]]
            for c, v in (("kind", kind), ("unit", m["unit_id"]), ("key", part["key"]), ("rows", int(part["rows"])),
                         ("bytes", int(part["bytes"])), ("sha256", part["sha256"]), ("node_id", node.get("node_id")),
                         ("node_ip", node.get("node_ip")), ("embed_node_id", embed.get("node_id"))):
                cols[c].append(v)
    schema = pa.schema([("kind", pa.string()), ("unit", pa.string()), ("key", pa.string()), ("rows", pa.int64()),
                        ("bytes", pa.int64()), ("sha256", pa.string()), ("node_id", pa.string()),
                        ("node_ip", pa.string()), ("embed_node_id", pa.string())])
    buf = io.BytesIO()
    pq.write_table(pa.table(cols, schema=schema), buf, compression="zstd")
    data = buf.getvalue()
    key = parts_index_key(run_id)
    store.write_bytes(key, data)
    return {"key": key, "rows": len(cols["key"]), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def summarize_outputs(ordered: list[dict[str, Any]], index: dict[str, Any],
                      inline_limit: int | None = None) -> dict[str, Any]:
    """``manifest["outputs"]``: the inline lists for a small run; totals and the index pointer above the limit
    (``INLINE_PARTS_LIMIT`` units unless given)."""
    if len(ordered) <= (INLINE_PARTS_LIMIT if inline_limit is None else inline_limit):
        return {kind: [m[_FILE_FIELD[kind]] for m in ordered] for kind in KINDS}
    totals = {kind: {"parts": len(ordered), "rows": sum(int(m[_FILE_FIELD[kind]]["rows"]) for m in ordered),
                     "bytes": sum(int(m[_FILE_FIELD[kind]]["bytes"]) for m in ordered)} for kind in KINDS}
    return {"parts_index": index, "totals": totals}


def nodes_summary(ordered: list[dict[str, Any]]) -> dict[str, Any]:
    """Units committed per node (by node IP and id), for a user looking for a slow or failing node."""
    by: dict[str, dict[str, Any]] = {}
    for m in ordered:
        node = _marker_node(m)
        nid = node.get("node_id") or "local"
        entry = by.setdefault(nid, {"node_ip": node.get("node_ip"), "units": 0, "embed_seconds": 0.0})
        entry["units"] += 1
        entry["embed_seconds"] = round(entry["embed_seconds"] + float(m.get("embed_seconds", 0.0)), 3)
    return by


def run_outputs(store: Store | None, manifest: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """A run's parts of ``kind`` (chunks/embeddings/rejects) as ``{key, rows, bytes, sha256}`` dicts in unit
    order, from the inline lists (older and small runs) or the parts index (``store`` needed then)."""
    outputs = manifest.get("outputs") or {}
    if kind in outputs:
        return list(outputs[kind] or [])
    index = outputs.get("parts_index")
    if not index:
        return []
    if store is None:
        from engine.core.errors import ConfigError

        raise ConfigError(f"run {manifest.get('run_id')!r} lists its parts in {index['key']}: open its store to read them")
    return [p for p in read_parts_index(store, index["key"]) if p["kind"] == kind]


def read_parts_index(store: Store, key: str) -> list[dict[str, Any]]:
    """Every row of a parts index (all kinds), in the order written (unit order)."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(store.read_bytes(key)))
    return [{k: v for k, v in row.items() if v is not None} for row in table.to_pylist()]
