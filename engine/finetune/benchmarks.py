"""Benchmarks for fine-tuning: the Cranfield-layout folder, a general set from Python's docstrings, exact-search scores.

A benchmark (``corpus.jsonl``/``queries.jsonl``/``qrels.tsv``) is scored with exact cosine
search; queries that also occur in the training data are left out of its score, and counted.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.errors import NotFoundError, SchemaError

log = logging.getLogger(__name__)



@dataclass
class Benchmark:
    name: str
    doc_ids: list[str]
    docs: list[str]
    queries: dict[str, str]  # query_id -> text (only judged queries)
    qrels: dict[str, dict[str, float]]  # query_id -> doc_id -> gain (> 0)


def load_benchmark(path: str | os.PathLike[str], gain: str = "binary") -> Benchmark:
    """A folder with corpus.jsonl (doc_id, text, optional title), queries.jsonl (query_id, text) and
    qrels.tsv (query_id, doc_id, grade, with a header); grades become gains by ``engine.quality.judgments.GAINS``."""
    from engine.quality.judgments import load_qrels, load_queries

    root = Path(path)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels.tsv"):
        if not (root / name).exists():
            raise NotFoundError(f"benchmark {root} has no {name} (it needs corpus.jsonl, queries.jsonl, qrels.tsv)")
    doc_ids, docs = [], []
    for n, line in enumerate((root / "corpus.jsonl").read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            text, title, did = str(d.get("text") or ""), str(d.get("title") or ""), str(d["doc_id"])
        except (json.JSONDecodeError, KeyError) as err:
            raise SchemaError(f"{root / 'corpus.jsonl'}:{n}: a document needs 'doc_id' and 'text' ({err})") from None
        if text.strip():
            doc_ids.append(did)
            docs.append(text if not title or text.startswith(title) else f"{title}\n{text}")
    known = set(doc_ids)
    queries = {q.query_id: q.text for q in load_queries(root / "queries.jsonl")}
    qrels = {q: {d: g for d, g in rel.items() if d in known}
             for q, rel in load_qrels(root / "qrels.tsv", gain).items() if q in queries}
    qrels = {q: rel for q, rel in qrels.items() if rel}
    return Benchmark(root.name, doc_ids, docs, {q: t for q, t in queries.items() if q in qrels}, qrels)


def write_benchmark(out: str | os.PathLike[str], source: str | os.PathLike[str],
                    query_ids: set[str] | None = None) -> Path:
    """Copy a benchmark folder keeping only ``query_ids`` (a held-out split)."""
    src, dst = Path(source), Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "corpus.jsonl", dst / "corpus.jsonl")
    lines = [ln for ln in (src / "queries.jsonl").read_text().splitlines()
             if ln.strip() and (query_ids is None or str(json.loads(ln)["query_id"]) in query_ids)]
    (dst / "queries.jsonl").write_text("\n".join(lines) + "\n")
    qrels = (src / "qrels.tsv").read_text().splitlines()
    keep = [ln for ln in qrels
            if query_ids is None or ln.split("\t")[0] in query_ids or not ln.split("\t")[0].isdigit()]
    (dst / "qrels.tsv").write_text("\n".join(keep) + "\n")
    return dst


def stdlib_benchmark(limit: int = 300) -> Benchmark:
    """A general-English/technical set from Python's own docstrings (no download): the summary line of
    each stdlib module's docstring is the query, the rest of the docstring its one relevant document."""
    from engine.embed.stdlib_corpus import stdlib_docs

    doc_ids, docs, queries, qrels = [], [], {}, {}
    for row in stdlib_docs(limit):
        text = row["text"].strip()
        head, _, rest = text.partition("\n\n")
        head, rest = " ".join(head.split()), rest.strip()
        if len(head) < 15 or len(rest) < 80:
            continue
        doc_ids.append(row["doc_id"])
        docs.append(rest)
        queries[row["doc_id"]] = head
        qrels[row["doc_id"]] = {row["doc_id"]: 1.0}
    return Benchmark("stdlib-docstrings", doc_ids, docs, queries, qrels)


def resolve_benchmark(spec: str, gain: str = "binary") -> Benchmark:
    return stdlib_benchmark() if spec == "stdlib" else load_benchmark(spec, gain)


def evaluate(model: Any, bench: Benchmark, *, exclude_queries: set[str] | None = None,
             max_queries: int | None = None, seed: int = 0, batch_size: int = 64) -> dict[str, Any]:
    """nDCG@10, MRR@10, Recall@10/100 (engine.quality.metrics) by exact cosine search with a SentenceTransformer
    (or an engine Encoder)."""
    from engine.mining import norm_text
    from engine.quality.metrics import query_metrics, recall_at_k

    qids = sorted(bench.queries)
    excluded = 0
    if exclude_queries:
        kept = [q for q in qids if norm_text(bench.queries[q]) not in exclude_queries]
        excluded = len(qids) - len(kept)
        qids = kept
    if max_queries and len(qids) > max_queries:
        qids = sorted(random.Random(seed).sample(qids, max_queries))
    if not qids:
        return {"queries": 0, "excluded_as_trained_on": excluded}
    dvecs = _encode(model, bench.docs, batch_size, query=False)  # [n_docs, dim]
    qvecs = _encode(model, [bench.queries[q] for q in qids], batch_size, query=True)  # [n_q, dim]
    scores = qvecs @ dvecs.T  # [n_q, n_docs]
    k = min(100, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable"), 1)
    per_query = []
    for i, q in enumerate(qids):
        ranked = [bench.doc_ids[j] for j in order[i]]
        m = query_metrics(ranked, bench.qrels[q], 10)
        m["recall@100"] = recall_at_k(ranked, bench.qrels[q], 100)
        per_query.append(m)
    out: dict[str, Any] = {"queries": len(qids), "docs": len(bench.docs), "excluded_as_trained_on": excluded}
    for key in ("ndcg@10", "mrr@10", "recall@10", "recall@100"):
        out[key] = round(float(np.mean([m[key] for m in per_query])), 4)
    return out


def _encode(model: Any, texts: list[str], batch_size: int, *, query: bool) -> np.ndarray:
    if hasattr(model, "encode_queries"):  # an engine Encoder
        return model.encode_queries(texts) if query else model.encode_passages(texts)
    fn = getattr(model, "encode_query" if query else "encode_document", None) or model.encode
    return np.asarray(fn(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                         show_progress_bar=False), dtype=np.float32)
