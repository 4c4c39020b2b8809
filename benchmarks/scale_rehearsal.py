"""Scale rehearsal: the embed job over N synthetic documents with the stand-in encoder, Ray already up.

Measures what grows with the corpus outside the model: planning time (schema, units, duplicate ids
on Ray), driver peak RSS, per-worker peak RSS, manifest bytes (manifest + parts index + plan),
finalize time, chunks/s. The forward pass is left out (``standin:``: tokenizer, batches and
shapes of the packaged MiniLM, zero vectors), so the figures are the pipeline's, not the model's.

    .venv/bin/python benchmarks/scale_rehearsal.py --docs 100000 1000000 --json out.json

Each size runs in a fresh driver process (``embedctl embed --address``) against one Ray cluster
started here (one node, ``--cpus`` logical CPUs); ray worker RSS is sampled every 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DRIVER = textwrap.dedent("""
    import json, resource, sys, time
    import engine.distributed.embed as job
    from engine.embed.config import EmbedJobConfig
    timed = {}
    real = job.finalize_run
    def finalize(*a, **k):
        t = time.perf_counter(); out = real(*a, **k); timed["finalize_s"] = round(time.perf_counter() - t, 3)
        return out
    job.finalize_run = finalize
    m = job.run_embed_job(EmbedJobConfig.from_flat(json.loads(sys.argv[1])))
    print(json.dumps({"manifest": m, "finalize_s": timed.get("finalize_s"),
                      "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
""")


def write_corpus(folder: Path, docs: int, files: int, seed: int = 0) -> float:
    """``docs`` short synthetic documents (~24 words) in ``files`` Parquet files; 0.1% repeat an earlier id."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(5000)], dtype=object)
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-docs // files)
    for f in range(files):
        lo, hi = f * per, min(docs, (f + 1) * per)
        words = vocab[rng.integers(0, len(vocab), size=(hi - lo, 24))]
        texts = [" ".join(row) for row in words]
        ids = np.array([f"doc{i:09d}" for i in range(lo, hi)], dtype=object)
        dup = rng.random(hi - lo) < 0.001
        ids[dup] = [f"doc{int(x):09d}" for x in rng.integers(0, max(1, lo + 1), size=int(dup.sum()))]
        pq.write_table(pa.table({"doc_id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())}),
                       folder / f"part-{f:04d}.parquet", row_group_size=8192)
    return time.perf_counter() - t0


class WorkerRss:
    """Peak RSS per Ray worker process of this cluster (``ray::`` processes descended from this one: the
    cluster's raylet is our child), sampled in a thread; other Ray instances on the machine are ignored."""

    def __init__(self) -> None:
        self.peak: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerRss:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            for p in psutil.Process().children(recursive=True):
                try:
                    cmd, rss = " ".join(p.cmdline()), p.memory_info().rss
                except psutil.Error:
                    continue
                if cmd.startswith("ray::"):
                    name = cmd.split()[0]
                    old = self.peak.get(p.pid, ("", 0))
                    self.peak[p.pid] = (name if name != "ray::IDLE" else old[0] or name, max(rss, old[1]))
            self._stop.wait(0.5)

    def summary(self) -> dict[str, Any]:
        rss = sorted((v[1] for v in self.peak.values()), reverse=True)
        by_role: dict[str, float] = {}
        for name, r in self.peak.values():
            by_role[name] = max(by_role.get(name, 0.0), round(r / 2**20, 1))
        return {"workers": len(rss), "max_mb": round(rss[0] / 2**20, 1) if rss else None, "by_role_max_mb": by_role}


def run_size(address: str, docs: int, files: int, unit_rows: int, work: Path) -> dict[str, Any]:
    corpus, store = work / f"corpus-{docs}", work / f"store-{docs}"
    gen_s = write_corpus(corpus, docs, files)
    cfg = {"corpus": str(corpus), "store": str(store), "model": "standin:", "unit_rows": unit_rows,
           "chunk_tokens": 128, "chunk_overlap": 16, "address": address, "progress": False}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": str(REPO),
           # keep 127.0.0.1 as the driver's node IP (Ray would swap in the host's outward IP)
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    t0 = time.perf_counter()
    with WorkerRss() as rss:
        p = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cfg)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"embed of {docs} docs failed:\n{p.stderr[-4000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    m = out["manifest"]
    run = store / "runs" / m["run_id"]
    meta_bytes = {"manifest": (run / "manifest.json").stat().st_size,
                  "parts_index": (run / "parts.parquet").stat().st_size,
                  "plan": (run / "_state" / "plan.json").stat().st_size if (run / "_state" / "plan.json").exists() else None}
    job_s = m["timings"]["wall_seconds"]
    plan_s = m["timings"].get("start_up", {}).get("plan_s")
    return {"docs": docs, "files": files, "units": m["units"]["total"], "chunks": m["counts"]["chunks"],
            "rejected": m["counts"]["rejected"], "corpus_gen_s": round(gen_s, 1), "job_s": job_s,
            "driver_wall_s": round(wall, 1), "plan_s": plan_s, "ray_init_s": m["timings"]["start_up"].get("ray_init_s"),
            "dedup_s": m["timings"]["start_up"].get("dedup_s"),
            "finalize_s": out["finalize_s"],
            "plan_pct": round(100 * plan_s / job_s, 2) if plan_s else None,
            "finalize_pct": round(100 * out["finalize_s"] / job_s, 2) if out["finalize_s"] else None,
            "chunks_per_s": m["throughput"]["chunks_per_second"], "driver_peak_rss_mb": out["driver_peak_rss_mb"],
            "worker_rss": rss.summary(), "metadata_bytes": meta_bytes,
            "plan_json_bytes_per_unit": round(meta_bytes["plan"] / m["units"]["total"], 1) if meta_bytes["plan"] else None,
            "outputs_inline": "embeddings" in m["outputs"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--files", type=int, default=0, help="Parquet files per corpus [docs / 50k, at least 2]")
    ap.add_argument("--unit-rows", type=int, default=2048)
    ap.add_argument("--cpus", type=int, default=2, help="logical CPUs of the one-node cluster")
    ap.add_argument("--work", default=None, help="scratch folder [a temp dir]")
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": args.cpus, "include_dashboard": False,
                                      "node_ip_address": "127.0.0.1", "object_store_memory": 1 << 30})
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="scale-rehearsal-", dir=args.work) as tmp:
            for n in args.docs:
                r = run_size("127.0.0.1:" + cluster.address.rsplit(":", 1)[1], n, args.files or max(2, n // 50_000), args.unit_rows, Path(tmp))
                r["load_avg"] = [round(x, 2) for x in os.getloadavg()]
                print(json.dumps(r), flush=True)
                results.append(r)
    finally:
        cluster.shutdown()
    if len(results) >= 2:
        a, b = results[0], results[-1]
        growth = {k: round(b[k] / a[k], 2) if a.get(k) and b.get(k) else None
                  for k in ("docs", "job_s", "plan_s", "finalize_s", "chunks_per_s", "driver_peak_rss_mb")}
        print(json.dumps({"growth_first_to_last": growth}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
