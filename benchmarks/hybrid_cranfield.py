"""Hybrid retrieval on Cranfield: dense vs BM25 vs fused (untuned RRF, tuned), nDCG@10, and search latency.

embed (packaged all-MiniLM-L6-v2, cached) -> build-index --kind flat --sparse bm25 -> nDCG@10 of
the same version in every mode, with the metric code `embedctl evaluate` uses (graded Cranfield
gains, documents collapsed to their best chunk) -> fusion tuned on half of the queries (seeded
hash split) and scored on the other half, both ways round (2-fold), so the tuned figure over all
225 queries never scores a query with a fusion tuned on it -> p50 latency of one-query searches,
dense and hybrid interleaved on the same loaded version.

    .venv/bin/python benchmarks/hybrid_cranfield.py            # prints a table; --json for one object

Measured 2026-12-04 (2 shared CPUs, load average 16-18): dense 0.3791, BM25 0.3714, RRF k=60
0.4187, tuned 2-fold 0.4202 (k=30 / k=10 chosen per fold), newest tuned record on all 225
queries 0.4211; p50 batch 1: dense 24.6 ms, hybrid 25.6 ms (1.04x).

Re-measured 2026-12-04 06:21 after z-score weighted fusion joined the tuning grid (load average
15-17): dense 0.3791, BM25 0.3714, RRF k=60 0.4187, tuned 2-fold 0.4200 (fold a: RRF k=30 w=0.5;
fold b: weighted z-score w=0.6), newest record (RRF k=30) on all 225 queries 0.4211 (tuned on
half of them); p50 dense 21.4 ms, hybrid 22.2 ms (1.04x). Goals: untuned >= 0.42 missed by
0.0013, tuned >= 0.43 missed; latency <= 2x met.

Why 0.4187 and not the reference 0.421 (checked on this version's own candidate lists):
- fusion depth is not it: taking 100, 200, 400 or 1000 chunk hits per list before fusion gives
  the same RRF-60 figure (0.4187) to four places;
- BM25 over chunks vs whole documents: bm25s over the 1,398 whole documents (title + text, same
  tokenizer and k1/b) scores 0.3735 alone (reference 0.373) and 0.4201 fused with our dense list;
  a document's BM25 collapsed from its chunks by max (what --docs does) is 0.3714, by sum 0.2634;
  the title indexed once instead of twice (Cranfield's text starts with it) is worse (0.365);
- the rest is the dense side: the reference embeds one vector per document, the product one per
  chunk (1,858 chunks), 0.3791 vs 0.382.
So the gap is chunking (an embed-run choice), not how the product fuses. Fusion tuning has a
ceiling here: the best fusion of tune-fusion's grid chosen on ALL 225 queries (so scored on its
own tuning queries) is RRF k=30 w=0.5 0.4211, z-score weighted w=0.6 0.4208, min-max weighted
w=0.6 0.4194 (weights in 0.05 steps: RRF k=30 w=0.45 0.4212); none reaches 0.43.

Writes under build/hybrid_cranfield/ (gitignored). Reads ../shared/data/cranfield.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from engine.core.storage import open_store  # noqa: E402
from engine.index.build import build_index  # noqa: E402
from engine.index.fusion import FusionConfig  # noqa: E402
from engine.index.hits import best_per_doc  # noqa: E402
from engine.index.params import BuildConfig  # noqa: E402
from engine.index.searcher import Searcher  # noqa: E402
from engine.index.tuning import tune_version  # noqa: E402
from engine.quality.judgments import load_qrels, load_queries  # noqa: E402
from engine.quality.metrics import ndcg_at_k  # noqa: E402

CRANFIELD = REPO.parent / "shared" / "data" / "cranfield"
INDEX = "cranfield-hybrid"
K = 10


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def embed(work: Path) -> dict[str, Any]:
    from benchmarks.quality_cranfield import corpus_parquet
    from engine.embed.config import EmbedJobConfig
    from engine.embed.pipeline import run_locally

    cfg = EmbedJobConfig.from_flat({"corpus": str(corpus_parquet(work)), "store": str(work / "store"),
                                    "progress": False})
    t = time.perf_counter()
    manifest = run_locally(cfg)
    log(f"embed run {manifest['run_id']}: {manifest['counts']} in {time.perf_counter() - t:.1f}s")
    return manifest


def ndcg(searcher: Searcher, texts: list[str], gains: list[dict[str, float]], **search: Any) -> float:
    """Mean nDCG@10 over documents (best chunk per document), as `embedctl evaluate` computes it."""
    results = searcher.search(texts, K, collapse_docs=True, **search)
    return statistics.fmean(ndcg_at_k([h.doc_id for h in best_per_doc(hits, K)], g, K)
                            for hits, g in zip(results, gains, strict=True))


def two_fold_tuned(searcher: Searcher, store: Any, queries: list[tuple[str, str]],
                   qrels: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Tune on one half, score the other, both ways; nDCG@10 of every query under a fusion not tuned on it."""
    a = tune_version(searcher, store, queries, qrels, ndcg_at_k, k=K, share=0.5, seed=0, save=False, fold=0)
    b = tune_version(searcher, store, queries, qrels, ndcg_at_k, k=K, share=0.5, seed=0, save=False, fold=1)
    return {"fold_a": a, "fold_b": b}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(REPO / "build" / "hybrid_cranfield"))
    ap.add_argument("--latency-queries", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not (CRANFIELD / "corpus.jsonl").exists():
        sys.exit(f"Cranfield not found at {CRANFIELD} (it lives in ../shared/data)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = open_store(str(work / "store"))
    load = os.getloadavg()
    run = embed(work)
    t = time.perf_counter()
    res = build_index(store, run["run_id"], INDEX, BuildConfig(kind="flat", sparse="bm25", gate_recall=None))
    log(f"version {res.version_id} ({res.manifest['counts']['vectors']} chunks, BM25 shards"
        f"{', reused' if res.reused else ''}) in {time.perf_counter() - t:.1f}s")
    queries = [(q.query_id, q.text) for q in load_queries(CRANFIELD / "queries.jsonl")]
    qrels = load_qrels(CRANFIELD / "qrels.tsv", "cranfield")
    judged = [(q, t) for q, t in queries if qrels.get(q)]
    texts, gains = [t for _, t in judged], [qrels[q] for q, _ in judged]
    out: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs, load average {load[0]:.1f} at start",
                           "version": res.version_id, "queries": len(judged), "k": K}
    with Searcher.load(store, INDEX, res.version_id) as s:
        rrf60 = FusionConfig()  # untuned: RRF k=60, equal weights
        out["ndcg@10"] = {"dense": ndcg(s, texts, gains), "sparse": ndcg(s, texts, gains, mode="sparse"),
                          "hybrid_rrf60": ndcg(s, texts, gains, mode="hybrid", fusion=rrf60)}
        log(f"nDCG@10 {json.dumps({k: round(v, 4) for k, v in out['ndcg@10'].items()})}")
        # tuned: 2-fold (each half scored with the fusion tuned on the other half)
        half = two_fold_tuned(s, store, judged, qrels)
        a, b = half["fold_a"], half["fold_b"]
        na, nb = a["benchmark"]["held_out"], b["benchmark"]["held_out"]
        out["ndcg@10"]["hybrid_tuned_2fold"] = (a["held_out"]["tuned"] * na + b["held_out"]["tuned"] * nb) / (na + nb)
        out["tuning"] = {"fold_a": {"chosen": a["chosen"], "held_out": a["held_out"], "queries": na},
                         "fold_b": {"chosen": b["chosen"], "held_out": b["held_out"], "queries": nb}}
        # the record searchers use by default: tuned on half, as `embedctl tune-fusion` does
        rec = tune_version(s, store, judged, qrels, ndcg_at_k, k=K, share=0.5, seed=0, label="cranfield")
        out["tuned_record"] = {"key": rec["key"], "chosen": rec["chosen"], "held_out": rec["held_out"]}
    with Searcher.load(store, INDEX, res.version_id) as s:  # loads the new record as its hybrid default
        out["ndcg@10"]["hybrid_tuned_default_all"] = ndcg(s, texts, gains, mode="hybrid")
        out["latency_ms"] = latency(s, texts[: args.latency_queries])
    out["ndcg@10"] = {k: round(v, 4) for k, v in out["ndcg@10"].items()}
    out["load_average_end"] = round(os.getloadavg()[0], 1)
    (work / "results.json").write_text(json.dumps(out, indent=2))
    if args.json:
        print(json.dumps(out))
        return
    print(f"Cranfield, {out['queries']} judged queries, {out['machine']}")
    for name, v in out["ndcg@10"].items():
        print(f"  nDCG@10 {name:28} {v:.4f}")
    lat = out["latency_ms"]
    print(f"  p50 latency, batch 1: dense {lat['dense_p50']:.1f} ms, hybrid {lat['hybrid_p50']:.1f} ms "
          f"({lat['ratio_p50']:.2f}x)")


def latency(s: Searcher, texts: list[str]) -> dict[str, float]:
    """p50 of one-query searches (query encoding included), dense and hybrid interleaved so both see the same load."""
    for t in texts[:5]:  # warm-up: encoder, BM25 pages, thread pools
        s.search([t], K, collapse_docs=True)
        s.search([t], K, collapse_docs=True, mode="hybrid")
    dense, hybrid = [], []
    for t in texts:
        t0 = time.perf_counter()
        s.search([t], K, collapse_docs=True)
        t1 = time.perf_counter()
        s.search([t], K, collapse_docs=True, mode="hybrid")
        t2 = time.perf_counter()
        dense.append((t1 - t0) * 1000)
        hybrid.append((t2 - t1) * 1000)
    d, h = statistics.median(dense), statistics.median(hybrid)
    return {"dense_p50": round(d, 2), "hybrid_p50": round(h, 2), "ratio_p50": round(h / d, 3), "queries": len(texts)}


if __name__ == "__main__":
    main()
