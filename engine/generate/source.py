"""The chunks that get queries (an embed run's chunk parts, filtered and sampled) and the store cache of answers."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.core.errors import ConfigError, NotFoundError, SchemaError
from engine.core.storage import Store, join
from engine.embed.parts_index import run_outputs
from engine.generate.config import GenerateJobConfig

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

CACHE_ROOT = "generate/cache"


@dataclass(frozen=True)
class ChunkItem:
    """One chunk to ask about: ids, the passage exactly as sent, and the hash the cache is keyed by."""

    chunk_id: str
    doc_id: str
    content_hash: str  # the run's chunk content hash
    passage: str  # title prefix + chunk text (what the run embedded), cut to max_passage_chars
    passage_key: str  # sha256 of the passage: equal passages share one cached answer across runs


def read_run_manifest(store: Store, run_id: str) -> dict[str, Any]:
    """The embed run's manifest (engine.index's reader: exists, succeeded, has a model and parts)."""
    from engine.index.runs import read_run

    man = read_run(store, run_id).manifest
    if man.get("kind", "embed") != "embed":
        raise ConfigError(f"run {run_id!r} is a {man.get('kind')!r} run, not an embed run")
    return man


def read_chunks(store: Store, man: dict[str, Any]) -> pa.Table:
    """Every chunk row of the run (its chunks/ parts, in manifest order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = [p for p in run_outputs(store, man, "chunks") if int(p.get("rows", 0)) > 0]
    if not parts:
        raise NotFoundError(f"embed run {man.get('run_id')!r} has no chunks")
    tables = []
    with tempfile.TemporaryDirectory(prefix="embedctl-gen-") as tmp:
        for i, p in enumerate(parts):
            local = os.path.join(tmp, f"{i}.parquet")
            store.download_file(str(p["key"]), local)
            try:
                tables.append(pq.read_table(local))
            except Exception as err:  # noqa: BLE001 - any arrow failure is a corrupt run
                raise SchemaError(f"chunk part {p['key']!r} is not readable Parquet: {err}") from err
    table = pa.concat_tables(tables, promote_options="default")
    missing = {"chunk_id", "doc_id", "text"} - set(table.column_names)
    if missing:
        raise SchemaError(f"the run's chunk rows lack {sorted(missing)} (the embed run contract)")
    return table


def apply_where(table: pa.Table, where: str | None) -> pa.Table:
    """Rows matching a SQL predicate over the chunk columns (duckdb), e.g. ``lang = 'en' AND n_tokens > 20``."""
    if not where:
        return table
    import duckdb

    con = duckdb.connect()
    try:
        con.register("chunks", table)
        return con.execute(f"SELECT * FROM chunks WHERE {where}").to_arrow_table()  # noqa: S608 - the user's own filter
    except duckdb.Error as err:
        raise ConfigError(f"--where {where!r} is not a valid filter over the chunk columns "
                          f"{table.column_names}: {str(err).splitlines()[0]}") from None
    finally:
        con.close()


def select_chunks(cfg: GenerateJobConfig, table: pa.Table, run_config: dict[str, Any]) -> tuple[list[ChunkItem], int]:
    """(chunks to ask about, in run order; chunks skipped as too short)."""
    from engine.mining import run_chunker

    total = table.num_rows
    table = apply_where(table, cfg.select.where)
    log.info("%d of %d chunks match the filter", table.num_rows, total)
    prefix_for = run_chunker(run_config).prefix_for
    cols = {c: table.column(c).to_pylist() for c in ("chunk_id", "doc_id", "text")}
    titles = table.column("title").to_pylist() if "title" in table.column_names else [None] * table.num_rows
    hashes = table.column("content_hash").to_pylist() if "content_hash" in table.column_names else None
    items: list[ChunkItem] = []
    short = 0
    for i in range(table.num_rows):
        text = cols["text"][i] or ""
        if len(text.strip()) < cfg.select.min_chunk_chars:
            short += 1
            continue
        passage = (prefix_for(titles[i]) + text)[: cfg.llm.max_passage_chars]
        pkey = hashlib.sha256(passage.encode("utf-8", "surrogatepass")).hexdigest()
        items.append(ChunkItem(str(cols["chunk_id"][i]), str(cols["doc_id"][i]),
                               str(hashes[i]) if hashes else pkey, passage, pkey))
    if cfg.select.sample is not None and cfg.select.sample < len(items):
        keep = set(random.Random(cfg.select.seed).sample(range(len(items)), cfg.select.sample))
        items = [it for i, it in enumerate(items) if i in keep]
    return items, short


# ---------------------------------------------------------------------------------------------
# the cache: one JSON object per (settings, passage), written as each answer arrives
# ---------------------------------------------------------------------------------------------


def cache_prefix(settings_id: str) -> str:
    return join(CACHE_ROOT, settings_id)


def cache_key(settings_id: str, passage_key: str) -> str:
    return join(cache_prefix(settings_id), passage_key[:2], f"{passage_key}.json")


def cached_keys(store: Store, settings_id: str) -> set[str]:
    """Passage keys with a stored answer (one listing, not one request per chunk)."""
    out = set()
    for key in store.list(cache_prefix(settings_id)):
        name = key.rsplit("/", 1)[-1]
        if name.endswith(".json") and not name.startswith("."):
            out.add(name[: -len(".json")])
    return out
