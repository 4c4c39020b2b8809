"""Benchmark files: queries + graded judgments + the corpus fingerprint they were judged against, and their evaluation."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.core import layout
from engine.core.errors import ConfigError, NotFoundError, SchemaError
from engine.core.storage import Store, join, sha256_bytes
from engine.embed.parts_index import run_outputs
from engine.quality import metrics
from engine.quality.evaluate import EvalConfig, evaluate_searcher
from engine.quality.judgments import Query
from engine.quality.records import open_text, pick, read_records
from engine.quality.reports import now_iso

log = logging.getLogger(__name__)

BENCHMARK_FORMAT = "embedctl-benchmark"
BENCHMARK_FORMAT_VERSION = 1


@dataclass
class Benchmark:
    """An offline benchmark: queries, graded judgments (gains), and the corpus they refer to."""

    queries: list[dict[str, Any]]
    qrels: dict[str, dict[str, float]]
    corpus: dict[str, Any]
    grades: dict[str, Any]
    name: str = "benchmark"
    summary: dict[str, Any] = field(default_factory=dict)
    benchmark_id: str = ""
    created_at: str = ""

    @property
    def relevant_min_gain(self) -> float:
        return float(self.grades.get("relevant_min_gain", 1))

    def relevant(self, query_id: str) -> set[str]:
        """Docs counted as relevant for binary metrics (recall, MRR): gain >= relevant_min_gain."""
        return {d for d, g in self.qrels.get(query_id, {}).items() if g >= self.relevant_min_gain}

    def judged_queries(self) -> list[dict[str, Any]]:
        """Queries with at least one relevant doc (the ones metrics are averaged over)."""
        return [q for q in self.queries if self.relevant(q["query_id"])]

    def to_dict(self) -> dict[str, Any]:
        return {"format": BENCHMARK_FORMAT, "format_version": BENCHMARK_FORMAT_VERSION, "name": self.name,
                "benchmark_id": self.benchmark_id, "created_at": self.created_at, "grades": self.grades,
                "corpus": self.corpus, "summary": self.summary, "queries": self.queries, "qrels": self.qrels}


def corpus_fingerprint(doc_ids: Iterable[str]) -> str:
    """sha256 over the sorted unique doc ids: two corpora with the same ids share it."""
    h = hashlib.sha256()
    for d in sorted(set(doc_ids)):
        h.update(d.encode("utf-8") + b"\n")
    return h.hexdigest()


def run_doc_ids(store: Store, run_id: str) -> tuple[set[str], dict[str, Any]]:
    """The doc ids an embed run holds (from its chunk or embedding parts), and its manifest."""
    import pyarrow.parquet as pq

    try:
        manifest = store.read_json(layout.run_manifest_key(run_id))
    except NotFoundError:
        raise NotFoundError(f"run {run_id!r} not found in {store.describe()} (no manifest)") from None
    parts = run_outputs(store, manifest, "chunks") or run_outputs(store, manifest, "embeddings")
    if not parts:
        raise SchemaError(f"run {run_id!r} lists no chunk or embedding outputs; did it finish?")
    ids: set[str] = set()
    for part in parts:
        key = part["key"] if "/" in part["key"] else join(layout.run_prefix(run_id), part["key"])
        table = pq.read_table(io.BytesIO(store.read_bytes(key)), columns=["doc_id"])
        ids.update(str(x) for x in table.column("doc_id").to_pylist())
    return ids, manifest


def corpus_doc_ids(path: str | os.PathLike[str], id_column: str = "doc_id") -> set[str]:
    """Doc ids of a corpus given as a Parquet file/folder or a JSONL file."""
    p = Path(path)
    if p.is_dir() or p.suffix == ".parquet":
        import pyarrow.dataset as ds

        try:
            table = ds.dataset(str(p), format="parquet").to_table(columns=[id_column])
        except Exception as err:  # noqa: BLE001
            raise SchemaError(f"cannot read column {id_column!r} from the Parquet corpus {p}: {err}") from err
        return {str(x) for x in table.column(id_column).to_pylist()}
    return {str(pick(r, (id_column, "doc_id", "_id", "id"), "doc id", f"{p} row {i}"))
            for i, r in enumerate(read_records(p), 1)}


def _distribution(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "min": 0.0, "max": 0.0}
    a = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(a.mean()), 3), "median": float(np.median(a)), "min": float(a.min()),
            "max": float(a.max())}


def build_benchmark(queries: list[dict[str, Any]], qrels: dict[str, dict[str, float]], *,
                    corpus_ids: set[str] | None = None, corpus_source: dict[str, Any] | None = None,
                    grades: dict[str, Any] | None = None, name: str = "benchmark",
                    drop_unknown: bool = False) -> Benchmark:
    """Check judgments against the queries and the corpus and summarise the benchmark.

    Judgments naming a document that is not in the corpus are refused (SchemaError with the
    count and examples) unless ``drop_unknown``, which drops them and records how many. A
    judgment for a query that is not in the query file is always refused.
    """
    grades = dict(grades or {"scheme": "identity", "relevant_min_gain": 1})
    qids = {q["query_id"] for q in queries}
    orphan = sorted(set(qrels) - qids)
    if orphan:
        raise SchemaError(f"{len(orphan)} judged query ids are not in the query file (e.g. {orphan[:5]}); "
                          "the files do not belong together")
    qrels = {q: dict(d) for q, d in qrels.items()}
    unknown: list[tuple[str, str]] = []
    if corpus_ids is not None:
        unknown = [(q, d) for q, docs in qrels.items() for d in docs if d not in corpus_ids]
        if unknown and not drop_unknown:
            raise SchemaError(
                f"{len(unknown)} of {sum(len(d) for d in qrels.values())} judgments point at documents that are not "
                f"in the corpus (e.g. {', '.join(f'query {q} -> doc {d}' for q, d in unknown[:5])}); fix the "
                "judgments or the corpus, or pass --drop-unknown to drop them (the count is recorded)")
        for q, d in unknown:
            del qrels[q][d]
        qrels = {q: d for q, d in qrels.items() if d}
    bench = Benchmark(queries=list(queries), qrels=qrels, corpus={}, grades=grades, name=name)
    min_gain = bench.relevant_min_gain
    judged_per_q = [len(qrels.get(q["query_id"], {})) for q in queries]
    rel_per_q = [len(bench.relevant(q["query_id"])) for q in queries]
    judged_docs = {d for docs in qrels.values() for d in docs}
    rel_docs = {d for docs in qrels.values() for d, g in docs.items() if g >= min_gain}
    corpus: dict[str, Any] = {"source": corpus_source or None}
    if corpus_ids is not None:
        corpus.update(fingerprint=corpus_fingerprint(corpus_ids), docs=len(corpus_ids))
    else:
        corpus.update(fingerprint=None, docs=None)
    summary: dict[str, Any] = {
        "queries": len(queries),
        "queries_with_relevant": sum(1 for n in rel_per_q if n),
        "queries_without_judgments": sum(1 for n in judged_per_q if n == 0),
        "judgments": sum(judged_per_q),
        "relevant_judgments": sum(rel_per_q),
        "judged_docs_per_query": _distribution(judged_per_q),
        "relevant_docs_per_query": _distribution(rel_per_q),
        "judged_docs": len(judged_docs),
        "corpus_coverage": round(len(judged_docs) / len(corpus_ids), 4) if corpus_ids else None,
        "relevant_coverage": round(len(rel_docs) / len(corpus_ids), 4) if corpus_ids else None,
        "unknown_doc_judgments_dropped": len(unknown),
        "gain_histogram": {f"{g:g}": n for g, n in
                           sorted(_count(g for d in qrels.values() for g in d.values()).items())},
    }
    for col in ("lang", "type"):
        values = [str(q[col]) for q in queries if q.get(col) not in (None, "")]
        if values:
            summary[f"by_{col}"] = dict(sorted(_count(values).items()))
    bench.corpus, bench.summary, bench.created_at = corpus, summary, now_iso()
    content = json.dumps({"queries": bench.queries, "qrels": bench.qrels, "grades": grades,
                          "corpus": corpus.get("fingerprint")}, sort_keys=True).encode()
    bench.benchmark_id = f"{name}-{sha256_bytes(content)[:12]}"
    return bench


def _count(items: Iterable[Any]) -> dict[Any, int]:
    out: dict[Any, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def save_benchmark(bench: Benchmark, path: str | os.PathLike[str]) -> None:
    data = json.dumps(bench.to_dict(), indent=1, sort_keys=False).encode()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(gzip.compress(data, mtime=0) if p.suffix == ".gz" else data)
    os.replace(tmp, p)


def load_benchmark(path: str | os.PathLike[str]) -> Benchmark:
    """Read a benchmark file written by ``save_benchmark`` (refuses other formats and newer versions)."""
    p = Path(path)
    with open_text(p) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as err:
            raise SchemaError(f"{p} is not a benchmark file (invalid JSON: {err})") from err
    if not isinstance(d, dict) or d.get("format") != BENCHMARK_FORMAT:
        raise SchemaError(f"{p} is not an embedctl benchmark (build one with `embedctl benchmark build`)")
    if int(d.get("format_version", 0)) > BENCHMARK_FORMAT_VERSION:
        raise SchemaError(f"{p} is benchmark format {d['format_version']}; this embedctl reads up to "
                          f"{BENCHMARK_FORMAT_VERSION}: upgrade embedctl")
    qrels = {str(q): {str(doc): float(g) for doc, g in docs.items()} for q, docs in d["qrels"].items()}
    return Benchmark(queries=d["queries"], qrels=qrels, corpus=d.get("corpus") or {}, grades=d.get("grades") or {},
                     name=d.get("name", p.stem), summary=d.get("summary") or {},
                     benchmark_id=d.get("benchmark_id", ""), created_at=d.get("created_at", ""))


def looks_like_benchmark(p: Path) -> bool:
    try:
        with open_text(p) as f:
            head = f.read(200)
    except (OSError, UnicodeDecodeError):
        return False
    return BENCHMARK_FORMAT in head


def evaluate_benchmark(searcher: Any, bench: Benchmark, *, ks: Sequence[int] = (10, 100), store: Store | None = None,
                       exact: bool = True, nprobe: int | None = None) -> dict[str, Any]:
    """recall@k, MRR@k and graded nDCG@k of a searcher on a benchmark, overall and per ``lang``
    and per ``type`` when the benchmark's queries carry them, beside exact search.

    Runs the index builder's evaluation (``engine.quality.evaluate.evaluate_searcher``) once at the
    largest ``k`` and recomputes every metric at each ``k`` from its per-query rankings with
    ``engine.quality.metrics``: nDCG on the graded gains, recall and MRR on the docs whose gain reaches
    the benchmark's ``relevant_min_gain``. Queries with no relevant doc are skipped (counted).
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ConfigError(f"ks must be positive integers, got {list(ks)!r}")
    kmax = ks[-1]
    graded = {q: {d: g for d, g in docs.items() if g > 0} for q, docs in bench.qrels.items()}
    queries = [Query(q["query_id"], q["text"]) for q in bench.queries]
    per_query: list[dict[str, Any]] = []
    summary = evaluate_searcher(searcher, queries, graded, EvalConfig(k=kmax, exact=exact, nprobe=nprobe),
                                store=store, per_query=per_query)
    rows, groups, skipped = _benchmark_rows(bench, per_query, graded, ks)
    if not rows["index"]:
        raise SchemaError("no benchmark query has a relevant document (check relevant_min_gain and the qrels)")
    result: dict[str, Any] = {
        "benchmark": bench.benchmark_id, "index": searcher.index, "version": searcher.version_id,
        "kind": searcher.manifest.get("kind"), "ks": ks, "queries": len(bench.queries),
        "evaluated": len(rows["index"]), "skipped_no_relevant": skipped,
        "relevant_min_gain": bench.relevant_min_gain, "corpus_match": _corpus_match(searcher, bench, store),
        **_metric_table(rows),
        f"recall_vs_exact@{kmax}": summary["metrics"].get(f"recall_vs_exact@{kmax}"), "timings": summary["timings"],
    }
    for col, by in groups.items():
        if by:
            result[f"by_{col}"] = {value: _metric_table(r) for value, r in sorted(by.items())}
    return result


SideRows = dict[str, list[dict[str, float]]]  # "index"/"exact" -> one metrics row per query


def _benchmark_rows(bench: Benchmark, per_query: Sequence[Mapping[str, Any]], graded: Mapping[str, Mapping[str, float]],
                    ks: Sequence[int]) -> tuple[SideRows, dict[str, dict[str, SideRows]], int]:
    """Metric rows at every ``k`` per side, overall and grouped by ``lang``/``type``; queries skipped."""
    meta = {q["query_id"]: q for q in bench.queries}
    rows: SideRows = {"index": [], "exact": []}
    groups: dict[str, dict[str, SideRows]] = {"lang": {}, "type": {}}
    skipped = 0
    for rec in per_query:
        qid = rec["query_id"]
        relevant = {d: 1.0 for d in bench.relevant(qid)}
        if "index" not in rec or not relevant:
            skipped += 1
            continue
        for side in ("index", "exact"):
            if side not in rec:
                continue
            docs = rec[side]["docs"]
            row: dict[str, float] = {}
            for k in ks:
                row.update({f"ndcg@{k}": metrics.ndcg_at_k(docs, graded[qid], k),
                            f"recall@{k}": metrics.recall_at_k(docs, relevant, k),
                            f"mrr@{k}": metrics.mrr_at_k(docs, relevant, k)})
            rows[side].append(row)
            for col in ("lang", "type"):
                value = meta[qid].get(col)
                if value not in (None, ""):
                    groups[col].setdefault(str(value), {"index": [], "exact": []})[side].append(row)
    return rows, groups, skipped


def _metric_table(side_rows: SideRows) -> dict[str, Any]:
    out: dict[str, Any] = {"queries": len(side_rows["index"]),
                           "index": {k: round(v, 6) for k, v in metrics.mean_metrics(side_rows["index"]).items()}}
    if side_rows["exact"]:
        out["exact"] = {k: round(v, 6) for k, v in metrics.mean_metrics(side_rows["exact"]).items()}
    return out


def _corpus_match(searcher: Any, bench: Benchmark, store: Store | None) -> bool | None:
    """Whether the version indexes the corpus the benchmark was judged against (None: unknown)."""
    if store is None or not bench.corpus.get("fingerprint") or not searcher.manifest.get("source_run"):
        return None
    ids, _ = run_doc_ids(store, str(searcher.manifest["source_run"]))
    match = corpus_fingerprint(ids) == bench.corpus["fingerprint"]
    if not match:
        log.warning("benchmark %s was judged against another corpus than %s/%s indexes; unjudged new docs "
                    "count as misses", bench.benchmark_id, searcher.index, searcher.version_id)
    return match
