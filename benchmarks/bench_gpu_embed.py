"""Embedding throughput: the engine job end to end vs plain SentenceTransformer.encode, same texts, one run.

    .venv/bin/python benchmarks/bench_gpu_embed.py [--n 20000] [--tokens 200] [--model PATH] [--compile]

Texts come from `benchmarks/textgen.py` (no download): words drawn from Python's own
docstrings, lengths ~ Normal(tokens, tokens/8) in model tokens, clipped to [tokens/2,
max_seq_length-2]. On a CUDA machine it measures:
  - encode fp32, batch 32 (what users write first)
  - encode fp16, batch 256
  - the engine: Parquet in -> Ray Data chunk tasks (tokenize) -> GPU actor(s) -> Parquet out
and prints chunks/s, tokens/s, MFU (dense bf16 peak of the card) and the ratios, plus the
cosine of fp16/bf16 vectors against fp32. Without CUDA it runs the same on CPU (fp16 encode
skipped) and says so.
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

# Dense bf16 peak FLOP/s by card name fragment (vendor datasheets, no sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def flops_per_token(model, seq: int) -> float:
    """~2 x non-embedding params (matmuls) + 4 x layers x seq x hidden (attention scores and values)."""
    auto = model[0].auto_model
    cfg = auto.config
    params = sum(p.numel() for n, p in auto.named_parameters() if "embeddings" not in n)
    return 2.0 * params + 4.0 * cfg.num_hidden_layers * seq * cfg.hidden_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=None, help="texts [20000 on GPU, 1500 on CPU]")
    ap.add_argument("--tokens", type=int, default=200, help="mean text length in model tokens")
    ap.add_argument("--model", default=None, help="model folder (default: the packaged MiniLM)")
    ap.add_argument("--batch-tokens", type=int, default=None, help="engine token budget [262144 GPU, 16384 CPU]")
    ap.add_argument("--workers", default=None,
                    help="engine actors (GPU: per card, fractional GPUs); a list like 1,2,3 runs the engine once per count")
    ap.add_argument("--baseline-n", type=int, default=None,
                    help="texts for the two encode baselines (their first N; steady-state rates) [min(n, 20000)]")
    ap.add_argument("--compile", action="store_true", help="torch.compile in the engine's actors")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from sentence_transformers import SentenceTransformer

    from benchmarks.textgen import generate_texts
    from engine.distributed.embed import run_embed_job
    from engine.distributed.runtime import init_ray
    from engine.embed.config import EmbedJobConfig
    from engine.embed.encoders import resolve_model_path
    from engine.embed.pipeline import model_tokenizer

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    card = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    n = args.n or (20000 if cuda else 1500)
    name, path = resolve_model_path(args.model)
    tok = model_tokenizer(args.model)
    model = SentenceTransformer(path, device=device)
    max_len = int(model.max_seq_length)
    t = time.perf_counter()
    texts = generate_texts(n, args.tokens, tok, max_len)
    print(f"generated {n} texts in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    nb = min(n, args.baseline_n or 20000)
    base_texts = texts[:nb]
    lengths = [c + tok.n_special for c in tok.count_batch(texts)]  # as the model reads them
    total_tokens = int(sum(lengths))
    fpt = flops_per_token(model, int(np.mean(lengths)))
    peak = next((v for k, v in PEAK_BF16.items() if k in card), None)
    base_tokens = int(sum(lengths[:nb]))
    res: dict = {"device": card, "model": name, "texts": n, "baseline_texts": nb,
                 "mean_tokens": round(float(np.mean(lengths)), 1), "torch": torch.__version__,
                 "length_distribution": f"Normal({args.tokens}, {args.tokens // 8}) tokens, clipped",
                 "runs": {}}

    def save() -> None:
        if args.out:  # after every stage, so a run cut short still leaves its figures
            Path(args.out).write_text(json.dumps(res, indent=2))

    def record(label: str, seconds: float, note: str = "", rows: int = n, tokens: int = total_tokens) -> None:
        flops = fpt * tokens / seconds
        res["runs"][label] = {"seconds": round(seconds, 2), "texts": rows, "chunks_per_s": round(rows / seconds, 1),
                              "tokens_per_s": round(tokens / seconds), "mfu": round(flops / peak, 4) if peak else None,
                              "note": note}
        print(f"{label:34s} {rows / seconds:10.1f} chunks/s {tokens / seconds:12.0f} tok/s", file=sys.stderr)
        save()

    if not args.skip_baselines:
        model.encode(texts[:64], batch_size=32)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        ref32 = model.encode(base_texts, batch_size=32, normalize_embeddings=True)
        if cuda:
            torch.cuda.synchronize()
        record("encode_fp32_b32", time.perf_counter() - t, rows=nb, tokens=base_tokens)
        if cuda:
            model.half()
            model.encode(texts[:256], batch_size=256)
            torch.cuda.synchronize()
            t = time.perf_counter()
            ref16 = model.encode(base_texts, batch_size=256, normalize_embeddings=True)
            torch.cuda.synchronize()
            record("encode_fp16_b256", time.perf_counter() - t, rows=nb, tokens=base_tokens)
            res["cosine_fp16_vs_fp32_min"] = float((ref16 * ref32).sum(1).min())
            save()
        else:
            res["runs"]["encode_fp16_b256"] = {"note": "skipped: fp16 needs CUDA"}
    del model
    if cuda:
        torch.cuda.empty_cache()

    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        (tmp / "corpus").mkdir()
        n_files = 16
        per = -(-n // n_files)
        for i in range(n_files):  # several files so the read/chunk tasks spread
            part = texts[i * per:(i + 1) * per]
            pq.write_table(pa.table({"doc_id": [f"t{i}-{j}" for j in range(len(part))], "text": part}),
                           tmp / "corpus" / f"part-{i}.parquet")
        t = time.perf_counter()
        init_ray(None)
        res["ray_init_seconds"] = round(time.perf_counter() - t, 1)
        worker_counts = [int(w) for w in str(args.workers).split(",")] if args.workers else [None]
        order = {f"t{i}-{j}": i * per + j for i in range(n_files) for j in range(per)}
        for workers in worker_counts:
            label = "engine_end_to_end" + (f"_w{workers}" if workers else "")
            cfg = EmbedJobConfig.from_flat({
                "corpus": str(tmp / "corpus"), "store": str(tmp / f"store-{label}"), "model": args.model,
                "device": device, "chunk_tokens": max_len - 2, "chunk_overlap": 0, "normalize": False,
                "unit_rows": 2048 if cuda else 256, "batch_tokens": args.batch_tokens or (262144 if cuda else 16384),
                "compile": args.compile, "workers": workers,
            })
            try:
                t = time.perf_counter()
                m = run_embed_job(cfg)
                job = time.perf_counter() - t
            except Exception as err:  # noqa: BLE001 - one failed configuration must not lose the others
                res["runs"][label] = {"error": f"{type(err).__name__}: {err}"[:2000]}
                print(f"{label}: FAILED {err!r}"[:2000], file=sys.stderr)
                save()
                continue
            assert m["counts"]["chunks"] == n, m["counts"]  # one chunk per text
            record(label, job, f"Parquet->Ray->Parquet, workers={workers or 'default'}, compile={args.compile}; "
                               f"ray.init not included")
            res["runs"][label]["actor_busy_seconds"] = m["timings"]["embed_worker_seconds"]
            res["runs"][label]["chunk_task_seconds"] = m["timings"]["chunk_worker_seconds"]  # summed over tasks
            if not args.skip_baselines:
                files = sorted(glob.glob(str(tmp / f"store-{label}" / "runs" / m["run_id"] / "embeddings" / "*.parquet")))
                vecs = np.zeros_like(ref32)
                for f in files:
                    tab = pq.read_table(f, columns=["doc_id", "embedding"])
                    emb = np.asarray(tab.column("embedding").combine_chunks().flatten()).reshape(tab.num_rows, -1)
                    for d, v in zip(tab.column("doc_id").to_pylist(), emb, strict=True):
                        k = order[d]
                        if k < nb:
                            vecs[k] = v
                res["runs"][label]["cosine_vs_encode_fp32_min"] = float((vecs * ref32).sum(1).min())
                base = res["runs"]["encode_fp32_b32"]["chunks_per_s"]
                res["runs"][label]["ratio_vs_encode_fp32_b32"] = round(res["runs"][label]["chunks_per_s"] / base, 2)
                if "chunks_per_s" in res["runs"].get("encode_fp16_b256", {}):
                    res["runs"][label]["ratio_vs_encode_fp16_b256"] = round(
                        res["runs"][label]["chunks_per_s"] / res["runs"]["encode_fp16_b256"]["chunks_per_s"], 2)
            save()
            shutil.rmtree(tmp / f"store-{label}", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=2))
    save()


if __name__ == "__main__":
    main()
