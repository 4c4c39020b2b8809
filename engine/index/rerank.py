"""The rerank stage: a local sentence-transformers ``CrossEncoder`` folder re-scores a search's top hits.

The cross-encoder reads (query, chunk) pairs; the chunk text is the title and text of the row
in the version's source run (read once, on first use, from its embeddings parts). All pairs of
a query batch go through ``CrossEncoder.predict`` together (batched), on CPU or GPU. Hits past
the rerank depth keep their order and retrieval scores after the reranked ones.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from engine.core.errors import ConfigError, NotFoundError

if TYPE_CHECKING:
    from engine.core.storage import Store

log = logging.getLogger(__name__)


class Reranker:
    """A cross-encoder loaded from a local folder (never downloaded). ``last_seconds``: the latest batch's time."""

    def __init__(self, path: str | os.PathLike[str], *, device: str = "cpu", batch_size: int = 32):
        folder = os.fspath(path)
        if not os.path.isdir(folder) or not os.path.exists(os.path.join(folder, "config.json")):
            raise ConfigError(f"--rerank {folder!r} is not a local cross-encoder folder (no config.json); give the "
                              "folder a sentence-transformers CrossEncoder was saved to")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import CrossEncoder
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar in the middle of a CLI's output

        try:
            self.model = CrossEncoder(folder, device=device, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot load the cross-encoder in {folder!r}: {str(err).splitlines()[0][:200]}") from None
        self.path, self.device, self.batch_size = folder, device, batch_size
        self.last_seconds = 0.0
        self.last_pairs = 0

    def score(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """[len(pairs)] float32 relevance scores (higher = more relevant)."""
        t0 = time.perf_counter()
        out: np.ndarray = np.zeros(0, dtype=np.float32)
        if pairs:
            raw: np.ndarray = np.asarray(self.model.predict([list(p) for p in pairs], batch_size=self.batch_size,
                                                            show_progress_bar=False), dtype=np.float32)
            raw = raw.reshape(len(pairs), -1)
            out = raw[:, -1]  # one-label heads: the score; two-label heads: the "relevant" logit
        self.last_seconds, self.last_pairs = time.perf_counter() - t0, len(pairs)
        return out


class ChunkTexts:
    """chunk_id -> the text BM25 and the cross-encoder read (title + text), from the version's source run."""

    def __init__(self, store: Store, manifest: Mapping[str, Any]):
        self.store, self.manifest = store, manifest
        self._texts: dict[str, str] | None = None
        self._lock = threading.Lock()

    def __call__(self, chunk_ids: Sequence[str]) -> list[str]:
        with self._lock:
            if self._texts is None:
                self._texts = self._load()
        return [self._texts.get(c, "") for c in chunk_ids]

    def _load(self) -> dict[str, str]:
        import pyarrow.parquet as pq

        from engine.index.runs import read_run, run_columns
        from engine.index.sparse import index_text

        run_id = str(self.manifest.get("source_run") or "")
        try:
            run = read_run(self.store, run_id)
        except NotFoundError:
            raise ConfigError(f"rerank needs the chunk texts of the version's source run {run_id!r}, which is gone "
                              "from the store") from None
        cols = ["chunk_id", "text"] + (["title"] if "title" in run_columns(self.store, run) else [])
        out: dict[str, str] = {}
        for part in run.parts:
            with self.store.arrow_filesystem().open_input_file(self.store.arrow_path(part.key)) as f:
                t = pq.read_table(f, columns=cols).to_pydict()
            titles = t.get("title") or [None] * len(t["chunk_id"])
            for c, title, text in zip(t["chunk_id"], titles, t["text"], strict=True):
                out[c] = index_text(title, text)
        return out


class RerankSearcher(Protocol):
    """What reranking uses of a loaded ``engine.index.searcher.Searcher`` (which imports this module, so it is
    named here by its shape, not imported): its cross-encoders and its chunk texts."""

    def reranker(self, path: str) -> Reranker: ...

    def chunk_texts(self, chunk_ids: Sequence[str]) -> list[str]: ...


def rerank_hits(searcher: RerankSearcher, queries: Sequence[str], hits: list[list[Any]], rerank: Any, *,
                depth: int | None = None) -> list[list[Any]]:
    """Re-score each query's top ``depth`` hits (default: all) with the cross-encoder, best first."""
    reranker = rerank if isinstance(rerank, Reranker) else searcher.reranker(str(rerank))
    if depth is not None and depth < 1:
        raise ConfigError(f"rerank depth must be >= 1, got {depth}")
    tops = [h[:depth] if depth else h for h in hits]
    texts = searcher.chunk_texts([x.chunk_id for top in tops for x in top])
    pairs = [(q, "") for q, top in zip(queries, tops, strict=True) for _ in top]
    pairs = [(q, t) for (q, _), t in zip(pairs, texts, strict=True)]
    scores = reranker.score(pairs)
    out, n = [], 0
    for top, all_hits in zip(tops, hits, strict=True):
        s = scores[n:n + len(top)]
        n += len(top)
        order = np.argsort(-s, kind="stable")
        out.append([replace(top[i], score=float(s[i])) for i in order] + all_hits[len(top):])
    log.debug("reranked %d pairs in %.3fs", len(pairs), reranker.last_seconds)
    return out
