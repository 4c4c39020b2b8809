"""Which generated queries become pairs: empty, too long, duplicate and (optionally) round-trip-inconsistent ones go."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.generate.config import FilterConfig

log = logging.getLogger(__name__)

DROP_REASONS = ("empty", "too_long", "duplicate", "copies_passage", "inconsistent")


@dataclass
class Candidate:
    """One generated query for one chunk, before filtering."""

    query: str
    query_index: int
    chunk: Any  # ChunkItem
    answer: dict[str, Any]  # the cached answer it came from


def clean_query(text: str) -> str:
    return " ".join(str(text or "").split())


def text_filter(cands: list[Candidate], cfg: FilterConfig) -> tuple[list[Candidate], dict[str, int]]:
    """Drop empty, too-long, passage-copying and duplicate queries (a duplicate keeps its first occurrence,
    whatever chunk asked for it: one query with two different positives would teach both as answers)."""
    from engine.mining import norm_text

    dropped = dict.fromkeys(DROP_REASONS, 0)
    seen: set[str] = set()
    kept = []
    for c in cands:
        q = clean_query(c.query)
        c.query = q
        if len(q) < cfg.min_query_chars:
            dropped["empty"] += 1
            continue
        if len(q) > cfg.max_query_chars or len(q.split()) > cfg.max_query_words:
            dropped["too_long"] += 1
            continue
        key = norm_text(q)
        if len(key) > 40 and key in norm_text(c.chunk.passage):
            dropped["copies_passage"] += 1  # a copied sentence teaches lexical overlap, not retrieval
            continue
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        kept.append(c)
    return kept, dropped


def consistency_filter(cands: list[Candidate], source: Any, k: int, cache_dir: str | None = None,
                       batch: int = 256) -> tuple[list[Candidate], dict[str, Any]]:
    """Keep a pair only when its chunk is in the run model's exact top-k for the query (round-trip
    consistency, as in Promptagator / InPars): a query the current model cannot tie back to its
    chunk is often off-topic or answerable by many chunks."""
    from engine.embed.encoders import encoder_from_identity
    from engine.mining import MinedCorpus

    if not cands:
        return cands, {"k": k, "checked": 0, "dropped": 0}
    corpus = MinedCorpus.open(source, cache_dir)
    encoder = encoder_from_identity(source.model)
    targets = corpus.rows_for_chunk_ids([c.chunk.chunk_id for c in cands])  # [n] row of each pair's chunk
    keep = np.zeros(len(cands), dtype=bool)
    ranks: list[int] = []
    for start in range(0, len(cands), batch):
        part = cands[start:start + batch]
        qvecs = encoder.encode_queries([c.query for c in part])  # [b, dim]
        _scores, rows = corpus.search_exact(np.asarray(qvecs, dtype=np.float32), k)  # [b, k]
        for i in range(len(part)):
            hit = np.nonzero(rows[i] == targets[start + i])[0]
            if hit.size:
                keep[start + i] = True
                ranks.append(int(hit[0]) + 1)
    kept = [c for c, ok in zip(cands, keep, strict=True) if ok]
    stats = {"k": k, "checked": len(cands), "dropped": len(cands) - len(kept),
             "mean_rank_of_kept": round(float(np.mean(ranks)), 3) if ranks else None}
    log.info("round-trip consistency at k=%d kept %d of %d pairs", k, len(kept), len(cands))
    return kept, stats
