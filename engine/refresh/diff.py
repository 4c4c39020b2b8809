"""The diff of a refresh: the snapshot's run against the live run, chunk by chunk, by chunk id and content hash."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.core.errors import IntegrityError
from engine.core.storage import Store
from engine.refresh.run_parts import chunk_rows

CATEGORIES = ("new", "changed", "unchanged", "deleted")


@dataclass
class RefreshDiff:
    """Documents and chunks of the new snapshot against the live run.

    Chunks: *unchanged* (same chunk id, same content hash), *changed* (same id, other hash),
    *new* (id only in the snapshot), *deleted* (id only in the live run). Documents:
    *unchanged* when every chunk is, *changed* when present in both otherwise, *new*/*deleted*
    when present on one side only. ``remove_ids``/``add_ids`` are the index delta: changed and
    deleted chunks leave, changed and new chunks come in."""

    docs: dict[str, int]
    chunks: dict[str, int]
    live_chunks: int
    snapshot_chunks: int
    embedded: int  # distinct texts the model had to embed (new/changed chunks with an unseen hash)
    reused_by_hash: int  # new/changed chunks whose text the live run had already embedded (moved text)
    remove_ids: list[str]
    add_ids: list[str]
    deleted_doc_ids: list[str]

    @property
    def changed_fraction(self) -> float:
        """Index churn relative to the live version: (chunks added + chunks removed) / live chunks."""
        churn = self.chunks["new"] + self.chunks["changed"] + self.chunks["deleted"]
        return churn / max(1, self.live_chunks)

    @property
    def empty(self) -> bool:
        return not (self.chunks["new"] or self.chunks["changed"] or self.chunks["deleted"])

    def summary(self) -> dict[str, Any]:
        return {"docs": dict(self.docs), "chunks": dict(self.chunks), "live_chunks": self.live_chunks,
                "snapshot_chunks": self.snapshot_chunks, "embedded": self.embedded,
                "reused_by_hash": self.reused_by_hash, "changed_fraction": round(self.changed_fraction, 6),
                "index_delta": {"remove": len(self.remove_ids), "add": len(self.add_ids)}}


def diff_runs(store: Store, live_run: dict[str, Any], new_run: dict[str, Any]) -> RefreshDiff:
    """Compare the snapshot's run with the live run, chunk by chunk (columnar, no vectors read)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    old = chunk_rows(store, live_run)
    new = chunk_rows(store, new_run)
    for name, t in (("live", old), ("snapshot", new)):
        if pc.count_distinct(t.column("chunk_id")).as_py() != t.num_rows:
            raise IntegrityError(f"the {name} run has duplicate chunk ids; it is corrupt (rebuild it with embedctl embed)")
    joined = new.rename_columns(["chunk_id", "doc_id", "hash_new"]).join(
        old.rename_columns(["chunk_id", "doc_id_old", "hash_old"]), keys="chunk_id", join_type="full outer")
    hn, ho = joined.column("hash_new"), joined.column("hash_old")
    in_new, in_old = pc.is_valid(hn), pc.is_valid(ho)
    same = pc.and_(pc.and_(in_new, in_old), pc.equal(pc.fill_null(hn, ""), pc.fill_null(ho, "")))
    changed = pc.and_(pc.and_(in_new, in_old), pc.invert(same))
    new_only = pc.and_(in_new, pc.invert(in_old))
    old_only = pc.and_(in_old, pc.invert(in_new))
    doc = pc.coalesce(joined.column("doc_id"), joined.column("doc_id_old"))
    status = pa.table({"doc": doc, "new": new_only, "old": old_only, "same": same, "changed": changed})
    chunk_counts = {"new": _true(new_only), "changed": _true(changed), "unchanged": _true(same),
                    "deleted": _true(old_only)}
    # A document: new if it has no old chunk; deleted if no new chunk; unchanged if all chunks same.
    per_doc = status.group_by("doc").aggregate([("new", "all"), ("old", "all"), ("same", "all")])
    all_new, all_old, all_same = (per_doc.column(c) for c in ("new_all", "old_all", "same_all"))
    doc_counts = {"new": _true(all_new), "deleted": _true(all_old), "unchanged": _true(all_same)}
    doc_counts["changed"] = per_doc.num_rows - sum(doc_counts.values())
    doc_counts = {k: doc_counts[k] for k in CATEGORIES}
    deleted_docs = sorted(pc.filter(per_doc.column("doc"), all_old).to_pylist())
    ids = joined.column("chunk_id")
    remove_ids = pc.filter(ids, pc.or_(changed, old_only)).to_pylist()
    add_ids = pc.filter(ids, pc.or_(changed, new_only)).to_pylist()
    # What the model had to see: distinct hashes of incoming chunks that the live run lacks.
    incoming = pc.unique(pc.filter(hn, pc.or_(changed, new_only)))
    known = pc.is_in(incoming, value_set=pc.unique(old.column("content_hash")))
    embedded = _true(pc.invert(known))
    reused_by_hash = len(add_ids) - _count_in(pc.filter(hn, pc.or_(changed, new_only)), incoming, known)
    return RefreshDiff(docs=doc_counts, chunks=chunk_counts, live_chunks=old.num_rows, snapshot_chunks=new.num_rows,
                       embedded=embedded, reused_by_hash=reused_by_hash, remove_ids=sorted(remove_ids),
                       add_ids=sorted(add_ids), deleted_doc_ids=deleted_docs)


def _true(mask: Any) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.cast(mask, "int64")).as_py() or 0)


def _count_in(hashes: Any, incoming: Any, known: Any) -> int:
    """How many of ``hashes`` (with repeats) are not in the live run: the chunks the model served."""
    import pyarrow.compute as pc

    unseen = pc.filter(incoming, pc.invert(known))
    return _true(pc.is_in(hashes, value_set=unseen))
