"""The one reader of judged queries and relevance judgments (qrels), and the grade-to-gain mappings.

Every part of the engine that reads queries or judgments (``evaluate``, ``benchmark build``,
migrate's baseline, finetune's evaluation, the benchmarks) goes through ``read_queries`` and
``read_judgments`` here, so a file means the same thing everywhere.

Query files: JSONL/JSON/CSV/TSV/Parquet (optionally gzipped) with ``query_id`` (or ``qid``,
``_id``, ``id``) and ``text`` (or ``query``); other columns are kept (``lang``/``type``).

Judgment files: a delimited text file with a header naming ``query_id``, ``doc_id`` and
``grade`` (tab- or whitespace-separated; other spellings below), a headerless TREC qrels file
(``qid iter docid grade``), or JSONL/JSON/CSV/Parquet with the same columns.

**A document judged twice for one query keeps its highest gain** (after the grade-to-gain
mapping), whatever the order of the lines; identical repeats are silent, conflicting ones are
logged with their count. This is how multi-assessor judgments are usually merged (a document
is as relevant as its most favourable judgment), it never depends on the row order of the
file, and it is what ``embedctl evaluate`` has always done, so no judgments file that worked
stops working.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core.errors import ConfigError, NotFoundError, SchemaError
from engine.quality.records import read_records, read_text

log = logging.getLogger(__name__)

QUERY_ID_COLUMNS = ("query_id", "qid", "_id", "id")
QUERY_TEXT_COLUMNS = ("text", "query")
QRELS_QUERY_COLUMNS = ("query_id", "qid", "query-id")
QRELS_DOC_COLUMNS = ("doc_id", "docid", "corpus-id", "corpus_id")
QRELS_GRADE_COLUMNS = ("grade", "score", "relevance", "rel")
# formats read_records parses by their suffix; any other text file is a delimited qrels table or TREC qrels
RECORD_SUFFIXES = (".parquet", ".json", ".jsonl", ".ndjson", ".csv")


@dataclass(frozen=True)
class Query:
    query_id: str
    text: str


def _first(row: Mapping[str, Any], names: Sequence[str]) -> Any:
    for n in names:
        v = row.get(n)
        if v is not None and v != "":
            return v
    return None


def read_queries(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Queries as ``[{"query_id", "text", ...optional lang, type...}]`` (JSONL/CSV/TSV/Parquet).

    Accepted column names: ``query_id``/``qid``/``_id``/``id`` and ``text``/``query``. Extra
    columns are kept (``lang`` and ``type`` drive the evaluation breakdown). A repeated query
    id is an error (two texts for one id cannot both be right).
    """
    rows = read_records(path)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, row in enumerate(rows, 1):
        where = f"{os.fspath(path)} row {i}"
        qid, text = _first(row, QUERY_ID_COLUMNS), _first(row, QUERY_TEXT_COLUMNS)
        if qid is None or text is None:
            raise SchemaError(f"{where}: a query needs 'query_id' and 'text' (also accepted: qid/_id/id, query); "
                              f"got {sorted(row)}")
        qid = str(qid)
        if qid in seen:
            raise SchemaError(f"{where}: duplicate query id {qid!r}")
        seen.add(qid)
        extra = {k: v for k, v in row.items() if k not in QUERY_ID_COLUMNS + QUERY_TEXT_COLUMNS}
        out.append({"query_id": qid, "text": str(text), **extra})
    if not out:
        raise SchemaError(f"{os.fspath(path)} holds no queries")
    return out


def load_queries(path: str | os.PathLike[str]) -> list[Query]:
    """``read_queries`` as ``Query`` objects (what ``evaluate`` takes); a missing file is a ConfigError."""
    try:
        rows = read_queries(path)
    except NotFoundError:
        raise ConfigError(f"cannot read queries file {os.fspath(path)!r}: it does not exist") from None
    return [Query(q["query_id"], q["text"]) for q in rows]


# ---------------------------------------------------------------------------------------------
# grades -> gains
# ---------------------------------------------------------------------------------------------


def _gain_cranfield(grade: float) -> float:
    return 5.0 - grade if 1 <= grade <= 4 else 0.0


def _gain_linear(grade: float) -> float:
    return float(grade) if grade > 0 else 0.0


def _gain_binary(grade: float) -> float:
    return 1.0 if grade > 0 else 0.0


# `evaluate --gain NAME`: grade -> gain. "cranfield": grade 1 is the best (complete answer) and 4
# the least, -1 judged non-relevant: 5 - grade for 1..4, else 0. "linear": the grade is the gain
# (TREC style: higher = more relevant). "binary": any positive grade is relevant with gain 1.
GAINS: dict[str, Callable[[float], float]] = {"cranfield": _gain_cranfield, "linear": _gain_linear,
                                               "binary": _gain_binary}

# `benchmark build --gains cranfield`: the same scale as a strict map (an unlisted grade is an error)
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


# ---------------------------------------------------------------------------------------------
# judgments
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Judgment:
    """One line of a judgments file: a graded (query, doc) pair and where it was read."""

    query_id: str
    doc_id: str
    grade: float
    where: str  # "file:line" or "file row n", for error messages


def _is_trec_line(tokens: Sequence[str]) -> bool:
    return len(tokens) == 4 and all(re.fullmatch(r"-?\w[\w.\-]*", t) for t in tokens) and \
        re.fullmatch(r"-?\d+", tokens[3]) is not None


def _grade(raw: Any, where: str) -> float:
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise SchemaError(f"{where}: expected a numeric grade ('query_id doc_id grade'), got {raw!r}") from None


def _column(cols: Sequence[str], names: Sequence[str]) -> int | None:
    return next((cols.index(n) for n in names if n in cols), None)


def _text_judgments(p: Path) -> list[Judgment]:
    """A delimited table with a header (tab-separated, or whitespace when the header has no tab),
    or headerless TREC qrels (``qid iter docid grade``)."""
    lines = [(n, ln) for n, ln in enumerate(read_text(p).splitlines(), 1) if ln.strip()]
    if not lines:
        raise SchemaError(f"qrels file {os.fspath(p)!r} is empty: it holds no judgments")
    if _is_trec_line(lines[0][1].split()):
        out = []
        for n, line in lines:
            parts = line.split()
            if len(parts) != 4:
                raise SchemaError(f"{p}:{n}: TREC qrels lines have 4 fields (qid iter docid grade)")
            out.append(Judgment(parts[0], parts[2], _grade(parts[3], f"{p}:{n}"), f"{p}:{n}"))
        return out
    header = lines[0][1]
    split: Callable[[str], list[str]] = (lambda s: s.split("\t")) if "\t" in header else str.split
    cols = [c.strip().lower() for c in split(header)]
    qi, di, gi = (_column(cols, QRELS_QUERY_COLUMNS), _column(cols, QRELS_DOC_COLUMNS),
                  _column(cols, QRELS_GRADE_COLUMNS))
    if qi is None or di is None or gi is None:
        raise SchemaError(f"qrels file {os.fspath(p)!r} needs a header 'query_id doc_id grade' "
                          f"(or TREC lines 'qid iter docid grade'); got {split(header)}")
    out = []
    for n, line in lines[1:]:
        parts = split(line)
        if len(parts) <= max(qi, di, gi):
            raise SchemaError(f"{p}:{n}: expected 'query_id doc_id grade', got {line!r}")
        out.append(Judgment(parts[qi].strip(), parts[di].strip(), _grade(parts[gi].strip(), f"{p}:{n}"), f"{p}:{n}"))
    return out


def _record_judgments(p: Path) -> list[Judgment]:
    out = []
    for i, row in enumerate(read_records(p), 1):
        where = f"{p} row {i}"
        low = {str(k).strip().lower(): v for k, v in row.items()}
        qid, doc = _first(low, QRELS_QUERY_COLUMNS), _first(low, QRELS_DOC_COLUMNS)
        raw = _first(low, QRELS_GRADE_COLUMNS)
        if qid is None or doc is None or raw is None:
            raise SchemaError(f"{where}: a judgment needs 'query_id', 'doc_id' and 'grade'; got {sorted(row)}")
        out.append(Judgment(str(qid), str(doc), _grade(raw, where), where))
    return out


def read_judgments(path: str | os.PathLike[str]) -> list[Judgment]:
    """Every judgment line of a file, in file order (see the module docstring for the formats)."""
    p = Path(path)
    name = p.name[:-3] if p.name.endswith(".gz") else p.name
    judgments = _record_judgments(p) if Path(name).suffix.lower() in RECORD_SUFFIXES else _text_judgments(p)
    if not judgments:
        raise SchemaError(f"{p} holds no judgments")
    return judgments


def merge_judgments(judgments: Iterable[Judgment], to_gain: Callable[[Judgment], float],
                    source: str = "qrels") -> dict[str, dict[str, float]]:
    """``{query_id: {doc_id: gain}}``; a document judged twice keeps its highest gain (module docstring)."""
    out: dict[str, dict[str, float]] = {}
    conflicts: list[str] = []
    for j in judgments:
        gain = to_gain(j)
        docs = out.setdefault(j.query_id, {})
        prev = docs.get(j.doc_id)
        if prev is not None and prev != gain:
            conflicts.append(f"query {j.query_id} doc {j.doc_id}: gains {prev:g} and {gain:g} ({j.where})")
        docs[j.doc_id] = gain if prev is None else max(prev, gain)
    if conflicts:
        log.warning("%s: %d documents judged twice with different grades keep their highest gain (e.g. %s)",
                    source, len(conflicts), conflicts[0])
    return out


def read_qrels(path: str | os.PathLike[str], gains: dict[int, float] | None = None) -> dict[str, dict[str, float]]:
    """Judgments as ``{query_id: {doc_id: gain}}`` with gain >= 0 (0 = judged non-relevant).

    ``gains`` maps raw grades to gains (``parse_gain_map``); a grade it does not name is an
    error. Without it a grade is its own gain, grades <= 0 meaning judged non-relevant.
    """
    judgments = read_judgments(path)

    def to_gain(j: Judgment) -> float:
        if gains is None:
            return max(0.0, j.grade)
        if int(j.grade) != j.grade or int(j.grade) not in gains:
            raise SchemaError(f"{os.fspath(path)}: grade {j.grade:g} (query {j.query_id}, doc {j.doc_id}) is not in "
                              f"the gain map {sorted(gains)}; extend --gains")
        return gains[int(j.grade)]

    return merge_judgments(judgments, to_gain, os.fspath(path))


def load_qrels(path: str | os.PathLike[str], gain: str = "cranfield") -> dict[str, dict[str, float]]:
    """``query_id -> {doc_id: gain}`` through a named mapping (``GAINS``), judged-non-relevant
    (zero-gain) documents dropped: what ``evaluate --gain NAME`` scores with."""
    if gain not in GAINS:
        raise ConfigError(f"gain mapping must be one of {', '.join(GAINS)}, got {gain!r}")
    to_gain = GAINS[gain]
    try:
        judgments = read_judgments(path)
    except NotFoundError:
        raise ConfigError(f"cannot read qrels file {os.fspath(path)!r}: it does not exist") from None
    merged = merge_judgments(judgments, lambda j: to_gain(j.grade), os.fspath(path))
    out = {q: {d: g for d, g in docs.items() if g > 0} for q, docs in merged.items()}
    return {q: docs for q, docs in out.items() if docs}
