"""CPU inference backends, one run: the embed job per backend vs bare SentenceTransformer.encode, plus quality.

    .venv/bin/python benchmarks/bench_backends.py [--limit N] [--out results.json]
    .venv/bin/python benchmarks/bench_backends.py --scratch [--texts 600] [--threads 2] [--rounds 3]

On Cranfield (../shared/data/cranfield, 1,400 abstracts; the stdlib demo corpus when absent):
1. the ONNX exports (fp32, int8) are built once into the cache (a one-off, timed separately);
2. `embedctl embed --device cpu --backend B [--quantize int8]` as a command, per backend
   (torch, onnx fp32, onnx int8, and openvino fp32/int8 where openvino/nncf are installed), each
   into a fresh store: command wall time, Ray start included;
3. bare `SentenceTransformer.encode(batch_size=32)` fp32 on exactly the engine's chunk inputs
   (model load timed apart, as in bench_embed.py); ratios = bare encode time / job wall time;
4. cosine of each backend's stored vectors to the torch run's, row by row;
5. nDCG@10 / recall@10 on the Cranfield queries per build (exact search, chunk hits collapsed
   to documents by their best chunk, queries embedded by each run's own model identity);
6. model-process start-up (fresh interpreter: import + load, then the first vector) per backend,
   and for the torch path through sentence-transformers (what engine/embed/bert.py saves).

``--scratch`` measures the runtimes alone, in this one process (no Ray, no job): each backend and int8
recipe encodes the same Cranfield texts at ``--threads`` threads, rounds interleaved (median kept);
chunks/s and cosine to ONNX fp32. openvino int8 recipe 3 (weights only) is what
``--quantize int8`` meant on openvino before recipe 4 (static); onnx int8 is dynamic recipe 2.

Timings on a shared machine are noisy: the load average before and after is printed with them.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.bench_embed import CRANFIELD, write_corpus  # noqa: E402

BACKENDS = {"torch": ("torch", "none"), "onnx-fp32": ("onnx", "none"), "onnx-int8": ("onnx", "int8")}
if importlib.util.find_spec("openvino") is not None:  # optional package: measured when installed
    BACKENDS["openvino-fp32"] = ("openvino", "none")
    if importlib.util.find_spec("nncf") is not None:
        BACKENDS["openvino-int8"] = ("openvino", "int8")
# Model-process start-up also measures the torch path through sentence-transformers (what runs on
# CPU without engine/embed/bert.py), to show what the native BERT saves.
START_UP = {**BACKENDS, "torch-sentence-transformers": ("torch", "none")}
EMBEDCTL = [str(Path(sys.executable).with_name("embedctl"))]  # the installed command, as users run it


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> str:
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = Path("/proc/cpuinfo").read_text()
        model += " (avx512_vnni)" if "avx512_vnni" in flags else ""
    except OSError:
        pass
    return f"{platform.machine()} {os.cpu_count()} CPUs, {model}"


def run_job(corpus: Path, store: Path, backend: str, quantize: str) -> tuple[float, dict[str, Any]]:
    """The embed command, as a user runs it (fresh process, local Ray started inside)."""
    cmd = EMBEDCTL + ["embed", "--corpus", str(corpus), "--store", str(store), "--device", "cpu",
                      "--backend", backend, "--quantize", quantize, "--unit-rows", "256", "--json"]
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    summary = json.loads(out.stdout)
    manifest = json.loads((store / "runs" / summary["run_id"] / "manifest.json").read_text())
    return wall, manifest


def run_vectors(store: Path, manifest: dict[str, Any]) -> tuple[list[str], list[str], Any]:
    """chunk ids, doc ids, vectors [n, dim] of a run, in chunk-id order."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(glob.glob(str(store / "runs" / manifest["run_id"] / "embeddings" / "*.parquet")))
    t = pa.concat_tables([pq.read_table(f, columns=["chunk_id", "doc_id", "embedding"]) for f in files])
    t = t.sort_by("chunk_id")
    vecs = np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    return t.column("chunk_id").to_pylist(), t.column("doc_id").to_pylist(), vecs


def retrieval_quality(doc_ids: list[str], vecs: Any, identity: dict[str, Any], k: int = 10) -> dict[str, float]:
    """Mean nDCG@k / recall@k over the Cranfield queries: exact search, best chunk per document."""
    import numpy as np

    from engine.embed.encoders import encoder_from_identity
    from engine.quality.judgments import parse_gain_map, read_qrels, read_queries
    from engine.quality.metrics import mean_metrics, query_metrics

    queries = read_queries(CRANFIELD.parent / "queries.jsonl")
    qrels = read_qrels(CRANFIELD.parent / "qrels.tsv", parse_gain_map("cranfield"))
    queries = [q for q in queries if q["query_id"] in qrels]
    enc = encoder_from_identity(identity)
    q = enc.encode_queries([x["text"] for x in queries])  # [queries, dim]
    scores = q @ vecs.T  # [queries, chunks]
    docs = np.asarray(doc_ids)
    rows = []
    for i, x in enumerate(queries):
        ranking: list[str] = []
        for j in np.argsort(-scores[i], kind="stable"):
            if docs[j] not in ranking:
                ranking.append(str(docs[j]))
            if len(ranking) == k:
                break
        rows.append(query_metrics(ranking, qrels[x["query_id"]], k))
    return {key: round(v, 4) for key, v in mean_metrics(rows).items() if key in (f"ndcg@{k}", f"recall@{k}")}


def start_up(name: str, backend: str, quantize: str) -> dict[str, float]:
    """A fresh interpreter: import + load (export cached), then the first vector, timed apart."""
    code = ("import time; t = time.perf_counter(); from engine.embed.encoders import load_encoder; "
            f"e = load_encoder(None, device='cpu', backend={backend!r}, quantize={quantize!r}); "
            "t1 = time.perf_counter(); e.encode(['flutter']); t2 = time.perf_counter(); "
            "print(t1 - t, t2 - t1, type(e).__name__)")
    env = {**os.environ, "EMBEDCTL_ENCODER": "sentence-transformers" if name.endswith("sentence-transformers") else "auto"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, env=env)
    load, first, cls = out.stdout.split()[-3:]
    return {"import_load_s": round(float(load), 2), "first_vector_s": round(float(first), 3),
            "total_s": round(float(load) + float(first), 2), "encoder": cls}


def bare_encode(texts: list[str]) -> tuple[float, float, Any]:
    from sentence_transformers import SentenceTransformer

    from engine.embed.encoders import resolve_model_path

    t = time.perf_counter()
    model = SentenceTransformer(resolve_model_path(None)[1], device="cpu")
    load = time.perf_counter() - t
    model.encode(texts[:32], batch_size=32)  # warm-up, as the engine's actor warms up on its first unit
    t = time.perf_counter()
    vecs = model.encode(texts, batch_size=32, normalize_embeddings=True)
    return load, time.perf_counter() - t, vecs


SCRATCH = {"onnx-fp32": ("onnx", "none", None), "openvino-fp32": ("openvino", "none", None),
           "openvino-int8-weights (recipe 3)": ("openvino", "int8", 3), "onnx-int8-dynamic (recipe 2)": ("onnx", "int8", 2),
           "openvino-int8-static (recipe 4)": ("openvino", "int8", 4)}


def scratch(n_texts: int, threads: int, rounds: int) -> dict[str, Any]:
    """The runtimes alone, one process: chunks/s (median of interleaved rounds) and cosine to ONNX fp32."""
    import statistics

    from engine.embed.encoders import load_encoder

    texts = [json.loads(line)["text"] for line in CRANFIELD.open()][:n_texts]
    encs = {}
    for name, (backend, quantize, recipe) in SCRATCH.items():
        if backend == "openvino" and f"openvino-{'fp32' if quantize == 'none' else 'int8'}" not in BACKENDS:
            continue  # openvino / nncf not installed
        log(f"load (building if not cached): {name}")
        encs[name] = load_encoder(None, device="cpu", backend=backend, quantize=quantize, int8_recipe=recipe,
                                  threads=threads)
    res: dict[str, Any] = {"machine": machine(), "texts": len(texts), "threads": threads, "rounds": rounds,
                           "load_average_before": os.getloadavg(), "rows": {}}
    speeds: dict[str, list[float]] = {k: [] for k in encs}
    cpu: dict[str, list[float]] = {k: [] for k in encs}  # chunks per CPU-second of this process: less hostage to load
    ref = None
    for r in range(rounds):
        for name, enc in encs.items():
            enc.encode(texts[:16])  # warm-up: first-call allocations
            t, c = time.perf_counter(), time.process_time()
            vecs = enc.encode(texts)
            speeds[name].append(len(texts) / (time.perf_counter() - t))
            cpu[name].append(len(texts) / (time.process_time() - c))
            ref = vecs if ref is None else ref
            if r == 0:
                cos = (vecs * ref).sum(1)
                res["rows"][name] = {"int8_recipe": enc.identity.get("int8_recipe"),
                                     "cosine_to_onnx_fp32": {"mean": round(float(cos.mean()), 5),
                                                             "min": round(float(cos.min()), 5)}}
            log(f"round {r}: {name} {speeds[name][-1]:.1f} chunks/s")
    base, base_cpu = statistics.median(speeds["onnx-fp32"]), statistics.median(cpu["onnx-fp32"])
    for name, v in speeds.items():
        res["rows"][name].update(chunks_per_s=round(statistics.median(v), 1), all_rounds=[round(x, 1) for x in v],
                                 vs_onnx_fp32=round(statistics.median(v) / base, 2),
                                 chunks_per_cpu_s=round(statistics.median(cpu[name]), 1),
                                 cpu_vs_onnx_fp32=round(statistics.median(cpu[name]) / base_cpu, 2))
    res["load_average_after"] = os.getloadavg()
    print(json.dumps(res, indent=2))
    print(f"\n| runtime ({len(texts)} Cranfield texts, {threads} threads, median of {rounds}) | chunks/s | vs ONNX fp32 "
          "| chunks per CPU-s | vs ONNX fp32 | cosine to ONNX fp32 (mean / min) |\n|---|---|---|---|---|---|",
          file=sys.stderr)
    for name, row in res["rows"].items():
        c = row["cosine_to_onnx_fp32"]
        print(f"| {name} | {row['chunks_per_s']} | {row['vs_onnx_fp32']:.2f}x | {row['chunks_per_cpu_s']} | "
              f"{row['cpu_vs_onnx_fp32']:.2f}x | {c['mean']:.5f} / {c['min']:.5f} |", file=sys.stderr)
    print(f"load average before {res['load_average_before']}, after {res['load_average_after']}", file=sys.stderr)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="use only the first N documents")
    ap.add_argument("--out", default=None, help="also write the results JSON here")
    ap.add_argument("--scratch", action="store_true", help="only the in-process runtime table (no embed jobs)")
    ap.add_argument("--texts", type=int, default=600, help="--scratch: Cranfield texts encoded per runtime")
    ap.add_argument("--threads", type=int, default=2, help="--scratch: threads per runtime")
    ap.add_argument("--rounds", type=int, default=3, help="--scratch: interleaved rounds (the median is kept)")
    args = ap.parse_args()
    if args.scratch:
        res = scratch(args.texts, args.threads, args.rounds)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2))
        return
    import pyarrow.parquet as pq

    from engine.embed.config import EmbedJobConfig
    from engine.embed.encoders import model_fingerprint, resolve_model_path
    from engine.embed.model_facts import embed_inputs, make_chunker

    tmp = Path(tempfile.mkdtemp(prefix="bench-backends-"))
    res: dict[str, Any] = {"machine": machine(), "load_average_before": os.getloadavg()}
    try:
        res["corpus"] = write_corpus(tmp / "corpus", args.limit)
        from engine.embed.backends.onnx_export import ensure_onnx_model

        path = resolve_model_path(None)[1]
        t = time.perf_counter()
        for q in ("none", "int8"):
            ensure_onnx_model(path, model_fingerprint(path), q)
        if "openvino-fp32" in BACKENDS:
            from engine.embed.backends import prebuild

            prebuild(None, "openvino", BACKENDS.get("openvino-int8", ("", "none"))[1], "cpu")
        res["export_build_s_if_not_cached"] = round(time.perf_counter() - t, 2)

        jobs: dict[str, dict[str, Any]] = {}
        manifests: dict[str, dict[str, Any]] = {}
        for name, (backend, quantize) in BACKENDS.items():
            log(f"embed job: {name}")
            wall, m = run_job(tmp / "corpus", tmp / f"store-{name}", backend, quantize)
            manifests[name] = m
            jobs[name] = {"command_wall_s": round(wall, 2), "chunks": m["counts"]["chunks"],
                          "int8_recipe": m["model"].get("int8_recipe"),
                          "chunks_per_s": round(m["counts"]["chunks"] / wall, 2),
                          "start_up": (m.get("timings") or {}).get("start_up"),
                          **({"quality": m["quality"]} if m.get("quality") else {})}
        ref = manifests["torch"]
        cfg = EmbedJobConfig.from_flat({"corpus": str(tmp / "corpus"), "store": str(tmp / "store-torch")})
        texts: list[str] = []
        for f in sorted(glob.glob(str(tmp / "store-torch" / "runs" / ref["run_id"] / "chunks" / "*.parquet"))):
            texts += embed_inputs(pq.read_table(f), make_chunker(cfg))
        log(f"bare SentenceTransformer.encode on {len(texts)} chunk texts")
        load, bare, _ = bare_encode(texts)
        res["bare_encode"] = {"model_load_s": round(load, 2), "encode_s": round(bare, 2),
                              "chunks_per_s": round(len(texts) / bare, 2)}

        _cids, docs, torch_vecs = run_vectors(tmp / "store-torch", ref)
        for name, m in manifests.items():
            store = tmp / f"store-{name}"
            _c, d, vecs = run_vectors(store, m)
            cos = (vecs * torch_vecs).sum(axis=1)
            jobs[name]["ratio_vs_bare_encode"] = round(bare / jobs[name]["command_wall_s"], 3)
            jobs[name]["cosine_to_torch_fp32"] = {"mean": round(float(cos.mean()), 6), "min": round(float(cos.min()), 6)}
            log(f"retrieval quality: {name}")
            jobs[name]["cranfield"] = retrieval_quality(d, vecs, m["model"])
        res["jobs"] = jobs
        base = jobs["onnx-fp32"]["cranfield"]["ndcg@10"]
        res["int8_relative_ndcg10_loss_vs_onnx_fp32"] = round(1 - jobs["onnx-int8"]["cranfield"]["ndcg@10"] / base, 4)
        base_t = jobs["torch"]["cranfield"]["ndcg@10"]
        res["int8_relative_ndcg10_loss_vs_torch_fp32"] = round(1 - jobs["onnx-int8"]["cranfield"]["ndcg@10"] / base_t, 4)
        if "openvino-int8" in jobs:
            ov_base = jobs["openvino-fp32"]["cranfield"]["ndcg@10"]
            res["openvino_int8_relative_ndcg10_loss_vs_openvino_fp32"] = round(
                1 - jobs["openvino-int8"]["cranfield"]["ndcg@10"] / ov_base, 4)
        log("model-process start-up")
        res["model_process_start_up"] = {name: start_up(name, *bq) for name, bq in START_UP.items()}
        res["load_average_after"] = os.getloadavg()
        print(json.dumps(res, indent=2))
        print(f"\nmachine: {res['machine']}; load average before {res['load_average_before']}, "
              f"after {res['load_average_after']}", file=sys.stderr)
        print("ratios (bare SentenceTransformer.encode fp32 batch 32 time / job command wall time):", file=sys.stderr)
        for name, j in jobs.items():
            print(f"  {name:10s} {j['ratio_vs_bare_encode']:.2f}x  nDCG@10 {j['cranfield'].get('ndcg@10')}  "
                  f"cos-to-torch mean {j['cosine_to_torch_fp32']['mean']}", file=sys.stderr)
        for name, su in res["model_process_start_up"].items():
            print(f"  start-up {name:28s} import+load {su['import_load_s']:.2f} s, first vector {su['first_vector_s']:.3f} s "
                  f"({su['encoder']})", file=sys.stderr)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
