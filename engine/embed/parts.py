"""A unit's files: Parquet parts written atomically with their sha256, the vector column, commit-marker keys."""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Any

from engine.core.layout import run_prefix
from engine.core.storage import Store, join, sha256_file

if TYPE_CHECKING:
    import pyarrow as pa


def state_key(run_id: str, *parts: str) -> str:
    return join(run_prefix(run_id), "_state", *parts)


def write_part(store: Store, key: str, table: pa.Table) -> dict[str, Any]:
    """Write a Parquet part atomically (temp file -> upload/rename); return its key, rows, bytes, sha256.

    Written without timestamps or writer-dependent metadata so equal tables give equal bytes.
    """
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="embedctl-part-") as tmp:
        path = os.path.join(tmp, "part.parquet")
        pq.write_table(table, path, row_group_size=8192, write_statistics=True, **_codecs(table))
        digest, size = sha256_file(path), os.path.getsize(path)
        store.upload_file(key, path)
    return {"key": key, "rows": table.num_rows, "bytes": size, "sha256": digest}


def read_part(store: Store, key: str) -> pa.Table:
    import pyarrow.parquet as pq

    with store.arrow_filesystem().open_input_file(store.arrow_path(key)) as f:
        return pq.read_table(f)


def _codecs(table: pa.Table) -> dict[str, Any]:
    """zstd for text and ids; vector columns stored plain, without dictionary or compression.

    Float vectors barely compress (high-entropy mantissas): on 8,192 x 384 float32 rows zstd saved
    8% of the bytes at twice the write time and 1.4x the read time, and dictionary-encoding floats
    made the column larger (benchmarks/bench_parquet_codecs.py). Tables without a vector column
    are written exactly as before.
    """
    import pyarrow as pa

    vectors = [f.name for f in table.schema if pa.types.is_fixed_size_list(f.type)]
    if not vectors:
        return {"compression": "zstd"}
    # Per-column codecs are keyed by leaf path: "<name>.list.element" for a fixed-size list.
    compression = {f"{name}.list.element": "none" for name in vectors}
    compression.update({f.name: "zstd" for f in table.schema if f.name not in vectors})
    return {"compression": compression, "use_dictionary": [f.name for f in table.schema if f.name not in vectors]}


def embedding_column(vectors: Any, dtype: str) -> pa.FixedSizeListArray:
    import numpy as np
    import pyarrow as pa

    arr = np.ascontiguousarray(vectors, dtype=np.float16 if dtype == "float16" else np.float32)
    n, dim = arr.shape if arr.ndim == 2 else (0, 0)
    flat = pa.array(arr.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, dim) if n else pa.array([], type=pa.list_(flat.type, max(dim, 1)))
