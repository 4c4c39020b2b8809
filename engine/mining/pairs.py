"""(query, positive) pairs: read from Parquet, grouped by query, every positive of a query kept."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core.errors import NotFoundError, SchemaError
from engine.core.storage import Store, open_store, sha256_file

log = logging.getLogger(__name__)


QUERY_COLUMNS = ("query", "anchor", "question")
POSITIVE_COLUMNS = ("positive", "answer", "passage")
POSITIVE_ID_COLUMNS = ("positive_id", "doc_id", "positive_doc_id", "chunk_id")


@dataclass
class QueryGroup:
    """One query and every positive the pair set knows for it (one output row per positive)."""

    key: str  # query_id, or the query text when there is no id
    query_id: str | None
    query: str
    positives: list[tuple[str | None, str | None]]  # (positive_id, positive_text), input order, deduplicated

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "query_id": self.query_id, "query": self.query, "positives": self.positives}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QueryGroup:
        positives = [(p[0], p[1]) for p in d["positives"]]
        return cls(d["key"], d.get("query_id"), d["query"], positives)


@dataclass
class PairSet:
    groups: list[QueryGroup]
    pairs: int
    rejects: dict[str, int]
    sha256: str
    columns: dict[str, str | None]

    @property
    def max_positives(self) -> int:
        return max((len(g.positives) for g in self.groups), default=1)


def _pick(names: list[str], options: tuple[str, ...]) -> str | None:
    lower = {n.lower(): n for n in names}
    return next((lower[o] for o in options if o in lower), None)


def read_pairs(uri: str, endpoint_url: str | None = None) -> PairSet:
    """Read (query, positive) pairs from Parquet: ``query`` plus ``positive`` text and/or ``positive_id``.

    Optional ``query_id`` groups pairs by query (else the query text does, as in
    sentence-transformers). Rows with an empty query, or neither a positive text nor an id,
    are counted as rejects, never dropped silently.
    """
    import pyarrow.parquet as pq

    store, key = split_uri(uri, endpoint_url)
    if not store.exists(key):
        raise NotFoundError(f"pairs file {uri!r} does not exist")
    with tempfile.TemporaryDirectory(prefix="embedctl-pairs-") as tmp:
        local = os.path.join(tmp, "pairs.parquet")
        store.download_file(key, local)
        digest = sha256_file(local)
        try:
            table = pq.read_table(local)
        except Exception as err:  # noqa: BLE001 - any arrow/parquet failure is a bad input file
            raise SchemaError(f"pairs file {uri!r} is not readable Parquet: {err}") from err
    names = table.column_names
    q_col = _pick(names, QUERY_COLUMNS)
    p_col = _pick(names, POSITIVE_COLUMNS)
    pid_col = _pick(names, POSITIVE_ID_COLUMNS)
    qid_col = _pick(names, ("query_id", "qid"))
    if q_col is None or (p_col is None and pid_col is None):
        raise SchemaError(
            f"pairs file {uri!r} has columns {names}; it needs a query column ({'/'.join(QUERY_COLUMNS)}) and a "
            f"positive text ({'/'.join(POSITIVE_COLUMNS)}) and/or id ({'/'.join(POSITIVE_ID_COLUMNS)}) column")

    def col(name: str | None) -> list[Any]:
        if name is None:
            return [None] * table.num_rows
        return [None if v is None else str(v) for v in table.column(name).to_pylist()]

    queries, positives, pos_ids, qids = col(q_col), col(p_col), col(pid_col), col(qid_col)
    groups: dict[str, QueryGroup] = {}
    rejects: dict[str, int] = {}
    pairs = 0
    for q, p, pid, qid in zip(queries, positives, pos_ids, qids, strict=True):
        if not q or not q.strip():
            rejects["empty_query"] = rejects.get("empty_query", 0) + 1
            continue
        if not (p and p.strip()) and not pid:
            rejects["no_positive"] = rejects.get("no_positive", 0) + 1
            continue
        gkey = qid if qid else q
        g = groups.get(gkey)
        if g is None:
            g = groups[gkey] = QueryGroup(gkey, qid, q, [])
        entry = (pid or None, p if p and p.strip() else None)
        if entry in g.positives:
            rejects["duplicate_pair"] = rejects.get("duplicate_pair", 0) + 1
            continue
        g.positives.append(entry)
        pairs += 1
    if not groups:
        raise SchemaError(f"pairs file {uri!r} holds no usable (query, positive) pair (rejects: {rejects})")
    return PairSet(list(groups.values()), pairs, rejects, digest,
                   {"query": q_col, "positive": p_col, "positive_id": pid_col, "query_id": qid_col})


def split_uri(uri: str, endpoint_url: str | None = None) -> tuple[Store, str]:
    """``/a/b/file.parquet`` or ``s3://bucket/a/file.parquet`` -> (store at the parent, key)."""
    text = os.fspath(uri).rstrip("/")
    if text.startswith("s3://") or text.startswith("file://"):
        parent, _, name = text.rpartition("/")
        return open_store(parent, endpoint_url=endpoint_url), name
    path = Path(text).expanduser().resolve()
    return open_store(str(path.parent)), path.name
