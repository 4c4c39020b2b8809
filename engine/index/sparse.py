"""BM25 sparse shards (``bm25s`` + PyStemmer, English stop words): tokenize, build, save, load, score.

One BM25 shard per dense shard, over the same chunk rows (row ``r`` of shard ``s`` is global id
``id_start + r``), built inside the same shard task. Statistics (IDF, average length) are per
shard, as in a sharded search engine's default "query then fetch": with one shard (every corpus
under a million chunks by default) the scores are exactly BM25 over the whole corpus.
The text indexed is the chunk's title and text, the same words the dense embedding saw.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from engine.core.errors import IntegrityError

log = logging.getLogger(__name__)

# Okapi BM25 as Lucene scores it (bm25s' default method), with the usual k1/b.
BM25_PARAMS: dict[str, Any] = {"method": "lucene", "k1": 1.5, "b": 0.75}
TOKENIZER: dict[str, Any] = {"lower": True, "stopwords": "en", "stemmer": "english",
                             "token_pattern": r"(?u)\b\w\w+\b"}
SPARSE_DIR = "{base}.bm25"  # shards/shard-NNNNN.bm25/<bm25s file>


def _stemmer() -> Any:
    import Stemmer

    return Stemmer.Stemmer(TOKENIZER["stemmer"])


def tokenize(texts: Sequence[str]) -> list[list[str]]:
    """Lower-cased word tokens without English stop words, Snowball-stemmed: one list per text."""
    import bm25s

    if not texts:
        return []
    out = bm25s.tokenize(list(texts), lower=TOKENIZER["lower"], token_pattern=TOKENIZER["token_pattern"],
                         stopwords=TOKENIZER["stopwords"], stemmer=_stemmer(), return_ids=False,
                         show_progress=False)
    return [list(t) for t in out]


def index_text(title: str | None, text: str | None) -> str:
    """What BM25 indexes for one chunk: its title (when any) and its text."""
    return f"{title}\n{text or ''}" if title else (text or "")


class Bm25Index:
    """A BM25 index over ``n`` rows: ``scores(tokens)`` gives [n] float32 scores (0 = no shared term)."""

    def __init__(self, model: Any, rows: int):
        self.model = model
        self.rows = rows

    @classmethod
    def build(cls, texts: Sequence[str]) -> Bm25Index:
        import bm25s

        model = bm25s.BM25(**BM25_PARAMS)
        tokens = tokenize(texts)
        # bm25s needs at least one token per corpus; an all-stop-word corpus still indexes (no hits).
        model.index(tokens if any(tokens) else [["\u2205"]] * len(tokens), show_progress=False)
        return cls(model, len(texts))

    def save(self, directory: str | os.PathLike[str]) -> list[str]:
        """Write the bm25s files into ``directory``; their names, sorted."""
        self.model.save(os.fspath(directory), show_progress=False)
        with open(os.path.join(directory, "rows.json"), "w", encoding="utf-8") as f:
            json.dump({"rows": self.rows}, f)
        return sorted(os.listdir(directory))

    @classmethod
    def load(cls, paths: Mapping[str, str], rows: int, where: str = "") -> Bm25Index:
        """From the local paths of one shard's files (file name -> path, all in one folder), memory-mapped."""
        import bm25s

        if not paths:
            raise IntegrityError(f"{where}: a sparse shard lists no files")
        folders = {os.path.dirname(p) for p in paths.values()}
        if len(folders) != 1:
            raise IntegrityError(f"{where}: the files of one sparse shard are in several folders")
        try:
            model = bm25s.BM25.load(folders.pop(), mmap=True, show_progress=False)
        except (OSError, ValueError, KeyError) as err:
            raise IntegrityError(f"{where}: cannot load the BM25 shard: {err}") from None
        return cls(model, rows)

    def scores(self, tokens: Sequence[str]) -> np.ndarray:
        """[rows] float32 BM25 scores of one tokenized query (zeros when it shares no term)."""
        if self.rows == 0 or not tokens:
            return np.zeros(self.rows, dtype=np.float32)
        known = [t for t in tokens if t in self.model.vocab_dict]
        if not known:
            return np.zeros(self.rows, dtype=np.float32)
        s = np.asarray(self.model.get_scores(known), dtype=np.float32)
        if len(s) != self.rows:
            raise IntegrityError(f"BM25 shard scores {len(s)} rows, its manifest says {self.rows}")
        return s


def top_rows(scores: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` rows with a positive score (among ``allowed`` rows when given): (scores [m], rows [m]), m <= k,
    best first, ties by smaller row."""
    s = scores if allowed is None else np.where(allowed, scores, 0.0)
    cand = np.nonzero(s > 0)[0]
    if len(cand) > k:
        part = np.argpartition(-s[cand], k - 1)[:k]
        cand = cand[part]
    order = np.lexsort((cand, -s[cand]))
    rows = cand[order]
    return s[rows].astype(np.float32), rows.astype(np.int64)


def library_version() -> str:
    import bm25s

    return f"bm25s=={bm25s.__version__}"
