"""The quality loop: benchmarks, similarity-threshold calibration, canaries, drift reports.

Four instruments, each a pure core plus a thin store-facing wrapper:

- **benchmark**: queries + graded judgments + the corpus fingerprint they were judged
  against, as one versioned JSON file (``build_benchmark`` / ``save_benchmark`` /
  ``load_benchmark``); ``evaluate_benchmark`` scores a searcher on it with a per-``lang`` /
  per-``type`` breakdown.
- **calibration**: labelled ``(query, doc, relevant)`` pairs are scored through the version's
  own model *and index* (so PQ/binary quantization is in the scores), and three rules are
  fitted: the absolute threshold maximising F-beta (``pr_curve`` / ``best_fbeta``), a
  relative-to-best margin ("keep hits within ``delta`` of the top score") and a minimum-score
  floor. Each calibration is its own object beside the version
  (``indexes/<i>/versions/<v>/calibration/<UTC ts>.json`` + ``.png`` + ``.queries.npy``):
  the version manifest stays immutable, a version can be recalibrated any number of times,
  and the record names the version, model fingerprint, index kind/params and corpus run it
  was fitted on, so ``calibration_status`` can say when it no longer fits.
- **canary**: known-good ``(query, expected doc)`` pairs against an alias; recall@k, MRR,
  top-k score distribution, empty-result rate under the stored threshold, the difference to
  a baseline report, and a gate (``GateError``, exit 7) a scheduler can alert on.
- **drift**: recent queries compared with the calibration-time queries: embedding centroid
  shift, novelty against the reference queries, query length, and top-1 score distribution
  (PSI and Kolmogorov-Smirnov), plus the empty-result rate.

Scores are similarities as the searcher returns them (higher is better); a hit is anything
with ``chunk_id``, ``doc_id`` and ``score`` (attributes or mapping keys).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from engine.core import layout
from engine.core.errors import ConfigError, GateError, NotFoundError, SchemaError
from engine.core.storage import Store, join, json_bytes, sha256_bytes

if TYPE_CHECKING:
    from engine.embed.encoders import Encoder

log = logging.getLogger(__name__)

BENCHMARK_FORMAT = "embedctl-benchmark"
BENCHMARK_FORMAT_VERSION = 1
CALIBRATION_FORMAT = 1
CANARY_FORMAT = 1
DRIFT_FORMAT = 1
CALIBRATION_DIR = "calibration"
MAX_CURVE_POINTS = 256
MAX_REFERENCE_QUERIES = 2000

Rule = Literal["absolute", "relative"]


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _get(hit: Any, name: str) -> Any:
    """A hit's field, whether the hit is a dataclass/named tuple or a mapping."""
    if isinstance(hit, Mapping):
        return hit[name]
    return getattr(hit, name)


# =============================================================================================
# reading queries, judgments, pairs and canaries
# =============================================================================================


def _open_text(path: str | os.PathLike[str]) -> io.TextIOBase:
    p = Path(path)
    if not p.exists():
        raise NotFoundError(f"{p} does not exist")
    if p.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8")  # type: ignore[return-value]
    return open(p, encoding="utf-8")  # type: ignore[return-value]


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a JSONL (``.jsonl``/``.ndjson``, optionally ``.gz``), JSON list, CSV/TSV with a
    header, or Parquet file, as dicts. Raises SchemaError naming the file and line on bad input."""
    p = Path(path)
    name = p.name[:-3] if p.name.endswith(".gz") else p.name
    suffix = Path(name).suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        if not p.exists():
            raise NotFoundError(f"{p} does not exist")
        try:
            return pq.read_table(p).to_pylist()
        except Exception as err:  # noqa: BLE001 - pyarrow raises many types; the user needs the file name
            raise SchemaError(f"{p} is not a readable Parquet file: {err}") from err
    with _open_text(p) as f:
        if suffix in (".tsv", ".csv", ".txt"):
            import csv

            delim = "," if suffix == ".csv" else "\t"
            rows = list(csv.DictReader(f, delimiter=delim))
            if rows and None in rows[0]:
                raise SchemaError(f"{p}: line 2 has more fields than the header")
            return [{k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in r.items()} for r in rows]
        if suffix == ".json":
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise SchemaError(f"{p} is not valid JSON: {err}") from err
            if not isinstance(data, list):
                raise SchemaError(f"{p}: expected a JSON list of objects")
            return data
        out = []
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SchemaError(f"{p}:{lineno}: not a JSON object ({err.msg})") from err
            if not isinstance(row, dict):
                raise SchemaError(f"{p}:{lineno}: expected a JSON object, got {type(row).__name__}")
            out.append(row)
        return out


def _pick(row: Mapping[str, Any], names: Sequence[str], what: str, where: str) -> Any:
    for n in names:
        if n in row and row[n] is not None and row[n] != "":
            return row[n]
    raise SchemaError(f"{where}: no {what} column (expected one of {', '.join(names)}); got {sorted(row)}")


def read_queries(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Queries as ``[{"query_id", "text", ...optional lang, type...}]`` (JSONL/CSV/TSV/Parquet).

    Accepted column names: ``query_id``/``qid``/``_id``/``id`` and ``text``/``query``. Extra
    columns are kept (``lang`` and ``type`` drive the evaluation breakdown).
    """
    rows = read_records(path)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, row in enumerate(rows, 1):
        where = f"{path} row {i}"
        qid = str(_pick(row, ("query_id", "qid", "_id", "id"), "query id", where))
        text = str(_pick(row, ("text", "query"), "query text", where))
        if qid in seen:
            raise SchemaError(f"{where}: duplicate query id {qid!r}")
        seen.add(qid)
        extra = {k: v for k, v in row.items() if k not in ("query_id", "qid", "_id", "id", "text", "query")}
        out.append({"query_id": qid, "text": text, **extra})
    if not out:
        raise SchemaError(f"{path} holds no queries")
    return out


CRANFIELD_GAINS = {1: 4, 2: 3, 3: 2, 4: 1, -1: 0}


def parse_gain_map(spec: str | None) -> dict[int, float] | None:
    """``None``/``"identity"`` (grade is the gain, grades <= 0 are judged non-relevant),
    ``"cranfield"`` (1..4 best..least -> gains 4..1, -1 -> 0) or ``"1=4,2=3,-1=0"``."""
    if spec is None or spec in ("", "identity"):
        return None
    if spec == "cranfield":
        return {k: float(v) for k, v in CRANFIELD_GAINS.items()}
    out: dict[int, float] = {}
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(-?\d+)\s*=\s*(-?\d+(?:\.\d+)?)\s*", part)
        if not m:
            raise ConfigError(f"bad --gains entry {part!r}: use GRADE=GAIN pairs like '1=4,2=3,-1=0', "
                              "or 'identity', or 'cranfield'")
        out[int(m.group(1))] = float(m.group(2))
    return out


def read_qrels(path: str | os.PathLike[str], gains: dict[int, float] | None = None) -> dict[str, dict[str, float]]:
    """Judgments as ``{query_id: {doc_id: gain}}`` with gain >= 0 (0 = judged non-relevant).

    Reads a TSV/CSV with a header (``query_id``/``qid``, ``doc_id``/``corpus-id``/``docid``,
    ``grade``/``score``/``relevance``), a headerless TREC qrels file (``qid 0 docid grade``)
    or JSONL. ``gains`` maps raw grades to gains; a grade it does not name is an error.
    """
    p = Path(path)
    with _open_text(p) as f:
        first = f.readline()
    tokens = first.split()
    trec = len(tokens) == 4 and all(re.fullmatch(r"-?\w[\w.\-]*", t) for t in tokens) and \
        re.fullmatch(r"-?\d+", tokens[3]) is not None
    rows: list[tuple[str, str, float]] = []
    if trec:
        with _open_text(p) as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 4:
                    raise SchemaError(f"{p}:{lineno}: TREC qrels lines have 4 fields (qid iter docid grade)")
                rows.append((parts[0], parts[2], float(parts[3])))
    else:
        for i, row in enumerate(read_records(p), 2):
            where = f"{p} row {i}"
            qid = str(_pick(row, ("query_id", "qid", "query-id"), "query id", where))
            doc = str(_pick(row, ("doc_id", "docid", "corpus-id", "corpus_id"), "doc id", where))
            raw = _pick(row, ("grade", "score", "relevance", "rel"), "grade", where)
            try:
                rows.append((qid, doc, float(raw)))
            except (TypeError, ValueError) as err:
                raise SchemaError(f"{where}: grade {raw!r} is not a number") from err
    out: dict[str, dict[str, float]] = {}
    for qid, doc, grade in rows:
        if gains is not None:
            if int(grade) not in gains or int(grade) != grade:
                raise SchemaError(f"{p}: grade {grade:g} (query {qid}, doc {doc}) is not in the gain map "
                                  f"{sorted(gains)}; extend --gains")
            gain = gains[int(grade)]
        else:
            gain = max(0.0, grade)
        prev = out.setdefault(qid, {}).get(doc)
        if prev is not None and prev != gain:
            raise SchemaError(f"{p}: query {qid} judges doc {doc} twice with different grades")
        out[qid][doc] = gain
    if not out:
        raise SchemaError(f"{p} holds no judgments")
    return out


@dataclass(frozen=True)
class LabelledPair:
    query: str
    doc_id: str
    relevant: bool


def read_pairs(path: str | os.PathLike[str]) -> list[LabelledPair]:
    """Calibration pairs: rows with ``query`` (text), ``doc_id`` and ``relevant`` (0/1, true/false)."""
    out = []
    for i, row in enumerate(read_records(path), 1):
        where = f"{path} row {i}"
        q = str(_pick(row, ("query", "text", "query_text"), "query text", where))
        d = str(_pick(row, ("doc_id", "docid", "corpus-id"), "doc id", where))
        raw = row.get("relevant", row.get("label"))
        if raw is None or raw == "":
            raise SchemaError(f"{where}: no 'relevant' (0/1) column")
        if isinstance(raw, str):
            if raw.lower() not in ("0", "1", "true", "false"):
                raise SchemaError(f"{where}: relevant must be 0/1 or true/false, got {raw!r}")
            rel = raw.lower() in ("1", "true")
        else:
            if raw not in (0, 1, True, False):
                raise SchemaError(f"{where}: relevant must be 0/1 or true/false, got {raw!r}")
            rel = bool(raw)
        out.append(LabelledPair(q, d, rel))
    if not out:
        raise SchemaError(f"{path} holds no pairs")
    pos = sum(p.relevant for p in out)
    if pos == 0 or pos == len(out):
        raise SchemaError(f"{path}: calibration needs both relevant and non-relevant pairs "
                          f"({pos} relevant of {len(out)})")
    return out


@dataclass(frozen=True)
class Canary:
    """A known-good query and the doc ids any of which counts as a correct answer."""

    query: str
    expected: tuple[str, ...]
    id: str = ""


def read_canaries(path: str | os.PathLike[str]) -> list[Canary]:
    """A canary set: rows with ``query`` and ``doc_id`` (or ``expected``: a list), optional ``id``;
    rows sharing a query are merged. A benchmark file works too (its relevant docs are expected)."""
    p = Path(path)
    if p.suffix in (".json", ".gz") and _looks_like_benchmark(p):
        bench = load_benchmark(p)
        return [Canary(q["text"], tuple(sorted(bench.relevant(q["query_id"]))), q["query_id"])
                for q in bench.queries if bench.relevant(q["query_id"])]
    merged: dict[str, tuple[str, list[str]]] = {}
    for i, row in enumerate(read_records(p), 1):
        where = f"{p} row {i}"
        q = str(_pick(row, ("query", "text"), "query text", where))
        exp = row.get("expected")
        if exp is None:
            exp = [_pick(row, ("doc_id", "expected_doc", "docid"), "expected doc id", where)]
        elif isinstance(exp, str):
            exp = [e for e in exp.split("|") if e]
        cid = str(row.get("id") or row.get("query_id") or q)
        entry = merged.setdefault(q, (cid, []))
        entry[1].extend(str(e) for e in exp if str(e) not in entry[1])
    if not merged:
        raise SchemaError(f"{p} holds no canaries")
    return [Canary(q, tuple(docs), cid) for q, (cid, docs) in merged.items()]


def _looks_like_benchmark(p: Path) -> bool:
    try:
        with _open_text(p) as f:
            head = f.read(200)
    except (OSError, UnicodeDecodeError):
        return False
    return BENCHMARK_FORMAT in head


def read_query_texts(path: str | os.PathLike[str]) -> list[str]:
    """Recent queries for ``drift``: JSONL/CSV/Parquet with ``text``/``query``, or plain text (one per line)."""
    p = Path(path)
    if p.suffix.lower() in (".txt", ".log") or p.name.endswith((".txt.gz", ".log.gz")):
        with _open_text(p) as f:
            out = [line.strip() for line in f if line.strip()]
    else:
        out = [str(_pick(r, ("text", "query"), "query text", f"{p} row {i}")) for i, r in enumerate(read_records(p), 1)]
    if not out:
        raise SchemaError(f"{p} holds no queries")
    return out


# =============================================================================================
# benchmarks
# =============================================================================================


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
    outputs = manifest.get("outputs") or {}
    parts = outputs.get("chunks") or outputs.get("embeddings") or []
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
    return {str(_pick(r, (id_column, "doc_id", "_id", "id"), "doc id", f"{p} row {i}"))
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
    bench.corpus, bench.summary, bench.created_at = corpus, summary, _now_iso()
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
    with _open_text(p) as f:
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


def make_pairs(bench: Benchmark, *, searcher: Any = None, depth: int = 20, unjudged_per_query: int = 0,
               seed: int = 0, min_gain: float | None = None) -> list[LabelledPair]:
    """Calibration pairs from a benchmark: relevant docs (gain >= the benchmark's
    ``relevant_min_gain``) are positives; judged non-relevant docs (gain 0) are negatives;
    judged docs in between (e.g. Cranfield's "minimum interest") are left out, since neither
    answer is wrong for them (``min_gain`` overrides the benchmark's cut). With a ``searcher``,
    up to ``unjudged_per_query`` unjudged docs
    from each query's top ``depth`` are sampled as extra negatives: the hard negatives a
    threshold actually has to reject (pooled judgments assume unjudged means non-relevant).
    """
    import random

    rng = random.Random(seed)
    min_gain = bench.relevant_min_gain if min_gain is None else min_gain
    queries = [q for q in bench.queries if any(g >= min_gain for g in bench.qrels.get(q["query_id"], {}).values())]
    tops: list[list[tuple[str, float]]] = [[] for _ in queries]
    if searcher is not None and unjudged_per_query > 0:
        tops = [doc_ranking(r) for r in search_all(searcher, [q["text"] for q in queries], depth)]
    pairs: list[LabelledPair] = []
    for q, ranking in zip(queries, tops):
        judged = bench.qrels.get(q["query_id"], {})
        for doc, gain in sorted(judged.items()):
            if gain >= min_gain:
                pairs.append(LabelledPair(q["text"], doc, True))
            elif gain <= 0:
                pairs.append(LabelledPair(q["text"], doc, False))
        unjudged = [d for d, _ in ranking if d not in judged]
        for doc in rng.sample(unjudged, min(unjudged_per_query, len(unjudged))):
            pairs.append(LabelledPair(q["text"], doc, False))
    return pairs


def write_pairs(pairs: Sequence[LabelledPair], path: str | os.PathLike[str]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps({"query": pair.query, "doc_id": pair.doc_id, "relevant": int(pair.relevant)}) + "\n")
    os.replace(tmp, p)


def evaluate_benchmark(searcher: Any, bench: Benchmark, *, ks: Sequence[int] = (10, 100), store: Store | None = None,
                       exact: bool = True, nprobe: int | None = None) -> dict[str, Any]:
    """recall@k, MRR@k and graded nDCG@k of a searcher on a benchmark, overall and per ``lang``
    and per ``type`` when the benchmark's queries carry them, beside exact search.

    Runs the index builder's evaluation (``engine.quality.evaluate.evaluate_searcher``) once at the
    largest ``k`` and recomputes every metric at each ``k`` from its per-query rankings with
    ``engine.quality.metrics``: nDCG on the graded gains, recall and MRR on the docs whose gain reaches
    the benchmark's ``relevant_min_gain``. Queries with no relevant doc are skipped (counted).
    """
    import tempfile

    from engine.quality import metrics
    from engine.quality.evaluate import EvalConfig, Query, evaluate_searcher

    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ConfigError(f"ks must be positive integers, got {list(ks)!r}")
    kmax = ks[-1]
    graded = {q: {d: g for d, g in docs.items() if g > 0} for q, docs in bench.qrels.items()}
    queries = [Query(q["query_id"], q["text"]) for q in bench.queries]
    with tempfile.TemporaryDirectory(prefix="embedctl-eval-") as tmp:
        path = os.path.join(tmp, "per_query.jsonl")
        summary = evaluate_searcher(searcher, queries, graded, EvalConfig(k=kmax, exact=exact, nprobe=nprobe),
                                    store=store, per_query_path=path)
        per_query = [json.loads(line) for line in open(path, encoding="utf-8")]
    meta = {q["query_id"]: q for q in bench.queries}
    rows: dict[str, list[dict[str, float]]] = {"index": [], "exact": []}
    groups: dict[str, dict[str, dict[str, list[dict[str, float]]]]] = {"lang": {}, "type": {}}
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
    if not rows["index"]:
        raise SchemaError("no benchmark query has a relevant document (check relevant_min_gain and the qrels)")

    def table(side_rows: Mapping[str, list[dict[str, float]]]) -> dict[str, Any]:
        out: dict[str, Any] = {"queries": len(side_rows["index"]),
                               "index": {k: round(v, 6) for k, v in metrics.mean_metrics(side_rows["index"]).items()}}
        if side_rows["exact"]:
            out["exact"] = {k: round(v, 6) for k, v in metrics.mean_metrics(side_rows["exact"]).items()}
        return out

    corpus_match = None
    if store is not None and bench.corpus.get("fingerprint") and searcher.manifest.get("source_run"):
        ids, _ = run_doc_ids(store, str(searcher.manifest["source_run"]))
        corpus_match = corpus_fingerprint(ids) == bench.corpus["fingerprint"]
        if not corpus_match:
            log.warning("benchmark %s was judged against another corpus than %s/%s indexes; unjudged new docs "
                        "count as misses", bench.benchmark_id, searcher.index, searcher.version_id)
    result: dict[str, Any] = {
        "benchmark": bench.benchmark_id, "index": searcher.index, "version": searcher.version_id,
        "kind": searcher.manifest.get("kind"), "ks": ks, "queries": len(bench.queries),
        "evaluated": len(rows["index"]), "skipped_no_relevant": skipped,
        "relevant_min_gain": bench.relevant_min_gain, "corpus_match": corpus_match, **table(rows),
        f"recall_vs_exact@{kmax}": summary["metrics"].get(f"recall_vs_exact@{kmax}"), "timings": summary["timings"],
    }
    for col, by in groups.items():
        if by:
            result[f"by_{col}"] = {value: table(r) for value, r in sorted(by.items())}
    return result


# =============================================================================================
# calibration math: precision-recall curve, F-beta optimum, relative-to-best, floor
# =============================================================================================


@dataclass(frozen=True)
class PRCurve:
    """Precision and recall of the rule ``score >= t`` at every distinct score ``t``.

    Pairs whose score is NaN were not retrieved (outside the search depth): no threshold can
    return them, so they count as predicted negative at every ``t`` (a relevant one lowers
    recall everywhere). Arrays are aligned, thresholds descending.
    """

    thresholds: np.ndarray  # [m] distinct retrieved scores, descending
    precision: np.ndarray  # [m]
    recall: np.ndarray  # [m]
    tp: np.ndarray  # [m] int
    fp: np.ndarray  # [m] int
    positives: int  # all relevant pairs, retrieved or not
    negatives: int

    def f_beta(self, beta: float = 1.0) -> np.ndarray:
        return f_beta(self.precision, self.recall, beta)

    def average_precision(self) -> float:
        """Area under the step PR curve (sum of precision x recall increments), as sklearn computes it."""
        if not len(self.recall):
            return 0.0
        prev = np.concatenate([[0.0], self.recall[:-1]])
        return float(np.sum((self.recall - prev) * self.precision))


def f_beta(precision: np.ndarray | float, recall: np.ndarray | float, beta: float = 1.0) -> np.ndarray:
    """(1 + b^2) P R / (b^2 P + R), 0 where both are 0. ``beta > 1`` weighs recall more."""
    if beta <= 0:
        raise ConfigError(f"beta must be > 0, got {beta!r}")
    p = np.asarray(precision, dtype=np.float64)
    r = np.asarray(recall, dtype=np.float64)
    b2 = beta * beta
    denom = b2 * p + r
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (1 + b2) * p * r / np.where(denom > 0, denom, 1.0), 0.0)


def pr_curve(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> PRCurve:
    """The precision-recall curve of ``score >= t`` over labelled pairs (NaN score = not retrieved).

    Tied scores move together (a threshold cannot split them), so there is one point per
    distinct score, not per pair.
    """
    s = np.asarray(scores, dtype=np.float64)  # [n]
    y = np.asarray(labels, dtype=bool)  # [n]
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must be 1-d and aligned")
    positives, negatives = int(y.sum()), int((~y).sum())
    keep = ~np.isnan(s)
    s, y = s[keep], y[keep]
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    # last index of each run of equal scores: the point where that threshold's group is complete
    last = np.flatnonzero(np.concatenate([s[1:] != s[:-1], [True]])) if len(s) else np.zeros(0, dtype=int)
    tp = np.cumsum(y)[last] if len(s) else np.zeros(0, dtype=int)
    fp = (last + 1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
    recall = tp / positives if positives else np.zeros(len(tp))
    return PRCurve(thresholds=s[last], precision=precision.astype(np.float64), recall=recall.astype(np.float64),
                   tp=tp.astype(np.int64), fp=fp.astype(np.int64), positives=positives, negatives=negatives)


@dataclass(frozen=True)
class OperatingPoint:
    """A chosen threshold and what it gives on the calibration pairs."""

    threshold: float  # the decision boundary: keep scores >= threshold
    precision: float
    recall: float
    f_beta: float
    beta: float
    tp: int
    fp: int
    fn: int
    at_score: float  # the lowest kept calibration score (threshold is between it and the next lower one)

    def to_dict(self) -> dict[str, Any]:
        # the boundary keeps full precision: rounding could move it across a calibration score
        return {k: (round(v, 6) if isinstance(v, float) and k not in ("threshold", "at_score") else v)
                for k, v in asdict(self).items()}


def best_fbeta(curve: PRCurve, beta: float = 1.0) -> OperatingPoint:
    """The threshold maximising F-beta on the curve.

    Ties in F-beta go to the highest threshold (fewer results for the same quality). The
    stored boundary is the midpoint between the chosen score and the next lower calibration
    score, so it sits in the gap rather than on a training example; both give the same
    partition of the calibration pairs.
    """
    if not len(curve.thresholds):
        raise SchemaError("no calibration pair was retrieved by the index: nothing to calibrate on "
                          "(raise --depth, or check that the pairs' doc ids exist in this index)")
    f = curve.f_beta(beta)
    i = int(np.flatnonzero(f >= f.max() - 1e-12)[0])  # highest threshold among (float-)ties
    at = float(curve.thresholds[i])
    boundary = (at + float(curve.thresholds[i + 1])) / 2 if i + 1 < len(curve.thresholds) else at
    tp, fp = int(curve.tp[i]), int(curve.fp[i])
    return OperatingPoint(threshold=boundary, precision=float(curve.precision[i]), recall=float(curve.recall[i]),
                          f_beta=float(f[i]), beta=beta, tp=tp, fp=fp, fn=curve.positives - tp, at_score=at)


def relative_margins(scores: np.ndarray, top_scores: np.ndarray) -> np.ndarray:
    """``top score of the pair's query - pair score`` (>= 0; NaN where the pair was not retrieved)."""
    return np.asarray(top_scores, dtype=np.float64) - np.asarray(scores, dtype=np.float64)


def best_relative(scores: np.ndarray, top_scores: np.ndarray, labels: np.ndarray, beta: float = 1.0,
                  floor: float | None = None) -> OperatingPoint:
    """The margin ``delta`` for "keep hits within ``delta`` of the query's top score" maximising
    F-beta, with the floor applied first (as search applies it). ``threshold`` holds ``delta``."""
    s = np.asarray(scores, dtype=np.float64)
    m = relative_margins(s, top_scores)
    if floor is not None:
        m = np.where(s >= floor, m, np.nan)
    curve = pr_curve(-m, labels)  # keep iff -margin >= -delta
    op = best_fbeta(curve, beta)
    return OperatingPoint(threshold=max(0.0, -op.threshold), precision=op.precision, recall=op.recall,
                          f_beta=op.f_beta, beta=beta, tp=op.tp, fp=op.fp, fn=op.fn, at_score=-op.at_score)


def choose_floor(scores: np.ndarray, labels: np.ndarray, floor_recall: float = 0.99) -> float | None:
    """The highest score floor that still keeps ``floor_recall`` of the retrieved relevant pairs:
    a safety net under the relative rule that removes only garbage."""
    if not 0 < floor_recall <= 1:
        raise ConfigError(f"floor recall must be in (0, 1], got {floor_recall!r}")
    s = np.asarray(scores, dtype=np.float64)
    pos = np.sort(s[np.asarray(labels, dtype=bool) & ~np.isnan(s)])  # ascending
    if not len(pos):
        return None
    drop = int(math.floor((1 - floor_recall) * len(pos) + 1e-9))  # relevant pairs we may lose
    return float(pos[min(drop, len(pos) - 1)])


def point_at(scores: np.ndarray, labels: np.ndarray, keep: np.ndarray, beta: float = 1.0) -> dict[str, float]:
    """Precision/recall/F-beta of an arbitrary keep-mask over the pairs."""
    y = np.asarray(labels, dtype=bool)
    k = np.asarray(keep, dtype=bool)
    tp, fp = int((k & y).sum()), int((k & ~y).sum())
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / int(y.sum()) if y.sum() else 0.0
    return {"precision": round(p, 6), "recall": round(r, 6), "f_beta": round(float(f_beta(p, r, beta)), 6),
            "tp": tp, "fp": fp, "fn": int(y.sum()) - tp}


def downsample_curve(curve: PRCurve, max_points: int = MAX_CURVE_POINTS) -> dict[str, list[float]]:
    """At most ``max_points`` points of the curve, evenly spaced in rank, ends kept."""
    m = len(curve.thresholds)
    idx = np.unique(np.linspace(0, m - 1, min(m, max_points)).round().astype(int)) if m else np.zeros(0, dtype=int)
    return {"threshold": [round(float(x), 6) for x in curve.thresholds[idx]],
            "precision": [round(float(x), 6) for x in curve.precision[idx]],
            "recall": [round(float(x), 6) for x in curve.recall[idx]]}


# =============================================================================================
# applying thresholds to search results
# =============================================================================================


@dataclass(frozen=True)
class Thresholds:
    """What search applies: ``absolute`` keeps ``score >= max(threshold, floor)``; ``relative``
    keeps ``score >= max(top - delta, floor)``."""

    rule: Rule = "absolute"
    threshold: float | None = None
    delta: float | None = None
    floor: float | None = None
    source: str = "manual"  # a calibration id, or "manual"
    calibrated_on: str | None = None

    def __post_init__(self) -> None:
        if self.rule not in ("absolute", "relative"):
            raise ConfigError(f"threshold rule must be 'absolute' or 'relative', got {self.rule!r}")
        if self.rule == "relative" and self.delta is None:
            raise ConfigError("the relative rule needs a delta (keep hits within delta of the top score)")

    @classmethod
    def from_calibration(cls, record: Mapping[str, Any], rule: Rule | None = None) -> Thresholds:
        return cls(rule=rule or record.get("rule", "absolute"),
                   threshold=(record.get("absolute") or {}).get("threshold"),
                   delta=(record.get("relative") or {}).get("delta"),
                   floor=(record.get("floor") or {}).get("score"),
                   source=str(record.get("calibration_id", "calibration")),
                   calibrated_on=record.get("version_id"))

    def cutoff(self, top_score: float) -> float:
        """The minimum score kept for a query whose best hit scored ``top_score``."""
        floor = -math.inf if self.floor is None else self.floor
        if self.rule == "relative":
            assert self.delta is not None
            return max(top_score - self.delta, floor)
        return max(-math.inf if self.threshold is None else self.threshold, floor)

    def describe(self) -> str:
        parts = []
        if self.rule == "relative":
            parts.append(f"within {self.delta:.4f} of the top score")
        elif self.threshold is not None:
            parts.append(f"score >= {self.threshold:.4f}")
        if self.floor is not None:
            parts.append(f"floor {self.floor:.4f}")
        origin = f"calibration {self.source}" + (f" on {self.calibrated_on}" if self.calibrated_on else "")
        return f"{self.rule} rule ({', '.join(parts)}; {origin if self.source != 'manual' else 'manual'})"


def as_thresholds(calibration: Thresholds | Mapping[str, Any] | float | None) -> Thresholds | None:
    if calibration is None or isinstance(calibration, Thresholds):
        return calibration
    if isinstance(calibration, (int, float)):
        return Thresholds(rule="absolute", threshold=float(calibration))
    return Thresholds.from_calibration(calibration)


def apply_thresholds(hits: Sequence[Any], calibration: Thresholds | Mapping[str, Any] | float | None,
                     ) -> tuple[list[Any], str | None]:
    """One query's hits (best first) filtered by the calibrated rule, and why it is empty if it is.

    ``calibration`` is a calibration record (``load_calibration``), a ``Thresholds``, a bare
    float (an absolute threshold) or None (no filtering). The reason is None whenever hits
    remain; otherwise a sentence a user can act on, so an empty answer is never silent.
    """
    hits = list(hits)
    th = as_thresholds(calibration)
    if not hits:
        return [], "no candidates: the index returned no hits for this query"
    if th is None:
        return hits, None
    top = max(float(_get(h, "score")) for h in hits)
    cut = th.cutoff(top)
    kept = [h for h in hits if float(_get(h, "score")) >= cut]
    if kept:
        return kept, None
    best = max(hits, key=lambda h: float(_get(h, "score")))
    return [], (f"no result passed the {th.describe()}: all {len(hits)} candidates scored below {cut:.4f} "
                f"(best: doc {_get(best, 'doc_id')} at {float(_get(best, 'score')):.4f})")


def apply_thresholds_batch(results: Sequence[Sequence[Any]], calibration: Thresholds | Mapping[str, Any] | float | None,
                           ) -> tuple[list[list[Any]], list[str | None]]:
    """``apply_thresholds`` over a batch of queries: (kept hits per query, reason per query)."""
    th = as_thresholds(calibration)
    out = [apply_thresholds(r, th) for r in results]
    return [h for h, _ in out], [r for _, r in out]


# =============================================================================================
# searchers and scoring pairs through the index
# =============================================================================================

Loader = Any  # Callable[[Store, str, str], searcher]: engine.index.searcher.Searcher.load by default
QueryEncoder = Any  # Callable[[list[str]], np.ndarray [n, dim]]


def default_loader(store: Store, index: str, version: str) -> Any:
    """The index builder's searcher, fully verified (checksums) before it answers anything."""
    from engine.index.searcher import Searcher

    return Searcher.load(store, index, version, verify=True)


def version_manifest(store: Store, index: str, version: str) -> dict[str, Any]:
    try:
        return store.read_json(layout.version_manifest_key(index, version))
    except NotFoundError:
        raise NotFoundError(f"version {version!r} of index {index!r} has no manifest in {store.describe()}: "
                            "it does not exist or its upload never finished") from None


def doc_ranking(hits: Sequence[Any]) -> list[tuple[str, float]]:
    """Chunk hits (best first) collapsed to documents: each doc once, at its best chunk's score."""
    best: dict[str, float] = {}
    for h in hits:
        d, s = str(_get(h, "doc_id")), float(_get(h, "score"))
        if d not in best or s > best[d]:
            best[d] = s
    return sorted(best.items(), key=lambda kv: -kv[1])


def _accepts(fn: Any, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def search_all(searcher: Any, queries: Sequence[str], k: int, batch: int = 256,
               vectors: np.ndarray | None = None) -> list[list[Any]]:
    """Top-``k`` hits for every query, in batches. Asks for one hit per document when the
    searcher can (so ``k`` counts documents, as judgments do); ``vectors`` [n, dim] skips
    re-encoding queries already embedded with the version's model."""
    collapse = {"collapse_docs": True} if _accepts(searcher.search, "collapse_docs") else {}
    out: list[list[Any]] = []
    for i in range(0, len(queries), batch):
        if vectors is not None and hasattr(searcher, "search_vectors"):
            res = searcher.search_vectors(vectors[i:i + batch], k=k, **collapse)
        else:
            res = searcher.search(list(queries[i:i + batch]), k=k, **collapse)
        out.extend(list(r) for r in res)
    return out


def searcher_encoder(searcher: Any) -> QueryEncoder | None:
    """The searcher's own query encoder, if it exposes one (``engine.index.searcher.Searcher`` does)."""
    fn = getattr(searcher, "encode_queries", None)
    if callable(fn):
        return fn
    enc = getattr(searcher, "encoder", None)
    if enc is not None and callable(getattr(enc, "encode_queries", None)):
        return enc.encode_queries
    return None


def encode_and_search(searcher: Any, queries: Sequence[str], k: int, query_encoder: QueryEncoder | None = None,
                      ) -> tuple[np.ndarray | None, list[list[Any]]]:
    """Search, embedding the queries only once: with the searcher's own encoder, the vectors
    go to ``search_vectors`` and come back for drift references. ``query_encoder`` (tests)
    embeds for the caller while the searcher embeds for itself. (vectors [n, dim] | None, hits)."""
    own = searcher_encoder(searcher)
    if query_encoder is None and own is not None and hasattr(searcher, "search_vectors"):
        vecs = np.asarray(own(list(queries)), dtype=np.float32)
        return vecs, search_all(searcher, queries, k, vectors=vecs)
    hits = search_all(searcher, queries, k)
    vecs = np.asarray(query_encoder(list(queries)), dtype=np.float32) if query_encoder is not None else None
    return vecs, hits


def query_encoder_for(searcher: Any, manifest: Mapping[str, Any]) -> QueryEncoder:
    """The version's query encoder: the searcher's own if it exposes one, else the model the
    manifest names (refusing a fingerprint mismatch)."""
    own = searcher_encoder(searcher)
    if own is not None:
        return own
    from engine.embed.encoders import encoder_from_identity

    model = manifest.get("model")
    if not isinstance(model, Mapping):
        raise SchemaError("the version manifest names no model identity; cannot embed queries")
    encoder: Encoder = encoder_from_identity(dict(model))
    return encoder.encode_queries


@dataclass
class ScoredPairs:
    """Calibration pairs scored through the index: NaN score = not in the top ``depth`` docs."""

    pairs: list[LabelledPair]
    scores: np.ndarray  # [n] float64, NaN when not retrieved
    top_scores: np.ndarray  # [n] float64: the best score of the pair's query (NaN: empty result)
    labels: np.ndarray  # [n] bool
    queries: list[str]  # unique query texts, first-seen order
    query_top: dict[str, list[float]]  # query -> its top-k doc scores (best first)
    depth: int
    query_vectors: np.ndarray | None = None  # [len(queries), dim] when the queries were embedded here


def score_pairs(searcher: Any, pairs: Sequence[LabelledPair], depth: int = 100, *,
                query_encoder: QueryEncoder | None = None) -> ScoredPairs:
    """Score each (query, doc) pair the way search would: run the query through the version's
    index (quantization included) to ``depth`` chunks and take the doc's best chunk score."""
    if depth < 1:
        raise ConfigError(f"depth must be >= 1, got {depth}")
    queries = list(dict.fromkeys(p.query for p in pairs))
    vecs, results = encode_and_search(searcher, queries, depth, query_encoder)
    ranked = {q: doc_ranking(r) for q, r in zip(queries, results)}
    lookup = {q: dict(r) for q, r in ranked.items()}
    scores = np.array([lookup[p.query].get(p.doc_id, np.nan) for p in pairs], dtype=np.float64)
    tops = np.array([ranked[p.query][0][1] if ranked[p.query] else np.nan for p in pairs], dtype=np.float64)
    labels = np.array([p.relevant for p in pairs], dtype=bool)
    return ScoredPairs(list(pairs), scores, tops, labels, queries, {q: [s for _, s in r] for q, r in ranked.items()},
                       depth, vecs)


def evaluate_thresholds(sp: ScoredPairs, thresholds: Thresholds, beta: float = 1.0) -> dict[str, float]:
    """Precision/recall/F-beta of a threshold rule on scored pairs (e.g. held-out pairs, to
    check that a calibration generalises beyond the pairs it was fitted on)."""
    keep = np.zeros(len(sp.pairs), dtype=bool)
    for i, (s, top) in enumerate(zip(sp.scores, sp.top_scores)):
        if not math.isnan(s):
            keep[i] = s >= thresholds.cutoff(float(top))
    return point_at(sp.scores, sp.labels, keep, beta)


# =============================================================================================
# calibration records in the store
# =============================================================================================


def calibration_prefix(index: str, version: str) -> str:
    return join(layout.version_prefix(index, version), CALIBRATION_DIR)


def new_calibration_id() -> str:
    """UTC timestamp, microseconds included: sorts chronologically as a string."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def list_calibrations(store: Store, index: str, version: str) -> list[str]:
    """Calibration ids of a version, oldest first (a record counts once its JSON exists)."""
    prefix = calibration_prefix(index, version)
    ids = [k[len(prefix) + 1:-len(".json")] for k in store.list(prefix) if k.endswith(".json")]
    return sorted(i for i in ids if "/" not in i)


def read_calibration(store: Store, index: str, version: str, calibration_id: str) -> dict[str, Any]:
    return store.read_json(join(calibration_prefix(index, version), f"{calibration_id}.json"))


def _embedded_thresholds(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """A calibration record carried inside a version manifest's ``thresholds`` (e.g. copied by
    a build from its parent), if it looks like one."""
    th = manifest.get("thresholds")
    if isinstance(th, Mapping) and th.get("kind") == "calibration" and th.get("absolute"):
        return dict(th)
    return None


def load_calibration(store: Store, index: str, version: str, *, inherit: bool = True) -> dict[str, Any] | None:
    """The newest calibration that applies to ``version``, or None.

    Looks, in order, at the version's own records, a record embedded in its manifest's
    ``thresholds``, and (``inherit``) the newest record of the nearest ancestor along
    ``parent_version``. The result carries ``found_on`` (the version whose folder held it);
    its ``version_id`` is the version it was fitted on, which ``calibration_status`` compares.
    """
    ids = list_calibrations(store, index, version)
    if ids:
        rec = read_calibration(store, index, version, ids[-1])
        return {**rec, "found_on": version}
    if not inherit:
        return None
    seen = {version}
    current = version
    for _ in range(64):
        try:
            manifest = version_manifest(store, index, current)
        except NotFoundError:
            return None
        if current == version and (emb := _embedded_thresholds(manifest)) is not None:
            return {**emb, "found_on": version}
        parent = manifest.get("parent_version")
        if not parent or parent in seen:
            return None
        seen.add(parent)
        ids = list_calibrations(store, index, parent)
        if ids:
            return {**read_calibration(store, index, parent, ids[-1]), "found_on": parent}
        current = parent
    return None


def _fingerprint_of(model: Any) -> str | None:
    if isinstance(model, Mapping):
        return model.get("fingerprint") or model.get("name")
    return str(model) if model else None


def version_identity(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What a calibration depends on: model, quantization (index kind/params), corpus."""
    model = manifest.get("model") or {}
    return {
        "version_id": manifest.get("version_id"),
        "model": {"name": model.get("name"), "fingerprint": model.get("fingerprint"), "dim": manifest.get("dim"),
                  "truncate_dim": model.get("truncate_dim")} if isinstance(model, Mapping) else {"name": model},
        "index_kind": manifest.get("kind"),
        "index_params": manifest.get("params"),
        "metric": manifest.get("metric"),
        "source_run": manifest.get("source_run"),
        "corpus_fingerprint": manifest.get("corpus_fingerprint"),
    }


QUANTIZATION_KEYS = ("factory", "nlist", "pq_m", "pq_nbits", "rescore", "rescore_multiplier", "nprobe")


def quantization_of(kind: Any, params: Any) -> dict[str, Any]:
    """The part of an index's kind/params that changes its scores or its candidate lists (not
    the build's reasoning, timings or RAM estimates)."""
    out: dict[str, Any] = {"kind": kind}
    if isinstance(params, Mapping):
        out.update({k: params.get(k) for k in QUANTIZATION_KEYS if params.get(k) is not None})
    elif params is not None:
        out["params"] = params
    return out


def _describe_quantization(q: Mapping[str, Any]) -> str:
    rest = ", ".join(f"{k} {v}" for k, v in q.items() if k not in ("kind", "factory"))
    return f"{q.get('kind')} {q.get('factory') or ''}".strip() + (f" ({rest})" if rest else "")


def calibration_differences(record: Mapping[str, Any], manifest: Mapping[str, Any]) -> list[str]:
    """Why ``record`` does not fit the version ``manifest`` describes (empty: it fits)."""
    have = version_identity(manifest)
    reasons = []
    if _fingerprint_of(record.get("model")) != _fingerprint_of(have["model"]) or \
            (record.get("model") or {}).get("dim") != have["model"].get("dim"):
        reasons.append(f"model changed ({(record.get('model') or {}).get('name')} -> {have['model'].get('name')})")
    q_rec = quantization_of(record.get("index_kind"), record.get("index_params"))
    q_have = quantization_of(have["index_kind"], have["index_params"])
    if q_rec != q_have:
        reasons.append(f"quantization changed ({_describe_quantization(q_rec)} -> {_describe_quantization(q_have)})")
    if record.get("source_run") != have["source_run"] or \
            (record.get("corpus_fingerprint") or None) != (have["corpus_fingerprint"] or None):
        reasons.append(f"corpus changed (run {record.get('source_run')} -> {have['source_run']})")
    return reasons


def calibration_status(store: Store, index: str, version: str) -> dict[str, Any]:
    """Whether ``version`` has thresholds it can use, for ``status`` and ``search --threshold auto``.

    ``{"version", "calibrated", "calibration_id", "calibrated_on", "inherited", "needs_recalibration",
    "reasons", "rule", "threshold", "delta", "floor", "beta", "f_beta", "precision", "recall",
    "created_at"}``. ``calibrated_on`` differs from ``version`` when the thresholds were fitted on
    another version (inherited or copied); ``needs_recalibration`` is true when the model, the
    quantization or the corpus differ from what they were fitted on, or nothing was ever fitted.
    """
    manifest = version_manifest(store, index, version)
    rec = load_calibration(store, index, version)
    if rec is None:
        return {"version": version, "calibrated": False, "calibration_id": None, "calibrated_on": None,
                "inherited": False, "needs_recalibration": True,
                "reasons": [f"never calibrated: run `embedctl calibrate --index {index} --version {version} "
                            "--pairs PAIRS`"]}
    reasons = calibration_differences(rec, manifest)
    on = rec.get("version_id")
    if on != version:
        reasons.insert(0, f"calibrated on another version ({on})")
    absolute = rec.get("absolute") or {}
    return {
        "version": version, "calibrated": True, "calibration_id": rec.get("calibration_id"), "calibrated_on": on,
        "inherited": rec.get("found_on") != version or on != version,
        "needs_recalibration": bool(calibration_differences(rec, manifest)), "reasons": reasons,
        "rule": rec.get("rule"), "threshold": absolute.get("threshold"),
        "delta": (rec.get("relative") or {}).get("delta"), "floor": (rec.get("floor") or {}).get("score"),
        "beta": rec.get("beta"), "f_beta": absolute.get("f_beta"), "precision": absolute.get("precision"),
        "recall": absolute.get("recall"), "created_at": rec.get("created_at"),
    }


def calibration_line(status: Mapping[str, Any]) -> str:
    """One line for ``embedctl status`` from ``calibration_status``."""
    if not status.get("calibrated"):
        return "not calibrated (embedctl calibrate ...)"
    th = status.get("threshold")
    what = str(status.get("rule"))
    if isinstance(th, (int, float)):
        what = f"{what} rule, threshold {th:.4f}, F{status.get('beta') or 1:g} {status.get('f_beta') or 0:.3f}"
    if status.get("needs_recalibration"):
        return f"RECALIBRATE: {'; '.join(status.get('reasons') or [])} [{what}]"
    if status.get("calibrated_on") != status.get("version"):
        return f"{status.get('calibration_id')} inherited from {status.get('calibrated_on')} (still fits) [{what}]"
    return f"{status.get('calibration_id')} [{what}]"


def resolve_threshold(store: Store, index: str, version: str, spec: str | float | None, *,
                      rule: Rule | None = None, allow_stale: bool = False) -> Thresholds | None:
    """What ``search --threshold SPEC`` filters with: None (no filter), a number (absolute), or
    ``auto`` (the version's calibration; refused when it is missing or no longer fits the
    version, unless ``allow_stale``)."""
    if spec is None or spec == "" or spec == "none":
        return None
    if spec != "auto":
        try:
            return Thresholds(rule="absolute", threshold=float(spec))
        except ValueError as err:
            raise ConfigError(f"--threshold must be a number or 'auto', got {spec!r}") from err
    rec = load_calibration(store, index, version)
    if rec is None:
        raise NotFoundError(f"--threshold auto: version {version!r} of index {index!r} has no calibration; run "
                            f"`embedctl calibrate --index {index} --version {version} --pairs PAIRS` first")
    reasons = calibration_differences(rec, version_manifest(store, index, version))
    if reasons and not allow_stale:
        raise ConfigError(f"--threshold auto: the thresholds of {index}/{version} were calibrated on "
                          f"{rec.get('version_id')} and no longer fit: {'; '.join(reasons)}. Recalibrate "
                          f"(`embedctl calibrate --index {index} --version {version} ...`) or pass a number")
    return Thresholds.from_calibration(rec, rule)


def copy_calibrations(src: Store, dst: Store, index: str, version: str) -> int:
    """Copy a version's calibration records (and their plots) to another store; returns the count.
    ``publish --from`` copies only the artifacts a manifest lists; this is the companion for
    thresholds fitted before the upload."""
    prefix = calibration_prefix(index, version)
    n = 0
    for key in sorted(src.list(prefix), key=lambda k: k.endswith(".json")):  # JSON last: it commits a record
        if not dst.exists(key):
            dst.write_bytes(key, src.read_bytes(key))
            n += key.endswith(".json")
    return n


# =============================================================================================
# calibrate: pairs -> scores through the index -> thresholds -> record + plot
# =============================================================================================


@dataclass(frozen=True)
class CalibrationConfig:
    """How to calibrate: F-beta weight, search depth, the rule search applies, the floor."""

    beta: float = 1.0
    depth: int = 100  # chunks searched per query; a pair outside them is "not retrieved"
    rule: Rule = "absolute"  # what `search --threshold auto` applies by default
    floor: float | None = None  # a fixed floor; None chooses one from floor_recall
    floor_recall: float = 0.99  # the floor keeps this share of the retrieved relevant pairs
    reference_k: int = 10  # top-k whose mean score drift compares
    plot: bool = True

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"--beta must be > 0, got {self.beta}")
        if self.depth < 1:
            raise ConfigError(f"--depth must be >= 1, got {self.depth}")
        if self.rule not in ("absolute", "relative"):
            raise ConfigError(f"--rule must be absolute or relative, got {self.rule!r}")
        if not 0 < self.floor_recall <= 1:
            raise ConfigError(f"--floor-recall must be in (0, 1], got {self.floor_recall}")


def _empty_rate(tops: Sequence[float | None], th: Thresholds) -> float:
    """Share of queries whose thresholded answer is empty, from each query's top score."""
    if not tops:
        return 0.0
    empty = sum(1 for t in tops if t is None or (isinstance(t, float) and math.isnan(t)) or t < th.cutoff(t))
    return round(empty / len(tops), 6)


def query_profile(query_top: Mapping[str, Sequence[float]], k: int) -> dict[str, Any]:
    """Per-query top-1 score, mean top-``k`` score and length in words (NaN-free: queries
    with no hit are counted by ``empty``)."""
    top1, topk, lengths = [], [], []
    for q, scores in query_top.items():
        lengths.append(len(q.split()))
        if scores:
            top1.append(round(float(scores[0]), 6))
            topk.append(round(float(np.mean(scores[:k])), 6))
    return {"top1": top1, "topk_mean": topk, "lengths": lengths,
            "no_hits": [sum(1 for s in query_top.values() if not s)]}


def calibrate(store: Store, index: str, version: str, pairs: Sequence[LabelledPair],
              cfg: CalibrationConfig = CalibrationConfig(), *, loader: Loader | None = None,
              searcher: Any = None, query_encoder: QueryEncoder | None = None,
              pairs_source: str | None = None) -> dict[str, Any]:
    """Fit thresholds for ``version`` from labelled pairs and store them beside it.

    Writes ``calibration/<id>.queries.npy`` (reference query embeddings for drift),
    ``<id>.png`` (the curve) and last ``<id>.json`` (the record; its existence commits the
    calibration). Returns the record.
    """
    manifest = version_manifest(store, index, version)
    if searcher is None:
        searcher = (loader or default_loader)(store, index, version)
    sp = score_pairs(searcher, pairs, cfg.depth, query_encoder=query_encoder)
    curve = pr_curve(sp.scores, sp.labels)
    op = best_fbeta(curve, cfg.beta)
    floor = cfg.floor if cfg.floor is not None else choose_floor(sp.scores, sp.labels, cfg.floor_recall)
    rel = best_relative(sp.scores, sp.top_scores, sp.labels, cfg.beta, floor)
    retrieved = ~np.isnan(sp.scores)
    s0 = np.where(retrieved, sp.scores, -np.inf)
    floor_point = point_at(sp.scores, sp.labels, s0 >= (floor if floor is not None else -np.inf), cfg.beta)
    combined = point_at(sp.scores, sp.labels, s0 >= max(op.threshold, floor if floor is not None else -np.inf),
                        cfg.beta)
    cal_id = new_calibration_id()
    prefix = calibration_prefix(index, version)
    th_abs = Thresholds("absolute", op.threshold, rel.threshold, floor)
    th_rel = Thresholds("relative", op.threshold, rel.threshold, floor)
    tops = [s[0] if s else None for s in sp.query_top.values()]
    ref_queries = sp.queries[:MAX_REFERENCE_QUERIES]
    if sp.query_vectors is not None:
        emb = sp.query_vectors[:MAX_REFERENCE_QUERIES]  # [n_ref, dim]
    else:
        emb = np.asarray(query_encoder_for(searcher, manifest)(ref_queries), dtype=np.float32)
    buf = io.BytesIO()
    np.save(buf, emb.astype(np.float16), allow_pickle=False)
    emb_bytes = buf.getvalue()
    emb_key = f"{cal_id}.queries.npy"
    store.write_bytes(join(prefix, emb_key), emb_bytes)
    record: dict[str, Any] = {
        "format": CALIBRATION_FORMAT, "kind": "calibration", "calibration_id": cal_id, "created_at": _now_iso(),
        "index": index, **version_identity(manifest),
        "pairs": {"source": pairs_source, "sha256": _pairs_digest(pairs), "n": len(pairs),
                  "relevant": int(sp.labels.sum()), "non_relevant": int((~sp.labels).sum()),
                  "queries": len(sp.queries), "depth": cfg.depth,
                  "relevant_not_retrieved": int((sp.labels & ~retrieved).sum()),
                  "non_relevant_not_retrieved": int((~sp.labels & ~retrieved).sum())},
        "beta": cfg.beta, "rule": cfg.rule,
        "absolute": {**op.to_dict(), "with_floor": combined},
        "relative": {"delta": rel.threshold, **{k: v for k, v in rel.to_dict().items()
                                                          if k not in ("threshold", "at_score")}},
        "floor": {"score": None if floor is None else float(floor),
                  "chosen": "fixed" if cfg.floor is not None else
                  f"keeps {cfg.floor_recall:.0%} of the retrieved relevant pairs",
                  **floor_point},
        "average_precision": round(curve.average_precision(), 6),
        "empty_rate": {"absolute": _empty_rate(tops, th_abs), "relative": _empty_rate(tops, th_rel)},
        "curve": downsample_curve(curve),
        "reference": {"queries": len(ref_queries), "embeddings": emb_key, "embeddings_sha256": sha256_bytes(emb_bytes),
                      "k": cfg.reference_k, **query_profile(sp.query_top, cfg.reference_k)},
        "plot": None,
    }
    if cfg.plot:
        png = plot_calibration(curve, op, sp.scores, sp.labels, floor=floor,
                               title=f"{index}/{version} calibration {cal_id}")
        store.write_bytes(join(prefix, f"{cal_id}.png"), png)
        record["plot"] = f"{cal_id}.png"
    store.put_if_absent(join(prefix, f"{cal_id}.json"), json_bytes(record))
    log.info("calibrated %s/%s: threshold %.4f (F%.3g %.3f, P %.3f, R %.3f)", index, version, op.threshold,
             cfg.beta, op.f_beta, op.precision, op.recall)
    return record


def _pairs_digest(pairs: Sequence[LabelledPair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(f"{p.query}\x00{p.doc_id}\x00{int(p.relevant)}\n".encode())
    return h.hexdigest()


def plot_calibration(curve: PRCurve, op: OperatingPoint, scores: np.ndarray, labels: np.ndarray, *,
                     floor: float | None = None, title: str = "calibration") -> bytes:
    """PNG: the precision-recall curve with the chosen point and its iso-F-beta line, and the
    score histograms of relevant vs non-relevant pairs with the threshold and floor marked."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    try:
        ax1.step(curve.recall, curve.precision, where="post", color="tab:blue", label="precision-recall")
        r = np.linspace(0.01, 1, 200)
        b2 = op.beta ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            p_iso = op.f_beta * r / ((1 + b2) * r - b2 * op.f_beta)  # P on the F-beta isoline through the point
        ok = (p_iso > 0) & (p_iso <= 1)
        ax1.plot(r[ok], p_iso[ok], ls=":", color="grey", label=f"F{op.beta:g} = {op.f_beta:.3f}")
        ax1.scatter([op.recall], [op.precision], color="tab:red", zorder=5,
                    label=f"threshold {op.threshold:.3f} (P {op.precision:.2f}, R {op.recall:.2f})")
        ax1.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02), title="precision-recall")
        ax1.legend(loc="lower left", fontsize=8)
        ax1.grid(alpha=0.3)
        s = np.asarray(scores, dtype=np.float64)
        y = np.asarray(labels, dtype=bool)
        ok_s = ~np.isnan(s)
        if ok_s.any():
            bins = np.linspace(np.nanmin(s), np.nanmax(s), 40)
            ax2.hist(s[ok_s & ~y], bins=bins, alpha=0.55, color="tab:grey",
                     label=f"non-relevant ({int((ok_s & ~y).sum())})")
            ax2.hist(s[ok_s & y], bins=bins, alpha=0.55, color="tab:green", label=f"relevant ({int((ok_s & y).sum())})")
        ax2.axvline(op.threshold, color="tab:red", label=f"threshold {op.threshold:.3f}")
        if floor is not None:
            ax2.axvline(floor, color="tab:orange", ls="--", label=f"floor {floor:.3f}")
        missed = int((~ok_s & y).sum())
        ax2.set(xlabel="score", ylabel="pairs", title=f"scores ({missed} relevant pairs not retrieved)")
        ax2.legend(fontsize=8)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


# =============================================================================================
# canaries
# =============================================================================================


@dataclass(frozen=True)
class CanaryLimits:
    """When a canary fails. Drops are absolute differences against the baseline report."""

    max_recall_drop: float = 0.05
    max_mrr_drop: float = 0.05
    max_score_drop: float = 0.05  # mean top-1 score
    max_empty_rate_increase: float = 0.05
    min_recall: float | None = None  # absolute floor, checked with or without a baseline


def score_distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    """mean, median, p5, p95 (and n) of a list of scores; None values when empty."""
    if not len(values):
        return {"n": 0, "mean": None, "median": None, "p5": None, "p95": None}
    a = np.asarray(values, dtype=np.float64)
    return {"n": int(a.size), "mean": round(float(a.mean()), 6), "median": round(float(np.median(a)), 6),
            "p5": round(float(np.percentile(a, 5)), 6), "p95": round(float(np.percentile(a, 95)), 6)}


def canary_stats(canaries: Sequence[Canary], rankings: Sequence[Sequence[tuple[str, float]]], k: int,
                 thresholds: Thresholds | None = None) -> dict[str, Any]:
    """Recall@k, MRR@k, hit rate, top-k and top-1 score distributions and the empty-result rate
    under ``thresholds``, from each canary's document ranking (``doc_ranking``; best first)."""
    from engine.quality import metrics
    if len(canaries) != len(rankings):
        raise ValueError(f"{len(canaries)} canaries but {len(rankings)} rankings")
    recalls: list[float] = []
    rrs: list[float] = []
    hits: list[float] = []
    topk_scores: list[float] = []
    top1: list[float] = []
    empty = kept_recall_n = 0
    misses: list[dict[str, Any]] = []
    for c, ranking in zip(canaries, rankings):
        docs = [d for d, _ in ranking[:k]]
        expected = set(c.expected)
        gains = {d: 1.0 for d in expected}
        recalls.append(metrics.recall_at_k(docs, gains, k))
        rrs.append(metrics.mrr_at_k(docs, gains, k))
        found = bool(expected & set(docs))
        hits.append(1.0 if found else 0.0)
        topk_scores.extend(s for _, s in ranking[:k])
        if ranking:
            top1.append(ranking[0][1])
        kept = ranking[:k]
        if thresholds is not None and ranking:
            cut = thresholds.cutoff(ranking[0][1])
            kept = [(d, s) for d, s in ranking[:k] if s >= cut]
        if not kept:
            empty += 1
        kept_recall_n += bool(expected & {d for d, _ in kept})
        if not found:
            misses.append({"id": c.id, "query": c.query, "expected": list(c.expected), "got": docs[:3]})
    n = len(canaries)
    return {
        "canaries": n, "k": k,
        f"recall@{k}": round(float(np.mean(recalls)), 6) if n else None,
        f"hit_rate@{k}": round(float(np.mean(hits)), 6) if n else None,
        f"mrr@{k}": round(float(np.mean(rrs)), 6) if n else None,
        "topk_scores": score_distribution(topk_scores),
        "top1_scores": score_distribution(top1),
        "empty_rate": round(empty / n, 6) if n else None,
        "hit_rate_under_threshold": round(kept_recall_n / n, 6) if n else None,
        "thresholds": None if thresholds is None else {**asdict(thresholds)},
        "misses": misses[:20],
        "missed": len(misses),
    }


def compare_canary(current: Mapping[str, Any], baseline: Mapping[str, Any] | None,
                   limits: CanaryLimits) -> tuple[dict[str, Any], list[str]]:
    """Differences to the baseline stats (current - baseline) and the failures they cause."""
    k = current["k"]
    failures: list[str] = []
    rkey, mkey = f"recall@{k}", f"mrr@{k}"
    if limits.min_recall is not None and (current[rkey] or 0.0) < limits.min_recall:
        failures.append(f"{rkey} {current[rkey]:.4f} is below the minimum {limits.min_recall:.4f}")
    if baseline is None:
        return {}, failures
    if baseline.get("k") != k:
        raise ConfigError(f"the baseline was measured at k={baseline.get('k')}, this run at k={k}; use the same --k")
    diff = {
        rkey: _delta(current.get(rkey), baseline.get(rkey)),
        mkey: _delta(current.get(mkey), baseline.get(mkey)),
        "top1_mean": _delta(current["top1_scores"]["mean"], baseline["top1_scores"]["mean"]),
        "topk_mean": _delta(current["topk_scores"]["mean"], baseline["topk_scores"]["mean"]),
        "topk_median": _delta(current["topk_scores"]["median"], baseline["topk_scores"]["median"]),
        "empty_rate": _delta(current.get("empty_rate"), baseline.get("empty_rate")),
    }
    checks = [(rkey, -limits.max_recall_drop, "dropped"), (mkey, -limits.max_mrr_drop, "dropped"),
              ("top1_mean", -limits.max_score_drop, "dropped")]
    for key, limit, verb in checks:
        d = diff[key]
        if d is not None and d < limit - 1e-12:
            failures.append(f"{key} {verb} by {-d:.4f} (limit {-limit:.4f}) against the baseline")
    d = diff["empty_rate"]
    if d is not None and d > limits.max_empty_rate_increase + 1e-12:
        failures.append(f"empty-result rate rose by {d:.4f} (limit {limits.max_empty_rate_increase:.4f})")
    return diff, failures


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(float(a) - float(b), 6)


def _alias_versions(store: Store, index: str, alias: str, version: str | None) -> tuple[list[str], dict[str, Any]]:
    if version:
        return [version], {"version": version, "weighted": None}
    from engine.publish.aliases import read_alias

    state = read_alias(store, index, alias)
    assert state is not None
    return state.target.versions, state.target.to_dict()


def _baseline_stats(baseline: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The stats block of a baseline report (its first version's), or a bare stats block."""
    if baseline is None:
        return None
    if baseline.get("kind") == "canary":
        return baseline["versions"][0]["stats"]
    if "k" in baseline and "top1_scores" in baseline:
        return baseline
    raise SchemaError("the baseline is not a canary report (expected the JSON `embedctl canary` writes)")


def run_canary(store: Store, index: str, canaries: Sequence[Canary], *, alias: str = "live", version: str | None = None,
               k: int = 10, baseline: Mapping[str, Any] | None = None, limits: CanaryLimits = CanaryLimits(),
               loader: Loader | None = None, use_thresholds: bool = True) -> dict[str, Any]:
    """Run the canary set against every version the alias routes to (both, during a weighted
    rollout). Returns the report; ``report["passed"]`` is False when any version fails."""
    if k < 1:
        raise ConfigError(f"--k must be >= 1, got {k}")
    if not canaries:
        raise SchemaError("the canary set is empty")
    versions, target = _alias_versions(store, index, alias, version)
    base = _baseline_stats(baseline)
    results = []
    for v in versions:
        searcher = (loader or default_loader)(store, index, v)
        try:
            rankings = [doc_ranking(r) for r in search_all(searcher, [c.query for c in canaries], k)]
        finally:
            close = getattr(searcher, "close", None)
            if callable(close):
                close()
        th = None
        cal: dict[str, Any] = {"calibrated": False}
        warnings: list[str] = []
        if use_thresholds:
            # the thresholds `search --threshold auto` would apply: none when they no longer fit
            cal = calibration_status(store, index, v)
            rec = load_calibration(store, index, v)
            if rec is not None and not cal["needs_recalibration"]:
                th = Thresholds.from_calibration(rec)
            else:
                warnings.append("no calibration fits this version (" + "; ".join(cal["reasons"]) +
                                "): the empty-result rate is about raw hits; recalibrate")
        stats = canary_stats(canaries, rankings, k, th)
        diff, failures = compare_canary(stats, base, limits)
        results.append({"version": v, "stats": stats, "baseline_diff": diff, "failures": failures,
                        "passed": not failures, "warnings": warnings,
                        "calibration": {key: cal.get(key) for key in ("calibrated", "calibration_id", "calibrated_on",
                                                                      "needs_recalibration")}})
    return {"format": CANARY_FORMAT, "kind": "canary", "index": index, "alias": None if version else alias,
            "target": target, "created_at": _now_iso(), "k": k, "limits": asdict(limits),
            "baseline": None if base is None else {
                "created_at": (baseline or {}).get("created_at"),
                "version": ((baseline or {}).get("versions") or [{}])[0].get("version")},
            "passed": all(r["passed"] for r in results), "versions": results}


def canary_gate(report: Mapping[str, Any]) -> None:
    """Raise GateError (exit 7) when the canary report failed."""
    if report["passed"]:
        return
    lines = [f"{r['version']}: {f}" for r in report["versions"] for f in r["failures"]]
    raise GateError(f"canary failed on {report['index']}" + (f"/{report['alias']}" if report.get("alias") else "") +
                    ": " + "; ".join(lines))


# =============================================================================================
# Prometheus text format
# =============================================================================================


def _prom_label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus_text(samples: Sequence[tuple[str, str, Mapping[str, Any], float | None]]) -> str:
    """Prometheus text exposition (0.0.4) of gauges: ``(name, help, labels, value)`` samples,
    grouped so each metric's samples follow its one HELP/TYPE header (the format requires a
    family to be contiguous); None values are skipped."""
    families: dict[str, tuple[str, list[str]]] = {}
    for name, help_text, labels, value in samples:
        if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name):
            raise ValueError(f"invalid Prometheus metric name {name!r}")
        if value is None:
            continue
        lab = ",".join(f'{k}="{_prom_label(v)}"' for k, v in labels.items())
        v = float(value)
        text = "NaN" if math.isnan(v) else ("+Inf" if v == math.inf else "-Inf" if v == -math.inf else repr(v))
        families.setdefault(name, (help_text, []))[1].append(f"{name}{{{lab}}} {text}" if lab else f"{name} {text}")
    lines: list[str] = []
    for name, (help_text, rows) in families.items():
        lines.append(f"# HELP {name} {help_text.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}")
        lines.append(f"# TYPE {name} gauge")
        lines.extend(rows)
    return "\n".join(lines) + "\n"


def canary_prometheus(report: Mapping[str, Any]) -> str:
    k = report["k"]
    ts = datetime.strptime(report["created_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    samples: list[tuple[str, str, Mapping[str, Any], float | None]] = []
    for r in report["versions"]:
        st = r["stats"]
        lab = {"index": report["index"], "alias": report.get("alias") or "", "version": r["version"]}
        labk = {**lab, "k": k}
        samples += [
            ("embedctl_canary_recall", "Canary recall@k (share of expected docs in the top k).", labk,
             st[f"recall@{k}"]),
            ("embedctl_canary_mrr", "Canary mean reciprocal rank within the top k.", labk, st[f"mrr@{k}"]),
            ("embedctl_canary_hit_rate", "Share of canaries with an expected doc in the top k.", labk,
             st[f"hit_rate@{k}"]),
            ("embedctl_canary_empty_rate", "Share of canaries with no result under the stored threshold.", lab,
             st["empty_rate"]),
        ]
        for q in ("mean", "median", "p5", "p95"):
            samples.append(("embedctl_canary_topk_score", "Top-k score distribution of canary queries.",
                            {**labk, "stat": q}, st["topk_scores"][q]))
            samples.append(("embedctl_canary_top1_score", "Top-1 score distribution of canary queries.",
                            {**lab, "stat": q}, st["top1_scores"][q]))
        samples.append(("embedctl_canary_passed", "1 if the canary passed its limits, else 0.", lab,
                        float(r["passed"])))
        samples.append(("embedctl_canary_queries", "Number of canary queries.", lab, float(st["canaries"])))
    samples.append(("embedctl_canary_last_run_timestamp_seconds", "When the canary ran (unix time).",
                    {"index": report["index"], "alias": report.get("alias") or ""}, ts))
    return prometheus_text(samples)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write via a temp file + rename, so a textfile collector never reads half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)


# =============================================================================================
# drift
# =============================================================================================


@dataclass(frozen=True)
class DriftLimits:
    """When drift alerts (exit 7). PSI above 0.25 is the usual "significant shift" rule of thumb."""

    max_score_psi: float = 0.25  # top-1 score distribution
    max_length_psi: float = 0.25  # query length in words
    max_novel_rate: float = 0.25  # share of recent queries far from every reference query (5% expected)
    max_empty_rate_increase: float = 0.10


def psi(reference: Sequence[float], current: Sequence[float], bins: int = 10) -> float | None:
    """Population stability index of ``current`` against ``reference``, on the reference's
    quantile bins (each bin holds ~1/bins of the reference), with half a pseudo-count per bin
    so an empty bin does not blow up the log. Fewer bins for small samples (about 10 values
    per bin). None when either side is empty."""
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    if not ref.size or not cur.size:
        return None
    bins = max(2, min(bins, min(ref.size, cur.size) // 10))
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))  # inner edges
    p = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1) + 0.5
    q = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=len(edges) + 1) + 0.5
    p, q = p / p.sum(), q / q.sum()
    return round(float(np.sum((q - p) * np.log(q / p))), 6)


def psi_noise(n_reference: int, n_current: int, bins: int = 10) -> float:
    """The PSI two samples of these sizes from one distribution show on average
    (≈ (bins - 1) (1/n + 1/m)); its 99th percentile is under three times that."""
    if not n_reference or not n_current:
        return math.inf
    bins = max(2, min(bins, min(n_reference, n_current) // 10))
    return round((bins - 1) * (1 / n_reference + 1 / n_current), 6)


def ks_statistic(reference: Sequence[float], current: Sequence[float]) -> float | None:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a = np.sort(np.asarray(reference, dtype=np.float64))
    b = np.sort(np.asarray(current, dtype=np.float64))
    if not a.size or not b.size:
        return None
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / a.size
    cdf_b = np.searchsorted(b, grid, side="right") / b.size
    return round(float(np.max(np.abs(cdf_a - cdf_b))), 6)


def embedding_drift(reference: np.ndarray, current: np.ndarray, novelty_quantile: float = 0.05) -> dict[str, Any]:
    """How far recent query embeddings sit from the reference ones (both [n, dim], L2-normalised).

    ``centroid_similarity``: cosine of the two mean vectors. ``novel_rate``: share of recent
    queries whose nearest reference query is less similar than the ``novelty_quantile`` of the
    reference's own leave-one-out nearest-neighbour similarities (≈ that quantile when nothing
    moved; it grows as queries arrive on topics the reference never covered).
    """
    ref = np.asarray(reference, dtype=np.float32)
    cur = np.asarray(current, dtype=np.float32)
    if ref.shape[0] < 2 or cur.shape[0] < 1 or ref.shape[1] != cur.shape[1]:
        raise SchemaError(f"cannot compare query embeddings of shapes {ref.shape} and {cur.shape} "
                          "(a different model, or fewer than 2 reference queries)")
    c_ref, c_cur = ref.mean(axis=0), cur.mean(axis=0)
    cos = float(c_ref @ c_cur / max(float(np.linalg.norm(c_ref) * np.linalg.norm(c_cur)), 1e-12))
    sims_ref = ref @ ref.T  # [n_ref, n_ref]
    np.fill_diagonal(sims_ref, -np.inf)
    loo = sims_ref.max(axis=1)  # [n_ref] leave-one-out nearest-neighbour similarity
    nn_cur = (cur @ ref.T).max(axis=1)  # [n_cur]
    cutoff = float(np.quantile(loo, novelty_quantile))
    return {"centroid_similarity": round(cos, 6), "novelty_cutoff": round(cutoff, 6),
            "novel_rate": round(float(np.mean(nn_cur < cutoff)), 6), "expected_novel_rate": novelty_quantile,
            "nn_similarity": {"reference": score_distribution(loo.tolist()),
                              "current": score_distribution(nn_cur.tolist())}}


def drift_stats(reference: Mapping[str, Any], ref_embeddings: np.ndarray, current: Mapping[str, Any],
                cur_embeddings: np.ndarray, limits: DriftLimits = DriftLimits()) -> dict[str, Any]:
    """Compare two query profiles (``query_profile`` + ``empty_rate``) and their embeddings."""
    emb = embedding_drift(ref_embeddings, cur_embeddings)
    score: dict[str, Any] = {
             "psi": psi(reference["top1"], current["top1"]), "ks": ks_statistic(reference["top1"], current["top1"]),
             "psi_noise": psi_noise(len(reference["top1"]), len(current["top1"])),
             "reference": score_distribution(reference["top1"]), "current": score_distribution(current["top1"]),
             "topk_mean": {"reference": score_distribution(reference["topk_mean"]),
                           "current": score_distribution(current["topk_mean"])}}
    length: dict[str, Any] = {"psi": psi(reference["lengths"], current["lengths"]),
              "psi_noise": psi_noise(len(reference["lengths"]), len(current["lengths"])),
              "reference": score_distribution(reference["lengths"]), "current": score_distribution(current["lengths"])}
    empty = {"reference": reference.get("empty_rate"), "current": current.get("empty_rate"),
             "delta": _delta(current.get("empty_rate"), reference.get("empty_rate"))}
    alerts = []
    # a PSI alerts when it passes the limit and is clearly more than small-sample noise
    if score["psi"] is not None and score["psi"] > max(limits.max_score_psi, 3 * score["psi_noise"]):
        alerts.append(f"top-1 score distribution shifted (PSI {score['psi']:.3f} > {limits.max_score_psi}; "
                      f"mean {score['reference']['mean']} -> {score['current']['mean']})")
    if length["psi"] is not None and length["psi"] > max(limits.max_length_psi, 3 * length["psi_noise"]):
        alerts.append(f"query length distribution shifted (PSI {length['psi']:.3f} > {limits.max_length_psi})")
    if emb["novel_rate"] > limits.max_novel_rate:
        alerts.append(f"{emb['novel_rate']:.1%} of recent queries are unlike any calibration query "
                      f"(limit {limits.max_novel_rate:.0%}; {emb['expected_novel_rate']:.0%} expected without drift)")
    if empty["delta"] is not None and empty["delta"] > limits.max_empty_rate_increase:
        alerts.append(f"empty-result rate under the threshold rose {empty['reference']} -> {empty['current']}")
    return {"queries": {"reference": len(reference["lengths"]), "current": len(current["lengths"])},
            "embedding": emb, "top1_score": score, "query_length": length, "empty_rate": empty,
            "alerts": alerts, "drifted": bool(alerts)}


def reference_embeddings(store: Store, index: str, record: Mapping[str, Any]) -> np.ndarray:
    """The calibration-time query embeddings a record points at (checked against its sha256)."""
    ref = record["reference"]
    key = join(calibration_prefix(index, record.get("found_on") or record["version_id"]), ref["embeddings"])
    data = store.read_bytes(key)
    if sha256_bytes(data) != ref["embeddings_sha256"]:
        from engine.core.errors import IntegrityError

        raise IntegrityError(f"{store.describe(key)} does not match its calibration record (sha256)")
    return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)


def run_drift(store: Store, index: str, queries: Sequence[str], *, alias: str = "live", version: str | None = None,
              limits: DriftLimits = DriftLimits(), loader: Loader | None = None,
              query_encoder: QueryEncoder | None = None) -> dict[str, Any]:
    """Recent queries against the version the alias serves (blue during a rollout), compared
    with the queries and scores its calibration saw."""
    if len(queries) < 2:
        raise SchemaError("drift needs at least 2 recent queries")
    if version is None:
        from engine.publish.aliases import read_alias

        state = read_alias(store, index, alias)
        assert state is not None
        version = state.version
    rec = load_calibration(store, index, version)
    if rec is None:
        raise NotFoundError(f"drift compares with calibration time, but {index}/{version} was never calibrated; run "
                            f"`embedctl calibrate --index {index} --version {version} --pairs PAIRS` first")
    manifest = version_manifest(store, index, version)
    model_changes = [r for r in calibration_differences(rec, manifest) if r.startswith("model changed")]
    if model_changes:
        raise ConfigError(f"{index}/{version} has no calibration of its own model (the newest is from "
                          f"{rec.get('version_id')}: {model_changes[0]}); queries embedded by two models cannot be "
                          f"compared: run `embedctl calibrate --index {index} --version {version} --pairs PAIRS` first")
    searcher = (loader or default_loader)(store, index, version)
    try:
        ref_meta = rec["reference"]
        k = int(ref_meta.get("k", 10))
        unique = list(dict.fromkeys(queries))
        vecs, results = encode_and_search(searcher, unique, max(k, 1), query_encoder)
        query_top = {q: [s for _, s in doc_ranking(r)] for q, r in zip(unique, results)}
        profile = query_profile(query_top, k)
        th = Thresholds.from_calibration(rec)
        profile["empty_rate"] = _empty_rate([s[0] if s else None for s in query_top.values()], th)
        cur_emb = vecs if vecs is not None else np.asarray(query_encoder_for(searcher, manifest)(unique), np.float32)
    finally:
        close = getattr(searcher, "close", None)
        if callable(close):
            close()
    reference = {**ref_meta, "empty_rate": (rec.get("empty_rate") or {}).get(rec.get("rule", "absolute"))}
    stats = drift_stats(reference, reference_embeddings(store, index, rec), profile, cur_emb, limits)
    status = calibration_status(store, index, version)
    return {"format": DRIFT_FORMAT, "kind": "drift", "index": index, "alias": alias, "version": version,
            "created_at": _now_iso(), "calibration_id": rec.get("calibration_id"),
            "calibrated_on": rec.get("version_id"), "calibration_fits": not status["needs_recalibration"],
            "limits": asdict(limits), **stats}


def drift_prometheus(report: Mapping[str, Any]) -> str:
    lab = {"index": report["index"], "alias": report.get("alias") or "", "version": report["version"]}
    return prometheus_text([
        ("embedctl_drift_score_psi", "PSI of the top-1 score distribution vs calibration time.", lab,
         report["top1_score"]["psi"]),
        ("embedctl_drift_score_ks", "KS statistic of the top-1 score distribution vs calibration time.", lab,
         report["top1_score"]["ks"]),
        ("embedctl_drift_length_psi", "PSI of the query length distribution vs calibration time.", lab,
         report["query_length"]["psi"]),
        ("embedctl_drift_novel_rate", "Share of recent queries unlike any calibration query.", lab,
         report["embedding"]["novel_rate"]),
        ("embedctl_drift_centroid_similarity", "Cosine of recent vs calibration query centroids.", lab,
         report["embedding"]["centroid_similarity"]),
        ("embedctl_drift_empty_rate", "Empty-result rate of recent queries under the stored threshold.", lab,
         report["empty_rate"]["current"]),
        ("embedctl_drift_alerting", "1 if any drift limit is exceeded, else 0.", lab, float(report["drifted"])),
    ])


def drift_gate(report: Mapping[str, Any]) -> None:
    if report["drifted"]:
        raise GateError(f"drift on {report['index']}/{report['alias']} ({report['version']}): "
                        + "; ".join(report["alerts"]))
