"""Ray driver for synthetic queries: `python jobs/generate_queries.py --config gen.yaml` (`embedctl generate-queries`).

Spreads work as: the chunks without a cached answer -> ``tasks`` Ray tasks, each with a share
of the concurrency (threads with one request in flight each) and of the requests-per-minute
budget, so the job as a whole never exceeds ``concurrency`` requests in flight nor
``requests_per_minute``. The work is I/O-bound: a task reserves a tenth of a CPU. Each
answer is cached in the store as it arrives; the driver then filters and writes the pairs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any

from engine.distributed.driver import drive, driver_parser
from engine.generate.config import GenerateJobConfig
from engine.generate.job import (
    api_key_from_env,
    ask_chunks,
    finalize_generation,
    prepare_generation,
    raise_endpoint_error,
)

log = logging.getLogger("embedctl.engine.distributed.generate_queries")

Progress = Callable[[dict[str, Any]], None]
TASK_CPUS = 0.1  # waiting on HTTP: a task's CPU use is parsing JSON


def plan_tasks(cfg: GenerateJobConfig, pending: int) -> list[tuple[int, int, float | None]]:
    """(chunks, threads, requests per minute) per task: shares of the job-wide limits that sum to them."""
    rate = cfg.rate
    n = rate.tasks or max(1, min(rate.concurrency, math.ceil(pending / rate.chunks_per_task)))
    n = max(1, min(n, pending, rate.concurrency))
    plan = []
    for i in range(n):
        chunks = pending // n + (1 if i < pending % n else 0)
        threads = rate.concurrency // n + (1 if i < rate.concurrency % n else 0)
        rpm = rate.requests_per_minute * threads / rate.concurrency if rate.requests_per_minute else None
        plan.append((chunks, threads, rpm))
    return plan


def run_generation_job(cfg: GenerateJobConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run (or resume) the job: ask on Ray tasks, then finalize here; returns the summary."""
    t0 = time.perf_counter()
    prep = prepare_generation(cfg)  # every check happens before Ray starts
    if progress:
        progress({"event": "planned", "chunks": len(prep.items), "pending": len(prep.pending)})
    results: list[dict[str, Any]] = []
    runtime: dict[str, Any] = {"mode": "ray", "tasks": 0}
    if prep.pending:
        import ray

        from engine.distributed.runtime import init_ray

        init_ray(cfg.address)
        plan = plan_tasks(cfg, len(prep.pending))
        runtime = {"mode": "ray", "tasks": len(plan), "threads": [p[1] for p in plan],
                   "requests_per_minute": [p[2] for p in plan]}
        log.info("asking for %d chunks over %d Ray task(s)", len(prep.pending), len(plan))
        key = api_key_from_env(cfg.llm)
        # max_retries=0: a task's chunks already retry request by request; a task that dies lost only
        # the answers in flight (the rest are cached), and the next run asks for those
        task: Any = ray.remote(num_cpus=TASK_CPUS, max_retries=0)(ask_chunks)
        refs, start = [], 0
        for chunks, threads, rpm in plan:
            refs.append(task.remote(prep.pending[start:start + chunks], prep.cfg, key, threads, rpm))
            start += chunks
        pending_refs = list(refs)
        while pending_refs:
            done, pending_refs = ray.wait(pending_refs, num_returns=1)
            try:
                part = ray.get(done[0])
            except ray.exceptions.RayTaskError as err:
                for r in pending_refs:
                    ray.cancel(r, force=True)
                raise_endpoint_error(err)
                raise
            results.extend(part)
            if progress:
                progress({"event": "task", "chunks": len(part),
                          "failed": sum(1 for r in part if r["status"] != "ok")})
    return finalize_generation(prep, results, time.perf_counter() - t0, runtime)


def run_generation(cfg: GenerateJobConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Ray tasks, or this process with ``local``."""
    if cfg.local:
        from engine.generate.job import run_generation_locally

        return run_generation_locally(cfg, progress)
    return run_generation_job(cfg, progress)


def main(argv: list[str] | None = None) -> int:
    args = driver_parser("generate-queries", "YAML/JSON config (same keys as `embedctl generate-queries` flags)"
                         ).parse_args(argv)
    return drive(args, GenerateJobConfig.from_flat, run_generation,
                 dry=lambda cfg: dataclasses.asdict(cfg) | {"job_id": cfg.job_id()})


if __name__ == "__main__":
    sys.exit(main())
