"""The one reader of judged queries and relevance judgments (qrels), and the grade-to-gain mappings."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from engine.core.errors import ConfigError, SchemaError
from engine.quality.records import open_text, pick, read_records

log = logging.getLogger(__name__)


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
        qid = str(pick(row, ("query_id", "qid", "_id", "id"), "query id", where))
        text = str(pick(row, ("text", "query"), "query text", where))
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
    with open_text(p) as f:
        first = f.readline()
    tokens = first.split()
    trec = len(tokens) == 4 and all(re.fullmatch(r"-?\w[\w.\-]*", t) for t in tokens) and \
        re.fullmatch(r"-?\d+", tokens[3]) is not None
    rows: list[tuple[str, str, float]] = []
    if trec:
        with open_text(p) as f:
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
            qid = str(pick(row, ("query_id", "qid", "query-id"), "query id", where))
            doc = str(pick(row, ("doc_id", "docid", "corpus-id", "corpus_id"), "doc id", where))
            raw = pick(row, ("grade", "score", "relevance", "rel"), "grade", where)
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
