"""The gates a refreshed version passes before it is published: the recall gate's verdict and the canary set."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from engine.core.storage import Store, open_store
from engine.refresh.diff import RefreshDiff


def recall_verdict(version_manifest: dict[str, Any]) -> dict[str, Any]:
    """The recall gate as the summary reports it, from the version manifest's ``recall_gate``."""
    rg = version_manifest.get("recall_gate") or {}
    return {"passed": bool(rg.get("passed", True)), "recall": rg.get("recall"), "threshold": rg.get("threshold"),
            "k": rg.get("k"), "detail": f"recall@{rg.get('k')} {rg.get('recall')} vs threshold {rg.get('threshold')}"}


def canary_gate(store: Store, index: str, canary: str, *, live_version: str, version_id: str, diff: RefreshDiff,
                endpoint_url: str | None = None) -> dict[str, Any]:
    """The canary set on the new version against the live version as the baseline.

    Canaries whose every expected document was deleted are retired (reported, not run)."""
    from engine.quality.canary import Canary, run_canary

    canaries = load_canaries(canary, endpoint_url)
    gone = set(diff.deleted_doc_ids)
    kept = [c for c in canaries if set(c.expected) - gone]
    retired = [c.id or c.query for c in canaries if not set(c.expected) - gone]
    kept = [Canary(c.query, tuple(d for d in c.expected if d not in gone), c.id) for c in kept]
    if not kept:
        return {"passed": True, "detail": f"all {len(canaries)} canaries expect deleted documents: none to run",
                "retired": retired}
    baseline = run_canary(store, index, kept, version=live_version)
    report = run_canary(store, index, kept, version=version_id, baseline=baseline)
    v = report["versions"][0]
    k = report["k"]
    recall = v["stats"].get(f"recall@{k}")
    live_recall = baseline["versions"][0]["stats"].get(f"recall@{k}")
    return {"passed": bool(report["passed"]), "failures": v["failures"], "retired": retired,
            "recall": recall, "baseline_recall": live_recall,
            "detail": (f"{len(kept)} canaries: recall@{k} {recall} (live {live_recall})"
                       + (f"; {'; '.join(v['failures'])}" if v["failures"] else ""))}


def load_canaries(path: str, endpoint_url: str | None = None) -> list[Any]:
    """A canary set from a local file or an s3:// object (``engine.quality.canary.read_canaries`` formats)."""
    from engine.quality.canary import read_canaries

    if not path.startswith("s3://"):
        return read_canaries(path)
    parent, name = path.rsplit("/", 1)
    with tempfile.TemporaryDirectory(prefix="embedctl-canary-") as tmp:
        local = os.path.join(tmp, name)
        open_store(parent, endpoint_url=endpoint_url).download_file(name, local)
        return read_canaries(local)
