"""The embed job's stages as plain functions over one work unit, runnable with or without Ray.

prepare_run  -> plan the corpus (schema check, units, duplicates), save the plan, list pending units
chunk_unit   -> read + validate + normalise + chunk one unit; write chunks/ and rejects/ parts
UnitEmbedder -> embed one unit's chunks (token-budget batches)      } engine.embed.embedder: on Ray the
commit_unit  -> append the vectors, write embeddings/, then commit  } actor only computes, writers commit
finalize_run -> gather the unit commits into manifest.json

Resume: a unit is done when ``_state/done/<unit>.json`` exists; that marker is written last,
after all three parts, and records their sha256 and row counts. Every part's bytes depend
only on the unit and the config, so a rerun after ``kill -9`` rewrites the same files and
the final run equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from engine import __version__
from engine.core.errors import ConfigError
from engine.core.layout import run_manifest_key, run_part_key
from engine.core.storage import open_store
from engine.embed.chunking import chunk_id_for, content_hash, normalize_text
from engine.embed.config import EmbedJobConfig
from engine.embed.corpus import (
    CorpusPlan,
    Unit,
    corpus_store,
    find_plan_duplicates,
    plan_corpus,
    read_unit,
    rejects_schema,
    validate_unit,
)
from engine.embed.embedder import UnitEmbedder, commit_unit, unpack_ids
from engine.embed.model_facts import ModelInfo, embed_inputs, make_chunker, model_info, model_tokenizer
from engine.embed.parts import embedding_column, read_part, state_key, write_part
from engine.embed.parts_index import nodes_summary, read_markers, run_outputs, summarize_outputs, write_parts_index
from engine.embed.tokenizers import HFTokenizer

if TYPE_CHECKING:
    import pyarrow as pa

    from engine.embed.corpus import DuplicateFinder
    from engine.embed.encoders import Encoder

log = logging.getLogger(__name__)

# Re-exported: callers import the embed job's pieces from here (refresh, mining, tests, benchmarks).
__all__ = ["ModelInfo", "PreparedRun", "UnitEmbedder", "chunk_unit", "chunk_unit_table", "chunk_unit_tokens",
           "commit_unit", "embed_inputs", "embedding_column", "finalize_run", "make_chunker", "model_info",
           "model_tokenizer", "plan_meta_for", "prepare_run", "pretokenize", "read_part", "run_locally", "run_summary",
           "state_key", "unpack_ids", "write_part"]


def default_run_id(cfg: EmbedJobConfig, plan: CorpusPlan) -> str:
    """Same config + same inputs -> same run id, so rerunning a command resumes its run."""
    h = hashlib.sha256(json.dumps(cfg.identity_dict(), sort_keys=True, default=str).encode())
    for f in plan.files:
        h.update(f"{f.key}\x00{f.fingerprint}".encode())
    return f"embed-{h.hexdigest()[:12]}"


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------


@dataclass
class PreparedRun:
    run_id: str
    plan: CorpusPlan
    pending: list[Unit]
    done: list[str]
    manifest: dict[str, Any]
    cfg: EmbedJobConfig  # the config the run uses: its backend resolved (a legacy run's torch, see prepare_run)


LEGACY_DEFAULT_BACKEND: Final = "torch"  # what a run got with no backend asked before the default followed the device


def prepare_run(cfg: EmbedJobConfig, duplicate_finder: DuplicateFinder | None = None,
                backend_asked: bool = True) -> PreparedRun:
    """Validate inputs and config before any work; create or resume the run (duplicate ids found in this
    process, or by ``duplicate_finder``: on Ray).

    ``backend_asked`` False: the backend was chosen by device (``EmbedJobConfig.with_device_defaults``).
    Then, when the store holds the run the same command named before that default (the torch backend on
    every device), that run is resumed on torch: rerunning a command keeps resuming its run across the
    upgrade, and a finished run is not embedded again on another runtime; and a model the chosen runtime
    cannot run (its export is refused) runs on torch, as before, with a warning. A config with no backend
    (a direct caller, not the driver) gets the one this host's device picks, as not asked."""
    if cfg.embed.backend is None:
        cfg, backend_asked = cfg.with_backend(None), False
    cfg.validate()
    make_chunker(cfg)  # config errors (chunk size vs model limit, missing tokenizer) surface now
    store = open_store(cfg.store, endpoint_url=cfg.endpoint_url)
    _cstore, plan = plan_corpus(cfg.corpus, find_duplicates=False)  # duplicates below, for a new plan only
    cfg = _run_backend(cfg, plan, store, backend_asked)
    run_id = cfg.run_id or default_run_id(cfg, plan)
    previous = None
    if store.exists(run_manifest_key(run_id)):
        previous = store.read_json(run_manifest_key(run_id))
        if previous.get("kind") != "embed":
            raise ConfigError(f"run {run_id!r} exists and is a {previous.get('kind')!r} run; pick another --run-id")
        if previous.get("identity") != json.loads(json.dumps(cfg.identity_dict(), default=str)):
            hint = ""
            if "backend" not in (previous.get("identity") or {}).get("embed", {}) and \
                    cfg.embed.backend != LEGACY_DEFAULT_BACKEND:
                hint = (f" (it ran on the {LEGACY_DEFAULT_BACKEND} backend, the default before the default followed "
                        f"the device: add --backend {LEGACY_DEFAULT_BACKEND} to resume it)")
            raise ConfigError(
                f"run {run_id!r} already exists with a different config{hint}; resume it with the same flags or use "
                "a new --run-id"
            )
        old_inputs = {f["key"]: f["fingerprint"] for f in previous.get("inputs", [])}
        new_inputs = {f.key: f.fingerprint for f in plan.files}
        if old_inputs and old_inputs != new_inputs:
            raise ConfigError(
                f"the corpus changed since run {run_id!r} started (input fingerprints differ); use a new --run-id "
                "(or `embedctl refresh` to update an index incrementally)"
            )
    plan_key = state_key(run_id, "plan.json")
    if store.exists(plan_key):
        plan = CorpusPlan.from_dict(store.read_json(plan_key))  # the saved plan wins: same units on resume
    else:
        plan.duplicates = find_plan_duplicates(cfg.corpus, plan, duplicate_finder)
        store.write_json(plan_key, plan.to_dict())
    done = {Path(k).stem for k in store.list(state_key(run_id, "done"))}
    pending = [u for u in plan.units if u.unit_id not in done]
    manifest = {
        "kind": "embed",
        "run_id": run_id,
        "status": "running",
        "engine_version": __version__,
        "config": json.loads(json.dumps(cfg.to_dict(), default=str)),
        "identity": json.loads(json.dumps(cfg.identity_dict(), default=str)),
        "inputs": [{"key": f.key, "rows": f.rows, "bytes": f.size, "fingerprint": f.fingerprint} for f in plan.files],
        "corpus": cfg.corpus.corpus,
        "started_at": (previous or {}).get("started_at") or _now(),
        "attempts": int((previous or {}).get("attempts", 0)) + 1,
        "units": {"total": len(plan.units), "done_before_this_attempt": len(done)},
    }
    store.write_json(run_manifest_key(run_id), manifest)
    return PreparedRun(run_id, plan, pending, sorted(done), manifest, cfg)


def _run_backend(cfg: EmbedJobConfig, plan: CorpusPlan, store: Any, backend_asked: bool) -> EmbedJobConfig:
    """The config with the backend the run uses, its export built (``prepare_run``): a legacy torch run of
    the same command resumed on torch; with no backend asked, a model the runtime cannot run on torch."""
    if not backend_asked and not cfg.run_id and cfg.embed.backend != LEGACY_DEFAULT_BACKEND:
        legacy = replace(cfg, embed=replace(cfg.embed, backend=LEGACY_DEFAULT_BACKEND))
        legacy_id = default_run_id(legacy, plan)
        if store.exists(run_manifest_key(legacy_id)):
            log.warning("resuming run %s, which this command started on the %s backend (the default before it "
                        "followed the device); new runs get %s", legacy_id, LEGACY_DEFAULT_BACKEND, cfg.embed.backend)
            cfg = legacy
    from engine.embed.backends import prebuild

    try:
        prebuild(cfg.embed.model, cfg.embed.backend, cfg.embed.quantize, cfg.embed.device)  # export errors too
    except ConfigError as err:
        if backend_asked or cfg.embed.quantize != "none" or cfg.embed.backend == LEGACY_DEFAULT_BACKEND:
            raise
        # A model the runtime backends cannot run (another module layout, a slow tokenizer, ...): with no
        # backend asked it runs on torch, as every model did before the default followed the device.
        log.warning("%s; no --backend was asked, so this run uses %s", err, LEGACY_DEFAULT_BACKEND)
        cfg = replace(cfg, embed=replace(cfg.embed, backend=LEGACY_DEFAULT_BACKEND))
    return cfg


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------------------------
# chunk stage (CPU)
# ---------------------------------------------------------------------------------------------


def chunk_schema(metadata: list[tuple[str, pa.DataType]]) -> pa.Schema:
    import pyarrow as pa

    base = [("chunk_id", pa.string()), ("doc_id", pa.string()), ("chunk_index", pa.int32()), ("text", pa.string()),
            ("char_start", pa.int32()), ("char_end", pa.int32()), ("n_tokens", pa.int32()),
            ("content_hash", pa.string()), ("title", pa.string())]
    return pa.schema(base + metadata)


def chunk_unit(cfg: EmbedJobConfig, plan_meta: dict[str, Any], unit: Unit, dups: dict[int, str]) -> dict[str, Any]:
    """Read, validate, normalise and chunk one unit; write its chunks/ and rejects/ parts; return the summary."""
    return chunk_unit_table(cfg, plan_meta, unit, dups)[0]


def chunk_unit_table(cfg: EmbedJobConfig, plan_meta: dict[str, Any], unit: Unit,
                     dups: dict[int, str]) -> tuple[dict[str, Any], pa.Table]:
    """As ``chunk_unit``, also returning the chunk table (for pre-tokenizing in the same task)."""
    summary, chunks, _ids = chunk_unit_tokens(cfg, plan_meta, unit, dups)
    return summary, chunks


def chunk_unit_tokens(cfg: EmbedJobConfig, plan_meta: dict[str, Any], unit: Unit,
                      dups: dict[int, str]) -> tuple[dict[str, Any], pa.Table, list[list[int]] | None]:
    """As ``chunk_unit_table``, plus every chunk's model token ids when sizing computed them (else None)."""
    import pyarrow as pa

    chunk_started_at = time.time()  # the unit's timeline (its commit marker): chunked, embedded, committed
    t0 = time.perf_counter()
    store = open_store(cfg.store, endpoint_url=cfg.endpoint_url)
    cstore, _keys = corpus_store(cfg.corpus)
    plan = CorpusPlan(files=[], units=[], has_title=plan_meta["has_title"],
                      metadata_columns=plan_meta["metadata_columns"], duplicates={unit.file: dups})
    table = read_unit(cstore, unit)
    normalize = normalize_text if cfg.chunk.normalize else (lambda s: s.strip() and s)
    rows = validate_unit(table, unit, cfg.corpus, plan, normalize)
    chunker = make_chunker(cfg)
    cols: dict[str, list[Any]] = {k: [] for k in ("chunk_id", "doc_id", "chunk_index", "text", "char_start",
                                                   "char_end", "n_tokens", "content_hash", "title")}
    meta_out: dict[str, list[Any]] = {c: [] for c in plan.metadata_columns}
    token_ids: list[list[int] | None] = []
    per_doc = chunker.chunk_many(rows.texts, rows.titles)  # one batched tokenizer pass for the unit
    for i, (doc_id, doc_chunks, title) in enumerate(zip(rows.doc_ids, per_doc, rows.titles, strict=True)):
        for ch in doc_chunks:
            token_ids.append(ch.ids)
            cols["chunk_id"].append(chunk_id_for(doc_id, chunker.fp, ch.chunk_index))
            cols["doc_id"].append(doc_id)
            cols["chunk_index"].append(ch.chunk_index)
            cols["text"].append(ch.text)
            cols["char_start"].append(ch.char_start)
            cols["char_end"].append(ch.char_end)
            cols["n_tokens"].append(ch.n_tokens)
            cols["content_hash"].append(content_hash(ch.embed_text))
            cols["title"].append(title)
            for c in plan.metadata_columns:
                meta_out[c].append(rows.metadata[c][i])
    meta_fields = []
    for c in plan.metadata_columns:
        src_type = table.schema.field(c).type if c in table.column_names else pa.null()
        meta_fields.append((_meta_name(c), plan_meta["metadata_types"].get(c) or src_type))
    schema = chunk_schema(meta_fields)
    arrays = [pa.array(cols[n], type=schema.field(n).type) for n in cols]
    arrays += [pa.array(meta_out[c], type=schema.field(_meta_name(c)).type) for c in plan.metadata_columns]
    chunks = pa.Table.from_arrays(arrays, schema=schema)
    rejects = pa.Table.from_pylist(rows.rejects, schema=rejects_schema())
    chunk_file = write_part(store, run_part_key(cfg_run_id(plan_meta), "chunks", unit.unit_id), chunks)
    reject_file = write_part(store, run_part_key(cfg_run_id(plan_meta), "rejects", unit.unit_id), rejects)
    return {
        "unit_id": unit.unit_id, "input_rows": unit.rows, "accepted": len(rows.doc_ids), "rejected": len(rows.rejects),
        "reject_reasons": _count(r["reason"] for r in rows.rejects), "chunks": chunks.num_rows,
        "tokens": int(sum(cols["n_tokens"])), "chunk_file": chunk_file, "reject_file": reject_file,
        "chunk_seconds": time.perf_counter() - t0, "chunk_started_at": round(chunk_started_at, 3),
    }, chunks, (None if any(x is None for x in token_ids) else token_ids)  # type: ignore[return-value]


def pretokenize(cfg: EmbedJobConfig, chunks: pa.Table,
                known: list[list[int]] | None = None) -> tuple[bytes, bytes] | None:
    """Token ids (specials included) of every chunk's model input, packed as (int32 ids, int32 lengths).

    Runs in the CPU chunk tasks so GPU actors never tokenize (one process tokenizes ~6.5k chunks/s,
    far below what a GPU embeds). None when the model has no fast tokenizer (the hash encoder).
    """
    import numpy as np

    tok = model_tokenizer(cfg.embed.model)
    if not (cfg.embed.pretokenize and isinstance(tok, HFTokenizer)):
        return None
    prompt = cfg.embed.passage_prompt or ""
    if known is not None and not prompt and len(known) == chunks.num_rows:
        ids = known  # the chunker's sizing already tokenized exactly these inputs
    else:
        ids = tok.ids_batch([prompt + t for t in embed_inputs(chunks, make_chunker(cfg))])
    lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    return flat.tobytes(), lengths.tobytes()


def _meta_name(c: str) -> str:
    from engine.embed.corpus import RESERVED

    return f"meta_{c}" if c in RESERVED else c


def cfg_run_id(plan_meta: dict[str, Any]) -> str:
    return str(plan_meta["run_id"])


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


# ---------------------------------------------------------------------------------------------
# finalize
# ---------------------------------------------------------------------------------------------


def start_up(markers: list[dict[str, Any]], job_started_at: float) -> dict[str, float] | None:
    """Where a job's fixed start went, from this attempt's unit markers (seconds after the job started):
    when the first embedding worker was up and its model loaded, when the first unit began, was embedded
    and was committed (markers from this release on)."""
    mine = [m for m in markers if float(m.get("started_at", 0)) >= job_started_at and "actor_ready_at" in m]
    if not mine:
        return None
    loads = sorted(float(m["actor_ready_at"]) - float(m["actor_created_at"]) for m in mine)
    return {"first_worker_created_s": round(min(float(m["actor_created_at"]) for m in mine) - job_started_at, 3),
            "first_worker_ready_s": round(min(float(m["actor_ready_at"]) for m in mine) - job_started_at, 3),
            "model_load_s": round(loads[len(loads) // 2], 3),
            "first_unit_start_s": round(min(float(m["started_at"]) for m in mine) - job_started_at, 3),
            **{f"first_unit_{stage}_s": round(min(float(m[f"{stage}_at"]) for m in mine) - job_started_at, 3)
               for stage in ("embedded", "committed") if all(f"{stage}_at" in m for m in mine)}}


def finalize_run(cfg: EmbedJobConfig, prepared: PreparedRun, wall_seconds: float,
                 started_at: float | None = None, driver_timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Gather unit commits into the manifest; the run succeeds only if every unit is committed.

    ``started_at`` (epoch seconds) adds ``timings.start_up`` for the units embedded in this attempt;
    ``driver_timings`` (plan_s, ray_init_s, first_unit_done_s: the driver's own clock) join it."""
    store = open_store(cfg.store, endpoint_url=cfg.endpoint_url)
    run_id = prepared.run_id
    markers = {m["unit_id"]: m for m in read_markers(store, store.list(state_key(run_id, "done")))}  # in parallel
    missing = [u.unit_id for u in prepared.plan.units if u.unit_id not in markers]
    ordered = [markers[u.unit_id] for u in prepared.plan.units if u.unit_id in markers]
    counts = {
        "input_rows": sum(m["input_rows"] for m in ordered), "accepted": sum(m["accepted"] for m in ordered),
        "rejected": sum(m["rejected"] for m in ordered), "chunks": sum(m["chunks"] for m in ordered),
        "tokens": sum(m["tokens"] for m in ordered),
    }
    reasons: dict[str, int] = {}
    for m in ordered:
        for r, n in m["reject_reasons"].items():
            reasons[r] = reasons.get(r, 0) + n
    embed_s = sum(m["embed_seconds"] for m in ordered)
    chunk_s = sum(m["chunk_seconds"] for m in ordered)
    identities = {json.dumps(m["model"], sort_keys=True) for m in ordered}
    if len(identities) > 1:
        raise ConfigError(f"run {run_id!r} has units embedded by different models; start a new run")
    model = json.loads(identities.pop()) if identities else None
    timings: dict[str, Any] = {"wall_seconds": round(wall_seconds, 3), "chunk_worker_seconds": round(chunk_s, 3),
                               "embed_worker_seconds": round(embed_s, 3)}
    startup = start_up(ordered, started_at) if started_at else None
    if startup or driver_timings:
        timings["start_up"] = {**(driver_timings or {}), **(startup or {})}
    write_s = sum(float(m.get("write_seconds", 0.0)) for m in ordered)
    if write_s:
        timings["write_worker_seconds"] = round(write_s, 3)
    manifest = dict(prepared.manifest)
    manifest.update(
        status="succeeded" if not missing else "incomplete",
        finished_at=_now(),
        model=model,
        dim=model["dim"] if model else None,
        metric="cosine",
        dtype=cfg.embed.output_dtype,
        # inline part lists for a small run; totals + a Parquet parts index (also per-unit nodes) for a big one
        outputs=summarize_outputs(ordered, write_parts_index(store, run_id, ordered)),
        nodes=nodes_summary(ordered),
        counts=counts,
        rejects={"count": counts["rejected"], "by_reason": reasons},
        missing_units=missing,
        timings=timings,
        throughput={
            "docs_per_second": round(counts["accepted"] / wall_seconds, 2) if wall_seconds else None,
            "chunks_per_second": round(counts["chunks"] / wall_seconds, 2) if wall_seconds else None,
            "tokens_per_second": round(counts["tokens"] / wall_seconds, 2) if wall_seconds else None,
        },
    )
    if counts["input_rows"] != counts["accepted"] + counts["rejected"]:
        raise AssertionError("row accounting broke: input != accepted + rejected")
    if model and not missing and model.get("quantize", "none") != "none":  # a quantized run: its cosine to fp32
        from engine.embed.backends.quality import run_quality

        manifest["quality"] = run_quality(cfg, store, model, run_outputs(store, manifest, "embeddings"))
    store.write_json(run_manifest_key(run_id), manifest)
    return manifest


def run_summary(manifest: dict[str, Any], store_uri: str) -> dict[str, Any]:
    return {
        "run_id": manifest["run_id"], "status": manifest["status"], "store": store_uri,
        "counts": manifest.get("counts"), "rejects": manifest.get("rejects"), "dim": manifest.get("dim"),
        "model": (manifest.get("model") or {}).get("name"), "timings": manifest.get("timings"),
        "throughput": manifest.get("throughput"), "attempts": manifest.get("attempts"),
        "units": manifest.get("units"), "missing_units": manifest.get("missing_units"),
    }


def run_locally(cfg: EmbedJobConfig, encoder: Encoder | None = None) -> dict[str, Any]:
    """The whole job in this process, without Ray (unit tests and tiny corpora)."""
    started_at = time.time()
    t0 = time.perf_counter()
    prepared = prepare_run(cfg)
    cfg = prepared.cfg
    plan_meta = plan_meta_for(prepared)
    embedder = UnitEmbedder(cfg, prepared.run_id, encoder=encoder) if prepared.pending else None
    for unit in prepared.pending:
        chunked, table, ids = chunk_unit_tokens(cfg, plan_meta, unit, prepared.plan.duplicates.get(unit.file, {}))
        packed = pretokenize(cfg, table, ids) if encoder is None else None
        assert embedder is not None
        embedder.embed_unit(chunked, unpack_ids(*packed) if packed else None)
    return finalize_run(cfg, prepared, time.perf_counter() - t0, started_at)


def plan_meta_for(prepared: PreparedRun) -> dict[str, Any]:
    """The small, picklable part of the plan every chunk task needs."""
    return {"run_id": prepared.run_id, "has_title": prepared.plan.has_title,
            "metadata_columns": prepared.plan.metadata_columns, "metadata_types": prepared.plan.metadata_types()}
