"""The embed job's stages as plain functions over one work unit, runnable with or without Ray.

prepare_run  -> plan the corpus (schema check, units, duplicates), save the plan, list pending units
chunk_unit   -> read + validate + normalise + chunk one unit; write chunks/ and rejects/ parts
UnitEmbedder -> embed one unit's chunks (token-budget batches); write embeddings/, then commit it
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
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import __version__
from engine.core.errors import ConfigError
from engine.core.layout import run_manifest_key, run_part_key, run_prefix
from engine.core.storage import Store, join, json_bytes, open_store, sha256_file
from engine.embed.chunking import ChunkConfig, Chunker, chunk_id_for, content_hash, normalize_text
from engine.embed.config import EmbedJobConfig
from engine.embed.corpus import CorpusPlan, Unit, corpus_store, plan_corpus, read_unit, rejects_schema, validate_unit
from engine.embed.tokenizers import HFTokenizer, Tokenizer, WhitespaceTokenizer, load_tokenizer

if TYPE_CHECKING:
    import pyarrow as pa

    from engine.embed.encoders import Encoder

log = logging.getLogger(__name__)


def state_key(run_id: str, *parts: str) -> str:
    return join(run_prefix(run_id), "_state", *parts)


# ---------------------------------------------------------------------------------------------
# model facts without loading the model (tokenizer + max length), for the CPU chunk stage
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    max_seq_length: int


@lru_cache(maxsize=8)
def model_info(spec: str | None) -> ModelInfo:
    if spec and spec.startswith("hash:"):
        return ModelInfo(spec, "", 512)
    from engine.embed.encoders import resolve_model_path

    name, path = resolve_model_path(spec)
    max_len = 512
    cfg = Path(path) / "sentence_bert_config.json"
    if cfg.exists():
        max_len = int(json.loads(cfg.read_text()).get("max_seq_length") or max_len)
    return ModelInfo(name, path, max_len)


@lru_cache(maxsize=8)
def model_tokenizer(spec: str | None) -> Tokenizer:
    info = model_info(spec)
    if not info.path:
        return WhitespaceTokenizer()
    tok_json = Path(info.path) / "tokenizer.json"
    if not tok_json.exists():
        raise ConfigError(f"model folder {info.path} has no tokenizer.json (a fast tokenizer is needed for chunking)")
    return HFTokenizer(tok_json, name=f"hf:{info.name}")


@lru_cache(maxsize=8)
def _chunker(cfg_json: str) -> Chunker:
    d = json.loads(cfg_json)
    chunk_cfg = ChunkConfig(**d["chunk"])
    mtok = model_tokenizer(d["model"])
    return Chunker(chunk_cfg, load_tokenizer(chunk_cfg.tokenizer, mtok), mtok, model_info(d["model"]).max_seq_length,
                   prompt=d.get("passage_prompt") or "")


def make_chunker(cfg: EmbedJobConfig) -> Chunker:
    return _chunker(json.dumps({"chunk": asdict(cfg.chunk), "model": cfg.embed.model,
                                "passage_prompt": cfg.embed.passage_prompt}, sort_keys=True))


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


def prepare_run(cfg: EmbedJobConfig) -> PreparedRun:
    """Validate inputs and config before any work; create or resume the run."""
    cfg.validate()
    make_chunker(cfg)  # config errors (chunk size vs model limit, missing tokenizer) surface now
    store = open_store(cfg.store, endpoint_url=cfg.endpoint_url)
    _cstore, plan = plan_corpus(cfg.corpus)
    run_id = cfg.run_id or default_run_id(cfg, plan)
    previous = None
    if store.exists(run_manifest_key(run_id)):
        previous = store.read_json(run_manifest_key(run_id))
        if previous.get("kind") != "embed":
            raise ConfigError(f"run {run_id!r} exists and is a {previous.get('kind')!r} run; pick another --run-id")
        if previous.get("identity") != json.loads(json.dumps(cfg.identity_dict(), default=str)):
            raise ConfigError(
                f"run {run_id!r} already exists with a different config; resume it with the same flags or use a new --run-id"
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
    return PreparedRun(run_id, plan, pending, sorted(done), manifest)


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
        "chunk_seconds": time.perf_counter() - t0,
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


def unpack_ids(flat: bytes, lengths: bytes) -> list[Any]:
    import numpy as np

    ids = np.frombuffer(flat, dtype=np.int32)
    lens = np.frombuffer(lengths, dtype=np.int32)
    return np.split(ids, np.cumsum(lens)[:-1]) if len(lens) else []


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


def write_part(store: Store, key: str, table: pa.Table) -> dict[str, Any]:
    """Write a Parquet part atomically (temp file -> upload/rename); return its key, rows, bytes, sha256.

    Written without timestamps or writer-dependent metadata so equal tables give equal bytes.
    """
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="embedctl-part-") as tmp:
        path = os.path.join(tmp, "part.parquet")
        pq.write_table(table, path, compression="zstd", row_group_size=8192, write_statistics=True)
        digest, size = sha256_file(path), os.path.getsize(path)
        store.upload_file(key, path)
    return {"key": key, "rows": table.num_rows, "bytes": size, "sha256": digest}


def read_part(store: Store, key: str) -> pa.Table:
    import pyarrow.parquet as pq

    with store.arrow_filesystem().open_input_file(store.arrow_path(key)) as f:
        return pq.read_table(f)


# ---------------------------------------------------------------------------------------------
# embed stage (CPU or GPU actor)
# ---------------------------------------------------------------------------------------------


def embedding_column(vectors: Any, dtype: str) -> pa.FixedSizeListArray:
    import numpy as np
    import pyarrow as pa

    arr = np.ascontiguousarray(vectors, dtype=np.float16 if dtype == "float16" else np.float32)
    n, dim = arr.shape if arr.ndim == 2 else (0, 0)
    flat = pa.array(arr.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, dim) if n else pa.array([], type=pa.list_(flat.type, max(dim, 1)))


class UnitEmbedder:
    """Holds the model once; embeds whole units and commits them. Used as a Ray Data actor."""

    def __init__(self, cfg: EmbedJobConfig, run_id: str, threads: int | None = None, encoder: Encoder | None = None):
        from engine.embed.encoders import load_encoder

        self.created_at = time.time()  # start-up accounting (manifest timings.start_up)
        self.cfg = cfg
        self.run_id = run_id
        self.store = open_store(cfg.store, endpoint_url=cfg.endpoint_url)
        e = cfg.embed
        self.encoder = encoder or load_encoder(
            e.model, device=e.device, dtype=e.dtype, truncate_dim=e.truncate_dim, query_prompt=e.query_prompt,
            passage_prompt=e.passage_prompt, batch_tokens=e.batch_tokens, threads=threads, compile=e.compile,
        )
        self.ready_at = time.time()

    def embed_unit(self, chunked: dict[str, Any], token_ids: list[Any] | None = None) -> dict[str, Any]:
        """Embed one unit's chunks (from pre-tokenized ids when given) and commit the unit."""
        import pyarrow as pa

        _maybe_crash_for_test()
        started_at = time.time()
        t0 = time.perf_counter()
        chunks = read_part(self.store, chunked["chunk_file"]["key"])
        encode_ids = getattr(self.encoder, "encode_ids", None)
        if token_ids is not None and encode_ids is not None and len(token_ids) == chunks.num_rows:
            vectors = encode_ids(token_ids)  # [n_chunks, dim] float32, L2-normalised
        else:
            vectors = self.encoder.encode_passages(embed_inputs(chunks, make_chunker(self.cfg)))
        column = embedding_column(vectors, self.cfg.embed.output_dtype)
        table = chunks.append_column(pa.field("embedding", column.type), column)
        emb_file = write_part(self.store, run_part_key(self.run_id, "embeddings", chunked["unit_id"]), table)
        embed_seconds = time.perf_counter() - t0
        marker = {k: v for k, v in chunked.items() if k not in ("chunk_seconds",)}
        marker.update(embedding_file=emb_file, dim=self.encoder.dim, model=self.encoder.identity, chunk_seconds=chunked["chunk_seconds"],
                      embed_seconds=embed_seconds, started_at=round(started_at, 3),
                      actor_created_at=round(self.created_at, 3), actor_ready_at=round(self.ready_at, 3))
        # The commit: written last, so a unit with a marker has all three parts.
        self.store.write_bytes(state_key(self.run_id, "done", f"{chunked['unit_id']}.json"), json_bytes(marker))
        return marker

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Ray Data entry point: a batch of unit rows (JSON ``chunked``; packed ``ids``/``lens`` when pre-tokenized)."""
        out = []
        for i, s in enumerate(batch["chunked"]):
            ids = batch["ids"][i] if "ids" in batch else None
            token_ids = unpack_ids(ids, batch["lens"][i]) if ids else None
            out.append(self.embed_unit(json.loads(s), token_ids))
        return {"marker": [json.dumps(m) for m in out]}


def embed_inputs(chunks: pa.Table, chunker: Chunker) -> list[str]:
    """Title prefix + chunk text, exactly as the chunker sized it (the prompt is added by the encoder)."""
    texts = chunks.column("text").to_pylist()
    titles = chunks.column("title").to_pylist()
    return [chunker.prefix_for(t) + x for t, x in zip(titles, texts, strict=True)]


def _maybe_crash_for_test() -> None:
    """Test hook: with EMBEDCTL_TEST_CRASH_ONCE=<flag file>, the first worker to get here dies for real."""
    flag = os.environ.get("EMBEDCTL_TEST_CRASH_ONCE")
    if flag and not os.path.exists(flag):
        Path(flag).write_text(str(os.getpid()))
        os._exit(137)


# ---------------------------------------------------------------------------------------------
# finalize
# ---------------------------------------------------------------------------------------------


def start_up(markers: list[dict[str, Any]], job_started_at: float) -> dict[str, float] | None:
    """Where a job's fixed start went, from this attempt's unit markers (seconds after the job started):
    when the first embedding worker was up and its model loaded, and when the first unit began."""
    mine = [m for m in markers if float(m.get("started_at", 0)) >= job_started_at and "actor_ready_at" in m]
    if not mine:
        return None
    loads = sorted(float(m["actor_ready_at"]) - float(m["actor_created_at"]) for m in mine)
    return {"first_worker_created_s": round(min(float(m["actor_created_at"]) for m in mine) - job_started_at, 3),
            "first_worker_ready_s": round(min(float(m["actor_ready_at"]) for m in mine) - job_started_at, 3),
            "model_load_s": round(loads[len(loads) // 2], 3),
            "first_unit_start_s": round(min(float(m["started_at"]) for m in mine) - job_started_at, 3)}


def finalize_run(cfg: EmbedJobConfig, prepared: PreparedRun, wall_seconds: float,
                 started_at: float | None = None) -> dict[str, Any]:
    """Gather unit commits into the manifest; the run succeeds only if every unit is committed.

    ``started_at`` (epoch seconds) adds ``timings.start_up`` for the units embedded in this attempt."""
    store = open_store(cfg.store, endpoint_url=cfg.endpoint_url)
    run_id = prepared.run_id
    markers = {}
    for key in store.list(state_key(run_id, "done")):
        m = store.read_json(key)
        markers[m["unit_id"]] = m
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
    if startup:
        timings["start_up"] = startup
    manifest = dict(prepared.manifest)
    manifest.update(
        status="succeeded" if not missing else "incomplete",
        finished_at=_now(),
        model=model,
        dim=model["dim"] if model else None,
        metric="cosine",
        dtype=cfg.embed.output_dtype,
        outputs={
            "chunks": [m["chunk_file"] for m in ordered],
            "embeddings": [m["embedding_file"] for m in ordered],
            "rejects": [m["reject_file"] for m in ordered],
        },
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
