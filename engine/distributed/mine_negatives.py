"""Ray driver for hard-negative mining: `python jobs/mine_negatives.py --config job.yaml` (`embedctl mine-negatives`).

Spreads work as: query batches -> a pool of mining actors, each holding the corpus shards
memory-mapped and the query encoder once (plus BM25 / a cross-encoder when asked). At most
two batches are in flight per actor, so the driver never holds more than a few batches of
results, and a worker's memory is its shards plus one batch whatever the number of queries.
Each batch is committed to the output's staging folder; rerunning after a crash redoes only
the batches without a commit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from engine.distributed.driver import drive, driver_parser
from engine.mining import (
    BatchRunner,
    MiningJobConfig,
    MiningSource,
    finalize_mining,
    prepare_mining,
    read_pairs,
    resolve_source,
)

log = logging.getLogger("embedctl.engine.distributed.mine_negatives")
IN_FLIGHT_PER_ACTOR = 2

Progress = Callable[[dict[str, Any]], None]


class _MiningActor:
    """One mining worker: loads the corpus and model in ``__init__``, then mines batches."""

    def __init__(self, cfg: MiningJobConfig, source: MiningSource, max_positives: int, threads: int):
        self.runner = BatchRunner(cfg, source, max_positives=max_positives, threads=threads)

    def ready(self) -> dict[str, Any]:
        from engine.mining import current_rss_bytes

        torch = sys.modules.get("torch")  # loaded only for a real model; not imported for the hash encoder
        return {"pid": os.getpid(), "load_seconds": self.runner.miner.load_seconds, "rss_bytes": current_rss_bytes(),
                "torch_threads": torch.get_num_threads() if torch else None,
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}

    def run(self, batch_index: int, groups: list[dict[str, Any]]) -> dict[str, Any]:
        return self.runner.run(batch_index, groups)


def plan_mining_pool(resources: dict[str, float], device: str, workers: int | None, threads: int | None,
                     batches: int) -> Any:
    """The embed job's pool rule (engine.distributed.runtime.plan_pool: fractional CPUs, never one full CPU per
    actor on a small machine), with no more actors than batches and one actor per GPU (the embed
    job's two per card were measured for embedding only)."""
    from engine.distributed.runtime import PoolPlan, plan_pool

    plan = plan_pool(resources, device, workers, threads, actors_per_gpu=1)
    note = ""
    if plan.actors > max(1, batches) and not workers:
        plan = plan_pool(resources, device, max(1, batches), threads, actors_per_gpu=1)
        note = f" (one per batch: {max(1, batches)} batch(es))"
    cpus = float(resources.get("CPU", 1.0))
    if cpus <= 2 and plan.cpus_per_actor >= 1 and not plan.gpus_per_actor:
        # a small machine: reserve half a CPU (the reservation is logical; torch threads are set apart),
        # so Ray always has room for its own tasks and for a second job
        plan = PoolPlan(plan.actors, 0.5, 0.0, plan.threads_per_actor, plan.cpus_per_task,
                        plan.reason.replace(f"x {plan.cpus_per_actor:g} CPU", "x 0.5 CPU"))
    return PoolPlan(plan.actors, plan.cpus_per_actor, plan.gpus_per_actor, plan.threads_per_actor,
                    plan.cpus_per_task, plan.reason + note)


def run_mining_job(cfg: MiningJobConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run (or resume) the mining job on Ray; returns the summary."""
    t0 = time.perf_counter()
    prep = prepare_mining(cfg)  # every check happens here, before Ray starts
    if prep.finished is not None:
        if progress:
            progress({"event": "already_done", "out": cfg.out})
        return prep.finished
    if progress:
        progress({"event": "planned", "queries": len(prep.pairs.groups), "pairs": prep.pairs.pairs,
                  "batches": len(prep.batches), "pending": len(prep.pending), "corpus_rows": prep.source.rows})
    pool_info: dict[str, Any] = {"mode": "ray", "actors": 0}
    if prep.pending:
        import ray

        from engine.distributed.placement import connect_for_store

        connect_for_store(cfg.runtime.address, cfg.store, shared_filesystem=cfg.runtime.shared_filesystem)
        actors, pool_info = _start_actors(ray, prep.cfg, prep)  # prep.cfg: paths made absolute
        pool_info["startup_seconds"] = round(time.perf_counter() - t0, 3)
        t_mine = time.perf_counter()
        try:
            _mine_batches(ray, actors, prep, progress)
        finally:
            for actor in actors:
                ray.kill(actor)
        pool_info["mining_seconds"] = round(time.perf_counter() - t_mine, 3)
    return finalize_mining(prep, time.perf_counter() - t0, pool_info)


def _start_actors(ray: Any, cfg: MiningJobConfig, prep: Any) -> tuple[list[Any], dict[str, Any]]:
    """The actor pool, sized from the cluster, each actor loaded (shards and model) before mining."""
    pool = plan_mining_pool(ray.cluster_resources(), cfg.runtime.device, cfg.runtime.workers,
                            cfg.runtime.threads_per_worker, len(prep.pending))
    log.info("mining pool: %s", pool.reason)
    pool_info: dict[str, Any] = {"mode": "ray", "actors": pool.actors, "cpus_per_actor": pool.cpus_per_actor,
                                 "gpus_per_actor": pool.gpus_per_actor, "threads_per_actor": pool.threads_per_actor,
                                 "reason": pool.reason}
    options: dict[str, Any] = {}
    if not pool.gpus_per_actor:
        # Ray sets OMP_NUM_THREADS=1 in a worker with less than one CPU before torch loads, and
        # OpenMP keeps it: torch.set_num_threads later is not enough. Set it at process start.
        env = {"OMP_NUM_THREADS": str(pool.threads_per_actor)}
        if pool.threads_per_actor > 1:
            # Ray runs workers at nice 15; OpenMP threads that spin at barriers lose their CPU to any
            # other process and stall each other (measured: 4x slower on a busy 2-core machine).
            # Passive waiting costs little on an idle machine.
            env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
        options["runtime_env"] = {"env_vars": env}
    actor_cls: Any = ray.remote(num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor,
                                max_restarts=2, max_task_retries=2, **options)(_MiningActor)
    actors: list[Any] = [actor_cls.remote(cfg, prep.source, prep.pairs.max_positives, pool.threads_per_actor)
                         for _ in range(pool.actors)]
    # wait for every actor to load its shards and model, so the mining phase is timed on its own
    loaded = ray.get([a.ready.remote() for a in actors])
    pool_info["actor_load_seconds"] = [round(x["load_seconds"], 3) for x in loaded]
    pool_info["actor_torch_threads"] = [x["torch_threads"] for x in loaded]
    return actors, pool_info


def _mine_batches(ray: Any, actors: list[Any], prep: Any, progress: Progress | None) -> None:
    """Keep IN_FLIGHT_PER_ACTOR batches queued on each actor until every pending batch is mined."""
    from engine.core.errors import EmbedctlError

    todo = list(prep.pending)
    in_flight: dict[Any, tuple[int, int]] = {}  # ref -> (actor, batch)

    def submit(a: int) -> None:
        i = todo.pop(0)
        in_flight[actors[a].run.remote(i, [g.to_dict() for g in prep.batches[i]])] = (a, i)

    for a in range(len(actors)):
        for _ in range(IN_FLIGHT_PER_ACTOR):
            if todo:
                submit(a)
    while in_flight:
        done, _ = ray.wait(list(in_flight), num_returns=1)
        a, i = in_flight.pop(done[0])
        try:
            stats = ray.get(done[0])
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, EmbedctlError):
                raise cause from err
            raise
        if progress:
            progress({"event": "batch", "batch": i, "queries": stats["queries"], "rows": stats["rows_written"],
                      "peak_rss_bytes": stats["worker"]["peak_rss_bytes"]})
        if todo:
            submit(a)


def dry_run(cfg: MiningJobConfig) -> dict[str, Any]:
    """Resolve the source and read the pairs without writing anything."""
    cfg.validate()
    source = resolve_source(cfg)
    pairs = read_pairs(cfg.pairs, cfg.endpoint_url)
    b = cfg.runtime.batch_size
    return {"config": cfg.to_dict(), "source": source.to_dict(), "queries": len(pairs.groups), "pairs": pairs.pairs,
            "pair_rejects": pairs.rejects, "max_positives_per_query": pairs.max_positives,
            "batches": -(-len(pairs.groups) // b), "window": cfg.mining.range_max + (
                cfg.mining.window_extra if cfg.mining.window_extra is not None else pairs.max_positives)}


def build_parser() -> argparse.ArgumentParser:
    p = driver_parser("mine-negatives", "YAML/JSON job config (same keys as `embedctl mine-negatives` flags)",
                      "validate the config offline, print it resolved as JSON, exit")
    p.add_argument("--check-store", action="store_true",
                   help="with --dry-run: also resolve the source version and read the pairs (needs the store)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def dry(cfg: MiningJobConfig) -> dict[str, Any]:
        # Offline by default, so a manifest's config can be checked where the store is unreachable.
        if args.check_store:
            return dry_run(cfg)
        cfg.validate()
        return {"config": cfg.to_dict()}

    return drive(args, MiningJobConfig.from_flat,
                 lambda cfg: run_mining_job(cfg, progress=lambda e: log.info("%s", json.dumps(e))), dry=dry)


if __name__ == "__main__":
    sys.exit(main())
