"""Duplicate document ids across a corpus, found by hash partitions so no process holds every id.

The rule is the corpus reader's: the first occurrence (file order, then row order) wins; every
later row with the same id is rejected and points at the first (``"<file key>#<row>"``).

Two steps, each a pure function over Arrow data, so they run in a plain loop or as Ray tasks:

1. ``partition_ids(file_index, ids, partitions)``: one file's id column -> ``partitions``
   tables of ``(id, file, row)``; an id always lands in the same partition (a hash of its UTF-8
   bytes), whichever file it is in.
2. ``duplicates_in_partition(tables)``: all files' tables of one partition -> the duplicate rows
   of that partition as ``(file, row, first_file, first_row)``.

Memory: step 1 holds one file's ids; step 2 one partition (about ``rows / partitions`` ids).
``find_duplicates_local`` chains them in this process; ``engine.distributed.dedup`` spreads them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

    from engine.core.storage import Store

# One partition per this many ids (a partition of 2M short ids is ~100-200 MB in step 2).
IDS_PER_PARTITION = 2_000_000

DuplicateMap = dict[str, dict[int, str]]  # file key -> {row -> "first file key#first row"}


def partitions_for(total_rows: int, ids_per_partition: int = IDS_PER_PARTITION) -> int:
    return max(1, -(-int(total_rows) // max(1, ids_per_partition)))


def partition_ids(file_index: int, ids: pa.Array | pa.ChunkedArray, partitions: int) -> list[pa.Table]:
    """Split one file's id column (nulls skipped: they are rejected as null ids) by id hash.

    Vectorised (no Python loop over rows): ids are compared as their string form (``str(v)``
    for integer ids, as the one-dict reader does), and the partition of an id is a hash of its
    UTF-8 bytes computed over Arrow's buffers (``string_partitions``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    keys = pc.cast(arr, pa.large_string())
    valid = pc.is_valid(keys).to_numpy(zero_copy_only=False)  # [n] bool
    rows = np.flatnonzero(valid).astype(np.int64)  # [m] row numbers of non-null ids
    keys = keys.filter(pa.array(valid)) if len(rows) < len(keys) else keys
    file_col = np.full(len(rows), file_index, dtype=np.int32)
    if partitions == 1:
        return [pa.table({"id": keys.cast(pa.string()), "file": pa.array(file_col), "row": pa.array(rows)})]
    part = string_partitions(keys, partitions)  # [m]
    out = []
    for p in range(partitions):
        sel = np.flatnonzero(part == p)
        out.append(pa.table({"id": keys.take(pa.array(sel)).cast(pa.string()), "file": pa.array(file_col[sel]),
                             "row": pa.array(rows[sel])}))
    return out


def string_partitions(keys: pa.LargeStringArray, partitions: int) -> np.ndarray:
    """``[n]`` partition of each (non-null) string: a multiplicative hash of its UTF-8 bytes, mod ``partitions``.

    Deterministic across processes and machines (it only has to send equal ids to the same
    partition; the rule for which row wins does not depend on it)."""
    n = len(keys)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    offsets = np.frombuffer(keys.buffers()[1], dtype=np.int64)[keys.offset: keys.offset + n + 1]  # [n+1]
    starts, lengths = offsets[:-1] - offsets[0], np.diff(offsets)  # [n] each, relative to the first byte
    data = np.frombuffer(keys.buffers()[2], dtype=np.uint8)[offsets[0]: offsets[-1]]  # [bytes]
    pos = np.arange(len(data), dtype=np.uint64) - np.repeat(starts.astype(np.uint64), lengths)  # byte's place in its id
    mixed = (data.astype(np.uint64) + np.uint64(1)) * _mix64(pos + np.uint64(1))  # a random weight per place
    padded = np.concatenate([mixed, np.zeros(1, np.uint64)])  # reduceat needs every index < len
    h = np.add.reduceat(padded, np.minimum(starts, len(data)))[:n]  # [n] sums wrap mod 2**64 by design
    h = _mix64(np.where(lengths > 0, h, np.uint64(0))) >> np.uint64(32)  # the high bits: every input bit reaches them
    return (h % np.uint64(partitions)).astype(np.int64)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over a uint64 array (a bijection that spreads every bit)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def duplicates_in_partition(tables: Iterable[pa.Table]) -> pa.Table:
    """Rows whose id was seen before (by file, then row), with where it was first seen."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pa.concat_tables(list(tables))
    empty = pa.table({"file": pa.array([], pa.int32()), "row": pa.array([], pa.int64()),
                      "first_file": pa.array([], pa.int32()), "first_row": pa.array([], pa.int64())})
    if table.num_rows < 2:
        return empty
    table = table.take(pc.sort_indices(table, sort_keys=[("id", "ascending"), ("file", "ascending"),
                                                         ("row", "ascending")]))
    ids = table.column("id").combine_chunks()
    same = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1)).to_numpy(zero_copy_only=False)  # [n-1]
    is_dup = np.concatenate([[False], same])  # [n]: same id as the row before it
    if not is_dup.any():
        return empty
    positions = np.arange(len(is_dup))
    first = np.maximum.accumulate(np.where(is_dup, 0, positions))  # start of each id's run
    files = table.column("file").to_numpy()
    rows = table.column("row").to_numpy()
    d = np.flatnonzero(is_dup)
    return pa.table({"file": pa.array(files[d].astype(np.int32)), "row": pa.array(rows[d].astype(np.int64)),
                     "first_file": pa.array(files[first[d]].astype(np.int32)),
                     "first_row": pa.array(rows[first[d]].astype(np.int64))})


def to_duplicate_map(found: Iterable[pa.Table], keys: Sequence[str]) -> DuplicateMap:
    """Partition results -> ``{file key: {row: "first key#row"}}`` (the plan's format)."""
    out: DuplicateMap = {}
    for t in found:
        for f, r, ff, fr in zip(t.column("file").to_pylist(), t.column("row").to_pylist(),
                                t.column("first_file").to_pylist(), t.column("first_row").to_pylist(), strict=True):
            out.setdefault(keys[f], {})[int(r)] = f"{keys[ff]}#{fr}"
    return {k: dict(sorted(v.items())) for k, v in out.items()}


def find_duplicates_local(read_ids: Sequence[pa.Array], keys: Sequence[str], *,
                          ids_per_partition: int = IDS_PER_PARTITION) -> DuplicateMap:
    """Both steps in this process (files given as their id columns, in corpus order)."""
    partitions = partitions_for(sum(len(a) for a in read_ids), ids_per_partition)
    by_part: list[list[pa.Table]] = [[] for _ in range(partitions)]
    for i, ids in enumerate(read_ids):
        for p, t in enumerate(partition_ids(i, ids, partitions)):
            by_part[p].append(t)
    return to_duplicate_map((duplicates_in_partition(ts) for ts in by_part), keys)


def read_id_column(store: Store, key: str, column: str) -> pa.ChunkedArray:
    """One file's id column (only that column is read)."""
    import pyarrow.parquet as pq

    with store.arrow_filesystem().open_input_file(store.arrow_path(key)) as f:
        return pq.read_table(f, columns=[column]).column(0)
