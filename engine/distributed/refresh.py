"""Ray orchestration of a refresh: `python jobs/refresh.py --config refresh.yaml` (also `embedctl refresh`).

Spreads work as: pending units of the new snapshot -> chunk (in the driver for small
snapshots, else Ray tasks) -> units whose chunks all have a stored vector are copied by cheap
Ray tasks (no model), units with new/changed chunks go to an embedding actor pool; when few
chunks need the model (``local_max_embed``), everything runs in the driver (the model in
``engine.refresh.model.ModelProcess``) and no actor is paid. The library steps (lease, diff,
index build, gates, publish) are ``engine.refresh``'s (``RefreshSession``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine.distributed.driver import drive, driver_parser
from engine.refresh.config import RefreshConfig
from engine.refresh.model import ModelProcess, can_embed_here, start_model_process
from engine.refresh.reuse import RefreshEmbedder, VectorLookup, unit_misses
from engine.refresh.session import RefreshSession, dry_run
from engine.refresh.summary import exit_code

if TYPE_CHECKING:
    from engine.embed.encoders import Encoder

log = logging.getLogger("embedctl.engine.distributed.refresh")

Progress = Callable[[dict[str, Any]], None]


def _chunk_task(row: dict[str, Any], session_cfg: Any, plan_meta: dict[str, Any], lookup: VectorLookup) -> dict[str, Any]:
    """Ray map task: chunk one unit (the embed job's stage) and count its chunks that need the model."""
    from engine.embed.corpus import Unit
    from engine.embed.pipeline import chunk_unit

    unit = Unit(**json.loads(row["unit"]))
    dups = {int(k): v for k, v in json.loads(row["dups"]).items()}
    chunked = chunk_unit(session_cfg, plan_meta, unit, dups)
    return {"chunked": json.dumps(chunked), "misses": unit_misses(session_cfg, chunked, lookup)}


class _RefreshActor:
    """Embedding actor: a RefreshEmbedder (the embed job's UnitEmbedder with stored-vector reuse)."""

    def __init__(self, cfg: Any, run_id: str, identity: dict[str, Any], lookup: VectorLookup, threads: int | None):
        self.embedder = RefreshEmbedder(cfg, run_id, identity, lookup, threads=threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.embedder(batch)


def _copy_task(row: dict[str, Any], cfg: Any, run_id: str, identity: dict[str, Any], lookup: VectorLookup) -> dict[str, Any]:
    """Ray map task for a unit whose every chunk has a stored vector: no model is loaded."""
    marker = RefreshEmbedder(cfg, run_id, identity, lookup).embed_unit(json.loads(row["chunked"]))
    return {"marker": json.dumps(marker)}


def run_refresh_job(rcfg: RefreshConfig, progress: Progress | None = None, encoder: Encoder | None = None) -> dict[str, Any]:
    """Run (or resume) a refresh and return its summary. ``encoder`` (tests) forces the in-driver path."""
    session = RefreshSession(rcfg)
    live, cfg = session.resolve()  # every refusal (alias, model/chunker, rollout) comes first
    executor = "local" if encoder is not None else rcfg.executor
    if executor == "auto" and not can_embed_here(cfg.embed.device):
        executor = "ray"  # device: cuda, and this driver (e.g. a RayJob head) has no GPU: embed on the cluster
    # The model loads in its own process from now on, beside planning and chunking (killed if unused).
    model_proc = None
    if encoder is None and executor != "ray":
        model_proc = start_model_process(session.store, live, cfg)
    if model_proc is not None:
        session.set_model_loader(model_proc.as_encoder)
    try:
        quick = session.up_to_date()  # "the snapshot's files are the live run's files": nothing to do
        if quick is not None:
            return {**quick, "executor": "none"}
        return _run(session, executor, encoder, progress, model_proc)
    finally:
        if model_proc is not None:
            model_proc.close()


def _run(session: RefreshSession, executor: str, encoder: Encoder | None, progress: Progress | None,
         model_proc: ModelProcess | None) -> dict[str, Any]:
    rcfg = session.rcfg
    with session:
        st = session.prepare()
        prepared = st.prepared
        if progress:
            progress({"event": "planned", "run_id": st.run_id, "units": len(prepared.plan.units),
                      "pending": len(prepared.pending), "docs": prepared.plan.total_rows})
        t = time.perf_counter()
        tables: dict[str, Any] = {}
        if rcfg.chunk_in_driver(executor, sum(u.rows for u in prepared.pending)):
            done = session.chunk_locally()
            chunked = [(c, session.unit_misses_in(table)) for c, table in done]
            tables = {c["unit_id"]: table for c, table in done}
        else:
            chunked = _chunk_on_ray(session)
        session.timings["chunk_seconds"] = time.perf_counter() - t
        misses = sum(m for _c, m in chunked)
        t = time.perf_counter()
        session.stage("embed")
        if rcfg.embed_in_driver(executor, misses):
            where = "driver"
            session.embed_in_driver(chunked, tables, encoder, progress)
        else:
            where = "ray"
            if model_proc is not None:
                model_proc.close()  # the cluster's actors embed: free this core now
            _embed_on_ray(session, chunked, progress)
        session.timings["embed_seconds"] = time.perf_counter() - t
        log.info("refresh %s: %d units, %d chunks needed the model; embedded in the %s", st.run_id, len(chunked),
                 misses, where)
        summary = session.finish()
        summary["executor"] = where
        if model_proc is not None and model_proc.info:
            summary["model_loader"] = model_proc.info
        return summary


def _items(session: RefreshSession) -> list[dict[str, str]]:
    import dataclasses

    st = session.state
    assert st is not None and st.prepared is not None
    items = []
    for u in st.prepared.pending:
        dups = st.prepared.plan.duplicates.get(u.file, {})
        unit_dups = {str(r): loc for r, loc in dups.items() if u.row_start <= r < u.row_end}
        items.append({"unit": json.dumps(dataclasses.asdict(u)), "dups": json.dumps(unit_dups)})
    return items


def _chunk_on_ray(session: RefreshSession) -> list[tuple[dict[str, Any], int]]:
    import ray

    from engine.distributed.placement import connect_for_store
    from engine.distributed.runtime import plan_pool
    from engine.embed.pipeline import plan_meta_for

    st = session.state
    assert st is not None and st.prepared is not None
    session.stage("chunk")
    if not st.prepared.pending:
        return []
    connect_for_store(st.cfg.runtime.address, st.cfg.store, shared_filesystem=st.cfg.runtime.shared_filesystem,
                      corpus=st.cfg.corpus.corpus)
    pool = plan_pool(ray.cluster_resources(), "cpu", None, None)
    items = _items(session)
    ds: Any = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 1000)))
    ds = ds.map(_chunk_task, fn_kwargs={"session_cfg": st.cfg, "plan_meta": plan_meta_for(st.prepared),
                                        "lookup": st.lookup}, num_cpus=pool.cpus_per_task)
    return [(json.loads(r["chunked"]), int(r["misses"])) for r in ds.iter_rows()]


def _embed_on_ray(session: RefreshSession, chunked: list[tuple[dict[str, Any], int]], progress: Progress | None) -> None:
    import ray

    from engine.distributed.placement import connect_for_store
    from engine.distributed.runtime import plan_pool

    st = session.state
    assert st is not None
    connect_for_store(st.cfg.runtime.address, st.cfg.store, shared_filesystem=st.cfg.runtime.shared_filesystem,
                      corpus=st.cfg.corpus.corpus)
    copy_only = [{"chunked": json.dumps(c)} for c, m in chunked if m == 0]
    to_embed = [{"chunked": json.dumps(c)} for c, m in chunked if m > 0]
    warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
    rows: list[dict[str, Any]] = []
    if copy_only:
        ds: Any = ray.data.from_items(copy_only, override_num_blocks=max(1, min(len(copy_only), 1000)))
        ds = ds.map(_copy_task, fn_kwargs={"cfg": st.cfg, "run_id": st.run_id, "identity": st.live.model,
                                           "lookup": st.lookup}, num_cpus=0.5)
        rows.extend(ds.iter_rows())
    if to_embed:
        pool = plan_pool(ray.cluster_resources(), st.cfg.embed.device, st.cfg.runtime.workers,
                         st.cfg.runtime.threads_per_worker)
        n = max(1, min(pool.actors, len(to_embed)))
        log.info("embedding pool for %d units with changed chunks: %s", len(to_embed), pool.reason)
        ds2: Any = ray.data.from_items(to_embed, override_num_blocks=max(1, min(len(to_embed), 1000)))
        ds2 = ds2.map_batches(
            _RefreshActor,
            fn_constructor_kwargs={"cfg": st.cfg, "run_id": st.run_id, "identity": st.live.model,
                                   "lookup": st.lookup, "threads": pool.threads_per_actor},
            batch_size=1, compute=ray.data.ActorPoolStrategy(min_size=n, max_size=n),
            num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor or None,
            max_restarts=3, max_task_retries=3,  # a unit's writes are idempotent: retry it on a new actor
        )
        rows.extend(ds2.iter_rows())
    for row in rows:
        marker = json.loads(row["marker"])
        session.record_unit(marker)
        if progress:
            progress({"event": "unit", **marker})


def build_parser() -> argparse.ArgumentParser:
    p = driver_parser("refresh", "YAML/JSON config (same keys as `embedctl refresh` flags)",
                      "validate the config (offline), print it resolved as JSON, exit")
    p.add_argument("--check-store", action="store_true",
                   help="with --dry-run: also read the store (live version, its run, model/chunker compatibility, "
                        "the lease) without writing anything")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return drive(args, RefreshConfig.from_flat,
                 lambda rcfg: run_refresh_job(rcfg, progress=lambda e: log.info("%s", json.dumps(_short(e)))),
                 dry=lambda rcfg: dry_run(rcfg, check_store=args.check_store), exit_code=exit_code)


def _short(event: dict[str, Any]) -> dict[str, Any]:
    keep = ("event", "run_id", "unit_id", "units", "pending", "docs", "accepted", "chunks", "refresh")
    return {k: v for k, v in event.items() if k in keep}


if __name__ == "__main__":
    sys.exit(main())
