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
    ap.add_argument("--workers", type=int, default=None, help="engine actors (GPU: per card, fractional GPUs)")
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
    from engine.config import EmbedJobConfig
    from engine.embedding import resolve_model_path
    from engine.pipeline import model_tokenizer
    from engine.runtime import init_ray
    from jobs.embed import run_embed_job

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    card = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    n = args.n or (20000 if cuda else 1500)
    name, path = resolve_model_path(args.model)
    tok = model_tokenizer(args.model)
    model = SentenceTransformer(path, device=device)
    max_len = int(model.max_seq_length)
    texts = generate_texts(n, args.tokens, tok, max_len)
    lengths = [len(x) for x in tok.ids_batch(texts)]
    total_tokens = int(sum(lengths))
    fpt = flops_per_token(model, int(np.mean(lengths)))
    peak = next((v for k, v in PEAK_BF16.items() if k in card), None)
    res: dict = {"device": card, "model": name, "texts": n, "mean_tokens": round(float(np.mean(lengths)), 1),
                 "length_distribution": f"Normal({args.tokens}, {args.tokens // 8}) tokens, clipped",
                 "runs": {}}

    def record(label: str, seconds: float, note: str = "") -> None:
        flops = fpt * total_tokens / seconds
        res["runs"][label] = {"seconds": round(seconds, 2), "chunks_per_s": round(n / seconds, 1),
                              "tokens_per_s": round(total_tokens / seconds), "mfu": round(flops / peak, 4) if peak else None,
                              "note": note}
        print(f"{label:34s} {n / seconds:10.1f} chunks/s {total_tokens / seconds:12.0f} tok/s", file=sys.stderr)

    if not args.skip_baselines:
        model.encode(texts[:64], batch_size=32)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        ref32 = model.encode(texts, batch_size=32, normalize_embeddings=True)
        if cuda:
            torch.cuda.synchronize()
        record("encode_fp32_b32", time.perf_counter() - t)
        if cuda:
            model.half()
            model.encode(texts[:256], batch_size=256)
            torch.cuda.synchronize()
            t = time.perf_counter()
            ref16 = model.encode(texts, batch_size=256, normalize_embeddings=True)
            torch.cuda.synchronize()
            record("encode_fp16_b256", time.perf_counter() - t)
            res["cosine_fp16_vs_fp32_min"] = float((ref16 * ref32).sum(1).min())
        else:
            res["runs"]["encode_fp16_b256"] = {"note": "skipped: fp16 needs CUDA"}
    del model
    if cuda:
        torch.cuda.empty_cache()

    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        (tmp / "corpus").mkdir()
        per = -(-n // 8)
        for i in range(8):  # 8 files so the read/chunk tasks spread
            part = texts[i * per:(i + 1) * per]
            pq.write_table(pa.table({"doc_id": [f"t{i}-{j}" for j in range(len(part))], "text": part}),
                           tmp / "corpus" / f"part-{i}.parquet")
        cfg = EmbedJobConfig.from_flat({
            "corpus": str(tmp / "corpus"), "store": str(tmp / "store"), "model": args.model, "device": device,
            "chunk_tokens": max_len - 2, "chunk_overlap": 0, "normalize": False, "unit_rows": 2048 if cuda else 256,
            "batch_tokens": args.batch_tokens or (262144 if cuda else 16384), "compile": args.compile,
            "workers": args.workers,
        })
        t = time.perf_counter()
        init_ray(None)
        ray_start = time.perf_counter() - t
        t = time.perf_counter()
        m = run_embed_job(cfg)
        job = time.perf_counter() - t
        assert m["counts"]["chunks"] == n, m["counts"]  # one chunk per text
        record("engine_end_to_end", job, f"Parquet->Ray->Parquet; ray.init {ray_start:.1f}s not included")
        res["runs"]["engine_end_to_end"]["actor_busy_seconds"] = m["timings"]["embed_worker_seconds"]
        if not args.skip_baselines:
            import pandas as pd

            files = sorted(glob.glob(str(tmp / "store" / "runs" / m["run_id"] / "embeddings" / "*.parquet")))
            df = pd.concat([pq.read_table(f, columns=["doc_id", "embedding"]).to_pandas() for f in files])
            order = {f"t{i}-{j}": i * per + j for i in range(8) for j in range(per)}
            vecs = np.zeros_like(ref32)
            for d, v in zip(df["doc_id"], df["embedding"]):
                vecs[order[d]] = v
            res["cosine_engine_vs_encode_fp32_min"] = float((vecs * ref32).sum(1).min())
            base = res["runs"]["encode_fp32_b32"]["chunks_per_s"]
            res["ratio_engine_vs_encode_fp32_b32"] = round(res["runs"]["engine_end_to_end"]["chunks_per_s"] / base, 2)
            if "chunks_per_s" in res["runs"].get("encode_fp16_b256", {}):
                res["ratio_engine_vs_encode_fp16_b256"] = round(
                    res["runs"]["engine_end_to_end"]["chunks_per_s"] / res["runs"]["encode_fp16_b256"]["chunks_per_s"], 2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
