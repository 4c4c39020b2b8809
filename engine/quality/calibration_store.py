"""Calibration records beside a version in the store: listing, loading (inherited too), staleness, resolving `--threshold`."""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import numpy as np

from engine.core import layout
from engine.core.errors import ConfigError, NotFoundError
from engine.core.storage import Store, join, sha256_bytes
from engine.index.version import read_version_manifest
from engine.quality.thresholds import Rule, Thresholds

log = logging.getLogger(__name__)

CALIBRATION_DIR = "calibration"


def calibration_prefix(index: str, version: str) -> str:
    return join(layout.version_prefix(index, version), CALIBRATION_DIR)


def new_calibration_id() -> str:
    """UTC timestamp, microseconds included: sorts chronologically as a string."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def list_calibrations(store: Store, index: str, version: str) -> list[str]:
    """Calibration ids of a version, oldest first (a record counts once its JSON exists)."""
    prefix = calibration_prefix(index, version)
    ids = [k[len(prefix) + 1:-len(".json")] for k in store.list(prefix) if k.endswith(".json")]
    return sorted(i for i in ids if "/" not in i)


def read_calibration(store: Store, index: str, version: str, calibration_id: str) -> dict[str, Any]:
    return store.read_json(join(calibration_prefix(index, version), f"{calibration_id}.json"))


def _embedded_thresholds(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """A calibration record carried inside a version manifest's ``thresholds`` (e.g. copied by
    a build from its parent), if it looks like one."""
    th = manifest.get("thresholds")
    if isinstance(th, Mapping) and th.get("kind") == "calibration" and th.get("absolute"):
        return dict(th)
    return None


def load_calibration(store: Store, index: str, version: str, *, inherit: bool = True) -> dict[str, Any] | None:
    """The newest calibration that applies to ``version``, or None.

    Looks, in order, at the version's own records, a record embedded in its manifest's
    ``thresholds``, and (``inherit``) the newest record of the nearest ancestor along
    ``parent_version``. The result carries ``found_on`` (the version whose folder held it);
    its ``version_id`` is the version it was fitted on, which ``calibration_status`` compares.
    """
    ids = list_calibrations(store, index, version)
    if ids:
        rec = read_calibration(store, index, version, ids[-1])
        return {**rec, "found_on": version}
    if not inherit:
        return None
    seen = {version}
    current = version
    for _ in range(64):
        try:
            manifest = read_version_manifest(store, index, current)
        except NotFoundError:
            return None
        if current == version and (emb := _embedded_thresholds(manifest)) is not None:
            return {**emb, "found_on": version}
        parent = manifest.get("parent_version")
        if not parent or parent in seen:
            return None
        seen.add(parent)
        ids = list_calibrations(store, index, parent)
        if ids:
            return {**read_calibration(store, index, parent, ids[-1]), "found_on": parent}
        current = parent
    return None


def _fingerprint_of(model: Any) -> str | None:
    if isinstance(model, Mapping):
        return model.get("fingerprint") or model.get("name")
    return str(model) if model else None


def version_identity(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What a calibration depends on: model, quantization (index kind/params), corpus."""
    model = manifest.get("model") or {}
    return {
        "version_id": manifest.get("version_id"),
        "model": {"name": model.get("name"), "fingerprint": model.get("fingerprint"), "dim": manifest.get("dim"),
                  "truncate_dim": model.get("truncate_dim")} if isinstance(model, Mapping) else {"name": model},
        "index_kind": manifest.get("kind"),
        "index_params": manifest.get("params"),
        "metric": manifest.get("metric"),
        "source_run": manifest.get("source_run"),
        "corpus_fingerprint": manifest.get("corpus_fingerprint"),
    }


QUANTIZATION_KEYS = ("factory", "nlist", "pq_m", "pq_nbits", "rescore", "rescore_multiplier", "nprobe")


def quantization_of(kind: Any, params: Any) -> dict[str, Any]:
    """The part of an index's kind/params that changes its scores or its candidate lists (not
    the build's reasoning, timings or RAM estimates)."""
    out: dict[str, Any] = {"kind": kind}
    if isinstance(params, Mapping):
        out.update({k: params.get(k) for k in QUANTIZATION_KEYS if params.get(k) is not None})
    elif params is not None:
        out["params"] = params
    return out


def _describe_quantization(q: Mapping[str, Any]) -> str:
    rest = ", ".join(f"{k} {v}" for k, v in q.items() if k not in ("kind", "factory"))
    return f"{q.get('kind')} {q.get('factory') or ''}".strip() + (f" ({rest})" if rest else "")


def calibration_differences(record: Mapping[str, Any], manifest: Mapping[str, Any]) -> list[str]:
    """Why ``record`` does not fit the version ``manifest`` describes (empty: it fits)."""
    have = version_identity(manifest)
    reasons = []
    if _fingerprint_of(record.get("model")) != _fingerprint_of(have["model"]) or \
            (record.get("model") or {}).get("dim") != have["model"].get("dim"):
        reasons.append(f"model changed ({(record.get('model') or {}).get('name')} -> {have['model'].get('name')})")
    q_rec = quantization_of(record.get("index_kind"), record.get("index_params"))
    q_have = quantization_of(have["index_kind"], have["index_params"])
    if q_rec != q_have:
        reasons.append(f"quantization changed ({_describe_quantization(q_rec)} -> {_describe_quantization(q_have)})")
    if record.get("source_run") != have["source_run"] or \
            (record.get("corpus_fingerprint") or None) != (have["corpus_fingerprint"] or None):
        reasons.append(f"corpus changed (run {record.get('source_run')} -> {have['source_run']})")
    return reasons


def calibration_status(store: Store, index: str, version: str) -> dict[str, Any]:
    """Whether ``version`` has thresholds it can use, for ``status`` and ``search --threshold auto``.

    ``{"version", "calibrated", "calibration_id", "calibrated_on", "inherited", "needs_recalibration",
    "reasons", "rule", "threshold", "delta", "floor", "beta", "f_beta", "precision", "recall",
    "created_at"}``. ``calibrated_on`` differs from ``version`` when the thresholds were fitted on
    another version (inherited or copied); ``needs_recalibration`` is true when the model, the
    quantization or the corpus differ from what they were fitted on, or nothing was ever fitted.
    """
    manifest = read_version_manifest(store, index, version)
    rec = load_calibration(store, index, version)
    if rec is None:
        return {"version": version, "calibrated": False, "calibration_id": None, "calibrated_on": None,
                "inherited": False, "needs_recalibration": True,
                "reasons": [f"never calibrated: run `embedctl calibrate --index {index} --version {version} "
                            "--pairs PAIRS`"]}
    reasons = calibration_differences(rec, manifest)
    on = rec.get("version_id")
    if on != version:
        reasons.insert(0, f"calibrated on another version ({on})")
    absolute = rec.get("absolute") or {}
    return {
        "version": version, "calibrated": True, "calibration_id": rec.get("calibration_id"), "calibrated_on": on,
        "inherited": rec.get("found_on") != version or on != version,
        "needs_recalibration": bool(calibration_differences(rec, manifest)), "reasons": reasons,
        "rule": rec.get("rule"), "threshold": absolute.get("threshold"),
        "delta": (rec.get("relative") or {}).get("delta"), "floor": (rec.get("floor") or {}).get("score"),
        "beta": rec.get("beta"), "f_beta": absolute.get("f_beta"), "precision": absolute.get("precision"),
        "recall": absolute.get("recall"), "created_at": rec.get("created_at"),
    }


def calibration_line(status: Mapping[str, Any]) -> str:
    """One line for ``embedctl status`` from ``calibration_status``."""
    if not status.get("calibrated"):
        return "not calibrated (embedctl calibrate ...)"
    th = status.get("threshold")
    what = str(status.get("rule"))
    if isinstance(th, (int, float)):
        what = f"{what} rule, threshold {th:.4f}, F{status.get('beta') or 1:g} {status.get('f_beta') or 0:.3f}"
    if status.get("needs_recalibration"):
        return f"RECALIBRATE: {'; '.join(status.get('reasons') or [])} [{what}]"
    if status.get("calibrated_on") != status.get("version"):
        return f"{status.get('calibration_id')} inherited from {status.get('calibrated_on')} (still fits) [{what}]"
    return f"{status.get('calibration_id')} [{what}]"


def resolve_threshold(store: Store, index: str, version: str, spec: str | float | None, *,
                      rule: Rule | None = None, allow_stale: bool = False) -> Thresholds | None:
    """What ``search --threshold SPEC`` filters with: None (no filter), a number (absolute), or
    ``auto`` (the version's calibration; refused when it is missing or no longer fits the
    version, unless ``allow_stale``)."""
    if spec is None or spec == "" or spec == "none":
        return None
    if spec != "auto":
        try:
            return Thresholds(rule="absolute", threshold=float(spec))
        except ValueError as err:
            raise ConfigError(f"--threshold must be a number or 'auto', got {spec!r}") from err
    rec = load_calibration(store, index, version)
    if rec is None:
        raise NotFoundError(f"--threshold auto: version {version!r} of index {index!r} has no calibration; run "
                            f"`embedctl calibrate --index {index} --version {version} --pairs PAIRS` first")
    reasons = calibration_differences(rec, read_version_manifest(store, index, version))
    if reasons and not allow_stale:
        raise ConfigError(f"--threshold auto: the thresholds of {index}/{version} were calibrated on "
                          f"{rec.get('version_id')} and no longer fit: {'; '.join(reasons)}. Recalibrate "
                          f"(`embedctl calibrate --index {index} --version {version} ...`) or pass a number")
    return Thresholds.from_calibration(rec, rule)


def copy_calibrations(src: Store, dst: Store, index: str, version: str) -> int:
    """Copy a version's calibration records (and their plots) to another store; returns the count.
    ``publish --from`` copies only the artifacts a manifest lists; this is the companion for
    thresholds fitted before the upload."""
    prefix = calibration_prefix(index, version)
    n = 0
    for key in sorted(src.list(prefix), key=lambda k: k.endswith(".json")):  # JSON last: it commits a record
        if not dst.exists(key):
            dst.write_bytes(key, src.read_bytes(key))
            n += key.endswith(".json")
    return n


def reference_embeddings(store: Store, index: str, record: Mapping[str, Any]) -> np.ndarray:
    """The calibration-time query embeddings a record points at (checked against its sha256)."""
    ref = record["reference"]
    key = join(calibration_prefix(index, record.get("found_on") or record["version_id"]), ref["embeddings"])
    data = store.read_bytes(key)
    if sha256_bytes(data) != ref["embeddings_sha256"]:
        from engine.core.errors import IntegrityError

        raise IntegrityError(f"{store.describe(key)} does not match its calibration record (sha256)")
    return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)
