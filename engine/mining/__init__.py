"""Hard-negative mining: candidates per strategy, positive-aware margin rules, exclusions, sampling, curriculum.

The flow for one query (``NegativeMiner.mine_batch`` runs it for a batch, inside a Ray actor
or in-process):

```
candidates (ranked)       embedding: exact search over the run's vectors, or the ANN index
                          bm25: BM25 (bm25s, as the index) over the chunk texts; random: seeded uniform draws
  -> dedupe texts         one candidate per content hash (sentence-transformers dedupes its corpus)
  -> window               the first range_max + max_positives (the same window sentence-transformers searches)
  -> exclude positives    every known positive of the query (all its chunks), and any candidate
                          whose normalised text equals a positive's text
  -> margin rules         absolute_margin, relative_margin (against the query's lowest positive
                          score, as NV-Retriever / sentence-transformers), max_score, min_score
  -> rank range           survivors [range_min, range_max) (bm25 and embedding; random has no rank)
  -> sampling             top or random
  -> cross-encoder        a chosen negative the cross-encoder scores above ce_max_score is dropped
                          (a likely false negative) and replaced by the next candidate
```

Rank semantics follow ``sentence_transformers.util.mine_hard_negatives`` exactly: the
range counts candidates that survived the exclusions and margin rules, so ``range_min=10``
skips the ten most similar *valid* candidates. Every removal is counted in the summary.

Memory: a worker holds the corpus (vectors as memory-mapped ``.npy``, texts and ids as a
memory-mapped Arrow file, five uint64 keys a row) and one query batch; nothing grows with
the number of queries. Results go to one Parquet part per batch, and the summary keeps
fixed-size score histograms, never the scores themselves.

Modules: ``config`` (rules, runtime, job config), ``pairs`` (reading and grouping pairs),
``corpus`` (the source run, memory-mapped), ``rules`` (exclusions, margins, rank range),
``stats`` (histograms, batch counters), ``miner`` (candidates per strategy, selection,
cross-encoder, output rows), ``job`` (batches, staging, resume, finalize, summary).
The Ray driver is ``jobs/mine_negatives.py``.
"""

from __future__ import annotations

from engine.mining.config import RULES, SOURCES, MiningConfig, MiningJobConfig, MiningRuntime, parse_mix, quotas
from engine.mining.corpus import (
    MinedCorpus,
    MiningSource,
    materialize_part,
    norm_key,
    norm_text,
    resolve_source,
    run_chunker,
    stable_u64,
)
from engine.mining.job import (
    BatchRunner,
    Output,
    PreparedMining,
    finalize_mining,
    format_summary,
    prepare_mining,
    run_mining_locally,
)
from engine.mining.miner import (
    Bm25Candidates,
    NegativeMiner,
    bm25_tokens,
    current_rss_bytes,
    load_cross_encoder,
    output_columns,
    output_schema,
    peak_rss_bytes,
)
from engine.mining.pairs import PairSet, QueryGroup, read_pairs, split_uri
from engine.mining.rules import Candidates, PositiveInfo, apply_rules, sample_order
from engine.mining.stats import BatchStats, ScoreHistogram

__all__ = [
    "RULES", "SOURCES", "MiningConfig", "MiningJobConfig", "MiningRuntime", "parse_mix", "quotas",
    "MinedCorpus", "MiningSource", "materialize_part", "norm_key", "norm_text", "resolve_source", "run_chunker",
    "stable_u64", "BatchRunner", "Output", "PreparedMining", "finalize_mining", "format_summary", "prepare_mining",
    "run_mining_locally", "Bm25Candidates", "NegativeMiner", "bm25_tokens", "current_rss_bytes",
    "load_cross_encoder", "output_columns", "output_schema", "peak_rss_bytes", "PairSet", "QueryGroup",
    "read_pairs", "split_uri", "Candidates", "PositiveInfo", "apply_rules", "sample_order", "BatchStats",
    "ScoreHistogram",
]
