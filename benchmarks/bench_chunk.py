"""Chunk stage throughput per CPU core: read + validate + normalise + chunk + tokenize + write, one process.

    .venv/bin/python benchmarks/bench_chunk.py [--scale 3] [--legacy-rev 1249ab9] [--repeat 2]

Runs the engine's chunk stage (``chunk_unit_tokens`` + ``pretokenize``, exactly what each Ray chunk
task runs) over Cranfield (× --scale) on one core (the tokenizer's thread pool is pinned to one
thread), side by side with the per-text chunker of ``--legacy-rev`` (loaded from git, nothing
copied), alternating the two so machine noise hits both. Prints chunks/s per core (CPU seconds of
this process) and wall, the share spent in the chunker alone, and checks that both produce the
same chunk files.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one core: the batch API may not borrow a second

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_embed import write_corpus  # noqa: E402


def legacy_chunking(rev: str) -> types.ModuleType:
    """The chunking module as it was at ``rev`` (straight from git), with a per-text ``chunk_many``."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:engine/embed/chunking.py"], check=True,
                         capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("legacy_chunking", loader=None)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["legacy_chunking"] = mod  # dataclasses look their module up
    exec(compile(src, f"{rev}:engine/embed/chunking.py", "exec"), mod.__dict__)  # noqa: S102 - our own history
    if not hasattr(mod.Chunker, "chunk_many"):
        mod.Chunker.chunk_many = lambda self, texts, titles: [self.chunk(t, ti) for t, ti in zip(texts, titles, strict=True)]
    return mod


def run_stage(cfg, legacy: types.ModuleType | None) -> dict[str, float]:
    """The whole chunk stage over every unit of a fresh run; CPU and wall seconds, chunks, digests."""
    import engine.embed.pipeline as P

    prepared = P.prepare_run(cfg)
    meta = P.plan_meta_for(prepared)
    real = P.make_chunker(cfg)
    chunker = real
    if legacy is not None:
        chunker = legacy.Chunker(legacy.ChunkConfig(**real.config.__dict__), real.window_tok, real.model_tok,
                                 P.model_info(cfg.embed.model).max_seq_length, prompt=real.prompt)
    saved = P.make_chunker
    P.make_chunker = lambda _cfg: chunker  # type: ignore[assignment]
    inner = [0.0]
    chunk_many = chunker.chunk_many

    def timed(texts, titles):
        t = time.process_time()
        out = chunk_many(texts, titles)
        inner[0] += time.process_time() - t
        return out

    chunker.chunk_many = timed  # type: ignore[method-assign]
    try:
        c0, w0 = time.process_time(), time.perf_counter()
        chunks, digests = 0, []
        for unit in prepared.pending:
            summary, table, ids = P.chunk_unit_tokens(cfg, meta, unit, prepared.plan.duplicates.get(unit.file, {}))
            P.pretokenize(cfg, table, ids)
            chunks += summary["chunks"]
            digests.append(summary["chunk_file"]["sha256"])
        return {"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0, "chunker_cpu_s": inner[0],
                "chunks": chunks, "digest": "".join(digests)}
    finally:
        P.make_chunker = saved
        chunker.chunk_many = chunk_many  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=3)
    ap.add_argument("--legacy-rev", default="1249ab9", help="git revision of the per-text chunker ('' = skip)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    from engine.embed.config import EmbedJobConfig

    legacy = legacy_chunking(args.legacy_rev) if args.legacy_rev else None
    with tempfile.TemporaryDirectory(prefix="bench-chunk-") as tmp:
        corpus = write_corpus(Path(tmp) / "corpus", None, scale=args.scale)
        results: dict[str, list[dict[str, float]]] = {"batched": [], "legacy": []}
        for r in range(args.repeat):
            for name, mod in (("legacy", legacy), ("batched", None)):
                if name == "legacy" and legacy is None:
                    continue
                cfg = EmbedJobConfig.from_flat({"corpus": str(Path(tmp) / "corpus"), "model": args.model,
                                                "store": str(Path(tmp) / f"store-{name}-{r}")})
                results[name].append(run_stage(cfg, mod))
    out: dict[str, object] = {"corpus": corpus, "machine": f"{platform.node()} {os.cpu_count()} CPUs",
                              "load_average": os.getloadavg()}
    for name, runs in results.items():
        if not runs:
            continue
        best = min(runs, key=lambda x: x["cpu_s"])
        out[name] = {"chunks": best["chunks"], "chunks_per_s_per_core": round(best["chunks"] / best["cpu_s"], 1),
                     "chunks_per_s_wall": round(best["chunks"] / best["wall_s"], 1),
                     "chunker_share": round(best["chunker_cpu_s"] / best["cpu_s"], 3),
                     "all_runs_per_core": [round(x["chunks"] / x["cpu_s"], 1) for x in runs]}
    if results["legacy"]:
        out["speedup_per_core"] = round(out["batched"]["chunks_per_s_per_core"]  # type: ignore[index]
                                        / out["legacy"]["chunks_per_s_per_core"], 2)  # type: ignore[index]
        out["same_chunk_files"] = results["legacy"][0]["digest"] == results["batched"][0]["digest"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
