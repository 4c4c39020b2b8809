"""BM25 sparse shards (``bm25s`` + PyStemmer, English stop words): tokenize, build, save, load, score.

One BM25 shard per dense shard, over the same chunk rows (row ``r`` of shard ``s`` is global id
``id_start + r``), built inside the same shard task. Statistics (IDF, average length) are per
shard, as in a sharded search engine's default "query then fetch": with one shard (every corpus
under a million chunks by default) the scores are exactly BM25 over the whole corpus.
The text indexed is the chunk's title and text, the same words the dense embedding saw.

Granularity ``doc`` (``build-index --sparse-granularity doc``) indexes one BM25 row per document
instead: the document's title once and its chunks' texts joined in order, the chunk overlap cut
out by the chunks' character offsets, so the document is scored as a whole (length
normalisation and term frequencies over the document, as a keyword engine indexes it). The
shard keeps ``row_doc.npy`` ([rows] int32: the BM25 document of each chunk row) and answers with
a chunk row of each document it ranks (its first, or its first allowed by a filter). A document
whose chunks straddle two shards is two BM25 documents, one per shard (collapsing keeps the better).
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
ROW_DOC_FILE = "row_doc.npy"  # granularity doc: [rows] int32, the BM25 document of each chunk row


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


def document_texts(doc_ids: Sequence[str], titles: Sequence[str | None], texts: Sequence[str | None],
                   starts: Sequence[int | None] | None = None, ends: Sequence[int | None] | None = None,
                   ) -> tuple[np.ndarray, list[str]]:
    """Chunk rows grouped into documents: (row_doc [rows] int32, the document number of each row in order of
    first appearance; one text per document). A document's text is its title once and its chunks' texts in
    order of their character offsets (row order without them), each chunk cut where the previous one ended
    (``char_start`` < the previous ``char_end``: the chunker's overlap, which would count twice)."""
    number: dict[str, int] = {}
    members: list[list[int]] = []
    row_doc = np.empty(len(doc_ids), dtype=np.int32)
    for row, doc in enumerate(doc_ids):
        d = number.setdefault(doc, len(number))
        if d == len(members):
            members.append([])
        members[d].append(row)
        row_doc[row] = d
    out = []
    for rows in members:
        spans = [(starts[r], ends[r]) for r in rows] if starts is not None and ends is not None else []
        if spans and all(a is not None and b is not None for a, b in spans):
            cut = sorted((int(a or 0), int(b or 0), r) for (a, b), r in zip(spans, rows, strict=True))
            parts, end = [], 0
            for start, stop, r in cut:  # each chunk from where the text before it ended
                parts.append((texts[r] or "")[max(0, end - start):])
                end = max(end, stop)
            body = "".join(parts)
        else:
            body = "\n".join(texts[r] or "" for r in rows)
        out.append(index_text(titles[rows[0]], body))
    return row_doc, out


class Bm25Index:
    """A BM25 index over ``n`` rows: ``scores(tokens)`` gives [n] float32 scores (0 = no shared term).

    With ``row_doc`` ([rows] int32) its rows are documents of the ``rows`` chunk rows: ``scores`` then
    gives one score per document ([docs]) and ``representatives`` maps documents back to chunk rows."""

    def __init__(self, model: Any, rows: int, row_doc: np.ndarray | None = None):
        self.model = model
        self.rows = rows
        self.row_doc = row_doc
        self.docs = rows if row_doc is None else (int(row_doc.max()) + 1 if len(row_doc) else 0)
        self._first: np.ndarray | None = None

    @classmethod
    def build(cls, texts: Sequence[str], row_doc: np.ndarray | None = None) -> Bm25Index:
        """Over ``texts`` (one per row, or one per document of ``row_doc``)."""
        import bm25s

        model = bm25s.BM25(**BM25_PARAMS)
        tokens = tokenize(texts)
        # bm25s needs at least one token per corpus; an all-stop-word corpus still indexes (no hits).
        model.index(tokens if any(tokens) else [["\u2205"]] * len(tokens), show_progress=False)
        return cls(model, len(texts) if row_doc is None else len(row_doc), row_doc)

    @classmethod
    def build_rows(cls, titles: Sequence[str | None], texts: Sequence[str | None], granularity: str = "chunk", *,
                   doc_ids: Sequence[str] | None = None, starts: Sequence[int | None] | None = None,
                   ends: Sequence[int | None] | None = None) -> Bm25Index:
        """A shard's BM25 over its chunk rows: one BM25 row per chunk, or (``doc``) per document of ``doc_ids``."""
        if granularity == "chunk":
            return cls.build([index_text(t, x) for t, x in zip(titles, texts, strict=True)])
        if doc_ids is None:
            raise ValueError("a document-level BM25 shard needs the rows' doc ids")
        row_doc, docs = document_texts(doc_ids, titles, texts, starts, ends)
        return cls.build(docs, row_doc)

    def save(self, directory: str | os.PathLike[str]) -> list[str]:
        """Write the bm25s files into ``directory``; their names, sorted."""
        self.model.save(os.fspath(directory), show_progress=False)
        with open(os.path.join(directory, "rows.json"), "w", encoding="utf-8") as f:
            json.dump({"rows": self.rows, **({"docs": self.docs} if self.row_doc is not None else {})}, f)
        if self.row_doc is not None:
            np.save(os.path.join(directory, ROW_DOC_FILE), self.row_doc.astype(np.int32), allow_pickle=False)
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
        folder = folders.pop()
        row_doc = None
        try:
            model = bm25s.BM25.load(folder, mmap=True, show_progress=False)
            if ROW_DOC_FILE in paths:
                row_doc = np.load(paths[ROW_DOC_FILE], allow_pickle=False)
        except (OSError, ValueError, KeyError) as err:
            raise IntegrityError(f"{where}: cannot load the BM25 shard: {err}") from None
        if row_doc is not None and (row_doc.ndim != 1 or len(row_doc) != rows or row_doc.dtype.kind not in "iu"
                                    or (rows and int(row_doc.min()) < 0)):
            raise IntegrityError(f"{where}: {ROW_DOC_FILE} must hold one document number per row ({rows}), got "
                                 f"shape {row_doc.shape} {row_doc.dtype}")
        return cls(model, rows, row_doc)

    def scores(self, tokens: Sequence[str]) -> np.ndarray:
        """[docs] float32 BM25 scores of one tokenized query (zeros when it shares no term); docs = rows at
        chunk granularity."""
        if self.docs == 0 or not tokens:
            return np.zeros(self.docs, dtype=np.float32)
        known = [t for t in tokens if t in self.model.vocab_dict]
        if not known:
            return np.zeros(self.docs, dtype=np.float32)
        s = np.asarray(self.model.get_scores(known), dtype=np.float32)
        if len(s) != self.docs:
            raise IntegrityError(f"BM25 shard scores {len(s)} rows, its manifest says {self.docs}")
        return s

    def representatives(self, allowed: np.ndarray | None = None) -> np.ndarray:
        """Granularity doc: [docs] int64, the chunk row standing for each document (its first row, or its first
        ``allowed`` row: [rows] bool), -1 for a document with no allowed row."""
        if self.row_doc is None:
            raise ValueError("representatives() is for document-level BM25 shards")
        if allowed is None and self._first is not None:
            return self._first
        rows = np.arange(self.rows, dtype=np.int64) if allowed is None else np.nonzero(allowed)[0]
        out = np.full(self.docs, -1, dtype=np.int64)
        docs, first = np.unique(self.row_doc[rows], return_index=True)
        out[docs] = rows[first]
        if allowed is None:
            self._first = out
        return out


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
