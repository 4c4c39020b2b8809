"""Labelled (query, doc, relevant) calibration pairs: reading, writing, drawing them from a benchmark, scoring them through an index."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.errors import ConfigError, SchemaError
from engine.index.hits import doc_scores
from engine.quality.benchmark import Benchmark
from engine.quality.prcurve import point_at
from engine.quality.records import pick, read_records
from engine.quality.scoring import QueryEncoder, encode_and_search, search_all
from engine.quality.thresholds import Thresholds

log = logging.getLogger(__name__)


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
        q = str(pick(row, ("query", "text", "query_text"), "query text", where))
        d = str(pick(row, ("doc_id", "docid", "corpus-id"), "doc id", where))
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


def write_pairs(pairs: Sequence[LabelledPair], path: str | os.PathLike[str]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps({"query": pair.query, "doc_id": pair.doc_id, "relevant": int(pair.relevant)}) + "\n")
    os.replace(tmp, p)


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
        tops = [doc_scores(r) for r in search_all(searcher, [q["text"] for q in queries], depth)]
    pairs: list[LabelledPair] = []
    for q, ranking in zip(queries, tops, strict=True):
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
    ranked = {q: doc_scores(r) for q, r in zip(queries, results, strict=True)}
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
    for i, (s, top) in enumerate(zip(sp.scores, sp.top_scores, strict=True)):
        if not math.isnan(s):
            keep[i] = s >= thresholds.cutoff(float(top))
    return point_at(sp.scores, sp.labels, keep, beta)
