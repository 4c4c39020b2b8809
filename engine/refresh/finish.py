"""After the embedding: finalize the refresh run, diff it, decide and build the new version, then gate/publish."""

from __future__ import annotations

import logging
from typing import Any

from engine.core import layout
from engine.core.errors import GateError, IntegrityError
from engine.embed.pipeline import state_key
from engine.refresh.diff import RefreshDiff, diff_runs
from engine.refresh.failpoints import stall_point
from engine.refresh.gates import recall_verdict
from engine.refresh.index_update import rebuild_version, update_version
from engine.refresh.publish import gate_and_publish
from engine.refresh.state import RunningSession
from engine.refresh.strategy import choose_strategy
from engine.refresh.summary import baseline_of, close_summary

log = logging.getLogger(__name__)


def finish_refresh(session: RunningSession) -> dict[str, Any]:
    """Finalize the run, diff it, build the version, gate it, publish it; return the summary."""
    from engine.embed.pipeline import finalize_run

    st = session.state
    assert st is not None and st.prepared is not None, "prepare() and embed first"
    stall_point("finalize")
    manifest = finalize_run(st.cfg, st.prepared, session.clock() - session.t0)
    if manifest["status"] != "succeeded":
        raise IntegrityError(f"refresh run {st.run_id} is incomplete (missing units "
                             f"{manifest.get('missing_units')}); rerun the same refresh to finish it")
    session.stage("diff")
    t = session.clock()
    diff = diff_runs(session.store, st.live.run_manifest, manifest)
    session.timings["diff_seconds"] = session.clock() - t
    per_unit = unit_stats(session)
    refresh_info = {
        "parent_run": st.live.run_id, "parent_version": st.live.version_id, "from_alias": session.rcfg.from_alias,
        "diff": diff.summary(), "embedding_calls": per_unit["embedded"], "reused_vectors": per_unit["reused"],
        "baseline": baseline_of(st.live.run_manifest),
    }
    manifest = dict(manifest, refresh=refresh_info)
    session.store.write_json(layout.run_manifest_key(st.run_id), manifest)
    summary: dict[str, Any] = {
        "index": session.rcfg.index, "from_alias": session.rcfg.from_alias, "from_version": st.live.version_id,
        "run_id": st.run_id, "docs": diff.docs, "chunks": diff.chunks, "live_chunks": diff.live_chunks,
        "snapshot_chunks": diff.snapshot_chunks, "embedding_calls": per_unit["embedded"],
        "embedding_calls_this_attempt": st.attempt_counts["embedded"], "reused_vectors": per_unit["reused"],
        "reused_by_hash": diff.reused_by_hash, "counts": manifest.get("counts"),
        "rejects": manifest.get("rejects"), "publish_to": session.rcfg.publish_to,
    }
    if diff.empty:
        summary.update(status="up_to_date", version_id=None, strategy=None,
                       strategy_reason="the snapshot has the same chunks as the live version",
                       published=False, reason=f"nothing changed; the alias stays on {st.live.version_id}")
    else:
        summary.update(build_gate_publish(session, diff, manifest))
    session.timings["wall_seconds"] = session.clock() - session.t0
    return close_summary(session.store, summary, manifest, session.timings)


def build_gate_publish(session: RunningSession, diff: RefreshDiff, manifest: dict[str, Any]) -> dict[str, Any]:
    """Decide incremental vs rebuild, build the version, run the gates, publish if they pass."""
    st = session.state
    assert st is not None
    out: dict[str, Any] = {"published": False, "publish": None, "gates": {}}
    session.stage("index")
    t = session.clock()
    decision = decide(session, diff, manifest)
    out.update(strategy=decision["strategy"], strategy_reason=decision["reason"], checks=decision["checks"])
    record = {**decision, "parent_version": st.live.version_id, "parent_run": st.live.run_id,
              "refresh_run": st.run_id, "diff": diff.summary(), "incremental_chain": decision["chain"]}
    try:
        vman = build_version(session, decision, diff, manifest, record)
    except GateError as err:
        session.timings["index_seconds"] = session.clock() - t
        out.update(status="gate_failed", version_id=decision.get("version_id"), reason=str(err),
                   gates={"recall": {"passed": False, "detail": str(err)}})
        return out
    session.timings["index_seconds"] = session.clock() - t
    out["version_id"] = str(vman["version_id"])
    out["gates"]["recall"] = recall_verdict(vman)
    return {**out, **gate_and_publish(session, out["version_id"], diff, out["gates"])}


def build_version(session: RunningSession, decision: dict[str, Any], diff: RefreshDiff, manifest: dict[str, Any],
                  record: dict[str, Any]) -> dict[str, Any]:
    """The new version's manifest: the live shards updated in place (a copy), or a rebuild from the run."""
    st = session.state
    assert st is not None
    rcfg = session.rcfg
    if decision["strategy"] == "incremental":
        return update_version(session.store, rcfg.index, st.live.version_manifest, decision["version_id"], manifest,
                              diff, record, gate_recall=gate_threshold(session))
    return rebuild_version(session.store, rcfg.index, st.run_id, st.live.version_manifest, record,
                           gate_recall=rcfg.recall_gate)


def gate_threshold(session: RunningSession) -> float | None:
    """The recall the updated version must reach: --recall-gate, else the live version's threshold."""
    st = session.state
    assert st is not None
    if session.rcfg.recall_gate is not None:
        return session.rcfg.recall_gate
    return (st.live.version_manifest.get("recall_gate") or {}).get("threshold")


def decide(session: RunningSession, diff: RefreshDiff, manifest: dict[str, Any]) -> dict[str, Any]:
    """Incremental or rebuild (saved in the run's state, so a resumed refresh keeps its choice)."""
    from engine.index.version import new_version_id

    st = session.state
    assert st is not None
    store, rcfg = session.store, session.rcfg
    key = state_key(st.run_id, "refresh", "decision.json")
    if store.exists(key):
        saved = store.read_json(key)
        if saved.get("parent_version") == st.live.version_id and rcfg.strategy in ("auto", saved["strategy"]):
            return saved  # a resumed refresh keeps its choice (and its version id)
    strategy, reason, checks = choose_strategy(store, rcfg, diff, st.live.version_manifest, manifest)
    chain = int(((st.live.version_manifest.get("refresh") or {}).get("incremental_chain")) or 0)
    # The index builder's naming (v<UTC ts>-<hex>), so --version latest finds refreshed versions too.
    decision = {"strategy": strategy, "reason": reason, "checks": checks, "parent_version": st.live.version_id,
                "chain": chain + 1 if strategy == "incremental" else 0,
                "version_id": new_version_id() if strategy == "incremental" else None}
    store.write_json(key, decision)  # under the lease: no other writer
    log.info("refresh %s: %s (%s)", st.run_id, strategy, reason)
    return decision


def unit_stats(session: RunningSession) -> dict[str, int]:
    """Reuse counts over every attempt (per-unit records written after each commit)."""
    st = session.state
    assert st is not None and st.prepared is not None
    out = {"reused": 0, "embedded": 0, "units_without_stats": 0}
    have = set(session.store.list(state_key(st.run_id, "refresh")))
    for unit in st.prepared.plan.units:
        key = state_key(st.run_id, "refresh", f"{unit.unit_id}.json")
        if key in have:
            rec = session.store.read_json(key)
            out["reused"] += int(rec["reused"])
            out["embedded"] += int(rec["embedded"])
        else:
            out["units_without_stats"] += 1
    return out
