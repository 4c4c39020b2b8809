"""The embed stage: an actor that only computes vectors, and the writer that appends, writes and commits them.

``UnitEmbedder.encode_unit`` turns one unit's pre-tokenized ids (or its chunk texts) into vectors;
``commit_unit`` reads the unit's chunk part, appends the vector column, writes the embeddings
part and then the commit marker ``_state/done/<unit>.json`` (last, so a unit with a marker has
all its parts). On Ray the two run in different processes (the actor pool, then writer tasks),
so the device never waits for a unit's I/O; ``embed_unit`` does both in one call (in-process
runs, refresh).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.core.layout import run_part_key
from engine.core.storage import json_bytes, open_store
from engine.embed.config import EmbedJobConfig
from engine.embed.model_facts import STANDIN_PREFIX, embed_inputs, make_chunker
from engine.embed.parts import embedding_column, read_part, state_key, write_part
from engine.embed.parts_index import worker_location

if TYPE_CHECKING:
    import numpy as np

    from engine.embed.encoders import Encoder

log = logging.getLogger(__name__)


def load_unit_encoder(cfg: EmbedJobConfig, threads: int | None = None) -> Encoder:
    """The job's encoder: the model named by ``cfg.embed.model``, or the stand-in for ``standin:<model>``."""
    e = cfg.embed
    if e.model and e.model.startswith(STANDIN_PREFIX):
        from engine.embed.standin import StandinEncoder

        return StandinEncoder(e.model[len(STANDIN_PREFIX):] or None, truncate_dim=e.truncate_dim)
    from engine.embed.encoders import load_encoder

    return load_encoder(
        e.model, device=e.device, dtype=e.dtype, truncate_dim=e.truncate_dim, query_prompt=e.query_prompt,
        passage_prompt=e.passage_prompt, batch_tokens=e.batch_tokens, threads=threads, compile=e.compile,
        backend=e.backend, quantize=e.quantize,
    )


class UnitEmbedder:
    """Holds the model once; embeds whole units (and, in-process, commits them). Used as a Ray Data actor."""

    def __init__(self, cfg: EmbedJobConfig, run_id: str, threads: int | None = None, encoder: Encoder | None = None):
        self.created_at = time.time()  # start-up accounting (manifest timings.start_up)
        self.cfg = cfg
        self.run_id = run_id
        self.store = open_store(cfg.store, endpoint_url=cfg.endpoint_url)
        self.encoder = encoder or load_unit_encoder(cfg, threads)
        self.ready_at = time.time()

    def encode_unit(self, chunked: dict[str, Any], token_ids: list[Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """One unit's vectors ``[n_chunks, dim]`` (float32, L2-normalised) and its timing facts; no writes."""
        _maybe_crash_for_test()
        started_at = time.time()
        t0 = time.perf_counter()
        encode_ids = getattr(self.encoder, "encode_ids", None)
        if token_ids is not None and encode_ids is not None and len(token_ids) == chunked["chunks"]:
            vectors = encode_ids(token_ids)  # the chunk part is not even read: the ids are all it needs
        else:
            chunks = read_part(self.store, chunked["chunk_file"]["key"])
            vectors = self.encoder.encode_passages(embed_inputs(chunks, make_chunker(self.cfg)))
        info = {"dim": self.encoder.dim, "model": self.encoder.identity, "embed_seconds": time.perf_counter() - t0,
                "started_at": round(started_at, 3), "actor_created_at": round(self.created_at, 3),
                "actor_ready_at": round(self.ready_at, 3), "embedded_at": round(time.time(), 3),
                "embed_worker": worker_location()}
        return vectors, info

    def embed_unit(self, chunked: dict[str, Any], token_ids: list[Any] | None = None) -> dict[str, Any]:
        """Embed one unit's chunks (from pre-tokenized ids when given) and commit the unit."""
        vectors, info = self.encode_unit(chunked, token_ids)
        return commit_unit(self.cfg, self.run_id, chunked, vectors, info)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Ray Data entry point that embeds and commits in the actor (refresh): unit rows in, markers out."""
        out = [self.embed_unit(chunked, token_ids) for chunked, token_ids in _unit_rows(batch)]
        return {"marker": [json.dumps(m) for m in out]}

    def encode_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Ray Data entry point of the embed job: unit rows in (JSON ``chunked``; packed ``ids``/``lens`` when
        pre-tokenized), vectors out (raw bytes in the stored dtype, with ``info`` JSON) for the writer tasks."""
        import numpy as np

        out: dict[str, list[Any]] = {"chunked": [], "vectors": [], "info": []}
        dtype = np.float16 if self.cfg.embed.output_dtype == "float16" else np.float32
        for chunked, token_ids in _unit_rows(batch):
            vectors, info = self.encode_unit(chunked, token_ids)
            out["chunked"].append(json.dumps(chunked))
            out["vectors"].append(np.ascontiguousarray(vectors, dtype=dtype).tobytes())
            out["info"].append(json.dumps(info))
        return out


def _unit_rows(batch: dict[str, Any]) -> list[tuple[dict[str, Any], list[Any] | None]]:
    rows = []
    for i, s in enumerate(batch["chunked"]):
        ids = batch["ids"][i] if "ids" in batch else None
        rows.append((json.loads(s), unpack_ids(ids, batch["lens"][i]) if ids else None))
    return rows


def commit_unit(cfg: EmbedJobConfig, run_id: str, chunked: dict[str, Any], vectors: Any,
                info: dict[str, Any]) -> dict[str, Any]:
    """Append the vectors to the unit's chunks, write the embeddings part, then the commit marker."""
    import pyarrow as pa

    t0 = time.perf_counter()
    store = open_store(cfg.store, endpoint_url=cfg.endpoint_url)
    chunks = read_part(store, chunked["chunk_file"]["key"])
    column = embedding_column(vectors, cfg.embed.output_dtype)
    table = chunks.append_column(pa.field("embedding", column.type), column)
    emb_file = write_part(store, run_part_key(run_id, "embeddings", chunked["unit_id"]), table)
    _maybe_crash_in_write_for_test()
    marker = {k: v for k, v in chunked.items() if k not in ("chunk_seconds",)}
    marker.update(embedding_file=emb_file, dim=info["dim"], model=info["model"], chunk_seconds=chunked["chunk_seconds"],
                  embed_seconds=info["embed_seconds"], write_seconds=round(time.perf_counter() - t0, 4),
                  started_at=info["started_at"], actor_created_at=info["actor_created_at"],
                  actor_ready_at=info["actor_ready_at"], embedded_at=info["embedded_at"],
                  embed_worker=info.get("embed_worker") or {}, write_worker=worker_location())
    marker["committed_at"] = round(time.time(), 3)
    # The commit: written last, so a unit with a marker has all three parts.
    store.write_bytes(state_key(run_id, "done", f"{chunked['unit_id']}.json"), json_bytes(marker))
    return marker


def commit_row(row: dict[str, Any], cfg: EmbedJobConfig, run_id: str) -> dict[str, Any]:
    """Ray Data writer task: one actor output row -> the unit's commit (its marker, as JSON)."""
    import numpy as np

    chunked, info = json.loads(row["chunked"]), json.loads(row["info"])
    dtype = np.float16 if cfg.embed.output_dtype == "float16" else np.float32
    vectors = np.frombuffer(row["vectors"], dtype=dtype).reshape(int(chunked["chunks"]), -1) if chunked["chunks"] \
        else np.zeros((0, info["dim"]), dtype=dtype)
    return {"marker": json.dumps(commit_unit(cfg, run_id, chunked, vectors, info))}


def _maybe_crash_for_test() -> None:
    """Test hook: with EMBEDCTL_TEST_CRASH_ONCE=<flag file>, the first worker to get here dies for real."""
    _crash_once("EMBEDCTL_TEST_CRASH_ONCE")


def _maybe_crash_in_write_for_test() -> None:
    """Test hook: EMBEDCTL_TEST_CRASH_IN_WRITE_ONCE=<flag file> kills the first writer between part and commit."""
    _crash_once("EMBEDCTL_TEST_CRASH_IN_WRITE_ONCE")


def _crash_once(env: str) -> None:
    flag = os.environ.get(env)
    if flag and not os.path.exists(flag):
        Path(flag).write_text(str(os.getpid()))
        os._exit(137)


def unpack_ids(flat: bytes, lengths: bytes) -> list[Any]:
    """Token ids packed by the chunk tasks (int32 ids + int32 lengths) -> one array per chunk."""
    import numpy as np

    ids = np.frombuffer(flat, dtype=np.int32)
    lens = np.frombuffer(lengths, dtype=np.int32)
    return np.split(ids, np.cumsum(lens)[:-1]) if len(lens) else []
