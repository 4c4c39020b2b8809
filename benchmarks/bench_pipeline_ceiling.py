"""The pipeline's ceiling without a GPU: the whole embed job with the stand-in encoder, Ray already up.

    .venv/bin/python benchmarks/bench_pipeline_ceiling.py [--scale 3] [--unit-rows 2048] [--model MODEL]

``--model standin:<model>`` does everything a real job does (Parquet in, chunk + tokenize, Ray
Data, token-budget batches padded as for the model, Parquet out, commits) except the forward
pass, so its throughput is what a device of any speed could at most be fed with on this
machine. Runs the job twice on one Ray (Ray started before the clock): first on the fresh cluster,
then again into a new store, as on a cluster that has run a dataset before (Ray Data's own actors
exist, idle workers have it imported). For each: chunks/s for the job and per core (wall x the
cluster's CPUs), per core after the first unit started, and per stage: chunks per busy second of
the chunk tasks, the embedding actors and the writer tasks (summed from the unit markers), and the
job's per-core figure over the chunk tasks' own rate (a share that moves less with the VM). The
headline ``chunks_per_s_per_core`` is the second job's; the first job's start-up is goal 4's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_embed import write_corpus  # noqa: E402


class WorkerRss(threading.Thread):
    """Samples the largest resident set of any Ray worker process (``ray::...``) every 0.5 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.stop = 0, False

    def run(self) -> None:
        import psutil

        while not self.stop:
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if cmd.startswith("ray::") and p.info["memory_info"] is not None:
                    self.peak = max(self.peak, p.info["memory_info"].rss)
            time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=3, help="Cranfield copies (new ids, rotated texts)")
    ap.add_argument("--unit-rows", type=int, default=2048)
    ap.add_argument("--model", default="standin:", help="standin:<model> (default: the packaged MiniLM's shape)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import ray

    from engine.distributed.runtime import init_ray
    from engine.embed.config import EmbedJobConfig

    tmp = Path(tempfile.mkdtemp(prefix="bench-ceiling-"))
    try:
        corpus = write_corpus(tmp / "corpus", None, args.scale)
        t0 = time.perf_counter()
        init_ray(None)
        ray_start = time.perf_counter() - t0
        cpus = float(ray.cluster_resources().get("CPU", 1))
        jobs = {}
        # The same job twice on one Ray, each into its own store: the first meets a fresh cluster (Ray
        # Data starts its own actors, every worker imports it); the second a cluster that has run a
        # dataset before, as a long-lived one has. The ceiling is the second; the fixed start the first.
        for name in ("fresh_ray", "used_ray"):
            cfg = EmbedJobConfig.from_flat({"corpus": str(tmp / "corpus"), "store": str(tmp / f"store-{name}"),
                                            "device": "cpu", "model": args.model, "unit_rows": args.unit_rows})
            jobs[name] = run_job(cfg, cpus)
        res = {
            "machine": f"{platform.node()} {os.cpu_count()} CPUs, Ray with {cpus:g} CPUs",
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "corpus": corpus, "model": args.model, "unit_rows": args.unit_rows,
            "ray_start_s": round(ray_start, 2),
            "chunks_per_s_per_core": jobs["used_ray"]["chunks_per_s_per_core"],
            "first_job_chunks_per_s_per_core": jobs["fresh_ray"]["chunks_per_s_per_core"],
            "jobs": jobs,
            # bounded by a unit and its queue, not by the corpus: compare --scale 1 with --scale 10
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        print(json.dumps(res, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_job(cfg: Any, cpus: float) -> dict[str, Any]:
    """One embed job, timed from the driver; per core, per stage, and after its first unit started."""
    from engine.distributed.embed import run_embed_job

    sampler = WorkerRss()
    sampler.start()
    t1 = time.perf_counter()
    m = run_embed_job(cfg)
    job = time.perf_counter() - t1
    sampler.stop = True
    c, t = m["counts"], m["timings"]
    up = t.get("start_up") or {}
    stages = {"chunk_tasks": t["chunk_worker_seconds"], "embed_actors": t["embed_worker_seconds"],
              "writers": t.get("write_worker_seconds", 0.0)}
    first = float(up.get("first_unit_start_s", 0.0))
    return {
        "status": m["status"], "units": m["units"]["total"], "chunks": c["chunks"], "tokens": c["tokens"],
        "job_s": round(job, 2),
        "chunks_per_s": round(c["chunks"] / job, 1),
        "chunks_per_s_per_core": round(c["chunks"] / job / cpus, 1),
        # the steady state: from the first unit's start to the end (the fixed start left out)
        "after_first_unit_per_core": round(c["chunks"] / max(job - first, 1e-9) / cpus, 1),
        "stage_busy_s": {k: round(v, 2) for k, v in stages.items()},
        "stage_chunks_per_busy_s": {k: round(c["chunks"] / v, 1) if v else None for k, v in stages.items()},
        # per-core throughput over the chunk tasks' own rate (chunks per busy second), which reduces to the
        # share of the cluster's core-seconds the chunk tasks were busy: steadier than the absolute figure
        # on a VM whose speed swings, since both move with the machine
        "per_core_over_chunk_tasks_rate": round(stages["chunk_tasks"] / (job * cpus), 3) if stages["chunk_tasks"] else None,
        "start_up": up,
        "worker_peak_rss_mb": round(sampler.peak / 2**20, 1),
    }


if __name__ == "__main__":
    main()
