"""The refreshed index version: an incremental update of a copy of the live shards, or a rebuild."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.core import layout
from engine.core.errors import ConflictError, GateError, IntegrityError
from engine.core.storage import LocalStore, Store, json_bytes
from engine.embed.parts_index import run_outputs
from engine.refresh.diff import RefreshDiff
from engine.refresh.failpoints import stall_point
from engine.refresh.recall_gate import measure_recall
from engine.refresh.run_parts import local_copy, read_columns, read_run_rows, read_run_table, unit_vectors
from engine.refresh.strategy import live_build_config

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass
class _Incoming:
    """The vectors that come in (changed and new chunks), sorted by chunk id, with their fresh ids."""

    cids: list[str]
    dids: list[str]
    vecs: np.ndarray  # [n, dim] float32, unit length
    ids: np.ndarray  # [n] int64, above every live id
    meta: pa.Table | None = None  # the version's metadata columns for these rows (filters), same order


@dataclass
class _Copy:
    """Where an update reads from (the live version) and writes to (the new one), and how it encodes."""

    store: Store
    live: dict[str, Any]
    src: str
    dst: str
    binary: bool
    rescore: str
    ranges: np.ndarray | None  # [2, dim] int8 rescore ranges of the live version
    meta_keys: dict[int, str]  # shard -> its metadata file (filter columns), when the live version has them
    meta_columns: list[str]


def update_version(store: Store, index: str, live: dict[str, Any], version_id: str, run_manifest: dict[str, Any],
                   diff: RefreshDiff, record: dict[str, Any], *, gate_recall: float | None) -> dict[str, Any]:
    """The incremental path: copy the live version's shards, remove the changed/deleted chunks' ids, add the
    changed/new chunks' vectors under fresh ids (above every live id, so each shard's id map stays sorted),
    measure recall against exact search over the refresh run, and commit the manifest (create-only).

    A rerun after a crash rewrites the same files; a version whose manifest exists is returned as is."""
    from engine.index.version import read_version_manifest

    if store.exists(layout.version_manifest_key(index, version_id)):
        return read_version_manifest(store, index, version_id)
    t0 = time.perf_counter()
    cp = _copy_plan(store, index, live, version_id)
    incoming = _incoming(store, run_manifest, diff, cp.meta_columns)
    shards = sorted(live["shards"], key=lambda s: int(s["shard"]))
    id_maps, removed_rows, max_id = _live_id_maps(store, cp, shards, set(diff.remove_ids))
    incoming.ids = np.arange(max_id + 1, max_id + 1 + len(incoming.cids), dtype=np.int64)
    takes = _assign_adds([len(t) - int(g.sum()) for t, g in zip(id_maps, removed_rows, strict=True)], len(incoming.cids))
    artifacts: list[dict[str, Any]] = []
    out_shards: list[dict[str, Any]] = []
    cursor = 0
    for s, t, gone, take in zip(shards, id_maps, removed_rows, takes, strict=True):
        entry, arts = _update_shard(cp, s, t, gone, incoming, slice(cursor, cursor + take))
        cursor += take
        out_shards.append(entry)
        artifacts += arts
    live_files = live.get("files") or {}
    for key in (live_files[r] for r in ("trained", "rescore_ranges") if live_files.get(r)):
        artifacts.append(_copy_artifact(store, layout.join(cp.src, key), layout.join(cp.dst, key), key, live))
    files_out = {r: k for r, k in live_files.items() if r in ("trained", "rescore_ranges")}
    rows = sum(int(s["rows"]) for s in out_shards)
    if rows != diff.snapshot_chunks:
        raise IntegrityError(f"the updated version holds {rows} vectors, the snapshot has {diff.snapshot_chunks} chunks")
    record = {**record, "build_config": live_build_config(store, index, live),
              "seconds": {"update": round(time.perf_counter() - t0, 3)}}
    manifest = {k: v for k, v in live.items() if k not in ("timings", "recall_gate", "build_key", "refresh")}
    manifest.update(
        version_id=version_id, index=index, created_at=_utc_now(), source_run=run_manifest["run_id"],
        source={"run_id": run_manifest["run_id"], "embeddings": [[o["key"], o["rows"], o["sha256"]]
                                                                 for o in run_outputs(store, run_manifest, "embeddings")]},
        parent_version=str(live["version_id"]), shards=out_shards, files=files_out, artifacts=artifacts,
        counts={"vectors": rows, "shards": len(out_shards)}, recall_gate=None, refresh=record,
    )
    return _gate_and_commit(store, index, live, manifest, run_manifest, gate_recall=gate_recall, t0=t0)


def _copy_plan(store: Store, index: str, live: dict[str, Any], version_id: str) -> _Copy:
    params = live.get("params") or {}
    rescore = str(params.get("rescore") or "none")
    src = layout.version_prefix(index, str(live["version_id"]))
    live_files = live.get("files") or {}
    ranges = None
    if rescore == "int8" and live_files.get("rescore_ranges"):
        data = store.read_bytes(layout.join(src, live_files["rescore_ranges"]))
        ranges = np.load(io.BytesIO(data), allow_pickle=False)
    metadata = live.get("metadata") or {}
    meta_keys = {int(m["shard"]): m["files"]["meta"] for m in metadata.get("shards") or []
                 if (m.get("files") or {}).get("meta")}
    return _Copy(store, live, src, layout.version_prefix(index, version_id), str(live["kind"]) == "binary-rerank",
                 rescore, ranges, meta_keys, list(metadata.get("columns") or {}) if meta_keys else [])


def _incoming(store: Store, run_manifest: dict[str, Any], diff: RefreshDiff, meta_columns: list[str]) -> _Incoming:
    """Changed and new chunks' rows from the refresh run (stored or just embedded), sorted by chunk id, with
    their metadata columns when the live version keeps them for filters."""
    cids, dids, vecs = read_run_rows(store, run_manifest, set(diff.add_ids))
    order = np.argsort(np.array(cids, dtype=object), kind="stable") if cids else np.zeros(0, np.int64)
    cids = [cids[i] for i in order]
    dids = [dids[i] for i in order]
    vecs = vecs[order] if len(order) else vecs
    if len(cids) != len(diff.add_ids):
        raise IntegrityError(f"refresh run {run_manifest['run_id']} holds {len(cids)} of the {len(diff.add_ids)} "
                             "chunks to add; rerun the refresh (it resumes)")
    meta = None
    if meta_columns:
        t = read_run_table(store, run_manifest, ["chunk_id", *meta_columns], set(diff.add_ids))
        pos = {c: i for i, c in enumerate(t.column("chunk_id").to_pylist())}
        meta = t.take([pos[c] for c in cids]).drop_columns(["chunk_id"])
    return _Incoming(cids, dids, unit_vectors(vecs), np.zeros(0, np.int64), meta)


def _live_id_maps(store: Store, cp: _Copy, shards: list[dict[str, Any]],
                  remove: set[str]) -> tuple[list[pa.Table], list[np.ndarray], int]:
    """Pass 1 over the id maps (small): each shard's map, the rows it loses, and the top of the id space."""
    id_maps, removed_rows, max_id = [], [], -1
    for s in shards:
        t = read_columns(store, layout.join(cp.src, s["files"]["ids"]), ["id", "chunk_id", "doc_id"])
        id_maps.append(t)
        ids = t.column("id").to_numpy()
        if len(ids):
            max_id = max(max_id, int(ids.max()))
        removed_rows.append(np.array([c in remove for c in t.column("chunk_id").to_pylist()], dtype=bool))
    found = sum(int(g.sum()) for g in removed_rows)
    if found != len(remove):
        raise IntegrityError(f"version {cp.live['version_id']} holds {found} of the {len(remove)} chunks the diff "
                             "removes; its id maps do not match its source run")
    return id_maps, removed_rows, max_id


def _update_shard(cp: _Copy, s: dict[str, Any], t: pa.Table, gone: np.ndarray, incoming: _Incoming,
                  take: slice) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One shard of the new version: the live bytes when untouched, else rewritten (its manifest entry, artifacts)."""
    files = dict(s["files"])
    meta_key = cp.meta_keys.get(int(s["shard"]))
    if not gone.any() and take.stop == take.start:
        keys = [*files.values(), *([meta_key] if meta_key else [])]
        arts = [_copy_artifact(cp.store, layout.join(cp.src, key), layout.join(cp.dst, key), key, cp.live)
                for key in keys]  # untouched shard: same bytes under the new version
        return dict(s), arts
    with tempfile.TemporaryDirectory(prefix="embedctl-refresh-shard-") as tmp:
        paths = {role: os.path.join(tmp, os.path.basename(key)) for role, key in files.items()}
        table = _rewrite_shard(cp, s, t, gone, incoming, take, paths)
        stall_point("shard")
        size = 0
        arts = []
        for role, key in files.items():
            digest = cp.store.upload_file(layout.join(cp.dst, key), paths[role])
            nbytes = os.path.getsize(paths[role])
            size += nbytes
            arts.append({"key": key, "bytes": nbytes, "sha256": digest})
        if meta_key:
            kept_ids = t.column("id").to_numpy()[~gone]
            arts.append(_rewrite_meta(cp, meta_key, kept_ids, incoming, take, os.path.join(tmp, "meta.parquet")))
    ids_now = table.column("id").to_numpy()
    return {**s, "rows": int(table.num_rows), "bytes": size, "id_start": int(ids_now.min()) if len(ids_now) else 0,
            "id_end": int(ids_now.max()) + 1 if len(ids_now) else 0}, arts


def _rewrite_shard(cp: _Copy, s: dict[str, Any], t: pa.Table, gone: np.ndarray, incoming: _Incoming,
                   take: slice, paths: dict[str, str]) -> pa.Table:
    """Remove ``gone`` rows from the live shard, add ``incoming[take]``; write index, id map, rescore to ``paths``."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.index.faiss_ops import index_from_bytes
    from engine.index.quantize import encode_rescore, pack_sign_bits

    files = s["files"]
    idx = index_from_bytes(cp.store.read_bytes(layout.join(cp.src, files["index"])), cp.binary)
    ids = t.column("id").to_numpy()
    rows = s.get("id_mode") == "row"  # a bare BFlat shard (engine.index.build) holds id-map rows, not ids
    if gone.any():
        n = idx.remove_ids(faiss.IDSelectorBatch(np.nonzero(gone)[0] if rows else ids[gone]))
        if n != int(gone.sum()):
            raise IntegrityError(f"shard {s['shard']}: removed {n} of {int(gone.sum())} ids")
    add_vecs = incoming.vecs[take]
    if len(add_vecs):
        x = pack_sign_bits(add_vecs) if cp.binary else add_vecs
        idx.add(x) if rows else idx.add_with_ids(x, incoming.ids[take])
    keep = ~gone
    table = pa.table({
        "id": pa.concat_arrays([pa.array(ids[keep], pa.int64()), pa.array(incoming.ids[take], pa.int64())]),
        "chunk_id": pa.concat_arrays([t.column("chunk_id").combine_chunks().filter(pa.array(keep)),
                                      pa.array(incoming.cids[take], pa.string())]),
        "doc_id": pa.concat_arrays([t.column("doc_id").combine_chunks().filter(pa.array(keep)),
                                    pa.array(incoming.dids[take], pa.string())]),
    })
    if idx.ntotal != table.num_rows:
        raise IntegrityError(f"shard {s['shard']}: {idx.ntotal} vectors but {table.num_rows} id map rows")
    (faiss.write_index_binary if cp.binary else faiss.write_index)(idx, paths["index"])
    pq.write_table(table, paths["ids"], compression="zstd", write_statistics=True)
    if "rescore" in files:
        old = np.load(local_copy(cp.store, layout.join(cp.src, files["rescore"]), paths["rescore"] + ".old"),
                      allow_pickle=False)
        np.save(paths["rescore"], np.concatenate([old[keep], encode_rescore(add_vecs, cp.rescore, cp.ranges)]),
                allow_pickle=False)
    return table


def _rewrite_meta(cp: _Copy, key: str, kept_ids: np.ndarray, incoming: _Incoming, take: slice,
                  path: str) -> dict[str, Any]:
    """A shard's metadata file (``id`` + filter columns) without the removed rows, with the added ones."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    old = read_columns(cp.store, layout.join(cp.src, key), None)
    kept = old.filter(pc.is_in(old.column("id"), value_set=pa.array(kept_ids, pa.int64())))
    n = take.stop - take.start
    cols: dict[str, Any] = {}
    for f in old.schema:
        if f.name == "id":
            cols["id"] = pa.array(incoming.ids[take], pa.int64())
        elif incoming.meta is not None and f.name in incoming.meta.column_names:
            try:
                cols[f.name] = incoming.meta.column(f.name).slice(take.start, n).cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise IntegrityError(f"metadata column {f.name!r} of the snapshot does not fit the live version's "
                                     f"type {f.type} ({err}); rerun with --strategy rebuild") from None
        else:
            cols[f.name] = pa.nulls(n, f.type)  # the snapshot lacks the column
    table = pa.concat_tables([kept, pa.table(cols, schema=old.schema)])
    pq.write_table(table, path, compression="zstd", write_statistics=True)
    digest = cp.store.upload_file(layout.join(cp.dst, key), path)
    return {"key": key, "bytes": os.path.getsize(path), "sha256": digest}


def _gate_and_commit(store: Store, index: str, live: dict[str, Any], manifest: dict[str, Any],
                     run_manifest: dict[str, Any], *, gate_recall: float | None, t0: float) -> dict[str, Any]:
    """The recall gate on the written version, its build report, then the create-only manifest commit."""
    from engine.index.version import read_version_manifest

    version_id = str(manifest["version_id"])
    dst = layout.version_prefix(index, version_id)
    record = manifest["refresh"]
    stall_point("gate")
    t1 = time.perf_counter()
    live_gate = live.get("recall_gate") or {}
    threshold = gate_recall if gate_recall is not None else live_gate.get("threshold")
    gate = measure_recall(store, index, manifest, run_manifest, k=int(live_gate.get("k") or 10), threshold=threshold)
    manifest["recall_gate"] = gate
    data = json_bytes({"version_id": version_id, "index": index, "refresh": record, "recall_gate": gate})
    store.write_bytes(layout.join(dst, "build-report.json"), data)
    manifest["artifacts"].append({"key": "build-report.json", "bytes": len(data),
                                  "sha256": hashlib.sha256(data).hexdigest()})
    manifest["files"]["report"] = "build-report.json"
    manifest["timings"] = {"update_s": record["seconds"]["update"], "gate_s": round(time.perf_counter() - t1, 3),
                           "total_s": round(time.perf_counter() - t0, 3)}
    if not gate["passed"]:
        store.delete_prefix(dst)  # nothing of a failed version stays where searchers look
        raise GateError(f"recall gate failed for the refreshed {index}: recall@{gate['k']} = {gate['recall']:.4f} "
                        f"against exact search is below {gate['threshold']}; nothing was published. Rerun with "
                        "--strategy rebuild")
    try:
        store.put_if_absent(layout.version_manifest_key(index, version_id), json_bytes(manifest))
    except ConflictError:
        manifest = read_version_manifest(store, index, version_id)
    return manifest


def _assign_adds(sizes: list[int], n_add: int) -> list[int]:
    """How many added rows each shard takes: fill the smallest shards first (water-filling)."""
    if n_add >= 100_000:
        return _assign_adds_fast(sizes, n_add)
    take = [0] * len(sizes)
    cur = list(sizes)
    for _ in range(n_add):
        i = min(range(len(cur)), key=lambda j: (cur[j], j))
        take[i] += 1
        cur[i] += 1
    return take


def _assign_adds_fast(sizes: list[int], n_add: int) -> list[int]:
    total = sum(sizes) + n_add
    target = -(-total // len(sizes))
    take = [max(0, target - s) for s in sizes]
    extra = sum(take) - n_add
    for i in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        cut = min(extra, take[i])
        take[i] -= cut
        extra -= cut
    return take


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _copy_artifact(store: Store, src: str, dst: str, key: str, live: dict[str, Any]) -> dict[str, Any]:
    """Copy one artifact of the live version (verified against the live manifest's sha256)."""
    want = {a["key"]: a for a in live.get("artifacts", [])}.get(key)
    sha256 = want["sha256"] if want else None
    if isinstance(store, LocalStore):
        digest = store.upload_file(dst, store.local_path(src), sha256=sha256)
        return {"key": key, "bytes": store.size(dst), "sha256": digest}
    with tempfile.TemporaryDirectory(prefix="embedctl-copy-") as tmp:
        path = os.path.join(tmp, "f")
        store.download_file(src, path)
        digest = store.upload_file(dst, path, sha256=sha256)
        return {"key": key, "bytes": os.path.getsize(path), "sha256": digest}


def rebuild_version(store: Store, index: str, run_id: str, live: dict[str, Any], record: dict[str, Any], *,
                    gate_recall: float | None) -> dict[str, Any]:
    """The rebuild path: the index builder on the refresh run, with the live version's build settings.

    The builder resumes by its own build key. The refresh record goes into the version manifest
    (``manifest_extra``); a version the builder had already finished without it (same build key) gets it in
    ``refresh.json`` beside its manifest."""
    from engine.index.build import build_index
    from engine.index.params import BuildConfig

    cfg_d = live_build_config(store, index, live)
    if gate_recall is not None:
        cfg_d["gate_recall"] = gate_recall
    cfg = BuildConfig.from_dict(cfg_d)
    record = {**record, "build_config": cfg.to_dict()}
    result = build_index(store, run_id, index, cfg, parent_version=str(live["version_id"]),
                         manifest_extra={"refresh": record})
    manifest = result.manifest
    if "refresh" not in manifest:
        side = layout.join(layout.version_prefix(index, result.version_id), "refresh.json")
        if not store.exists(side):
            store.write_json(side, record)
        manifest = dict(manifest, refresh=record)  # what the summary reports (the stored manifest lacks it)
    return manifest
