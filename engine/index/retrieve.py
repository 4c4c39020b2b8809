"""Sparse and hybrid retrieval over a loaded version: BM25 shards, fusion with the dense list, the rerank hook.

``Searcher.search(mode="sparse"|"hybrid")`` lands here; dense-only searches never do. Both
lists are taken ``FusionConfig.depth`` deep (at least k, and k x 4 chunk hits when collapsing
to documents), restricted to the ``allowed`` ids of a filter inside each search, then fused.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from engine.core.errors import ConfigError, IntegrityError
from engine.index.faiss_ops import merge_topk
from engine.index.fusion import FusionConfig, fuse
from engine.index.sparse import ROW_DOC_FILE, Bm25Index, tokenize, top_rows

log = logging.getLogger(__name__)

MODES = ("dense", "sparse", "hybrid")
COLLAPSE_FANOUT = 4  # chunk hits per wanted document when collapsing to documents


class SparseShard:
    """One loaded BM25 shard: rows ``[id_start, id_start + rows)`` of the version's global ids, one BM25 row per
    chunk row (granularity chunk) or per document (doc: a document's hit is one of its chunk rows)."""

    def __init__(self, entry: Mapping[str, Any], paths: Mapping[str, str], where: str):
        self.number = int(entry["shard"])
        self.rows = int(entry["rows"])
        self.id_start = int(entry["id_start"])
        self.granularity = str(entry.get("granularity") or "chunk")
        files = entry.get("files") or {}
        name = f"{where} sparse shard {self.number}"
        if self.granularity not in ("chunk", "doc"):
            raise IntegrityError(f"{name}: unknown granularity {self.granularity!r} (a newer embedctl built it?)")
        if self.rows and (ROW_DOC_FILE in files) != (self.granularity == "doc"):
            raise IntegrityError(f"{name}: granularity {self.granularity} but {ROW_DOC_FILE} is "
                                 f"{'listed' if ROW_DOC_FILE in files else 'missing'}")
        self.bm25 = Bm25Index.load({n: paths[key] for n, key in files.items()}, self.rows, name) if self.rows else None
        if self.bm25 is not None and int(getattr(self.bm25.model, "scores", {}).get("num_docs", self.bm25.docs)) \
                != self.bm25.docs:
            raise IntegrityError(f"{where}: sparse shard {self.number} indexes "
                                 f"{self.bm25.model.scores.get('num_docs')} rows, the manifest says {self.bm25.docs}")

    def search(self, tokens: Sequence[str], depth: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(scores [m], global ids [m]) of the best ``depth`` rows sharing a term with the query, m <= depth
        (granularity doc: the best documents, each as its first chunk row that ``allowed`` keeps)."""
        if self.bm25 is None:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        mask = None
        if allowed is not None:
            lo, hi = np.searchsorted(allowed, [self.id_start, self.id_start + self.rows])
            mask = np.zeros(self.rows, dtype=bool)
            mask[allowed[lo:hi] - self.id_start] = True
        if self.bm25.row_doc is None:
            scores, rows = top_rows(self.bm25.scores(tokens), depth, mask)
            return scores, rows + self.id_start
        rep = self.bm25.representatives(mask)  # [docs] chunk row per document, -1 = none allowed
        scores, docs = top_rows(self.bm25.scores(tokens), depth, rep >= 0 if mask is not None else None)
        return scores, rep[docs] + self.id_start


def sparse_ids(shards: Sequence[SparseShard], texts: Sequence[str], depth: int,
               allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """BM25 top ``depth`` over every sparse shard: (scores [q, depth], ids [q, depth]; -inf / -1 padded)."""
    q = len(texts)
    out_s = np.full((q, depth), -np.inf, dtype=np.float32)
    out_i = np.full((q, depth), -1, dtype=np.int64)
    for row, tokens in enumerate(tokenize(texts)):
        per = [s.search(tokens, depth, allowed) for s in shards]
        s_cat = [np.pad(sc, (0, depth - len(sc)), constant_values=-np.inf)[None, :] for sc, _ in per]
        i_cat = [np.pad(ids, (0, depth - len(ids)), constant_values=-1)[None, :] for _, ids in per]
        if per:
            ms, mi = merge_topk(s_cat, i_cat, depth)
            out_s[row], out_i[row] = ms[0], mi[0]
    return out_s, out_i


def per_doc(scores: np.ndarray, ids: np.ndarray, codes: np.ndarray,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A best-first chunk list as a document list: each document once, at its best chunk, ranks compacted.
    (scores [q, d], doc codes [q, d], the chunk ids standing for them [q, d]; -inf / -1 padded.)"""
    out_s = np.full(scores.shape, -np.inf, dtype=np.float32)
    out_c = np.full(ids.shape, -1, dtype=np.int64)
    out_i = np.full(ids.shape, -1, dtype=np.int64)
    for row in range(ids.shape[0]):
        valid = np.nonzero(ids[row] >= 0)[0]
        _, first = np.unique(codes[row, valid], return_index=True)
        keep = valid[np.sort(first)]
        n = len(keep)
        out_s[row, :n], out_c[row, :n], out_i[row, :n] = scores[row, keep], codes[row, keep], ids[row, keep]
    return out_s, out_c, out_i


class RetrievalSearcher(Protocol):
    """What sparse and hybrid search use of a loaded ``engine.index.searcher.Searcher`` (which imports this
    module, so it is named here by its shape, not imported)."""

    index: str

    @property
    def version_id(self) -> str: ...

    @property
    def sparse_shards(self) -> Sequence[SparseShard]: ...

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray: ...

    def search_ids(self, vectors: np.ndarray, k: int, *, nprobe: int | None = None,
                   rescore_multiplier: int | None = None, depth_k: int | None = None,
                   allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]: ...

    def doc_codes(self, ids: np.ndarray) -> tuple[np.ndarray, list[str]]: ...

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Any]]: ...


def fuse_docs(searcher: RetrievalSearcher, dense: tuple[np.ndarray, np.ndarray],
              sparse: tuple[np.ndarray, np.ndarray], fusion: FusionConfig, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Fusion over documents: each list collapsed to its documents first (a document's rank is its best
    chunk's), fused by document, each fused document shown by its best dense chunk (else its BM25 chunk).
    (scores [q, k], chunk ids [q, k].)"""
    ds, dc, di = per_doc(dense[0], dense[1], searcher.doc_codes(dense[1])[0])
    ss, sc, si = per_doc(sparse[0], sparse[1], searcher.doc_codes(sparse[1])[0])
    fs, fc = fuse((ds, dc), (ss, sc), fusion, k)
    out = np.full(fc.shape, -1, dtype=np.int64)
    for row in range(fc.shape[0]):
        rep = dict(zip(sc[row].tolist(), si[row].tolist(), strict=True))
        rep.update(zip(dc[row].tolist(), di[row].tolist(), strict=True))
        out[row] = [rep.get(c, -1) if c >= 0 else -1 for c in fc[row].tolist()]
    return fs, out


def search_modes(searcher: RetrievalSearcher, queries: Sequence[str], k: int, *, mode: str, fusion: FusionConfig,
                 allowed: np.ndarray | None, nprobe: int | None, rescore_multiplier: int | None,
                 collapse_docs: bool) -> list[list[Any]]:
    """Sparse or hybrid search of text queries; ``Hit`` lists (scores: BM25 or the fused score)."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not searcher.sparse_shards:
        raise ConfigError(f"index {searcher.index}/{searcher.version_id} has no sparse shards, so --mode {mode} "
                          "cannot run; rebuild it with `embedctl build-index --sparse bm25` or use --mode dense")
    want = k * COLLAPSE_FANOUT if collapse_docs else k
    depth = max(want, fusion.depth) if mode == "hybrid" else want
    sparse = sparse_ids(searcher.sparse_shards, queries, depth, allowed)
    if mode == "sparse":
        scores, ids = sparse
    else:
        def fused_with(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """The dense list of ``vectors`` fused with the BM25 list."""
            dense = searcher.search_ids(vectors, depth, nprobe=nprobe, rescore_multiplier=rescore_multiplier,
                                        depth_k=k, allowed=allowed)
            return fuse_docs(searcher, dense, sparse, fusion, want) if collapse_docs else fuse(dense, sparse,
                                                                                                fusion, want)

        vectors = searcher.encode_queries(queries)
        scores, ids = fused_with(vectors)
        if fusion.feedback_docs:  # second dense pass from the query moved toward the fused top (feedback.py)
            from engine.index.feedback import feedback_queries, stored_vectors

            scores, ids = fused_with(feedback_queries(vectors, ids, fusion, lambda i: stored_vectors(searcher, i)))
    hits = searcher.hits(scores[:, :want], ids[:, :want])
    if collapse_docs:
        from engine.index.hits import best_per_doc

        hits = [best_per_doc(h, k) for h in hits]
    return hits
