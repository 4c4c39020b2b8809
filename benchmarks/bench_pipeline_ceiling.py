"""The pipeline's ceiling without a GPU: the whole embed job with the stand-in encoder, Ray already up.

    .venv/bin/python benchmarks/bench_pipeline_ceiling.py [--scale 3] [--unit-rows 2048] [--model MODEL]

``--model standin:<model>`` does everything a real job does (Parquet in, chunk + tokenize, Ray
Data, token-budget batches padded as for the model, Parquet out, commits) except the forward
pass, so its throughput is what a device of any speed could at most be fed with on this
machine. Prints chunks/s for the job (wall, Ray up before the clock starts) and per core
(wall x the cluster's CPUs), and per stage: chunks per busy second of the chunk tasks, the
embedding actors and the writer tasks (summed from the unit markers), with the load average.
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

    from engine.distributed.embed import run_embed_job
    from engine.distributed.runtime import init_ray
    from engine.embed.config import EmbedJobConfig

    tmp = Path(tempfile.mkdtemp(prefix="bench-ceiling-"))
    try:
        corpus = write_corpus(tmp / "corpus", None, args.scale)
        t0 = time.perf_counter()
        init_ray(None)
        ray_start = time.perf_counter() - t0
        cpus = float(ray.cluster_resources().get("CPU", 1))
        cfg = EmbedJobConfig.from_flat({"corpus": str(tmp / "corpus"), "store": str(tmp / "store"), "device": "cpu",
                                        "model": args.model, "unit_rows": args.unit_rows})
        sampler = WorkerRss()
        sampler.start()
        t1 = time.perf_counter()
        m = run_embed_job(cfg)
        job = time.perf_counter() - t1
        sampler.stop = True
        c, t = m["counts"], m["timings"]
        stages = {"chunk_tasks": t["chunk_worker_seconds"], "embed_actors": t["embed_worker_seconds"],
                  "writers": t.get("write_worker_seconds", 0.0)}
        res = {
            "machine": f"{platform.node()} {os.cpu_count()} CPUs, Ray with {cpus:g} CPUs",
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "corpus": corpus, "model": args.model, "unit_rows": args.unit_rows, "units": m["units"]["total"],
            "chunks": c["chunks"], "tokens": c["tokens"], "status": m["status"],
            "ray_start_s": round(ray_start, 2), "job_s": round(job, 2),
            "chunks_per_s": round(c["chunks"] / job, 1),
            "chunks_per_s_per_core": round(c["chunks"] / job / cpus, 1),
            "stage_busy_s": {k: round(v, 2) for k, v in stages.items()},
            "stage_chunks_per_busy_s": {k: round(c["chunks"] / v, 1) if v else None for k, v in stages.items()},
            "start_up": t.get("start_up"),
            # bounded by a unit and its queue, not by the corpus: compare --scale 1 with --scale 10
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "worker_peak_rss_mb": round(sampler.peak / 2**20, 1),
        }
        print(json.dumps(res, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
