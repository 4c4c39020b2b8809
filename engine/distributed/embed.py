"""Ray driver for the embed job: `python jobs/embed.py --config job.yaml` (also `embedctl embed`).

Spreads work as: pending units -> chunk tasks (CPU, Ray Data map) -> embedding actor pool
(CPU or GPU, Ray Data map_batches: vectors only) -> writer tasks (CPU, Ray Data map: append,
write, hash, commit). The device never waits for a unit's I/O. Retries: an actor that dies
mid-unit is restarted and the unit retried; a writer that dies mid-write is retried (every
write is idempotent and the commit marker is written last).
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from engine.distributed.driver import drive, driver_parser
from engine.embed.config import EmbedJobConfig
from engine.embed.embedder import UnitEmbedder, commit_row
from engine.embed.pipeline import finalize_run, plan_meta_for, prepare_run, run_summary

log = logging.getLogger("embedctl.engine.distributed.embed")

Progress = Callable[[dict[str, Any]], None]


def _chunk_task(row: dict[str, Any], cfg: EmbedJobConfig, plan_meta: dict[str, Any]) -> dict[str, Any]:
    """Ray Data map task (CPU): read + validate + chunk one unit, and tokenize it for the actors."""
    from engine.embed.corpus import Unit
    from engine.embed.parts_index import worker_location
    from engine.embed.pipeline import chunk_unit_tokens, pretokenize

    unit = Unit(**json.loads(row["unit"]))
    dups = {int(k): v for k, v in json.loads(row["dups"]).items()}
    summary, table, token_ids = chunk_unit_tokens(cfg, plan_meta, unit, dups)
    summary["chunk_worker"] = worker_location()  # joins the unit's commit record (which node chunked it)
    packed = pretokenize(cfg, table, token_ids)
    ids, lens = packed if packed else (b"", b"")
    return {"chunked": json.dumps(summary), "ids": ids, "lens": lens}


class _EmbedActor:
    def __init__(self, cfg: EmbedJobConfig, run_id: str, threads: int, thread_env: dict[str, str]):
        _set_thread_env(thread_env)
        self.embedder = UnitEmbedder(cfg, run_id, threads=threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.embedder.encode_batch(batch)  # vectors only: the writer tasks commit


def run_embed_job(cfg: EmbedJobConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run (or resume) the embed job on Ray and return the final manifest."""
    started_at = time.time()
    t0 = time.perf_counter()
    driver: dict[str, float] = {}  # plan_s includes connecting Ray and finding duplicate ids
    driver["process_s"] = _process_age(started_at)  # the command's own start (interpreter, imports, flags)
    # all validation happens here, before Ray starts any work
    cfg, prepared = _prepare_while_ray_starts(cfg, driver)
    plan_s = time.perf_counter() - t0
    if progress:
        progress({"event": "planned", "run_id": prepared.run_id, "units": len(prepared.plan.units),
                  "pending": len(prepared.pending), "docs": prepared.plan.total_rows})
    driver["plan_s"] = round(plan_s, 3)
    if prepared.pending:
        _run_units_retrying(cfg, prepared, progress, driver, t0)
    return finalize_run(cfg, prepared, time.perf_counter() - t0, started_at, driver_timings=driver)


def _process_age(now: float) -> float:
    """Seconds this process ran before ``now`` (so a report can count from the command's start)."""
    try:
        import psutil  # a Ray dependency
    except ImportError:
        return 0.0
    try:
        return round(max(0.0, now - psutil.Process().create_time()), 3)
    except (OSError, psutil.Error):  # no /proc: the split starts at the job
        return 0.0


def _prepare_while_ray_starts(cfg: EmbedJobConfig, driver: dict[str, float]) -> tuple[EmbedJobConfig, Any]:
    """Plan the run (schema checks, fingerprints, units, tokenizer, backend export, duplicates) in a
    thread while this one connects or starts Ray (seconds on a local machine); units and, when none was
    asked, the backend chosen by device."""
    from concurrent.futures import ThreadPoolExecutor

    cfg.validate()  # a bad flag fails at once, before Ray starts
    remote = bool(cfg.runtime.address or os.environ.get("RAY_ADDRESS"))
    if remote and (not cfg.corpus.unit_rows or cfg.embed.backend is None) and cfg.embed.device == "auto":
        _connect(cfg, driver)  # the unit size and the default backend depend on whether the cluster has GPUs
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else _local_gpus()
    backend_asked = cfg.embed.backend is not None
    cfg = cfg.with_device_defaults(gpus)
    ray_up: Future[None] = Future()
    with ThreadPoolExecutor(1, thread_name_prefix="embedctl-plan") as pool:
        planned = pool.submit(prepare_run, cfg, duplicate_finder=_duplicate_finder(driver, ray_up),
                              backend_asked=backend_asked)
        try:
            _connect(cfg, driver)
        except BaseException as err:
            ray_up.set_exception(err)
            raise
        ray_up.set_result(None)
        prepared = planned.result()
        return prepared.cfg, prepared


def _connect(cfg: EmbedJobConfig, driver: dict[str, float]) -> None:
    """Connect (or start) Ray and check the store suits the cluster (again after a lost node: cheap)."""
    from engine.distributed.placement import connect_for_store
    from engine.distributed.runtime import quiet_ray_data

    with quiet_ray_data():  # Ray's own warnings and log lines, kept out of the CLI unless -v
        t_ray = time.perf_counter()
        connect_for_store(cfg.runtime.address, cfg.store, shared_filesystem=cfg.runtime.shared_filesystem,
                          corpus=cfg.corpus.corpus)
        driver.setdefault("ray_init_s", round(time.perf_counter() - t_ray, 3))


def _local_gpus() -> float:
    """GPUs a local Ray would see, without importing torch (device files; CUDA_VISIBLE_DEVICES narrows them)."""
    import glob

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return float(len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"]))
    return float(len(glob.glob("/dev/nvidia[0-9]*")))


SYSTEM_RETRIES = 2  # whole passes over the units still uncommitted after a node or actor is lost


def _run_units_retrying(cfg: EmbedJobConfig, prepared: Any, progress: Progress | None, driver: dict[str, float],
                        t0: float) -> None:
    """Run the pending units; when the cluster loses an actor's node mid-run (Ray Data then fails the
    whole dataset), run another pass over the units without a commit marker (commits are idempotent)."""
    import ray.exceptions as rex

    from engine.core.storage import open_store
    from engine.embed.parts import state_key

    lost = (rex.ActorDiedError, rex.ActorUnavailableError, rex.NodeDiedError, rex.ObjectLostError,
            rex.WorkerCrashedError)
    for attempt in range(SYSTEM_RETRIES + 1):
        try:
            _run_units(cfg, prepared, progress, driver, t0)
            return
        except lost as err:
            if attempt == SYSTEM_RETRIES:
                raise
            store = open_store(cfg.store, endpoint_url=cfg.endpoint_url)
            done = {k.rsplit("/", 1)[-1].removesuffix(".json") for k in store.list(state_key(prepared.run_id, "done"))}
            prepared.pending = [u for u in prepared.plan.units if u.unit_id not in done]
            log.warning("the cluster lost a worker mid-run (%s); retrying the %d uncommitted unit(s)",
                        type(err).__name__, len(prepared.pending))
            if not prepared.pending:
                return


DRIVER_DEDUP_ROWS = 250_000  # up to this many ids, duplicates are found in the driver (~tens of MB, no Ray round trip)


def _duplicate_finder(driver: dict[str, float], ray_up: Future[None]) -> Any:
    """Duplicate ids: in the driver for a small corpus, else by Ray tasks over hash partitions, so the
    driver never holds every id of a big one (it waits for the connection the main thread makes)."""
    def find(corpus: Any, keys: list[str], total_rows: int) -> dict[str, dict[int, str]]:
        t_dup = time.perf_counter()
        if total_rows <= DRIVER_DEDUP_ROWS:
            from engine.embed.corpus import local_duplicates

            dups = local_duplicates(corpus, keys)
        else:
            from engine.distributed.dedup import find_duplicates_ray

            ray_up.result()  # Ray started by the main thread (its error, if it failed, is raised there too)
            dups = find_duplicates_ray(corpus.with_absolute_path(), keys, total_rows)
        driver["dedup_s"] = round(time.perf_counter() - t_dup, 3)
        return dups

    return find


def _run_units(cfg: EmbedJobConfig, prepared: Any, progress: Progress | None, driver: dict[str, float],
               t0: float) -> None:
    """Chunk tasks -> embedding actors -> writer tasks over the pending units, streamed by Ray Data."""
    import ray

    from engine.distributed.runtime import plan_pool, quiet_ray_data

    _connect(cfg, driver)  # connected while planning; again after a lost node
    pool = plan_pool(ray.cluster_resources(), cfg.embed.device, cfg.runtime.workers, cfg.runtime.threads_per_worker,
                     standin=cfg.embed.standin)
    log.info("embedding pool: %s", pool.reason)
    plan_meta = plan_meta_for(prepared)
    cfg = cfg.with_absolute_paths()  # what the workers get: they run in the folder their Ray started in
    items = []
    dup_rows = {f: sorted(d) for f, d in prepared.plan.duplicates.items()}  # per file, for a bisect per unit
    for u in prepared.pending:
        dups, rows = prepared.plan.duplicates.get(u.file, {}), dup_rows.get(u.file, [])
        lo, hi = bisect.bisect_left(rows, u.row_start), bisect.bisect_left(rows, u.row_end)
        unit_dups = {str(r): dups[r] for r in rows[lo:hi]}
        items.append({"unit": json.dumps(dataclasses.asdict(u)), "dups": json.dumps(unit_dups)})
    with quiet_ray_data():  # Ray Data's own warnings and log lines, kept out of the CLI unless -v
        ds = unit_stages(
            ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 1000))), pool,
            chunk=(_chunk_task, {"cfg": cfg, "plan_meta": plan_meta}),
            embed=(_EmbedActor, {"cfg": cfg, "run_id": prepared.run_id, "threads": pool.threads_per_actor,
                                 "thread_env": _thread_env(pool)}),
            write=(commit_row, {"cfg": cfg, "run_id": prepared.run_id}))
        for marker in committed_markers(ds):
            if "first_unit_done_s" not in driver:
                driver["first_unit_done_s"] = round(time.perf_counter() - t0, 3)
            if progress:
                progress({"event": "unit", **json.loads(marker)})


def unit_stages(ds: Any, pool: Any, chunk: tuple[Callable[..., Any], dict[str, Any]],
                embed: tuple[type, dict[str, Any]], write: tuple[Callable[..., Any], dict[str, Any]]) -> Any:
    """The job's three Ray Data stages over a dataset of units, sized by ``pool`` (a PoolPlan):
    chunk tasks -> the embedding actor pool (vectors only) -> writer tasks (append, write, commit)."""
    import ray

    ds = ds.map(chunk[0], fn_kwargs=chunk[1], num_cpus=pool.cpus_per_task)
    ds = ds.map_batches(
        embed[0], fn_constructor_kwargs=embed[1], batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=pool.actors, max_size=pool.actors),
        num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor or None,
        # An actor killed mid-unit is restarted and the unit retried: writes are idempotent.
        max_restarts=3, max_task_retries=3, **_actor_env(pool),
    )
    # Writers: off the device's path; a writer killed mid-write is retried (the marker comes last).
    # Capped (pool.writers), so the CPUs they do not use go to the chunk tasks.
    return ds.map(write[0], fn_kwargs=write[1], num_cpus=pool.cpus_per_writer,
                  compute=ray.data.TaskPoolStrategy(size=pool.writers), max_retries=3, **_writer_env())


def committed_markers(ds: Any) -> Iterator[str]:
    """Each unit's commit marker (JSON) as soon as its writer is done. ``iter_rows`` looks one block
    ahead, so every unit but the last reached the driver (and the progress bar) only when the next
    one was committed: a CPU unit's whole embedding time late."""
    for batch in ds.iter_batches(batch_size=None, prefetch_batches=0, batch_format="pyarrow"):
        yield from batch.column("marker").to_pylist()


def _thread_env(pool: Any) -> dict[str, str]:
    """OpenMP settings for a CPU actor, applied in its constructor before torch loads (``_set_thread_env``)."""
    if pool.gpus_per_actor:
        return {}
    # Ray sets OMP_NUM_THREADS=1 in a 1-CPU worker, and OpenMP reads it once, when torch loads:
    # torch.set_num_threads later is not enough. Ray workers run niced; threads spinning at OpenMP
    # barriers lose their slices to any other load and the actor crawls (seen here: 4x slower in
    # the mining actors), hence PASSIVE.
    return {"OMP_NUM_THREADS": str(pool.threads_per_actor), "OMP_WAIT_POLICY": "PASSIVE"}


def _set_thread_env(env: dict[str, str]) -> None:
    """In the actor's own process, before its model (and OpenMP) loads. Passed as constructor arguments
    rather than a runtime_env: an actor with its own runtime_env waits for Ray's runtime-env agent
    (seconds on a fresh cluster) and cannot start in a plain worker process."""
    import sys

    if env and "torch" in sys.modules:
        log.warning("torch was loaded before the actor set its threads (%s); OpenMP may ignore them", env)
    os.environ.update(env)


def _actor_env(pool: Any) -> dict[str, Any]:
    """A runtime_env only for the fault-injection hook of the retry test (tests set it after Ray started)."""
    flag = os.environ.get("EMBEDCTL_TEST_CRASH_ONCE")
    return {"runtime_env": {"env_vars": {"EMBEDCTL_TEST_CRASH_ONCE": flag}}} if flag else {}


def _writer_env() -> dict[str, Any]:
    flag = os.environ.get("EMBEDCTL_TEST_CRASH_IN_WRITE_ONCE")  # fault-injection hook for the writer test
    return {"runtime_env": {"env_vars": {"EMBEDCTL_TEST_CRASH_IN_WRITE_ONCE": flag}}} if flag else {}


def build_parser() -> argparse.ArgumentParser:
    p = driver_parser("embed", "YAML/JSON job config (same keys as `embedctl embed` flags)")
    return p


def main(argv: list[str] | None = None) -> int:
    return drive(build_parser().parse_args(argv), EmbedJobConfig.from_flat,
                 lambda cfg: run_summary(run_embed_job(cfg, progress=lambda e: log.info("%s", json.dumps(_short(e)))),
                                         cfg.store),
                 exit_code=lambda summary: 0 if summary["status"] == "succeeded" else 1)


def _short(event: dict[str, Any]) -> dict[str, Any]:
    keep = ("event", "run_id", "unit_id", "units", "pending", "docs", "accepted", "rejected", "chunks", "tokens")
    return {k: v for k, v in event.items() if k in keep}


if __name__ == "__main__":
    sys.exit(main())
