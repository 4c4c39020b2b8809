"""What a refresh reports: its summary, and the cost of the full re-embed it saved."""

from __future__ import annotations

from typing import Any

from engine.core import layout
from engine.core.storage import Store
from engine.refresh.config import RefreshConfig
from engine.refresh.live import LiveVersion

OUTCOME_KEYS = ("status", "version_id", "strategy", "strategy_reason", "published", "reason", "gates")


def baseline_of(run_manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The last full embed in a chain of refreshes: what re-embedding everything costs."""
    inherited = (run_manifest.get("refresh") or {}).get("baseline")
    if inherited:
        return inherited
    t = run_manifest.get("timings") or {}
    c = run_manifest.get("counts") or {}
    if not c.get("chunks"):
        return None
    return {"run_id": run_manifest.get("run_id"), "chunks": int(c["chunks"]),
            "wall_seconds": t.get("wall_seconds"), "embed_worker_seconds": t.get("embed_worker_seconds")}


def full_embed_cost(baseline: dict[str, Any] | None, chunks: int, refresh_seconds: float) -> dict[str, Any]:
    """A full re-embed of the snapshot: every chunk through the model, timed at the baseline run's rate."""
    out: dict[str, Any] = {"embedding_calls": chunks, "estimated_seconds": None, "baseline_run": None,
                           "refresh_over_full": None}
    if baseline and baseline.get("chunks") and baseline.get("wall_seconds"):
        est = float(baseline["wall_seconds"]) * chunks / int(baseline["chunks"])
        out.update(estimated_seconds=round(est, 3), baseline_run=baseline.get("run_id"),
                   refresh_over_full=round(refresh_seconds / est, 4) if est else None)
    return out


def up_to_date_summary(rcfg: RefreshConfig, live: LiveVersion, timings: dict[str, float]) -> dict[str, Any]:
    """The summary of a refresh whose snapshot files are byte-identical to the live run's (nothing to do)."""
    c = live.run_manifest.get("counts") or {}
    docs, chunks = int(c.get("accepted", 0)), int(c.get("chunks", 0))
    return {"index": rcfg.index, "from_alias": rcfg.from_alias, "from_version": live.version_id,
            "run_id": None, "status": "up_to_date", "version_id": None, "strategy": None, "published": False,
            "reason": f"the snapshot's files are byte-identical to those of the live run {live.run_id}",
            "docs": {"new": 0, "changed": 0, "unchanged": docs, "deleted": 0},
            "chunks": {"new": 0, "changed": 0, "unchanged": chunks, "deleted": 0}, "live_chunks": chunks,
            "snapshot_chunks": chunks, "embedding_calls": 0, "embedding_calls_this_attempt": 0,
            "reused_vectors": 0, "saved_embedding_calls": chunks, "publish_to": rcfg.publish_to,
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "full_embed": full_embed_cost(baseline_of(live.run_manifest), chunks, timings["wall_seconds"])}


def close_summary(store: Store, summary: dict[str, Any], manifest: dict[str, Any],
                  timings: dict[str, float]) -> dict[str, Any]:
    """Add timings and the full-embed comparison to ``summary``; record the outcome in the run's manifest."""
    summary["timings"] = {k: round(v, 3) for k, v in timings.items()}
    summary["full_embed"] = full_embed_cost(manifest.get("refresh", {}).get("baseline"),
                                            int(summary["snapshot_chunks"]), timings["wall_seconds"])
    summary["saved_embedding_calls"] = int(summary["snapshot_chunks"]) - int(summary["embedding_calls"])
    rec = dict(manifest.get("refresh") or {}, outcome={k: summary.get(k) for k in OUTCOME_KEYS},
               timings=summary["timings"], full_embed=summary["full_embed"])
    store.write_json(layout.run_manifest_key(summary["run_id"]), dict(manifest, refresh=rec))
    return summary


def exit_code(summary: dict[str, Any]) -> int:
    """0 published/built/up to date; 7 a gate failed (nothing published); 5 the alias moved meanwhile."""
    return {"gate_failed": 7, "conflict": 5}.get(str(summary.get("status")), 0)
