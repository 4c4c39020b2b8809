"""Engine end to end (Parquet in -> Ray -> Parquet out) vs bare SentenceTransformer.encode, same texts, one run.

    .venv/bin/python benchmarks/bench_embed.py [--limit N] [--out results.json]

Corpus: Cranfield (../shared/data/cranfield, 1,400 abstracts) when present, else the stdlib
docstring demo corpus. The bare baseline encodes exactly the engine's chunk inputs (title
prefix + chunk text) with `encode(batch_size=32)`, the first thing users write.

Reported: docs/s, chunks/s, tokens/s for both, and the engine/bare ratio three ways:
- job: the engine's job wall time with Ray already up (as on a cluster) vs the encode call;
- job+start: including `ray.init` on this machine;
- steady: the embedding actors' summed busy time vs the encode call (pure per-chunk overhead).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CRANFIELD = REPO.parent / "shared" / "data" / "cranfield" / "corpus.jsonl"


def write_corpus(out: Path, limit: int | None, scale: int = 1) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    if CRANFIELD.exists():
        rows = [json.loads(line) for line in CRANFIELD.read_text().splitlines() if line.strip()]
        name = "cranfield"
    else:
        from engine.embed.stdlib_corpus import stdlib_docs

        rows = stdlib_docs(300)
        name = "stdlib-docstrings"
    rows = rows[:limit] if limit else rows
    if scale > 1:  # a bigger corpus of the same kind: copies under new ids, each copy's texts shifted by one word
        base = rows
        rows = list(base)
        for k in range(1, scale):
            rows += [{**r, "doc_id": f"{r['doc_id']}~{k}", "text": " ".join(r["text"].split()[k:] + r["text"].split()[:k])}
                     for r in base]
    for i in range(2):  # two files, so the multi-file path is in the measurement
        part = rows[i::2]
        pq.write_table(pa.Table.from_pylist([{"doc_id": r["doc_id"], "title": r.get("title"), "text": r["text"]}
                                             for r in part]), out / f"part-{i}.parquet", row_group_size=128)
    return f"{name} ({len(rows)} docs{f', {scale} copies' if scale > 1 else ''})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None, help="use only the first N documents")
    ap.add_argument("--scale", type=int, default=1,
                    help="corpus copies (new ids, texts rotated by k words): shows the fixed start-up amortised")
    ap.add_argument("--repeat", type=int, default=1,
                    help="whole runs, each in a fresh process; reports every run and the median ratios (this VM's "
                         "timings drift +-15%% between runs)")
    ap.add_argument("--out", default=None, help="also write the results JSON here")
    args = ap.parse_args()
    if args.repeat > 1:
        return repeat_runs(args)

    import pyarrow.parquet as pq

    from engine.distributed.embed import run_embed_job
    from engine.distributed.runtime import init_ray
    from engine.embed.config import EmbedJobConfig
    from engine.embed.pipeline import embed_inputs, make_chunker

    tmp = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        corpus_name = write_corpus(tmp / "corpus", args.limit, args.scale)
        cfg = EmbedJobConfig.from_flat({"corpus": str(tmp / "corpus"), "store": str(tmp / "store"), "device": "cpu",
                                        "unit_rows": 256})
        t0 = time.perf_counter()
        init_ray(None)
        ray_start = time.perf_counter() - t0
        t1 = time.perf_counter()
        m = run_embed_job(cfg)
        job = time.perf_counter() - t1
        c = m["counts"]

        # the same chunk inputs, for the baseline
        chunker = make_chunker(cfg)
        texts: list[str] = []
        for f in sorted(glob.glob(str(tmp / "store" / "runs" / m["run_id"] / "chunks" / "*.parquet"))):
            texts += embed_inputs(pq.read_table(f), chunker)
        assert len(texts) == c["chunks"]
        import ray

        ray.shutdown()  # the baseline gets the whole machine, as the engine did

        from sentence_transformers import SentenceTransformer

        from engine.embed.encoders import resolve_model_path

        t2 = time.perf_counter()
        model = SentenceTransformer(resolve_model_path(None)[1], device="cpu")
        load = time.perf_counter() - t2
        model.encode(texts[:32], batch_size=32)  # warm-up, as the engine's actor also warms up on its first unit
        t3 = time.perf_counter()
        model.encode(texts, batch_size=32, normalize_embeddings=True)
        bare = time.perf_counter() - t3

        steady = m["timings"]["embed_worker_seconds"]
        res = {
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs ({platform.processor() or 'cpu'}), torch CPU",
            "corpus": corpus_name,
            "docs": c["accepted"], "chunks": c["chunks"], "tokens": c["tokens"],
            "engine": {"ray_start_s": round(ray_start, 2), "job_s": round(job, 2),
                       "embed_actor_busy_s": round(steady, 2),
                       "start_up": m["timings"].get("start_up"),  # seconds after the job's start
                       "docs_per_s": round(c["accepted"] / job, 2), "chunks_per_s": round(c["chunks"] / job, 2),
                       "tokens_per_s": round(c["tokens"] / job, 1)},
            "bare_encode": {"model_load_s": round(load, 2), "encode_s": round(bare, 2),
                            "docs_per_s": round(c["accepted"] / bare, 2), "chunks_per_s": round(c["chunks"] / bare, 2),
                            "tokens_per_s": round(c["tokens"] / bare, 1)},
            "ratio_job": round(bare / job, 3),
            "ratio_job_plus_ray_start": round(bare / (job + ray_start), 3),
            "ratio_steady": round(bare / steady, 3) if steady else None,
        }
        print(json.dumps(res, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def repeat_runs(args: argparse.Namespace) -> None:
    """Run this benchmark ``--repeat`` times in fresh processes (one at a time) and summarise."""
    import statistics
    import subprocess

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            out = Path(tmp) / f"run{i}.json"
            cmd = [sys.executable, __file__, "--out", str(out), "--scale", str(args.scale)]
            cmd += ["--limit", str(args.limit)] if args.limit else []
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            runs.append(json.loads(out.read_text()))
            print(f"run {i + 1}/{args.repeat}: ratio job {runs[-1]['ratio_job']}", file=sys.stderr)
    res = {"machine": runs[0]["machine"], "corpus": runs[0]["corpus"], "chunks": runs[0]["chunks"], "runs": runs}
    for k in ("ratio_job", "ratio_job_plus_ray_start", "ratio_steady"):
        res[f"median_{k}"] = round(statistics.median(r[k] for r in runs), 3)
        res[f"range_{k}"] = [min(r[k] for r in runs), max(r[k] for r in runs)]
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
