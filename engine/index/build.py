"""The index build: an embed run becomes a sharded, versioned FAISS index behind a recall gate (the step sequence).

A build is a sequence of explicit steps, each safe to crash after:

1. **plan**: read the run manifest (parts, rows, dim, model), choose parameters from the corpus
   size, the dimension and the memory budget (``params.choose_params``; every choice comes with its
   reason, and every parameter can be overridden);
2. **sample**: training vectors drawn uniformly over the whole run, plus held-out gate queries
   (corpus vectors *not* in the training sample);
3. **train** once, in the driver (``train.py``): the IVF-PQ (or binary IVF) quantizer and the int8 rescore
   ranges are uploaded as artifacts of the version, so a resumed build never retrains;
4. **add**: one task per index shard (``shards.build_shard``: pure, idempotent, run by whatever
   ``mapper`` the caller gives; ``jobs/build_index.py`` gives Ray tasks). A shard reads its row
   range, encodes and adds it, writes the FAISS file, the id map (Parquet) and the rescore
   vectors (``.npy``, memory-mappable), uploads them, and commits a marker. It also computes the
   exact top neighbours of the gate queries within its rows, so the gate needs no second pass;
5. **gate** (``gate.py``): the version is loaded exactly as a searcher loads it; the default ``nprobe`` /
   rescore multiplier are tuned on the gate queries and recall@k against exact search is
   measured. Below ``gate_recall`` the build fails with the figure and nothing is published;
6. **commit**: the version manifest (``engine/core/layout.py`` contract) is written last, create-only.

Build state lives under ``indexes/<name>/builds/<build key>/`` (the key hashes the run's
embedding files and the build config): rerunning the same command after a crash reuses the
version id, the trained quantizer and every committed shard; rerunning it after success returns
the finished version.

Every built file loads with plain ``faiss.read_index`` / ``faiss.read_index_binary``; ids in the
FAISS files are global int64 row ids, and ``shards/shard-NNNNN.ids.parquet`` maps them to
``chunk_id`` / ``doc_id``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine import __version__
from engine.core import layout
from engine.core.errors import ConfigError, ConflictError, GateError
from engine.core.names import check_name
from engine.core.storage import Store, join, json_bytes
from engine.index.context import MANIFEST_FORMAT, BuildContext, Progress, now_iso, upload_bytes
from engine.index.gate import run_gate
from engine.index.params import BuildConfig, IndexParams, choose_params
from engine.index.runs import Mapper, RunInfo, local_mapper, metadata_columns, read_run
from engine.index.shards import add_shards, shard_committed
from engine.index.train import sample_vectors, train_quantizer
from engine.index.version import list_versions, new_version_id, read_version_manifest

log = logging.getLogger(__name__)

REPORT_KEY = "build-report.json"
MANIFEST_KEYS = frozenset({
    "format", "version_id", "index", "created_at", "engine_version", "model", "dim", "metric", "kind", "params",
    "source_run", "source", "parent_version", "shards", "files", "artifacts", "counts", "recall_gate", "thresholds",
    "build_key", "timings", "sparse", "metadata"})


@dataclass
class BuildResult:
    index: str
    version_id: str
    manifest: dict[str, Any]
    reused: bool  # the same build had already finished: nothing was rebuilt
    resumed: bool  # an interrupted build was continued

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {"index": self.index, "version": self.version_id, "kind": m["kind"], "rows": m["counts"]["vectors"],
                "shards": len(m["shards"]), "dim": m["dim"], "recall_gate": m["recall_gate"],
                "params": {k: m["params"].get(k) for k in ("factory", "nlist", "pq_m", "pq_nbits", "nprobe",
                                                           "rescore", "rescore_multiplier", "ram_bytes")},
                "timings": m["timings"], "reused": self.reused, "resumed": self.resumed,
                "bytes": sum(a["bytes"] for a in m["artifacts"]),
                **({"sparse": {"kind": m["sparse"]["kind"], "shards": len(m["sparse"]["shards"])}} if m.get("sparse")
                   else {}),
                **({"filter_columns": sorted(m["metadata"]["columns"])} if m.get("metadata") else {})}


def build_index(store: Store, run_id: str, index: str, cfg: BuildConfig | None = None, *,
                mapper: Mapper | None = None, progress: Progress | None = None, parallelism: int = 1,
                task_threads: int | None = None, parent_version: str | None = None,
                force: bool = False, manifest_extra: Mapping[str, Any] | None = None) -> BuildResult:
    """Build (or resume, or return the finished) index version of ``run_id`` under ``index``.

    ``mapper`` spreads the shard tasks (default: one after the other in this process);
    ``parallelism`` is how many run at once, used to choose the shard count. ``parent_version``
    defaults to the newest existing version of the index. ``force`` starts a new version even
    if the same build finished before. ``manifest_extra`` adds top-level keys to the manifest
    (e.g. a refresh record); it may not replace the builder's own. Raises GateError when recall
    is below the gate.
    """
    cfg = cfg or BuildConfig()
    cfg.validate()
    check_name("index", index)
    clash = set(manifest_extra or {}) & MANIFEST_KEYS
    if clash:
        raise ConfigError(f"manifest_extra may not replace the builder's manifest keys {sorted(clash)}")
    t_start = time.perf_counter()
    run = read_run(store, run_id)
    ctx = BuildContext(store, run, index, cfg, mapper=mapper or local_mapper, progress=progress,
                       parallelism=parallelism, task_threads=task_threads)
    started = _start_or_resume(ctx, force)
    if isinstance(started, BuildResult):
        return started
    state, params, resumed = started
    version_id = state["version_id"]
    prefix = layout.version_prefix(index, version_id)
    if parent_version is None:
        older = [v for v in list_versions(store, index) if v != version_id]
        parent_version = older[-1] if older else None

    train_vecs, gate_vecs, gate_ids, how = sample_vectors(ctx, params, state)
    train_quantizer(ctx, params, train_vecs, state, prefix)
    del train_vecs
    shard_results = add_shards(ctx, params, state, gate_vecs)

    # The manifest (without the gate result) is what the gate loads, exactly as a searcher would.
    manifest = _draft_manifest(ctx, params, state, shard_results, parent_version)
    gate, tuning = run_gate(ctx, params, manifest, shard_results, gate_vecs, gate_ids, how)
    ctx.emit("gate", **gate)
    if not gate["passed"]:
        state["status"] = "gate_failed"
        state["recall_gate"] = gate
        ctx.write_state(state)
        store.delete_prefix(prefix)  # nothing of a failed build stays where searchers look
        raise GateError(f"recall gate failed for {index}: recall@{gate['k']} = {gate['recall']:.4f} against exact "
                        f"search on {gate['queries']} queries is below --gate-recall {gate['threshold']} "
                        f"({params.factory}, nprobe={gate.get('nprobe')}, rescore x{gate.get('rescore_multiplier')}); "
                        "nothing was published. Raise nlist/pq_m, use --rescore int8, or lower the gate")
    _finish_manifest(ctx, manifest, params, gate, tuning, shard_results, resumed, time.perf_counter() - t_start)
    manifest.update(manifest_extra or {})
    try:
        store.put_if_absent(layout.version_manifest_key(index, version_id), json_bytes(manifest))
    except ConflictError:
        # A twin of this build (same key, same version id) committed first: use its manifest.
        manifest = read_version_manifest(store, index, version_id)
    state.update(status="complete", finished_at=now_iso())
    ctx.write_state(state)
    ctx.emit("published", version=version_id, recall=gate.get("recall"))
    return BuildResult(index, version_id, manifest, reused=False, resumed=resumed)


def _start_or_resume(ctx: BuildContext, force: bool) -> BuildResult | tuple[dict[str, Any], IndexParams, bool]:
    """The finished build's result, or (build state, parameters, resumed) of a new or interrupted one."""
    store, index, run, cfg = ctx.store, ctx.index, ctx.run, ctx.cfg
    state = ctx.read_state()
    resumed = False
    if state is not None and not force:
        if state.get("status") == "complete":
            vid = state["version_id"]
            if store.exists(layout.version_manifest_key(index, vid)):
                manifest = read_version_manifest(store, index, vid)
                ctx.emit("reused", version=vid)
                return BuildResult(index, vid, manifest, reused=True, resumed=False)
        elif state.get("status") == "building":
            resumed = True
    if state is None or force or state.get("status") != "building":
        params = choose_params(run.rows, run.dim, cfg, parallelism=ctx.parallelism)
        state = {"status": "building", "version_id": new_version_id(), "build_key": ctx.key, "run_id": run.run_id,
                 "started_at": now_iso(), "config": cfg.to_dict(), "params": params.to_dict()}
        ctx.write_state(state)
    else:
        # A resume keeps the first attempt's parameters (the shard layout depends on them, and
        # the cluster it resumes on may have another size).
        params = IndexParams(**state["params"])
    version_id = state["version_id"]
    prefix = layout.version_prefix(index, version_id)
    lost = [state[r]["key"] for r in ("trained", "ranges") if r in state
            and not shard_committed(store, prefix, {"files": {r: state[r]}})]
    if lost:  # e.g. gc removed an abandoned build's files: train again rather than fail
        log.warning("build %s: trained artifacts %s are gone; training again", index, lost)
        for r in ("trained", "ranges", "trained_at"):
            state.pop(r, None)
    if store.exists(layout.version_manifest_key(index, version_id)):
        raise ConflictError(f"version {version_id} of {index} already has a manifest but its build state says "
                            "building; remove the build state or rerun with --force")
    ctx.emit("planned", version=version_id, rows=run.rows, dim=run.dim, kind=params.kind, factory=params.factory,
             shards=params.shards, resumed=resumed, reasoning=params.reasoning)
    return state, params, resumed


def _draft_manifest(ctx: BuildContext, params: IndexParams, state: dict[str, Any],
                    shard_results: list[dict[str, Any]], parent_version: str | None) -> dict[str, Any]:
    """The version manifest before the gate: everything but the gate result, report and timings."""
    run: RunInfo = ctx.run
    artifacts: list[dict[str, Any]] = []
    files: dict[str, str] = {}
    for role in ("trained", "ranges"):
        if role in state:
            artifacts.append(dict(state[role]))
            files[{"trained": "trained", "ranges": "rescore_ranges"}[role]] = state[role]["key"]
    shards = []
    for r in shard_results:
        shards.append({"shard": r["shard"], "rows": r["rows"], "id_start": r["id_start"], "id_end": r["id_end"],
                       "id_mode": r["id_mode"],
                       "bytes": sum(f["bytes"] for f in r["files"].values()),
                       "files": {role: f["key"] for role, f in r["files"].items()}})
        artifacts.extend(dict(f) for f in r["files"].values())
    manifest = {
        "format": MANIFEST_FORMAT, "version_id": state["version_id"], "index": ctx.index, "created_at": now_iso(),
        "engine_version": __version__, "model": run.model, "dim": run.dim, "metric": run.metric,
        "kind": params.kind, "params": params.to_dict(), "source_run": run.run_id,
        "source": {"run_id": run.run_id, "run_manifest_sha256": run.manifest_sha256, "embeddings": run.fingerprint()},
        "parent_version": parent_version, "shards": shards, "files": files, "artifacts": artifacts,
        "counts": {"vectors": run.rows, "shards": len(shards)}, "recall_gate": None, "thresholds": {},
        "build_key": ctx.key,
    }
    manifest.update(_extra_sections(ctx, shard_results, artifacts))
    return manifest


def _extra_sections(ctx: BuildContext, shard_results: list[dict[str, Any]],
                    artifacts: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``sparse`` (BM25 shards) and ``metadata`` (filter columns) sections, when the shards have them;
    their files join ``artifacts`` (checksummed and verified like every other file)."""
    out: dict[str, Any] = {}
    if ctx.cfg.sparse != "none":
        from engine.index.sparse import BM25_PARAMS, TOKENIZER, library_version

        shards = []
        for r in shard_results:
            files = r.get("sparse") or {}
            doc = {"granularity": "doc"} if ctx.cfg.sparse_granularity == "doc" else {}
            shards.append({"shard": r["shard"], "rows": r["rows"], "id_start": r["id_start"], "id_end": r["id_end"],
                           "files": {name: f["key"] for name, f in files.items()}, **doc})
            artifacts.extend(dict(f) for f in files.values())
        out["sparse"] = {"kind": ctx.cfg.sparse, "library": library_version(), "params": BM25_PARAMS,
                         "tokenizer": TOKENIZER, "fields": ["title", "text"],
                         "granularity": ctx.cfg.sparse_granularity, "shards": shards}
    if any(r.get("meta") for r in shard_results):
        columns = metadata_columns(ctx.run_columns())
        shards = []
        for r in shard_results:
            files = r.get("meta") or {}
            shards.append({"shard": r["shard"], "files": {role: f["key"] for role, f in files.items()}})
            artifacts.extend(dict(f) for f in files.values())
        out["metadata"] = {"columns": columns, "shards": shards}
    return out


def _finish_manifest(ctx: BuildContext, manifest: dict[str, Any], params: IndexParams, gate: dict[str, Any],
                     tuning: dict[str, Any], shard_results: list[dict[str, Any]], resumed: bool,
                     total_s: float) -> None:
    """Add the tuned knobs, the gate result, the timings and the build report (an artifact) to the manifest."""
    params_dict = params.to_dict()
    for knob in ("nprobe", "rescore_multiplier"):
        if gate.get(knob) is not None:
            params_dict[knob] = gate[knob]
    params_dict["tuning"] = tuning
    rows = ctx.run.rows
    timings: dict[str, float | None] = {k: round(v, 3) for k, v in ctx.timings.items()}
    timings["total_s"] = round(total_s, 3)
    build_s = ctx.timings.get("train_s", 0.0) + ctx.timings.get("add_s", 0.0) + ctx.timings.get("sample_s", 0.0)
    timings["build_s_per_100k"] = round(build_s / max(rows, 1) * 100_000, 3) if rows else None
    report = {"version_id": manifest["version_id"], "index": ctx.index, "params": params_dict, "recall_gate": gate,
              "timings": timings, "shards": [{k: v for k, v in r.items() if k != "exact"} for r in shard_results],
              "build_key": ctx.key, "resumed": resumed}
    prefix = layout.version_prefix(ctx.index, manifest["version_id"])
    manifest["artifacts"].append({"key": REPORT_KEY, **upload_bytes(ctx.store, join(prefix, REPORT_KEY),
                                                                    json_bytes(report))})
    manifest["files"]["report"] = REPORT_KEY
    manifest.update(params=params_dict, recall_gate=gate, timings=timings)
    assert set(manifest) <= MANIFEST_KEYS, set(manifest) - MANIFEST_KEYS
