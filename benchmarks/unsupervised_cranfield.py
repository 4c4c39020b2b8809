"""Unsupervised domain adaptation on Cranfield (CPU): TSDAE or SimCSE on the 1,400 abstracts, nDCG@10 before and after.

    .venv/bin/python benchmarks/unsupervised_cranfield.py [--objective tsdae|simcse] [--max-steps 100]
        [--epochs 1] [--batch-size 8] [--work DIR] [--out results.json]

``--max-steps 0`` trains ``--epochs`` full passes over the chunks (one epoch: ~1,400 texts / batch).

The abstracts (title + text, ../shared/data/cranfield) are embedded into a run with the
model-free ``hash:384`` encoder: only the run's *chunks* matter here (they are the unlabelled
training texts); the packaged all-MiniLM-L6-v2 is then trained on them with
``embedctl finetune --objective ...`` and scored before and after on the 225 Cranfield queries
(exact search, Cranfield grades 1-3 as gains 4-2: ``--eval-gain cranfield``) and on the
general stdlib-docstring set (forgetting). Reports the settings, the load average and wall
times whatever the outcome. No query or judgment is used for training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CRANFIELD = REPO.parent / "shared" / "data" / "cranfield"


def build_run(work: Path) -> tuple[str, str, float]:
    """Cranfield abstracts -> corpus Parquet -> an embed run (hash encoder: chunks only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.embed.config import EmbedJobConfig
    from engine.embed.pipeline import run_locally

    rows = [json.loads(ln) for ln in (CRANFIELD / "corpus.jsonl").read_text().splitlines() if ln.strip()]
    # Cranfield's text already begins with its title: no separate title column (no title prefix twice)
    docs = [{"doc_id": str(r["doc_id"]), "text": str(r.get("text") or "")} for r in rows
            if str(r.get("text") or "").strip()]
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(docs), work / "corpus" / "part-000.parquet")
    t0 = time.perf_counter()
    man = run_locally(EmbedJobConfig.from_flat({"corpus": str(work / "corpus"), "store": str(work / "store"),
                                                "model": "hash:384", "chunk_tokens": 256, "chunk_overlap": 0}))
    return str(work / "store"), man["run_id"], time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objective", choices=["tsdae", "simcse"], default="tsdae")
    p.add_argument("--max-steps", type=int, default=100, help="0: no cap, train --epochs full passes")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=3e-5)  # the TSDAE paper's
    p.add_argument("--eval-max-queries", type=int, default=None)
    p.add_argument("--work", default=None)
    p.add_argument("--out", default=None, help="write the results JSON here too")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from engine.finetune.train import FinetuneConfig, run_finetune

    t_all = time.perf_counter()
    load_before = os.getloadavg()
    work = Path(args.work or tempfile.mkdtemp(prefix="embedctl-unsup-"))
    store, run_id, embed_s = build_run(work)
    cfg = FinetuneConfig.from_flat({
        "objective": args.objective, "store": store, "run": run_id, "out": str(work / f"model-{args.objective}"),
        "batch_size": args.batch_size, "epochs": args.epochs, "max_steps": args.max_steps or None, "learning_rate": args.learning_rate,
        "eval_set": str(CRANFIELD), "eval_gain": "cranfield", "general_eval": "stdlib",
        "eval_max_queries": args.eval_max_queries, "device": "cpu", "overwrite": True, "seed": 42})
    report = run_finetune(cfg)
    ev = report["eval"]
    result = {
        "objective": args.objective,
        "settings": {"base_model": report["base_model"]["name"], "max_steps": args.max_steps or None,
                     "epochs": args.epochs, "steps_trained": report["training"]["steps"],
                     "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                     "noise_ratio": cfg.noise_ratio if args.objective == "tsdae" else None,
                     "temperature": cfg.temperature if args.objective == "simcse" else None,
                     "training_texts": report["data"]["rows_used"], "device": report["device"]},
        "cranfield": {"before": ev["benchmark"]["before"], "after": ev["benchmark"]["after"],
                      "delta": ev["benchmark"]["delta"]},
        "general_stdlib": {"before": ev["general"]["before"], "after": ev["general"]["after"],
                           "delta": ev["general"]["delta"]},
        "verdict": report["verdict"],
        "seconds": {"embed_run_hash": round(embed_s, 1), "training": report["training"]["seconds"],
                    "one_evaluation": report["eval_seconds_each"], "total": round(time.perf_counter() - t_all, 1)},
        "training": report["training"],
        "machine": {"cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version()},
    }
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
