"""The label-free loop on Cranfield, chained end to end through the real CLI, with a stand-in LLM endpoint.

    .venv/bin/python benchmarks/label_free_loop.py [--docs 0] [--tsdae-steps 30] [--sample 400]
        [--queries-per-chunk 3] [--ft-steps 30] [--ft-eval] [--work DIR] [--out results.json]

Unlabelled corpus -> (TSDAE) -> generate-queries -> mine-negatives -> finetune -> evaluate ->
migrate, each step a subprocess ``embedctl <verb> ... --json`` exactly as a user types it,
on ../shared/data/cranfield (title + abstract, 1,400 documents) with a local store in a
temporary folder:

 1. ``embed`` the corpus with the packaged all-MiniLM-L6-v2, ``build-index --kind flat``,
    ``publish --alias live``; ``benchmark build`` from Cranfield's queries and judgments;
 2. ``evaluate`` the live alias (before);
 3. ``finetune --objective tsdae`` on the run's chunks (``--tsdae-steps 0`` skips it);
 4. ``generate-queries`` against ``tests/chat_server.py`` on loopback: a STAND-IN for an LLM
    whose "queries" are deterministic word picks from the passage ("what about w1 w2 w3 w4 i"),
    not a language model's questions, so the figures show the loop works, not what a real
    LLM's queries would teach the model;
 5. ``mine-negatives`` for those pairs against the live alias;
 6. ``finetune`` (supervised, mnrl) on the mined triplets from the TSDAE model, with the
    general-set forgetting check (``--ft-eval``: Cranfield inside finetune too);
 7. ``migrate run`` the live alias to the fine-tuned model (baseline, build, compare,
    calibrate, rollout, cutover, with the product's gates: a failed gate puts the alias back);
 8. ``evaluate`` the green version (after) and ``status``: which version the alias serves.

Cranfield's queries and judgments are used only to evaluate, never to train. Every step's
wall time and the nDCG@10 before/after are printed whatever the outcome (a failed step
stops the loop and says which). The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CRANFIELD = REPO.parent / "shared" / "data" / "cranfield"
EMBEDCTL = str(Path(sys.executable).with_name("embedctl"))
INDEX = "cran"


class StepFailed(RuntimeError):
    pass


class Loop:
    """Runs CLI verbs, keeps each one's wall time and --json answer."""

    def __init__(self, work: Path):
        self.work = work
        self.steps: list[dict[str, Any]] = []
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
                    "RAY_USAGE_STATS_ENABLED": "0"}

    def cli(self, name: str, *args: str, ok_codes: tuple[int, ...] = (0,)) -> dict[str, Any]:
        cmd = [EMBEDCTL, *args, "--json"]
        shown = " ".join(a if a else "''" for a in cmd[1:]).replace(str(self.work) + "/", "")
        print(f"\n[{name}] embedctl {shown}", flush=True)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=self.work)
        seconds = round(time.perf_counter() - t0, 1)
        (self.work / "logs").mkdir(exist_ok=True)
        (self.work / "logs" / f"{len(self.steps):02d}-{name}.stderr").write_text(p.stderr)
        try:
            answer = json.loads(p.stdout) if p.stdout.strip() else {}
        except json.JSONDecodeError:
            answer = {"stdout": p.stdout[-2000:]}
        self.steps.append({"step": name, "seconds": seconds, "exit": p.returncode})
        print(f"[{name}] exit {p.returncode} in {seconds:.1f} s", flush=True)
        if p.returncode not in ok_codes:
            print(p.stderr[-3000:], file=sys.stderr)
            raise StepFailed(f"step {name!r} exited {p.returncode}")
        return answer


def write_corpus(work: Path, max_docs: int) -> Path:
    """Cranfield's corpus.jsonl -> corpus Parquet (doc_id, text; the text already begins with the title)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(ln) for ln in (CRANFIELD / "corpus.jsonl").read_text().splitlines() if ln.strip()]
    docs = [{"doc_id": str(r["doc_id"]), "text": str(r.get("text") or "")} for r in rows
            if str(r.get("text") or "").strip()]
    if max_docs:
        docs = docs[:max_docs]
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(docs), work / "corpus" / "part-000.parquet")
    return work / "corpus"


def ndcg(answer: dict[str, Any]) -> float | None:
    """nDCG@10 of the searched version from `embedctl evaluate --json`."""
    value = ((answer.get("metrics") or {}).get("index") or {}).get("ndcg@10")
    return None if value is None else round(float(value), 4)


def run_loop(loop: Loop, args: argparse.Namespace, server_url: str) -> dict[str, Any]:
    work, res = loop.work, {}
    store = str(work / "store")
    st = ["--store", store]
    write_corpus(work, args.docs)
    emb = loop.cli("embed", "embed", "--corpus", "corpus", *st, "--run-id", "cran-base")
    run_id = emb.get("run_id", "cran-base")
    res["embed"] = {"run_id": run_id, "counts": emb.get("counts")}
    built = loop.cli("build-index", "build-index", *st, "--run", run_id, "--index", INDEX, "--kind", "flat")
    version = built["version"]
    loop.cli("publish", "publish", *st, "--index", INDEX, "--version", str(version), "--alias", "live")
    loop.cli("benchmark-build", "benchmark", "build", "--queries", str(CRANFIELD / "queries.jsonl"), "--qrels",
             str(CRANFIELD / "qrels.tsv"), "--gains", "cranfield", "--relevant-min-gain", "2", "--out",
             "cranfield.json", *(["--corpus", "corpus", "--drop-unknown"] if args.docs  # a subset: its judgments
                                 else ["--corpus", str(CRANFIELD / "corpus.jsonl")]))
    judged = ["--queries", str(CRANFIELD / "queries.jsonl"), "--qrels", str(CRANFIELD / "qrels.tsv"), "--no-exact",
              "--per-query", "eval-before.jsonl"]
    before = loop.cli("evaluate-before", "evaluate", *st, "--index", INDEX, "--alias", "live", *judged)
    res["evaluate_before"] = {"version": version, "ndcg@10": ndcg(before), "answer": before}
    base = None
    if args.tsdae_steps:
        tsdae = loop.cli("finetune-tsdae", "finetune", "--objective", "tsdae", *st, "--run", run_id, "--out",
                         "model-tsdae", "--batch-size", "8", "--learning-rate", "3e-5", "--max-steps",
                         str(args.tsdae_steps), "--device", "cpu", "--overwrite")
        res["tsdae"] = {"steps": tsdae["training"]["steps"], "texts": tsdae["data"]["rows_used"]}
        base = "model-tsdae"
    gen = loop.cli("generate-queries", "generate-queries", *st, "--run", run_id, "--endpoint", server_url,
                   "--model", "stand-in", "--queries-per-chunk", str(args.queries_per_chunk), "--sample",
                   str(args.sample), "--consistency-k", str(args.consistency_k), "--out", "pairs.parquet",
                   "--overwrite")
    res["generate_queries"] = {k: gen.get(k) for k in ("job_id", "chunks", "queries", "pairs", "out")}
    mined = loop.cli("mine-negatives", "mine-negatives", *st, "--index", INDEX, "--alias", "live", "--pairs",
                     "pairs.parquet", "--out", "triplets.parquet", "--num-negatives", str(args.num_negatives),
                     "--overwrite")
    res["mine_negatives"] = {k: mined.get(k) for k in ("counts", "pairs", "out", "rejects")}
    bench = ["--eval", str(CRANFIELD), "--eval-gain", "cranfield"] if args.ft_eval else []
    ft = loop.cli("finetune", "finetune", "--triplets", "triplets.parquet", *(["--base-model", base] if base else []),
                  "--out", "model-ft", "--batch-size", str(args.ft_batch_size), "--max-steps", str(args.ft_steps),
                  *bench, "--general-eval", "stdlib", "--device", "cpu", "--overwrite")
    res["finetune"] = {"data": ft["data"], "steps": ft["training"]["steps"], "seconds": ft["training"]["seconds"],
                       "eval": {k: {"before": v["before"].get("ndcg@10"), "after": v["after"].get("ndcg@10")}
                                for k, v in ft["eval"].items()}, "verdict": ft["verdict"]}
    # the gate decides whether the alias moves (exit 7 = a gate failed and the alias went back to blue)
    mig = loop.cli("migrate", "migrate", "run", *st, "--index", INDEX, "--model", "model-ft", "--benchmark",
                   "cranfield.json", "--max-recall-drop", str(args.max_recall_drop), ok_codes=(0, 7))
    ms = mig.get("status") or {}
    green = (ms.get("green") or {}).get("version")
    res["migrate"] = {"migration_id": mig.get("migration_id"), "status": ms.get("status"), "phase": ms.get("phase"),
                      "blue": (ms.get("blue") or {}).get("version"), "green": green, "rollback": ms.get("rollback"),
                      "phases": ms.get("phases")}
    judged[-1] = "eval-after.jsonl"
    # the green version, whether or not the gate let the alias move to it
    after = loop.cli("evaluate-after", "evaluate", *st, "--index", INDEX, "--version", str(green), *judged)
    status = loop.cli("status", "status", *st, "--index", INDEX)
    res["evaluate_after"] = {"version": green, "ndcg@10": ndcg(after), "answer": after}
    live = (status.get("aliases") or {}).get("live") or {}
    res["alias_after"] = {"live": live.get("version"), "weighted": live.get("weighted"),
                          "serves_fine_tuned_model": live.get("version") == green}
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=0, help="use the first N documents (0: all 1,400)")
    p.add_argument("--tsdae-steps", type=int, default=30, help="TSDAE optimiser steps, batch 8 (0: skip TSDAE)")
    p.add_argument("--sample", type=int, default=400, help="chunks asked for queries")
    p.add_argument("--queries-per-chunk", type=int, default=3)
    p.add_argument("--consistency-k", type=int, default=20)
    p.add_argument("--num-negatives", type=int, default=3)
    p.add_argument("--ft-steps", type=int, default=30, help="supervised fine-tuning steps")
    p.add_argument("--ft-batch-size", type=int, default=16)
    p.add_argument("--ft-eval", action="store_true", help="also score Cranfield inside finetune (2 more encodings)")
    p.add_argument("--max-recall-drop", type=float, default=0.05, help="migrate's canary gate (its default)")
    p.add_argument("--work", default=None)
    p.add_argument("--out", default=None, help="write the results JSON here too")
    args = p.parse_args()
    from tests.chat_server import ChatServer  # the loopback stand-in the tests use

    work = Path(args.work or tempfile.mkdtemp(prefix="embedctl-loop-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t_all = time.perf_counter()
    loop = Loop(work)
    print(f"work folder {work}; the 'LLM' is tests/chat_server.py, a deterministic STAND-IN (queries are word "
          "picks from each passage, not an LLM's questions)", flush=True)
    error = None
    with ChatServer() as server:
        try:
            res = run_loop(loop, args, server.url)
        except (StepFailed, KeyError) as err:
            res, error = {}, f"{type(err).__name__}: {err}"
        requests = server.requests
    result = {
        "llm": "STAND-IN: tests/chat_server.py on loopback (deterministic word picks from the passage)",
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "out")} | {
            "model": "packaged all-MiniLM-L6-v2", "index": "flat", "tsdae_batch_size": 8},
        "steps": loop.steps, "results": res, "error": error, "chat_requests": requests,
        "ndcg@10": {"before": (res.get("evaluate_before") or {}).get("ndcg@10"),
                    "after": (res.get("evaluate_after") or {}).get("ndcg@10")},
        "seconds_total": round(time.perf_counter() - t_all, 1),
        "machine": {"cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
                    "platform": platform.platform()},
        "work": str(work),
    }
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print("\n" + text)
    print("\nstep                 seconds  exit")
    for s in loop.steps:
        print(f"{s['step']:<20} {s['seconds']:>7.1f}  {s['exit']}")
    print(f"nDCG@10 (live alias, Cranfield, {INDEX}): before {result['ndcg@10']['before']} -> after "
          f"{result['ndcg@10']['after']}; total {result['seconds_total']:.0f} s" + (f"; FAILED: {error}" if error else ""))
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
