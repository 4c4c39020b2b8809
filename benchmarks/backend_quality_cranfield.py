"""What int8 costs in retrieval quality on Cranfield, through the commands users run.

    .venv/bin/python benchmarks/backend_quality_cranfield.py            # torch, onnx fp32, onnx int8
    .venv/bin/python benchmarks/backend_quality_cranfield.py --builds onnx-fp32,onnx-int8 --json
    .venv/bin/python benchmarks/backend_quality_cranfield.py --builds openvino-fp32,openvino-int8  # if installed

Per build: `embedctl embed --device cpu --backend B --quantize Q` (local Ray) on
../shared/data/cranfield (1,400 abstracts, default chunking), `embedctl build-index --kind flat`
(exact search), `embedctl evaluate` with the Cranfield judgments (gain 5 - grade, each run's
queries embedded by its own model identity, as a searcher does). Prints one row per build and the
relative nDCG@10 loss of int8 against each fp32 build (goal: <= 1%), with the manifest's
`quality.cosine_to_fp32`. Quality figures do not depend on machine load; the wall times printed
beside them do. Work lives in build/backend_quality_cranfield/ (gitignored); a rerun reuses
finished embed runs (same config, same run id) and index versions (same build); int8 builds live in a
store per recipe (``store-int8-recipe<N>``), so a new recipe is embedded, not read from an older run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.quality_cranfield import CRANFIELD, corpus_parquet  # noqa: E402  (the same Parquet copy of the corpus)

EMBEDCTL = [str(Path(sys.executable).with_name("embedctl"))]
BUILDS = {"torch": ("torch", "none"), "onnx-fp32": ("onnx", "none"), "onnx-int8": ("onnx", "int8"),
          "openvino-fp32": ("openvino", "none"), "openvino-int8": ("openvino", "int8")}  # openvino: optional package
DEFAULT_BUILDS = "torch,onnx-fp32,onnx-int8"
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
       "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def embedctl(*args: str) -> dict[str, Any]:
    """One command with --json; its JSON object (a failure prints the command's stderr and stops)."""
    cmd = [*EMBEDCTL, *args, "--json"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, env={**os.environ, **ENV})
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout))


def one_build(work: Path, name: str, backend: str, quantize: str) -> dict[str, Any]:
    from engine.embed.backends import current_int8_recipe

    # An int8 run's id does not name its recipe: each recipe gets its own store, so a rerun after a new
    # recipe embeds again instead of reusing the older recipe's finished run.
    store = str(work / ("store" if quantize == "none" else f"store-int8-recipe{current_int8_recipe(backend)}"))
    t = time.perf_counter()
    run = embedctl("embed", "--corpus", str(corpus_parquet(work)), "--store", store, "--device", "cpu",
                   "--backend", backend, "--quantize", quantize)
    embed_s = time.perf_counter() - t
    manifest = json.loads((Path(store) / "runs" / run["run_id"] / "manifest.json").read_text())
    index = f"cranfield-{name}"
    built = embedctl("build-index", "--store", store, "--run", run["run_id"], "--index", index, "--kind", "flat",
                     "--executor", "local", "--no-gate")
    version = str(built["version"])
    ev = embedctl("evaluate", "--store", store, "--index", index, "--version", version,
                  "--queries", str(CRANFIELD / "queries.jsonl"), "--qrels", str(CRANFIELD / "qrels.tsv"),
                  "--gain", "cranfield", "-k", "10", "--no-exact", "--per-query", str(work / f"per-query-{name}.jsonl"))
    metrics = ev["metrics"]["index"]
    row = {"build": name, "backend": backend, "quantize": quantize, "run_id": run["run_id"], "version": version,
           "chunks": manifest["counts"]["chunks"], "queries": ev.get("evaluated"),
           **{k: round(float(metrics[k]), 4) for k in ("ndcg@10", "recall@10", "mrr@10") if k in metrics},
           "embed_command_s": round(embed_s, 1), "model": {k: manifest["model"].get(k) for k in
                                                           ("backend", "quantize", "int8_recipe", "int8_calibration",
                                                            "export_fingerprint")}}
    if manifest.get("quality"):
        row["cosine_to_fp32"] = manifest["quality"]["cosine_to_fp32"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(REPO / "build" / "backend_quality_cranfield"))
    ap.add_argument("--builds", default=DEFAULT_BUILDS, help=f"comma-separated, of {', '.join(BUILDS)} [{DEFAULT_BUILDS}]")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = ap.parse_args()
    if not (CRANFIELD / "corpus.jsonl").exists():
        sys.exit(f"Cranfield not found at {CRANFIELD} (it lives in ../shared/data)")
    names = [b for b in args.builds.split(",") if b]
    unknown = set(names) - set(BUILDS)
    if unknown:
        sys.exit(f"unknown builds {sorted(unknown)}; known: {', '.join(BUILDS)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"load_average_before": os.getloadavg(), "rows": []}
    for name in names:
        log(f"{name}: embed, build flat, evaluate")
        res["rows"].append(one_build(work, name, *BUILDS[name]))
        log(json.dumps(res["rows"][-1]))
    by = {r["build"]: r for r in res["rows"]}
    res["int8_relative_ndcg10_loss"] = {
        f"{q} vs {ref}": round(1 - by[q]["ndcg@10"] / by[ref]["ndcg@10"], 4)
        for q in ("onnx-int8", "openvino-int8") for ref in ("torch", "onnx-fp32", "openvino-fp32")
        if ref in by and q in by}
    res["load_average_after"] = os.getloadavg()
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"{'build':10s} {'nDCG@10':>8s} {'R@10':>7s} {'MRR@10':>7s}  cosine to fp32 (mean/min)")
    for r in res["rows"]:
        cos = r.get("cosine_to_fp32")
        print(f"{r['build']:10s} {r.get('ndcg@10', 0):8.4f} {r.get('recall@10', 0):7.4f} {r.get('mrr@10', 0):7.4f}  "
              + (f"{cos['mean']:.4f} / {cos['min']:.4f}" if cos else "-"))
    for pair, loss in res["int8_relative_ndcg10_loss"].items():
        print(f"relative nDCG@10 loss {pair}: {100 * loss:.2f}% (goal <= 1%)")
    print(f"load average before {res['load_average_before']}, after {res['load_average_after']}")


if __name__ == "__main__":
    main()
