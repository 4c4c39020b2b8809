"""The rerank stage on Cranfield: a small cross-encoder trained from the packaged MiniLM on half the judged queries, scored on the other half.

No trained cross-encoder ships offline, so this benchmark makes one: the packaged
all-MiniLM-L6-v2 weights under a fresh one-logit head (sentence-transformers ``CrossEncoder``,
``num_labels=1``), trained on CPU on the judged queries of one half of a seeded hash split
(``engine.index.tuning.split_queries``, share 0.5, seed 0, fold 0: the 112 queries ``tune-fusion``
tunes on; the other 113 are held out). Each step takes 4 training queries and, per query, one
judged document (drawn in proportion to its gain) and 3 hard negatives (unjudged documents of
its hybrid top 30: dense + document BM25, RRF k=60), and a softmax cross-entropy over each group
of 4 logits: a ranking loss. Pairs are cut to 48 tokens, the word embeddings and the first 3
layers stay frozen, the head learns at 3e-3 and the top layers at 2e-4 (warm-up, linear decay
over the planned steps; a wall-clock cap stops it early and says so). The held-out half is then
searched with the product's own stage (``Searcher.search(rerank=folder, rerank_depth=N)``) and
scored with evaluate's metric code: nDCG@10 of dense, hybrid (RRF k=60, untuned) and hybrid +
rerank, plus p50 latency of one-query searches with and without the rerank.

    .venv/bin/python benchmarks/rerank_cranfield.py            # table; --json for one object

Measured 2026-12-04 (2 shared CPUs, other engineers' trainings and test suites running), held-out
113 queries, trained on the other 112:

| run | steps done | loss (chance 1.386) | dense | hybrid RRF-60 | + rerank | rerank cost |
|---|---|---|---|---|---|---|
| 06:15, pointwise BCE, 128 tokens, dense negatives, 240 s cap, chunk BM25 | 12 of 101 | BCE 0.69 -> 0.67 | 0.3501 | 0.3937 | @20 0.2804 | 5.5 s/query (batch), p50 +1.4 s |
| 07:55, this loss, 64 tokens, 2 layers frozen, 2 threads, load 11-47, chunk BM25 | 76 of 150 (840 s cap) | 1.39 -> 1.38 | 0.3501 | 0.3937 | @20 0.2702 | 3.6 s/query, p50 +3.5 s |
| 08:28, 200 steps, 48 tokens, 3 frozen, 1 thread, load 15-25, document BM25 | 200 of 200 in 570 s | 1.39 -> 1.21 | 0.3501 | 0.3927 | @10 **0.3510** | 0.50 s/query, p50 +0.40 s |
| 08:40, the same with 320 steps, load 16 -> 9 | 320 of 320 in 745 s | 1.39 -> 0.91 | 0.3501 | 0.3927 | @10 **0.3585** | 0.26 s/query, p50 +0.23 s |
| 08:56, defaults (450 steps, 900 s cap), load 6-8 | 450 of 450 in 483 s | 1.39 -> 1.18 (last 10; 0.72 at step 380) | 0.3501 | 0.3927 | @10 **0.3608** | 0.46 s/query, p50 +0.42 s |

The reranker learns (the loss falls below chance once a step costs ~3 s instead of ~20 s, and
more steps help: 0.3510 after 200, 0.3585 after 320, 0.3608 after 450) but within ~15 minutes
of CPU over ~100 queries it stays worse than the hybrid list it reorders (-0.032 nDCG@10 at
depth 10, a little above dense). What it would take: far more steps (a cross-encoder
is normally trained on 10^5+ pairs) on a quiet machine or a GPU, e.g. ``--steps 3000
--train-seconds 7200 --freeze-layers 0 --max-length 128``; on this VM it is out of reach.
Two threads on the loaded VM made a step ~7x slower than one (OpenMP threads wait on each
other when the cores are shared), hence ``--threads 1``.

Reuses the embed run of benchmarks/hybrid_cranfield.py (build/hybrid_cranfield/) and its version
with document BM25. Writes the trained model under build/rerank_cranfield/ (gitignored). Reads
../shared/data/cranfield.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.hybrid_cranfield import CRANFIELD, INDEX, K, embed, log  # noqa: E402
from engine.core.storage import open_store  # noqa: E402
from engine.index.build import build_index  # noqa: E402
from engine.index.fusion import FusionConfig  # noqa: E402
from engine.index.hits import best_per_doc  # noqa: E402
from engine.index.params import BuildConfig  # noqa: E402
from engine.index.searcher import Searcher  # noqa: E402
from engine.index.sparse import index_text  # noqa: E402
from engine.index.tuning import split_queries  # noqa: E402
from engine.quality.judgments import load_qrels, load_queries  # noqa: E402
from engine.quality.metrics import ndcg_at_k  # noqa: E402

MAX_GAIN = 4.0  # Cranfield grade 1 -> gain 4 (engine.quality.judgments)


def doc_texts() -> dict[str, str]:
    """doc_id -> title + text, as the sparse shards and the rerank stage read a one-chunk document."""
    out = {}
    with open(CRANFIELD / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            out[str(d["doc_id"])] = index_text(d.get("title"), d.get("text"))
    return out


def training_groups(s: Searcher, train: list[tuple[str, str]], qrels: dict[str, dict[str, float]],
                    docs: dict[str, str], neg_depth: int) -> list[tuple[str, list[tuple[str, float]], list[str]]]:
    """Per training query: (query, [(judged document text, gain)], [hard negative texts]). The negatives are
    the unjudged documents of the query's hybrid top ``neg_depth`` (RRF k=60 over dense + BM25): what a
    first stage actually puts in front of the reranker, so the ones it must learn to push down."""
    results = s.search([t for _, t in train], neg_depth, collapse_docs=True, mode="hybrid", fusion=FusionConfig())
    groups = []
    for (qid, text), hits in zip(train, results, strict=True):
        gains = qrels[qid]
        pos = [(docs[d], g) for d, g in sorted(gains.items()) if g > 0 and d in docs]
        neg = [docs[h.doc_id] for h in hits if h.doc_id not in gains and h.doc_id in docs]
        if pos and neg:
            groups.append((text, pos, neg))
    return groups


def train(groups: list[tuple[str, list[tuple[str, float]], list[str]]], out: Path, *, steps: int,
          queries_per_step: int, group: int, lr: float, head_lr: float, max_length: int, budget_s: float,
          seed: int, freeze_layers: int) -> dict[str, Any]:
    """Fine-tune a one-logit CrossEncoder from the packaged MiniLM and save it.

    Each step takes ``queries_per_step`` training queries; for each, one judged document (drawn in
    proportion to its gain) and ``group - 1`` of its hard negatives, and a softmax cross-entropy over
    the group's logits (the judged one should win): a ranking loss, which is what a reranker is for,
    and 1 positive : group-1 negatives uses each forward pass better than pointwise BCE. The fresh
    head learns at ``head_lr``, the encoder at ``lr``; linear warm-up then decay over ``steps``.
    The word embeddings and the first ``freeze_layers`` transformer layers stay frozen: less
    backward work per step on a CPU, and fewer weights to overfit ~100 queries."""
    import torch
    from sentence_transformers import CrossEncoder

    from engine.embed.encoders import resolve_model_path

    torch.manual_seed(seed)
    rng = random.Random(seed)
    _, folder = resolve_model_path(None)
    ce = CrossEncoder(str(folder), num_labels=1, max_length=max_length, device="cpu", local_files_only=True)
    model, tok = ce.model, ce.tokenizer
    model.train()
    for name, param in model.named_parameters():
        layer = name.split("encoder.layer.")[1].split(".")[0] if "encoder.layer." in name else None
        if "embeddings." in name or (layer is not None and int(layer) < freeze_layers):
            param.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in trainable if n.startswith(("classifier", "bert.pooler"))]
    body = [p for n, p in trainable if not n.startswith(("classifier", "bert.pooler"))]
    opt = torch.optim.AdamW([{"params": body, "lr": lr}, {"params": head, "lr": head_lr}], weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min((i + 1) / warmup, max(0.0, (steps - i) / max(1, steps - warmup))))
    loss_fn = torch.nn.CrossEntropyLoss()
    t0, losses, stopped, step = time.perf_counter(), [], False, 0
    order: list[int] = []
    for step in range(1, steps + 1):
        batch_q, batch_d = [], []
        for _ in range(queries_per_step):
            if not order:
                order = list(range(len(groups)))
                rng.shuffle(order)
            query, pos, neg = groups[order.pop()]
            p = rng.choices([d for d, _ in pos], weights=[g for _, g in pos])[0]
            n = rng.sample(neg, min(group - 1, len(neg)))
            n += [rng.choice(neg) for _ in range(group - 1 - len(n))]  # short lists repeat a negative
            batch_q += [query] * group
            batch_d += [p, *n]
        enc = tok(batch_q, batch_d, truncation=True, max_length=max_length, padding=True,  # longest first: some
                  return_tensors="pt")  # Cranfield queries alone pass 48 tokens
        logits = model(**enc).logits.view(queries_per_step, group)
        loss = loss_fn(logits, torch.zeros(queries_per_step, dtype=torch.long))  # the judged document is column 0
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if step % 10 == 0:
            log(f"step {step}/{steps} loss {statistics.fmean(losses[-10:]):.4f} {time.perf_counter() - t0:.0f}s")
        if time.perf_counter() - t0 > budget_s:
            stopped = True
            break
    model.eval()
    tok.model_max_length = max_length  # the saved folder truncates at the trained length when the stage loads it
    ce.save(str(out))
    chance = math.log(group)
    return {"steps": step, "steps_planned": steps, "stopped_by_budget": stopped,
            "seconds": round(time.perf_counter() - t0, 1), "loss_first_10": round(statistics.fmean(losses[:10]), 4),
            "loss_last_10": round(statistics.fmean(losses[-10:]), 4), "loss_chance": round(chance, 4),
            "trainable_params": sum(p.numel() for _, p in trainable)}


def ndcg(s: Searcher, texts: list[str], gains: list[dict[str, float]], **search: Any) -> tuple[float, float]:
    """(mean nDCG@10 over documents, seconds) of one batched search."""
    t = time.perf_counter()
    results = s.search(texts, K, collapse_docs=True, **search)
    secs = time.perf_counter() - t
    value = statistics.fmean(ndcg_at_k([h.doc_id for h in best_per_doc(hits, K)], g, K)
                             for hits, g in zip(results, gains, strict=True))
    return value, secs


def latency(s: Searcher, texts: list[str], rerank: str, depth: int) -> dict[str, float]:
    """p50 of one-query hybrid searches with and without the rerank, interleaved (same load for both)."""
    rrf60 = FusionConfig()
    for t in texts[:3]:
        s.search([t], K, collapse_docs=True, mode="hybrid", fusion=rrf60, rerank=rerank, rerank_depth=depth)
    plain, reranked = [], []
    for t in texts:
        t0 = time.perf_counter()
        s.search([t], K, collapse_docs=True, mode="hybrid", fusion=rrf60)
        t1 = time.perf_counter()
        s.search([t], K, collapse_docs=True, mode="hybrid", fusion=rrf60, rerank=rerank, rerank_depth=depth)
        t2 = time.perf_counter()
        plain.append((t1 - t0) * 1000)
        reranked.append((t2 - t1) * 1000)
    p, r = statistics.median(plain), statistics.median(reranked)
    return {"hybrid_p50_ms": round(p, 1), "hybrid_rerank_p50_ms": round(r, 1), "rerank_added_p50_ms": round(r - p, 1),
            "queries": len(texts), "rerank_depth": depth}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(REPO / "build" / "hybrid_cranfield"))
    ap.add_argument("--out", default=str(REPO / "build" / "rerank_cranfield"))
    ap.add_argument("--depth", type=int, default=10, help="rerank depth (documents re-scored per query)")
    ap.add_argument("--neg-depth", type=int, default=30,
                    help="hybrid top-N documents whose unjudged ones are the hard negatives")
    ap.add_argument("--steps", type=int, default=450, help="optimizer steps (the schedule's length)")
    ap.add_argument("--queries-per-step", type=int, default=4)
    ap.add_argument("--group", type=int, default=4, help="documents per query per step: 1 judged + group-1 negatives")
    ap.add_argument("--lr", type=float, default=2e-4, help="encoder learning rate")
    ap.add_argument("--head-lr", type=float, default=3e-3, help="learning rate of the fresh one-logit head")
    ap.add_argument("--max-length", type=int, default=48, help="tokens per (query, document) pair, in training and rerank")
    ap.add_argument("--freeze-layers", type=int, default=3, help="first transformer layers kept frozen (of 6)")
    ap.add_argument("--train-seconds", type=float, default=900.0, help="wall-clock cap on training (a safety stop)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: on the loaded 2-core VM two threads made a step 7x slower)")
    ap.add_argument("--latency-queries", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    work, out_dir = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(str(work / "store"))
    load = os.getloadavg()
    run = embed(work)
    res = build_index(store, run["run_id"], INDEX, BuildConfig(kind="flat", sparse="bm25", sparse_granularity="doc",
                                                               gate_recall=None))
    queries = [(q.query_id, q.text) for q in load_queries(CRANFIELD / "queries.jsonl")]
    qrels = load_qrels(CRANFIELD / "qrels.tsv", "cranfield")
    judged = [(q, t) for q, t in queries if qrels.get(q)]
    train_rows, test_rows = split_queries([q for q, _ in judged], 0.5, seed=0, fold=0)
    train_q, test_q = [judged[i] for i in train_rows], [judged[i] for i in test_rows]
    docs = doc_texts()
    model_dir = out_dir / "cross-encoder"
    result: dict[str, Any] = {
        "machine": f"{os.cpu_count()} CPUs, load average {load[0]:.1f} at start", "version": res.version_id,
        "split": {"how": "engine.index.tuning.split_queries share 0.5 seed 0 fold 0 (sha256 of seed:query_id)",
                  "train_queries": len(train_q), "test_queries": len(test_q)},
        "settings": {k: getattr(args, k) for k in ("depth", "neg_depth", "steps", "queries_per_step", "group", "lr",
                                                   "head_lr", "max_length", "freeze_layers", "train_seconds",
                                                   "threads")}}
    with Searcher.load(store, INDEX, res.version_id) as s:
        groups = training_groups(s, train_q, qrels, docs, args.neg_depth)
        npos, nneg = sum(len(g[1]) for g in groups), sum(len(g[2]) for g in groups)
        log(f"{len(groups)} training queries: {npos} judged documents, {nneg} hard negatives")
        result["training"] = {"queries": len(groups), "positives": npos, "hard_negatives": nneg,
                              **train(groups, model_dir, steps=args.steps, queries_per_step=args.queries_per_step,
                                      group=args.group, lr=args.lr, head_lr=args.head_lr, max_length=args.max_length,
                                      budget_s=args.train_seconds, seed=0,
                                      freeze_layers=args.freeze_layers)}
        log(f"trained: {result['training']}")
        texts, gains = [t for _, t in test_q], [qrels[q] for q, _ in test_q]
        rrf60 = FusionConfig()
        scores: dict[str, float] = {}
        scores["dense"], _ = ndcg(s, texts, gains)
        scores["hybrid_rrf60"], _ = ndcg(s, texts, gains, mode="hybrid", fusion=rrf60)
        scores[f"hybrid_rrf60+rerank@{args.depth}"], secs = ndcg(
            s, texts, gains, mode="hybrid", fusion=rrf60, rerank=str(model_dir), rerank_depth=args.depth)
        result["ndcg@10_held_out"] = {k: round(v, 4) for k, v in scores.items()}
        result["rerank_batch"] = {"queries": len(texts), "seconds": round(secs, 1),
                                  "ms_per_query": round(secs * 1000 / len(texts), 1)}
        log(f"nDCG@10 held out: {result['ndcg@10_held_out']}")
        result["latency_batch1"] = latency(s, texts[: args.latency_queries], str(model_dir), args.depth)
    result["load_average_end"] = round(os.getloadavg()[0], 1)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result))
        return
    print(f"Cranfield rerank, {result['split']['test_queries']} held-out queries "
          f"(trained on {result['split']['train_queries']}), {result['machine']}")
    for name, v in result["ndcg@10_held_out"].items():
        print(f"  nDCG@10 {name:32} {v:.4f}")
    lat = result["latency_batch1"]
    print(f"  p50 batch 1: hybrid {lat['hybrid_p50_ms']} ms, hybrid+rerank@{args.depth} {lat['hybrid_rerank_p50_ms']} ms")


if __name__ == "__main__":
    main()
