"""Incremental update or rebuild: the decision, from the change's size, the index shape, the chain and drift."""

from __future__ import annotations

import contextlib
from dataclasses import fields
from typing import Any

from engine.core import layout
from engine.core.errors import ConfigError, IntegrityError, NotFoundError
from engine.core.storage import Store
from engine.refresh.config import RefreshConfig
from engine.refresh.diff import RefreshDiff
from engine.refresh.drift import MIN_DRIFT_SAMPLE, quantizer_drift


def live_build_config(store: Store, index: str, vman: dict[str, Any]) -> dict[str, Any]:
    """The build settings behind a version: carried in ``refresh.build_config`` by refreshed versions, else the
    builder's saved state (found by ``build_key``), else reconstructed from ``params``."""
    from engine.index.params import BuildConfig

    carried = (vman.get("refresh") or {}).get("build_config")
    if carried:
        return dict(carried)
    if vman.get("build_key"):
        key = layout.join(layout.index_prefix(index), "builds", str(vman["build_key"])[:24], "state.json")
        with contextlib.suppress(NotFoundError, IntegrityError):
            cfg = store.read_json(key).get("config")
            if cfg:
                return dict(cfg)
    params = vman.get("params") or {}
    names = {f.name for f in fields(BuildConfig)}
    cfg = {k: v for k, v in (params.get("overrides") or {}).items() if k in names}
    cfg.update(kind=params.get("requested_kind") or vman.get("kind") or "ivfpq",
               rescore=params.get("rescore") or "int8", memory_budget=params.get("memory_budget"))
    gate = vman.get("recall_gate") or {}
    if "threshold" in gate:
        cfg["gate_recall"] = gate["threshold"]
    if gate.get("k"):
        cfg["gate_k"] = int(gate["k"])
    return cfg


def choose_strategy(store: Store, rcfg: RefreshConfig, diff: RefreshDiff, vman: dict[str, Any],
                    run_manifest: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(strategy, reason, checks): update a copy of the live shards when the change is small and the trained
    quantizer still fits the new vectors; rebuild when much changed, when the builder would now choose another
    index for this many vectors, after a long chain of incremental versions, or when the new vectors drift."""
    from engine.index.params import BuildConfig, choose_params

    checks: dict[str, Any] = {"changed_fraction": round(diff.changed_fraction, 6),
                              "rebuild_fraction": rcfg.rebuild_fraction}
    chain = int(((vman.get("refresh") or {}).get("incremental_chain")) or 0)
    checks["incremental_chain"] = chain
    if rcfg.strategy == "rebuild":
        return "rebuild", "rebuild asked for (--strategy rebuild)", checks
    problems = _incremental_blockers(vman)
    if problems:
        if rcfg.strategy == "incremental":
            raise ConfigError(f"--strategy incremental is impossible: {problems}; use --strategy rebuild or auto")
        return "rebuild", f"the live version cannot be updated in place: {problems}", checks
    new_rows = diff.snapshot_chunks
    try:
        cfg = BuildConfig.from_dict(live_build_config(store, rcfg.index, vman))
        params = choose_params(new_rows, int(vman["dim"]), cfg, parallelism=max(1, len(vman.get("shards") or [])))
        live_p = vman.get("params") or {}
        checks["builder_would_choose"] = {"kind": params.kind, "factory": params.factory}
        same_shape = params.kind == vman.get("kind") and (params.kind == "flat" or params.factory == live_p.get("factory"))
    except ConfigError as err:
        checks["builder_would_choose"] = f"(cannot tell: {err})"
        same_shape = True
    if rcfg.strategy == "incremental":
        checks["drift"] = quantizer_drift(store, rcfg.index, vman, run_manifest, diff)
        return "incremental", "incremental asked for (--strategy incremental)", checks
    if diff.changed_fraction > rcfg.rebuild_fraction:
        return "rebuild", (f"{diff.changed_fraction:.1%} of the live chunks changed, over --rebuild-fraction "
                           f"{rcfg.rebuild_fraction:.0%}: a rebuild retrains and rebalances"), checks
    if not same_shape:
        w = checks["builder_would_choose"]
        return "rebuild", (f"at {new_rows:,} vectors the builder chooses {w['kind']} {w['factory']} instead of the live "
                           f"{vman.get('kind')} {(vman.get('params') or {}).get('factory')}"), checks
    if chain >= rcfg.max_incremental_chain:
        return "rebuild", (f"{chain} incremental versions in a row (limit --max-incremental-chain "
                           f"{rcfg.max_incremental_chain}): rebuild to reset drift and fragmentation"), checks
    drift = quantizer_drift(store, rcfg.index, vman, run_manifest, diff)
    checks["drift"] = drift
    ratio = drift.get("ratio")
    if ratio is not None and ratio > rcfg.drift_threshold and drift.get("added", 0) >= MIN_DRIFT_SAMPLE:
        return "rebuild", (f"the new vectors fit the trained quantizer {ratio:.2f}x worse than the live ones "
                           f"({drift['measure']}), over --drift-threshold {rcfg.drift_threshold}"), checks
    if ratio is None:
        fit = "no trained quantizer (exact search)" if vman.get("kind") == "flat" else f"drift: {drift.get('measure')}"
    elif drift.get("added", 0) < MIN_DRIFT_SAMPLE:
        fit = (f"drift {ratio:.2f} ({drift['measure']}) not judged: {drift.get('added', 0)} added vectors are under "
               f"the {MIN_DRIFT_SAMPLE} a rebuild decision needs")
    else:
        fit = f"the quantizer still fits: drift {ratio:.2f} <= {rcfg.drift_threshold} ({drift['measure']})"
    return "incremental", (f"{diff.changed_fraction:.1%} of the chunks changed (<= {rcfg.rebuild_fraction:.0%}); "
                           f"{fit}"), checks


def _incremental_blockers(vman: dict[str, Any]) -> str:
    shards = vman.get("shards")
    if not isinstance(shards, list) or not shards:
        return "it has no shards"
    for s in shards:
        if "index" not in (s.get("files") or {}) or "ids" not in (s.get("files") or {}):
            return f"shard {s.get('shard')} has no FAISS file or id map (not built by embedctl build-index)"
    if (vman.get("sparse") or {}).get("shards"):
        return "it has BM25 shards, whose term statistics cover every row of a shard (a rebuild recomputes them)"
    if vman.get("kind") not in ("flat", "ivfpq", "binary-rerank"):
        return f"unknown index kind {vman.get('kind')!r}"
    return ""
