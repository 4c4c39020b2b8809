"""The embed job as a user measures it: the whole `embedctl embed` command vs a fresh bare-encode process.

    .venv/bin/python benchmarks/bench_embed_command.py [--pairs 2] [--scale 1] [--backends default,torch]
        [--out results.json]

Both sides are whole processes timed from outside, start-up included, run in turn (engine, bare,
engine, bare, ...) so a drift of the machine's speed hits both:

- engine: ``embedctl embed --corpus C --store S --json`` with the defaults a user gets (a local Ray
  started by the command, units and backend chosen by device), a fresh store each time so nothing
  resumes; ``--backends default,torch`` also times ``--backend torch`` in each round (each backend's
  ratio is to the same round's bare process);
- bare: ``python -c`` that imports sentence-transformers, loads the packaged MiniLM and calls
  ``encode(texts, batch_size=32, normalize_embeddings=True)`` on exactly the engine's chunk inputs
  (title prefix + chunk text, read from the first engine run's chunks).

Prints each pair, the median ratio bare/engine (>= 1.0 means the engine command is at least as
fast as the bare process), the engine's start-up split from its manifest, and the load average.
Corpus: Cranfield (../shared/data/cranfield) when present, else the stdlib docstring corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# Taken before any engine import: the engine's defaults (engine/__init__.py) stay out of the bare process.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
       "RAY_USAGE_STATS_ENABLED": "0"}

from benchmarks.bench_embed import write_corpus  # noqa: E402
from engine.embed.encoders import resolve_model_path  # noqa: E402

# A user's plain process: it imports no engine module (whose defaults would change the tokenizer's threads).
BARE = """
import json, sys
from sentence_transformers import SentenceTransformer
texts = json.load(open(sys.argv[1]))
model = SentenceTransformer(sys.argv[2], device="cpu")
model.encode(texts, batch_size=32, normalize_embeddings=True)
"""


def embedctl() -> str:
    found = shutil.which("embedctl", path=str(Path(sys.executable).parent))
    if not found:
        raise SystemExit("embedctl is not installed next to this Python; run the README's install command first")
    return found


def run_engine(corpus: Path, store: Path, backend: str = "default") -> tuple[float, dict]:
    t0 = time.perf_counter()
    flags = [] if backend == "default" else ["--backend", backend]
    out = subprocess.run([embedctl(), "embed", "--corpus", str(corpus), "--store", str(store), "--json", *flags],
                         env=ENV, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"embedctl embed failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return wall, json.loads(out.stdout)


def run_bare(texts: Path) -> float:
    t0 = time.perf_counter()
    model = str(resolve_model_path(None)[1])
    subprocess.run([sys.executable, "-c", BARE, str(texts), model], env=ENV, check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - t0


def chunk_texts(store: Path, run_id: str) -> list[str]:
    import pyarrow.parquet as pq

    from engine.embed.config import EmbedJobConfig
    from engine.embed.pipeline import embed_inputs, make_chunker

    chunker = make_chunker(EmbedJobConfig.from_flat({"corpus": "-", "store": "-"}))
    texts: list[str] = []
    for f in sorted((store / "runs" / run_id / "chunks").glob("*.parquet")):
        texts += embed_inputs(pq.read_table(f), chunker)
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=2, help="engine/bare pairs timed after a warm-up pair")
    ap.add_argument("--scale", type=int, default=1, help="corpus copies (see bench_embed.py)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N documents")
    ap.add_argument("--out", default=None, help="also write the results JSON here")
    ap.add_argument("--backends", default="default",
                    help="engine variants timed in each round, comma-separated: default (no flag) or a --backend value")
    args = ap.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="bench-embed-cmd-"))
    try:
        name = write_corpus(tmp / "corpus", args.limit, args.scale)
        for b in backends[1:]:
            run_engine(tmp / "corpus", tmp / f"store-warm-{b}", b)  # warm-up: its export built, file caches
        warm_wall, summary = run_engine(tmp / "corpus", tmp / "store-warm", backends[0])  # + the bare side's texts
        texts = chunk_texts(tmp / "store-warm", summary["run_id"])
        assert len(texts) == summary["counts"]["chunks"], "the bare side must encode exactly the engine's inputs"
        (tmp / "texts.json").write_text(json.dumps(texts))
        run_bare(tmp / "texts.json")  # warm-up: file caches for the bare side too
        pairs: dict[str, list[dict]] = {b: [] for b in backends}
        ran: dict[str, str] = {}
        for i in range(args.pairs):
            walls = {}
            for b in backends:
                walls[b] = run_engine(tmp / "corpus", tmp / f"store-{i}-{b}", b)
            b_wall = run_bare(tmp / "texts.json")
            for b, (e_wall, s) in walls.items():
                up = (s.get("timings") or {}).get("start_up") or {}
                run_manifest = json.loads((tmp / f"store-{i}-{b}" / "runs" / s["run_id"] / "manifest.json").read_text())
                ran[b] = (run_manifest.get("model") or {}).get("backend") or "torch"
                pairs[b].append({"engine_s": round(e_wall, 2), "bare_s": round(b_wall, 2),
                                 "ratio": round(b_wall / e_wall, 3),
                                 "first_unit_from_command_s": round(up.get("process_s", 0.0)
                                                                    + up.get("first_unit_start_s", 0.0), 2),
                                 "start_up": up, "load": round(os.getloadavg()[0], 1)})
                print(f"round {i + 1}/{args.pairs}: engine ({b}: {ran[b]}) {e_wall:.1f} s, bare {b_wall:.1f} s, "
                      f"ratio {b_wall / e_wall:.3f}", file=sys.stderr)
        first = pairs[backends[0]]
        res = {
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch CPU",
            "corpus": name, "chunks": len(texts), "tokens": summary["counts"]["tokens"],
            "unit_rows": None, "backend": ran.get(backends[0]), "pairs": first,
            "median_engine_s": round(statistics.median(p["engine_s"] for p in first), 2),
            "median_bare_s": round(statistics.median(p["bare_s"] for p in first), 2),
            "median_ratio_bare_over_engine": round(statistics.median(p["ratio"] for p in first), 3),
            "by_backend": {b: {"backend": ran.get(b), "pairs": pairs[b],
                               "median_ratio_bare_over_engine": round(statistics.median(p["ratio"] for p in pairs[b]), 3)}
                           for b in backends},
        }
        manifest = json.loads((tmp / "store-warm" / "runs" / summary["run_id"] / "manifest.json").read_text())
        res["unit_rows"] = manifest["config"]["corpus"]["unit_rows"]
        print(json.dumps(res, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
