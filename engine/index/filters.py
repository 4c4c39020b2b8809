"""Metadata filters of a loaded version: its filterable columns and the ids a ``--where`` expression allows.

The columns are ``chunk_id`` and ``doc_id`` (every version's id map) plus the metadata columns
the embed run carried (``title``, ``lang``, ``updated_at``, ...), stored per shard as
``shards/shard-NNNNN.meta.parquet`` (``id`` + columns) by builds that saw them. The table is read
on the first filtered search; an expression is evaluated over it once (pyarrow.compute) and
its allowed ids are then used *inside* the search (a FAISS ID selector, a BM25 mask).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.core.errors import IntegrityError
from engine.index.where import parse_where

if TYPE_CHECKING:
    import pyarrow as pa

CACHE_SIZE = 32  # parsed and evaluated expressions kept per searcher


class MetadataFilter:
    """Lazily loaded filter table of one version; ``allowed_ids(where)`` -> sorted int64 ids."""

    def __init__(self, manifest: Mapping[str, Any], paths: Mapping[str, str], ids: np.ndarray,
                 chunk_ids: pa.Array, doc_ids: pa.Array, where: str = ""):
        self.section = manifest.get("metadata") or {}
        self.paths, self.ids, self.where = paths, ids, where
        self._chunk_ids, self._doc_ids = chunk_ids, doc_ids
        self._table: pa.Table | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def columns(self) -> list[str]:
        """The column names a filter may use (without reading any file)."""
        return sorted({"chunk_id", "doc_id", *(self.section.get("columns") or {})})

    def table(self) -> pa.Table:
        with self._lock:
            if self._table is None:
                self._table = self._load()
            return self._table

    def _load(self) -> pa.Table:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"id": pa.array(self.ids, pa.int64()), "chunk_id": self._chunk_ids, "doc_id": self._doc_ids})
        parts = [pq.read_table(self.paths[s["files"]["meta"]]) for s in sorted(
            self.section.get("shards") or [], key=lambda s: int(s["shard"])) if (s.get("files") or {}).get("meta")]
        if not parts:
            return table
        meta = pa.concat_tables(parts, promote_options="permissive")
        meta_ids = meta.column("id").to_numpy()
        order = np.argsort(meta_ids, kind="stable")
        if len(meta_ids) != len(self.ids) or not np.array_equal(meta_ids[order], self.ids):
            raise IntegrityError(f"{self.where}: the metadata files do not cover the same ids as the id maps")
        meta = meta.take(pa.array(order, pa.int64()))
        for name in meta.column_names:
            if name not in table.column_names:
                table = table.append_column(name, meta.column(name))
        return table

    def allowed_ids(self, where: str) -> np.ndarray:
        """Sorted global ids of the rows ``where`` keeps (ConfigError for a bad expression)."""
        with self._lock:
            hit = self._cache.get(where)
            if hit is not None:
                self._cache.move_to_end(where)
                return hit
        table = self.table()
        flt = parse_where(where, {f.name: f.type for f in table.schema if f.name != "id"})
        ids = np.sort(table.filter(flt.expression).column("id").to_numpy())
        with self._lock:
            self._cache[where] = ids
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return ids
