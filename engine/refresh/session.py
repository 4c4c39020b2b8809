"""One refresh, step by step: plan (read-only), lease, the refresh run (chunk + embed with reuse), finish.

A refresh starts from the index version an alias names (``--from-alias live``), follows it to
the embed run it was built from (the version manifest's ``source_run``), and produces:

1. a *refresh run* ``runs/refresh-<hash>/``: a normal embed run of the new snapshot (same
   chunks/, embeddings/, rejects/, manifest.json with ``kind: "embed"``), made by the embed
   job's own stages (``engine.embed.pipeline.prepare_run``/``chunk_unit``/``UnitEmbedder``/
   ``finalize_run``). Its encoder is a ``ReusingEncoder`` (``engine.refresh.reuse``): a chunk
   whose content hash the parent run already embedded gets the parent's stored vector; only
   the rest reach the model (``engine.refresh.model``);
2. a diff (``engine.refresh.diff``) of the two runs' chunk rows;
3. a new index version, by an incremental update of a copy of the live shards or a full
   rebuild (``engine.refresh.strategy`` decides, ``engine.refresh.index_update`` builds): the
   choice and the reason go into the version manifest (``refresh``);
4. a publish through the normal CAS swap, only when the recall gate and the canary set pass
   (``engine.refresh.publish``).

One refresh per index at a time (``engine.refresh.lease``). A refresh whose model or chunker
config differs from the live version's is refused (``engine.refresh.live``): every vector
would change, which is what ``embedctl migrate`` is for.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from engine.core import layout
from engine.core.lease import Lease, LeaseKeeper
from engine.core.storage import open_store
from engine.embed.config import EmbedJobConfig
from engine.embed.encoders import Encoder
from engine.refresh.config import RefreshConfig
from engine.refresh.finish import finish_refresh
from engine.refresh.lease import acquire_lease_waiting, describe_lease
from engine.refresh.live import (
    LiveVersion,
    check_not_weighted,
    embed_job_config,
    inputs_unchanged,
    refresh_run_id,
    resolve_live,
)
from engine.refresh.model import LazyModel, preload_encoder
from engine.refresh.reuse import RefreshEmbedder, VectorLookup
from engine.refresh.state import RefreshState
from engine.refresh.summary import up_to_date_summary

log = logging.getLogger(__name__)


class RefreshSession:
    """Holds the lease for the whole refresh; the steps run inside ``with RefreshSession(cfg) as s``.

    ``plan()`` (no writes, no lease) -> ``__enter__`` (lease + heartbeat) -> ``prepare()`` (the
    refresh run, resumable) -> chunk + embed the pending units (``embed_locally`` or Ray, see
    ``engine.distributed.refresh``) -> ``finish()`` (finalize the run, diff, build, gates, publish,
    summary: ``engine.refresh.finish``).
    """

    def __init__(self, rcfg: RefreshConfig, *, clock: Callable[[], float] = time.perf_counter):
        rcfg.validate()
        self.rcfg = rcfg
        self.store = open_store(rcfg.store, endpoint_url=rcfg.endpoint_url)
        self.clock = clock
        self.t0 = clock()
        self.timings: dict[str, float] = {}
        self.state: RefreshState | None = None
        self.lease: Lease | None = None
        self.keeper: LeaseKeeper | None = None
        self._embedder: RefreshEmbedder | None = None
        self._resolved: tuple[LiveVersion, EmbedJobConfig] | None = None
        self._preload: Any = None  # Future-like of the Encoder while the model loads elsewhere

    # -- plan (read-only) ------------------------------------------------------------------
    def resolve(self) -> tuple[LiveVersion, EmbedJobConfig]:
        """The live version and the refresh's embed config, with every refusal (cheap: three small reads)."""
        if self._resolved is None:
            live = resolve_live(self.store, self.rcfg.index, self.rcfg.from_alias)
            if self.rcfg.publish_to:
                check_not_weighted(self.store, self.rcfg.index, self.rcfg.publish_to)
            cfg = embed_job_config(self.rcfg, live)
            cfg.validate()
            self._resolved = (live, cfg)
        return self._resolved

    def plan(self) -> RefreshState:
        """The refresh run's id (derived from the live run, config and snapshot files) and whether they changed."""
        if self.state is not None:
            return self.state
        from engine.embed.corpus import plan_corpus

        live, cfg = self.resolve()
        _cstore, cplan = plan_corpus(cfg.corpus, find_duplicates=False)
        inputs = sorted((f.key, f.fingerprint) for f in cplan.files)
        if cfg.run_id is None:
            cfg = dataclasses.replace(cfg, run_id=refresh_run_id(cfg, live, inputs))
        assert cfg.run_id is not None
        self.state = RefreshState(live=live, cfg=cfg, run_id=cfg.run_id,
                                  inputs_unchanged=inputs_unchanged(cfg, live, inputs))
        return self.state

    def up_to_date(self) -> dict[str, Any] | None:
        """The summary of a refresh with nothing to do (same input files as the live run), else None.

        Checked before the lease: an hourly schedule on an unchanged corpus costs one listing."""
        st = self.plan()
        if not st.inputs_unchanged:
            return None
        self.timings["wall_seconds"] = self.clock() - self.t0
        return up_to_date_summary(self.rcfg, st.live, self.timings)

    def describe_plan(self) -> dict[str, Any]:
        """The dry run: what would be refreshed from where, with which settings (no writes)."""
        st = self.plan()
        return {"index": self.rcfg.index, "from_alias": self.rcfg.from_alias, "from_version": st.live.version_id,
                "alias_generation": st.live.alias_generation, "live_run": st.live.run_id, "run_id": st.run_id,
                "publish_to": self.rcfg.publish_to,
                "model": st.live.model.get("name"), "dim": st.live.model.get("dim"),
                "config": json.loads(json.dumps(st.cfg.to_dict(), default=str)),
                "refresh": {k: v for k, v in self.rcfg.to_dict().items() if k != "overrides"},
                "resumes_existing_run": self.store.exists(layout.run_manifest_key(st.run_id)),
                "lease": describe_lease(self.store, self.rcfg.index)}

    # -- lease --------------------------------------------------------------------------------
    def __enter__(self) -> RefreshSession:
        st = self.plan()
        self.lease = acquire_lease_waiting(
            self.store, self.rcfg.index, ttl_s=self.rcfg.lease_ttl_s, wait_s=self.rcfg.lease_wait_s,
            info={"run_id": st.run_id, "from_version": st.live.version_id, "stage": "starting"},
            break_lease=self.rcfg.break_lease)
        self.keeper = LeaseKeeper(self.lease).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.keeper is not None:
            self.keeper.__exit__(*exc)

    def stage(self, name: str) -> None:
        """Record the stage in the lease (a waiting user sees it) and in the log."""
        log.info("refresh %s: %s", self.state.run_id if self.state else "?", name)
        if self.lease is not None:
            self.lease.update(stage=name, stage_at=time.time())

    # -- the refresh run ------------------------------------------------------------------------
    def prepare(self) -> RefreshState:
        """Create or resume the refresh run (``engine.embed.pipeline.prepare_run``) and index the live vectors."""
        from engine.embed.pipeline import prepare_run

        st = self.plan()
        self.stage("prepare")
        t = self.clock()
        st.prepared = prepare_run(st.cfg)
        st.lookup = VectorLookup.from_run(self.store, st.live.run_manifest, endpoint_url=self.rcfg.endpoint_url)
        self.timings["prepare_seconds"] = self.clock() - t
        log.info("refresh run %s: %d units (%d pending), %d live vectors indexed by content hash", st.run_id,
                 len(st.prepared.plan.units), len(st.prepared.pending), len(st.lookup))
        return st

    def embedder(self, *, threads: int | None = None, encoder: Encoder | None = None) -> RefreshEmbedder:
        """The driver's embedder (one per session: vectors embedded ahead are shared by every unit)."""
        st = self.state
        assert st is not None and st.lookup is not None, "prepare() first"
        if self._embedder is None:
            preload = self._preload
            self._embedder = RefreshEmbedder(st.cfg, st.run_id, st.live.model, st.lookup, threads=threads,
                                             encoder=encoder, load_inner=(preload.result if preload else None))
        return self._embedder

    def set_model_loader(self, loader: Callable[[], Encoder]) -> None:
        """Where the model comes from when a chunk needs it (the driver: a model process started early)."""
        self._preload = LazyModel(loader)

    def preload_model(self) -> None:
        """Start loading the model in a background thread, so its import (seconds) overlaps chunking."""
        if self._preload is None:
            st = self.plan()
            self._preload = preload_encoder(st.live.model, st.cfg.embed)

    def chunk_locally(self) -> list[tuple[dict[str, Any], Any]]:
        """Chunk every pending unit here (the embed job's chunk stage); (summary, chunk table) per unit."""
        from engine.embed.pipeline import chunk_unit_table, plan_meta_for

        st = self.state
        assert st is not None and st.prepared is not None, "prepare() first"
        self.stage("chunk")
        meta = plan_meta_for(st.prepared)
        return [chunk_unit_table(st.cfg, meta, u, st.prepared.plan.duplicates.get(u.file, {}))
                for u in st.prepared.pending]

    def embed_ahead(self, tables: list[Any], encoder: Encoder | None = None) -> int:
        """Embed the unseen chunks of all ``tables`` in one pass; returns how many went to the model."""
        from engine.embed.pipeline import embed_inputs, make_chunker

        st = self.state
        assert st is not None
        chunker = make_chunker(st.cfg)
        texts = [t for table in tables for t in embed_inputs(table, chunker)]
        return self.embedder(encoder=encoder).reusing.embed_ahead(texts)

    def write_units(self, chunked: list[dict[str, Any]], encoder: Encoder | None = None,
                    progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Commit each chunked unit: stored and just-embedded vectors into its embeddings part."""
        if not chunked:
            return
        embedder = self.embedder(encoder=encoder)
        for c in chunked:
            marker = embedder.embed_unit(c)
            self.record_unit(marker)
            if progress:
                progress({"event": "unit", **marker})

    def unit_misses_in(self, table: Any) -> int:
        """How many distinct chunk texts of a chunk table need the model (their hash is not in the live run)."""
        st = self.state
        assert st is not None and st.lookup is not None
        return st.lookup.misses(table.column("content_hash").to_pylist())

    def embed_in_driver(self, chunked: list[tuple[dict[str, Any], int]], tables: dict[str, Any],
                        encoder: Encoder | None = None, progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Commit chunked units (with their count of chunks that need the model) in this process.

        Units whose chunks all have stored vectors go first: they need no model, so they are written while the
        model is still loading; then one batched pass over every unseen chunk; then the rest. ``tables`` holds
        the chunk tables already in memory (by unit id); others are read back from the store."""
        self.write_units([c for c, m in chunked if not m], encoder, progress)
        need = [tables[c["unit_id"]] if c["unit_id"] in tables else self.read_chunk_table(c) for c, m in chunked if m]
        if need:
            self.embed_ahead(need, encoder)
        self.write_units([c for c, m in chunked if m], encoder, progress)

    def read_chunk_table(self, chunked: dict[str, Any]) -> Any:
        """A chunked unit's chunk table, read back from the refresh run."""
        from engine.embed.pipeline import read_part

        return read_part(self.store, chunked["chunk_file"]["key"])

    def embed_locally(self, encoder: Encoder | None = None) -> None:
        """Chunk every pending unit, embed all unseen chunks in one pass, commit the units (in this process)."""
        t = self.clock()
        if encoder is None:
            self.preload_model()
        done = self.chunk_locally()
        self.timings["chunk_seconds"] = self.clock() - t
        t = self.clock()
        self.stage("embed")
        chunked = [(c, self.unit_misses_in(table)) for c, table in done]
        self.embed_in_driver(chunked, {c["unit_id"]: table for c, table in done}, encoder)
        self.timings["embed_seconds"] = self.clock() - t

    def record_unit(self, marker: dict[str, Any]) -> None:
        """Add a committed unit's reuse counts to this attempt's."""
        st = self.state
        assert st is not None
        stats = marker.get("refresh") or {}
        for k in ("reused", "embedded"):
            st.attempt_counts[k] += int(stats.get(k, 0))

    # -- finish -------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Finalize the run, diff it, build the version, gate it, publish it; return the summary."""
        return finish_refresh(self)


def run_refresh_locally(rcfg: RefreshConfig, encoder: Encoder | None = None) -> dict[str, Any]:
    """The whole refresh in this process, without Ray (tests, small corpora). ``encoder``
    replaces the model for the chunks that need one (a counting encoder in tests)."""
    session = RefreshSession(rcfg)
    quick = session.up_to_date()  # refusals (and a byte-identical snapshot) come before the lease
    if quick is not None:
        return {**quick, "executor": "none"}
    with session:
        session.prepare()
        session.embed_locally(encoder)
        summary = session.finish()
    summary["executor"] = "driver"
    return summary


def dry_run(rcfg: RefreshConfig, *, check_store: bool = False) -> dict[str, Any]:
    """The resolved config (offline: CI lints ConfigMaps where the store is unreachable); with
    ``check_store`` also the live version, the refresh run id and the compatibility verdict."""
    out: dict[str, Any] = {"config": rcfg.to_dict()}
    if check_store:
        out["plan"] = RefreshSession(rcfg).describe_plan()
    return out
