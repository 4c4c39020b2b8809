"""Index benchmark: binary+rerank, IVF-PQ and flat side by side in one run, on this machine.

1. **binary+rerank on Cranfield** (1,400 abstracts, title + text, one vector each, packaged
   all-MiniLM-L6-v2): nDCG@10 kept against exact search, candidate-index memory against float32,
   and against sentence-transformers' ``semantic_search_faiss(corpus_precision="ubinary",
   rescore=True)`` on the same vectors at the same rescore multipliers;
2. **IVF-PQ on real embeddings**: the Cranfield abstracts plus their sentences (~10.8k MiniLM
   vectors), recall@10 against exact search for the 225 real Cranfield queries, compression,
   build time per 100k vectors; with and without the int8 rerank;
3. **synthetic scaling**: ``--rows`` clustered 384-dim vectors (default 200k; 1M with
   ``--rows 1000000`` takes ~6 min on 2 quiet cores), IVF-PQ shards added by Ray tasks with 1 and
   2 workers, build and query time per shard count;
4. query latency p50/p99 for a batch of 1 and of 256 queries, for every index above.

Query embedding time is excluded from latencies (queries are embedded once, up front); index
loading is excluded too. Embeddings are cached under ``build/bench_index/`` (gitignored).

    .venv/bin/python benchmarks/bench_index.py                      # ~10-20 min on 2 cores, cold
    .venv/bin/python benchmarks/bench_index.py --rows 50000 --out results.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from engine.core.storage import open_store  # noqa: E402
from engine.index.build import build_index  # noqa: E402
from engine.index.faiss_ops import exact_topk  # noqa: E402
from engine.index.params import BuildConfig  # noqa: E402
from engine.index.recall import knn_recall  # noqa: E402
from engine.index.searcher import Searcher  # noqa: E402
from engine.quality.evaluate import EvalConfig, evaluate_searcher  # noqa: E402
from engine.quality.judgments import load_qrels, load_queries  # noqa: E402
from engine.quality.metrics import ndcg_at_k  # noqa: E402
from tests.index_utils import clustered_vectors, make_run  # noqa: E402

CRANFIELD = REPO.parent / "shared" / "data" / "cranfield"
WORK = REPO / "build" / "bench_index"
K = 10


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def cranfield_embeddings(enc: Any) -> dict[str, Any]:
    """Docs (title + text), queries and sentences of Cranfield, embedded once and cached."""
    docs = [json.loads(line) for line in (CRANFIELD / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    queries = [json.loads(line) for line in (CRANFIELD / "queries.jsonl").read_text(encoding="utf-8").splitlines()]
    sents, sent_docs = [], []
    for d in docs:
        for s in d["text"].split(" . "):
            if len(s.split()) >= 3:
                sents.append(s.strip())
                sent_docs.append(d["doc_id"])
    tag = hashlib.sha256((enc.fingerprint + (CRANFIELD / "corpus.jsonl").read_text()
                          + (CRANFIELD / "queries.jsonl").read_text()).encode()).hexdigest()[:16]
    cache = WORK / f"cranfield-{tag}.npz"
    if cache.exists():
        z = np.load(cache)
        log(f"embeddings from cache {cache.name}")
        D, Q, S = z["docs"], z["queries"], z["sents"]
    else:
        t = time.perf_counter()
        D = enc.encode_passages([f"{d['title']} {d['text']}" for d in docs])
        Q = enc.encode_queries([q["text"] for q in queries])
        S = enc.encode_passages(sents)
        log(f"embedded {len(D)} docs, {len(Q)} queries, {len(S)} sentences in {time.perf_counter() - t:.0f}s")
        WORK.mkdir(parents=True, exist_ok=True)
        np.savez(cache, docs=D, queries=Q, sents=S)
    return {"docs": D, "queries": Q, "sents": S, "doc_ids": [d["doc_id"] for d in docs], "sent_docs": sent_docs}


def latency(searcher: Searcher, queries: np.ndarray, *, singles: int = 200, batches: int = 15,
            **knobs: Any) -> dict[str, float]:
    """p50/p99 milliseconds of search_vectors for one query and for a batch of 256."""
    rng = np.random.default_rng(0)
    pool = queries[rng.integers(0, len(queries), 256)] if len(queries) < 256 else queries[:256]
    searcher.search_vectors(pool[:8], K, **knobs)  # warm up (page in the memory maps)
    one = []
    for i in range(singles):
        q = pool[i % len(pool)][None]
        t = time.perf_counter()
        searcher.search_vectors(q, K, **knobs)
        one.append((time.perf_counter() - t) * 1000)
    many = []
    for _ in range(batches):
        t = time.perf_counter()
        searcher.search_vectors(pool, K, **knobs)
        many.append((time.perf_counter() - t) * 1000)
    return {"b1_p50_ms": round(float(np.percentile(one, 50)), 3), "b1_p99_ms": round(float(np.percentile(one, 99)), 3),
            "b256_p50_ms": round(float(np.percentile(many, 50)), 2),
            "b256_p99_ms": round(float(np.percentile(many, 99)), 2)}


def ndcg_mean(rankings: list[list[str]], qids: list[str], qrels: dict[str, dict[str, float]]) -> float:
    vals = [ndcg_at_k(r, qrels[q], K) for r, q in zip(rankings, qids, strict=True) if q in qrels]
    return float(np.mean(vals))


# ---------------------------------------------------------------------------------------------
# 1. binary + rerank on Cranfield, against exact and against sentence-transformers
# ---------------------------------------------------------------------------------------------


def bench_binary(store: Any, emb: dict[str, Any], enc: Any) -> dict[str, Any]:
    from sentence_transformers.util.quantization import quantize_embeddings, semantic_search_faiss

    D, Q, ids = emb["docs"], emb["queries"], emb["doc_ids"]
    make_run(store, "cran-docs", D, parts=2, model=enc.identity, chunk_ids=ids, doc_ids=ids)
    queries = load_queries(CRANFIELD / "queries.jsonl")
    qrels = load_qrels(CRANFIELD / "qrels.tsv")
    qids = [q.query_id for q in queries]
    out: dict[str, Any] = {"docs": len(D), "dim": int(D.shape[1]), "queries": len(Q)}
    versions = {}
    for kind in ("flat", "binary-rerank"):
        res = build_index(store, "cran-docs", f"cran-{kind}", BuildConfig(kind=kind), force=True)
        versions[kind] = res
        log(f"{kind}: built in {res.manifest['timings']['total_s']}s, gate {res.manifest['recall_gate']}")
    ex_scores, ex_rows = exact_topk(Q, D, np.arange(len(D)), 2 * K)
    exact_docs = [[ids[i] for i in row[:K]] for row in ex_rows]
    exact_ndcg = ndcg_mean(exact_docs, qids, qrels)
    with Searcher.load(store, "cran-binary-rerank", versions["binary-rerank"].version_id) as s:
        ev = evaluate_searcher(s, queries, qrels, EvalConfig(k=K), store=store, query_vectors=Q)
        mem = s.memory()
        tuned = s.default_multiplier
        ours = []
        for m in (1, 2, 4, 8, 10, 16):
            _, found = s.search_ids(Q, K, rescore_multiplier=m)
            docs = [[ids[i] for i in row if i >= 0] for row in found]
            ours.append({"rescore_multiplier": m, "recall_vs_exact@10": round(float(knn_recall(
                found, ex_rows, ex_scores, K).mean()), 4), "ndcg@10": round(ndcg_mean(docs, qids, qrels), 4)})
        lat = latency(s, Q)
    st = []
    ub = quantize_embeddings(D, precision="ubinary")
    for m in (1, 2, 4, 8, 10, 16):
        results, _, index = semantic_search_faiss(Q, corpus_embeddings=ub, corpus_precision="ubinary", top_k=K,
                                                  rescore=True, rescore_multiplier=m, output_index=True)
        found = np.array([[h["corpus_id"] for h in r] + [-1] * (K - len(r)) for r in results])
        docs = [[ids[i] for i in row if i >= 0] for row in found]
        st.append({"rescore_multiplier": m, "recall_vs_exact@10": round(float(knn_recall(
            found, ex_rows, ex_scores, K).mean()), 4), "ndcg@10": round(ndcg_mean(docs, qids, qrels), 4)})
    st_bytes = int(index.ntotal) * int(index.code_size)
    f32 = len(D) * D.shape[1] * 4
    out.update({
        "exact_ndcg@10": round(exact_ndcg, 4),
        "binary_rerank": {"tuned_multiplier": tuned, "gate": versions["binary-rerank"].manifest["recall_gate"],
                          "ndcg@10": round(ev["metrics"]["index"]["ndcg@10"], 4),
                          "retained_ndcg@10": round(ev["metrics"]["retained"]["ndcg@10"], 4),
                          "recall_vs_exact@10": round(ev["metrics"]["recall_vs_exact@10"], 4),
                          "mrr@10": round(ev["metrics"]["index"]["mrr@10"], 4),
                          "exact_mrr@10": round(ev["metrics"]["exact"]["mrr@10"], 4),
                          "candidate_index_bytes": mem["index_bytes"], "rescore_bytes_on_disk": mem["rescore_bytes"],
                          "float32_bytes": f32, "compression_vs_float32": round(f32 / mem["index_bytes"], 1),
                          "latency": lat, "sweep": ours},
        "sentence_transformers_ubinary": {"index_bytes": st_bytes, "sweep": st},
    })
    return out


# ---------------------------------------------------------------------------------------------
# 2. IVF-PQ on real embeddings (Cranfield abstracts + sentences)
# ---------------------------------------------------------------------------------------------


def bench_ivfpq_real(store: Any, emb: dict[str, Any], enc: Any) -> dict[str, Any]:
    X = np.vstack([emb["docs"], emb["sents"]]).astype(np.float32)
    doc_ids = list(emb["doc_ids"]) + list(emb["sent_docs"])
    chunk_ids = [f"{d}#0" for d in emb["doc_ids"]] + [f"{d}#s{i}" for i, d in enumerate(emb["sent_docs"])]
    Q = emb["queries"]
    make_run(store, "cran-sents", X, parts=4, model=enc.identity, chunk_ids=chunk_ids, doc_ids=doc_ids)
    ex_scores, ex_rows = exact_topk(Q, X, np.arange(len(X)), 2 * K)
    out: dict[str, Any] = {"vectors": len(X), "dim": int(X.shape[1]), "queries": len(Q)}
    for name, cfg in (("ivfpq_int8_rerank", BuildConfig()), ("ivfpq_pq_only", BuildConfig(rescore="none")),
                      ("flat", BuildConfig(kind="flat"))):
        res = build_index(store, "cran-sents", f"real-{name}", cfg, force=True)
        m = res.manifest
        with Searcher.load(store, f"real-{name}", res.version_id) as s:
            _, found = s.search_ids(Q, K)
            rec = float(knn_recall(found, ex_rows, ex_scores, K).mean())
            mem = s.memory()
            lat = latency(s, Q)
        f32 = len(X) * X.shape[1] * 4
        out[name] = {"factory": m["params"]["factory"], "nlist": m["params"]["nlist"], "nprobe": m["params"]["nprobe"],
                     "rescore": m["params"]["rescore"], "rescore_multiplier": m["params"]["rescore_multiplier"],
                     "recall_vs_exact@10_real_queries": round(rec, 4), "gate_recall_corpus_queries":
                     m["recall_gate"]["recall"], "index_bytes": mem["index_bytes"],
                     "rescore_bytes_on_disk": mem["rescore_bytes"],
                     "compression_vs_float32": round(f32 / mem["index_bytes"], 1),
                     "build_s": m["timings"]["total_s"], "build_s_per_100k": m["timings"]["build_s_per_100k"],
                     "train_s": m["timings"].get("train_s"), "latency": lat}
        log(f"real {name}: {out[name]}")
    return out


# ---------------------------------------------------------------------------------------------
# 3. synthetic scaling on Ray
# ---------------------------------------------------------------------------------------------


def bench_synthetic(work: Path, rows: int, dim: int = 384, repeats: int = 2) -> dict[str, Any]:
    from engine.distributed.build_index import BuildJobConfig, run_build_job
    from engine.distributed.runtime import init_ray

    store_path = work / "synthetic"
    store = open_store(store_path)
    run_id = f"synthetic-{rows}"
    if not store.exists(f"runs/{run_id}/manifest.json"):
        t = time.perf_counter()
        x = clustered_vectors(rows, dim, clusters=max(64, rows // 200), spread=0.5, seed=11)
        make_run(store, run_id, x, parts=8)
        log(f"synthetic run {rows}x{dim} written in {time.perf_counter() - t:.0f}s")
        del x
    queries = clustered_vectors(256, dim, clusters=max(64, rows // 200), spread=0.5, seed=11, sample_seed=5)
    init_ray(num_cpus=2)
    out: dict[str, Any] = {"rows": rows, "dim": dim, "builds": []}
    # Alternating repeats: on a shared machine the load drifts, and 1- vs 2-worker runs should see the same.
    plan = [(1, 1)] + [(4, w) for _ in range(repeats) for w in (1, 2)]
    for shards, workers in plan:
        cfg = BuildJobConfig(store=str(store_path), run=run_id, index=f"syn-s{shards}", build=BuildConfig(
            shards=shards), executor="ray", workers=workers, force=True)
        t = time.perf_counter()
        res = run_build_job(cfg)
        wall = time.perf_counter() - t
        m = res.manifest
        row = {"shards": shards, "workers": workers, "load_average_1m": round(os.getloadavg()[0], 1),
               "factory": m["params"]["factory"], "wall_s": round(wall, 1),
               **{k: m["timings"].get(k) for k in ("sample_s", "train_s", "add_s", "add_task_s", "add_task_cpu_s", "gate_s",
                                                    "build_s_per_100k")},
               "gate_recall": m["recall_gate"]["recall"], "nprobe": m["params"]["nprobe"],
               "rescore_multiplier": m["params"]["rescore_multiplier"]}
        with Searcher.load(store, f"syn-s{shards}", res.version_id) as s:
            row["latency"] = latency(s, queries, singles=100, batches=8)
            row["index_bytes"] = s.memory()["index_bytes"]
        store.delete_prefix(f"indexes/syn-s{shards}/versions/{res.version_id}")  # ~80 MB each: keep build/ small
        out["builds"].append(row)
        log(f"synthetic: {row}")
    for w in (1, 2):
        rows_w = [b for b in out["builds"] if b["shards"] == 4 and b["workers"] == w]
        out[f"median_add_s_4_shards_{w}_workers"] = round(float(np.median([b["add_s"] for b in rows_w])), 2)
        out[f"median_add_task_cpu_s_4_shards_{w}_workers"] = round(float(np.median(
            [b["add_task_cpu_s"] for b in rows_w])), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000, help="synthetic vectors for the scaling runs")
    ap.add_argument("--repeats", type=int, default=2, help="alternating 1-/2-worker runs of the 4-shard build")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: binary,real,synthetic")
    ap.add_argument("--out", default=None, help="also write the results JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not (CRANFIELD / "corpus.jsonl").exists():
        sys.exit(f"Cranfield not found at {CRANFIELD} (it lives in ../shared/data)")
    skip = set(filter(None, args.skip.split(",")))
    WORK.mkdir(parents=True, exist_ok=True)
    from engine.embed.encoders import load_encoder

    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "load_average_start": [round(x, 1) for x in os.getloadavg()]}
    import faiss

    machine["faiss"] = faiss.__version__
    t0 = time.perf_counter()
    enc = load_encoder(None)
    emb = cranfield_embeddings(enc)
    store = open_store(WORK / "store")
    results: dict[str, Any] = {"machine": machine}
    if "binary" not in skip:
        results["binary_rerank_cranfield"] = bench_binary(store, emb, enc)
    if "real" not in skip:
        results["ivfpq_real"] = bench_ivfpq_real(store, emb, enc)
    if "synthetic" not in skip:
        results["synthetic"] = bench_synthetic(WORK, args.rows, repeats=args.repeats)
    machine["load_average_end"] = [round(x, 1) for x in os.getloadavg()]
    results["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(results, indent=2)
    print(text)
    (WORK / "results.json").write_text(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
