"""Sizing before submitting: count documents, chunk a sample, time the model, extrapolate."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

from engine.embed.chunking import normalize_text
from engine.embed.config import EmbedJobConfig
from engine.embed.corpus import CorpusPlan, plan_corpus, read_unit, validate_unit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Estimate:
    docs: int
    sample_docs: int
    chunks_per_doc: float
    tokens_per_chunk: float
    est_chunks: int
    est_tokens: int
    chunks_per_second_per_worker: float
    throughput_source: str
    workers: int
    est_wall_hours: float
    est_worker_hours: float
    reject_rate: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate(docs: int, sample_docs: int, sample_chunks: int, sample_tokens: int, sample_rejects: int,
             chunks_per_second: float, workers: int, source: str, overhead_seconds: float = 30.0) -> Estimate:
    """Extrapolate a sample to the whole corpus on ``workers`` equal workers (linear in chunks)."""
    accepted = max(1, sample_docs - sample_rejects)
    cpd = sample_chunks / accepted
    tpc = sample_tokens / max(1, sample_chunks)
    reject_rate = sample_rejects / max(1, sample_docs)
    est_chunks = int(round(docs * (1 - reject_rate) * cpd))
    wall_s = est_chunks / max(1e-9, chunks_per_second * workers) + overhead_seconds
    return Estimate(docs, sample_docs, round(cpd, 3), round(tpc, 1), est_chunks, int(est_chunks * tpc),
                    round(chunks_per_second, 2), source, workers, round(wall_s / 3600, 4),
                    round(wall_s * workers / 3600, 4), round(reject_rate, 4))


def plan_job(cfg: EmbedJobConfig, sample_docs: int = 256, workers: int = 1, throughput: float | None = None,
             seed: int = 0) -> Estimate:
    """Chunk a random sample of units' rows and time the encoder on (at most) 256 of its chunks."""
    from engine.embed.pipeline import make_chunker

    store, plan = plan_corpus(cfg.corpus, find_duplicates=False)
    chunker = make_chunker(cfg)
    rng = random.Random(seed)
    units = list(plan.units)
    rng.shuffle(units)
    docs_seen = rejects = 0
    texts: list[str] = []
    tokens = 0
    normalize = normalize_text if cfg.chunk.normalize else (lambda s: s)
    for unit in units:
        if docs_seen >= sample_docs:
            break
        table = read_unit(store, unit).slice(0, sample_docs - docs_seen)
        rows = validate_unit(table, unit, cfg.corpus, CorpusPlan([], [], plan.has_title, plan.metadata_columns),
                             normalize)
        docs_seen += table.num_rows
        rejects += len(rows.rejects)
        for doc_chunks in chunker.chunk_many(rows.texts, rows.titles):
            for ch in doc_chunks:
                texts.append(ch.embed_text)
                tokens += ch.n_tokens
    n_chunks = len(texts)
    source = "given (--throughput)"
    if throughput is None:
        from engine.embed.encoders import load_encoder

        e = cfg.embed
        enc = load_encoder(e.model, device=e.device, dtype=e.dtype, truncate_dim=e.truncate_dim,
                           passage_prompt=e.passage_prompt, batch_tokens=e.batch_tokens, backend=e.backend,
                           quantize=e.quantize)
        timed = texts[:256] or ["warm up"]
        enc.encode_passages(timed[:8])  # warm-up: first call pays one-off costs
        t0 = time.perf_counter()
        enc.encode_passages(timed)
        dt = time.perf_counter() - t0
        throughput = len(timed) / dt if dt > 0 else math.inf
        source = f"measured on this machine ({len(timed)} chunks, {getattr(enc, 'device', 'cpu')})"
    return estimate(plan.total_rows, docs_seen, n_chunks, tokens, rejects, throughput, workers, source)
