"""The whole quality loop on Cranfield with the packaged all-MiniLM-L6-v2, on CPU.

benchmark build -> embed (cached) -> build-index (flat, IVF-PQ, a deliberately bad tiny PQ)
-> evaluate on the benchmark -> calibrate thresholds (fitted on the odd query ids, checked on
the even ones) -> canary with a baseline, then a swap to the bad version (must fail) and a
rollback -> drift (held-out Cranfield queries: no alert; Python-docstring queries: alert).

    .venv/bin/python benchmarks/quality_cranfield.py            # ~3 min cold (embedding), ~40 s warm
    .venv/bin/python benchmarks/quality_cranfield.py --json     # the figures as one JSON object

Everything it writes lives under build/quality_cranfield/ (gitignored): the Parquet copy of
the corpus, the store (embed run = the embedding cache, index versions, calibrations with
their PNG), the benchmark, the pairs, and results.json. Reads ../shared/data/cranfield.

Calibration pairs (documented choice): for each judged query, positives are the docs judged
grade 1-3 (complete answer, high relevance, useful background), wherever the index ranks them
(outside the top 100 they count as misses no threshold can recover); negatives are the docs
judged non-relevant (-1) plus every unjudged doc in the query's top 20 of the flat version
(pooled judgments: unjudged = non-relevant). That pool is what search actually returns, so
the threshold learns to cut what users would see. Grade 4 ("minimum interest") is left out
of the pairs: neither keeping nor dropping such a doc is wrong. Evaluation (nDCG, recall)
counts grades 1-4 as relevant, gain 5 - grade.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from engine.core.errors import GateError  # noqa: E402
from engine.core.storage import open_store  # noqa: E402
from engine.quality.benchmark import build_benchmark, evaluate_benchmark, run_doc_ids, save_benchmark  # noqa: E402
from engine.quality.calibration import CalibrationConfig, calibrate  # noqa: E402
from engine.quality.calibration_store import calibration_prefix, calibration_status  # noqa: E402
from engine.quality.canary import Canary, canary_gate, canary_prometheus, run_canary  # noqa: E402
from engine.quality.drift import run_drift  # noqa: E402
from engine.quality.judgments import parse_gain_map, read_qrels, read_queries  # noqa: E402
from engine.quality.pairs import evaluate_thresholds, make_pairs, score_pairs, write_pairs  # noqa: E402
from engine.quality.thresholds import Thresholds  # noqa: E402

CRANFIELD = REPO.parent / "shared" / "data" / "cranfield"
INDEX = "cranfield"
# name -> build settings: the exact reference, a realistic IVF-PQ without rescoring (its scores
# are approximate: calibration sees that), and a deliberately bad one for the canary.
BUILDS: dict[str, dict[str, Any]] = {
    "flat": {"kind": "flat", "rescore": "none"},
    "ivfpq": {"kind": "ivfpq", "factory": "IVF32,PQ32x4fs", "rescore": "none", "nprobe": 8},
    "tiny-pq": {"kind": "ivfpq", "factory": "IVF16,PQ4x4fs", "rescore": "none", "nprobe": 2},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def corpus_parquet(work: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = work / "corpus"
    if not (out / "part-000.parquet").exists():
        rows = [json.loads(line) for line in (CRANFIELD / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), out / "part-000.parquet")
    return out


def embed(work: Path) -> dict[str, Any]:
    """The embed run with the packaged model (default chunking, title prefix). Rerunning the
    same config resumes the same run id, so a finished run costs only a check."""
    from engine.embed.config import EmbedJobConfig
    from engine.embed.pipeline import run_locally

    cfg = EmbedJobConfig.from_flat({"corpus": str(corpus_parquet(work)), "store": str(work / "store"),
                                    "progress": False})
    t = time.perf_counter()
    manifest = run_locally(cfg)
    log(f"embed run {manifest['run_id']}: {manifest['counts']} in {time.perf_counter() - t:.1f}s")
    return manifest


def build_versions(store: Any, run_id: str) -> dict[str, str]:
    from engine.index.build import build_index
    from engine.index.params import BuildConfig

    out = {}
    parent = None
    for name, settings in BUILDS.items():
        res = build_index(store, run_id, INDEX, BuildConfig(gate_recall=None, **settings), parent_version=parent)
        out[name] = res.version_id
        parent = parent or res.version_id
        log(f"version {name}: {res.version_id} ({res.manifest['params']['factory']}"
            f"{', reused' if res.reused else ''})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(REPO / "build" / "quality_cranfield"))
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    ap.add_argument("--pool", type=int, default=20, help="unjudged docs of each query's top N are negatives")
    args = ap.parse_args()
    if not (CRANFIELD / "corpus.jsonl").exists():
        sys.exit(f"Cranfield not found at {CRANFIELD} (it lives in ../shared/data)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    store = open_store(str(work / "store"))
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs", "model": "all-MiniLM-L6-v2 (packaged)"}

    # 1. embed (cached), benchmark against the run's documents
    t = time.perf_counter()
    run = embed(work)
    t_embed = time.perf_counter() - t
    ids, _ = run_doc_ids(store, run["run_id"])
    qrels = read_qrels(CRANFIELD / "qrels.tsv", parse_gain_map("cranfield"))
    unknown = sum(1 for docs in qrels.values() for d in docs if d not in ids)
    bench = build_benchmark(read_queries(CRANFIELD / "queries.jsonl"), qrels, corpus_ids=ids,
                              corpus_source={"run": run["run_id"]}, name="cranfield", drop_unknown=True,
                              grades={"scheme": "cranfield", "gain_map": {"1": 4, "2": 3, "3": 2, "4": 1, "-1": 0},
                                      "relevant_min_gain": 1})
    save_benchmark(bench, work / "cranfield.benchmark.json")
    results["benchmark"] = {"id": bench.benchmark_id, "rejected_docs": run["counts"]["rejected"],
                            "judgments_on_rejected_docs_dropped": unknown, **{k: bench.summary[k] for k in (
                                "queries", "judgments", "relevant_judgments", "corpus_coverage")},
                            "judged_per_query_mean": bench.summary["judged_docs_per_query"]["mean"]}
    log(f"benchmark {bench.benchmark_id}: {bench.summary['queries']} queries, {bench.summary['judgments']} judgments "
        f"({unknown} on docs the embed job rejected, dropped)")

    # 2. index versions; one encoder shared by every searcher
    versions = build_versions(store, run["run_id"])
    from engine.embed.encoders import encoder_from_identity
    from engine.index.searcher import Searcher

    encoder = encoder_from_identity(run["model"])
    # Every step embeds the same Cranfield queries: embed each text once (a benchmark-only cache;
    # the Searcher calls encoder.encode_queries, which this instance attribute shadows).
    seen: dict[str, Any] = {}
    encode = encoder.encode_queries

    def cached(texts: list[str]) -> Any:
        import numpy as np

        todo = [t for t in dict.fromkeys(texts) if t not in seen]
        if todo:
            seen.update(zip(todo, encode(todo), strict=True))
        return np.stack([seen[t] for t in texts]) if texts else encode([])

    encoder.encode_queries = cached  # type: ignore[method-assign]

    def loader(st: Any, index: str, version: str) -> Searcher:
        return Searcher.load(st, index, version, verify=True, encoder=encoder)

    # 3. evaluate every version on the benchmark
    results["evaluate"] = {}
    for name, vid in versions.items():
        t = time.perf_counter()
        with loader(store, INDEX, vid) as s:
            ev = evaluate_benchmark(s, bench, ks=(10, 100), store=store)
        results["evaluate"][name] = {"version": vid, **{k: round(ev["index"][k], 4) for k in
                                                         ("ndcg@10", "recall@100", "mrr@10")},
                                     "exact_ndcg@10": round(ev["exact"]["ndcg@10"], 4), "queries": ev["evaluated"],
                                     "seconds": round(time.perf_counter() - t, 1)}
        log(f"evaluate {name}: {results['evaluate'][name]}")

    # 4. pairs (odd query ids calibrate, even ones check), calibration per version
    calib_q = {q["query_id"] for q in bench.queries if int(q["query_id"]) % 2 == 1}
    with loader(store, INDEX, versions["flat"]) as s:
        pairs = make_pairs(bench, searcher=s, depth=args.pool, unjudged_per_query=args.pool, seed=0, min_gain=2)
    text_of = {q["text"]: q["query_id"] for q in bench.queries}
    fit = [p for p in pairs if text_of[p.query] in calib_q]
    held = [p for p in pairs if text_of[p.query] not in calib_q]
    write_pairs(fit, work / "pairs.calibration.jsonl")
    write_pairs(held, work / "pairs.heldout.jsonl")
    results["pairs"] = {"calibration": {"n": len(fit), "relevant": sum(p.relevant for p in fit)},
                        "heldout": {"n": len(held), "relevant": sum(p.relevant for p in held)}}
    results["calibrate"] = {}
    for name in ("flat", "ivfpq"):
        vid = versions[name]
        t = time.perf_counter()
        rec = calibrate(store, INDEX, vid, fit, CalibrationConfig(beta=1.0, depth=100), loader=loader,
                          pairs_source=str(work / "pairs.calibration.jsonl"))
        th = Thresholds.from_calibration(rec)
        rel = Thresholds.from_calibration(rec, rule="relative")
        with loader(store, INDEX, vid) as s:
            sp = score_pairs(s, held, depth=100)
        a = rec["absolute"]
        png = store.read_bytes(f"{calibration_prefix(INDEX, vid)}/{rec['plot']}")
        (work / f"pr_{name}.png").write_bytes(png)
        results["calibrate"][name] = {
            "version": vid, "calibration_id": rec["calibration_id"], "threshold": round(a["threshold"], 4),
            "f1": round(a["f_beta"], 4), "precision": round(a["precision"], 4), "recall": round(a["recall"], 4),
            "heldout": evaluate_thresholds(sp, th), "relative_delta": round(rec["relative"]["delta"], 4),
            "relative_f1": rec["relative"]["f_beta"], "relative_heldout": evaluate_thresholds(sp, rel),
            "floor": round(rec["floor"]["score"], 4), "average_precision": rec["average_precision"],
            "relevant_not_retrieved": rec["pairs"]["relevant_not_retrieved"], "plot": str(work / f"pr_{name}.png"),
            "seconds": round(time.perf_counter() - t, 1)}
        log(f"calibrate {name}: {results['calibrate'][name]}")
    results["status"] = {name: {k: v for k, v in calibration_status(store, INDEX, vid).items()
                                if k in ("calibrated_on", "needs_recalibration", "reasons")}
                         for name, vid in versions.items()}

    # 5. canary: even (held-out) queries and their grade 1-2 docs, baseline on flat, then the swap
    from engine.publish.aliases import publish_version, rollback_alias

    canaries = [Canary(q["text"], tuple(sorted(d for d, g in bench.qrels[q["query_id"]].items() if g >= 3)),
                         q["query_id"]) for q in bench.queries if q["query_id"] not in calib_q
                and any(g >= 3 for g in bench.qrels.get(q["query_id"], {}).values())]
    publish_version(store, INDEX, versions["flat"], "live", reason="quality_cranfield: baseline")
    base = run_canary(store, INDEX, canaries, k=10, loader=loader)
    publish_version(store, INDEX, versions["tiny-pq"], "live", reason="quality_cranfield: deliberately worse")
    swapped = run_canary(store, INDEX, canaries, k=10, baseline=base, loader=loader)
    try:
        canary_gate(swapped)
        gate = "passed (unexpected)"
    except GateError as err:
        gate = f"exit {err.exit_code}: {err}"
    rollback_alias(store, INDEX, "live", reason="quality_cranfield: canary failed")
    (work / "canary.prom").write_text(canary_prometheus(swapped))
    pick = ("recall@10", "mrr@10", "empty_rate")
    results["canary"] = {
        "canaries": len(canaries),
        "baseline": {k: base["versions"][0]["stats"][k] for k in pick} | {
            "top1_mean": base["versions"][0]["stats"]["top1_scores"]["mean"]},
        "after_swap": {k: swapped["versions"][0]["stats"][k] for k in pick} | {
            "top1_mean": swapped["versions"][0]["stats"]["top1_scores"]["mean"]},
        "failures": swapped["versions"][0]["failures"], "gate": gate}
    log(f"canary: {results['canary']}")

    # 6. drift: held-out Cranfield queries vs Python docstring first lines
    from engine.embed.stdlib_corpus import stdlib_docs

    recent = [q["text"] for q in bench.queries if q["query_id"] not in calib_q]
    off = [d["text"].split(".")[0][:200] for d in stdlib_docs(limit=120)]
    results["drift"] = {}
    for label, qs in (("heldout_cranfield", recent), ("python_docstrings", off)):
        rep = run_drift(store, INDEX, qs, loader=loader)
        results["drift"][label] = {"queries": len(qs), "drifted": rep["drifted"],
                                   "novel_rate": rep["embedding"]["novel_rate"],
                                   "centroid_similarity": rep["embedding"]["centroid_similarity"],
                                   "top1_psi": rep["top1_score"]["psi"], "top1_ks": rep["top1_score"]["ks"],
                                   "top1_mean": rep["top1_score"]["current"]["mean"],
                                   "empty_rate": rep["empty_rate"]["current"], "alerts": rep["alerts"]}
        log(f"drift {label}: {results['drift'][label]}")
    results["seconds"] = round(time.perf_counter() - t_all, 1)
    results["embed_seconds"] = round(t_embed, 1)
    (work / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    if args.json:
        print(json.dumps(results, sort_keys=True))
        return
    print(markdown(results))


def markdown(r: dict[str, Any]) -> str:
    ev, cal, can, dr = r["evaluate"], r["calibrate"], r["canary"], r["drift"]
    lines = ["| version | nDCG@10 | recall@100 | MRR@10 | calibrated threshold | F1 (fit) | F1 (held-out) |",
             "|---|---|---|---|---|---|---|"]
    for name, e in ev.items():
        c = cal.get(name)
        th = f"{c['threshold']:.3f}" if c else "-"
        f1 = f"{c['f1']:.3f}" if c else "-"
        f1h = f"{c['heldout']['f_beta']:.3f}" if c else "-"
        lines.append(f"| {name} ({BUILDS[name].get('factory', 'Flat')}) | {e['ndcg@10']:.3f} | {e['recall@100']:.3f} | "
                     f"{e['mrr@10']:.3f} | {th} | {f1} | {f1h} |")
    b, a = can["baseline"], can["after_swap"]
    lines += ["", f"canary ({can['canaries']} held-out queries, k=10): recall@10 {b['recall@10']:.3f} -> "
              f"{a['recall@10']:.3f}, MRR@10 {b['mrr@10']:.3f} -> {a['mrr@10']:.3f} after the swap to tiny-pq: "
              f"{can['gate']}"]
    for label, d in dr.items():
        lines.append(f"drift {label}: {'ALERT' if d['drifted'] else 'ok'} (novel {d['novel_rate']:.0%}, "
                     f"top-1 PSI {d['top1_psi']}, mean top-1 {d['top1_mean']})")
    lines.append(f"\ntotal {r['seconds']} s on {r['machine']} (embedding {r['embed_seconds']} s of it)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
