"""Reusing stored vectors: a previous run's vectors by content hash, and an encoder that embeds only the rest."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from engine.core.errors import ConfigError
from engine.core.storage import Store, json_bytes, open_store
from engine.embed.chunking import content_hash
from engine.embed.config import EmbedJobConfig
from engine.embed.encoders import Encoder
from engine.embed.parts_index import run_outputs
from engine.embed.pipeline import UnitEmbedder, state_key
from engine.embed.tokenizers import WhitespaceTokenizer
from engine.refresh.failpoints import stall_point
from engine.refresh.run_parts import column_vectors, read_columns


def _hash_keys(hashes: list[str]) -> np.ndarray:
    """First 128 bits of each sha256 hex content hash as sortable 16-byte keys. [n] S16"""
    return np.array([bytes.fromhex(h[:32]) for h in hashes], dtype="S16")


class VectorLookup:
    """content hash -> stored vector of a previous run, without holding the vectors in memory.

    The index is three sorted arrays (16-byte hash key, part number, row in part): about 24
    bytes per chunk, cheap to ship to Ray actors. Vectors are read from the run's embeddings
    parts on demand, through an LRU cache of whole parts bounded by ``cache_bytes``.
    """

    def __init__(self, store_uri: str, endpoint_url: str | None, parts: list[str], keys: np.ndarray,
                 part_idx: np.ndarray, rows: np.ndarray, dim: int, cache_bytes: int = 1 << 30):
        self.store_uri, self.endpoint_url, self.parts = store_uri, endpoint_url, parts
        self.keys, self.part_idx, self.rows, self.dim = keys, part_idx, rows, dim
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._store: Store | None = None
        self.part_reads = 0

    @classmethod
    def from_run(cls, store: Store, run_manifest: dict[str, Any], endpoint_url: str | None = None,
                 cache_bytes: int = 1 << 30) -> VectorLookup:
        parts = [o["key"] for o in run_outputs(store, run_manifest, "embeddings")]
        keys, part_idx, rows = [], [], []
        for i, key in enumerate(parts):
            hashes = read_columns(store, key, ["content_hash"]).column(0).to_pylist()
            keys.append(_hash_keys(hashes))
            part_idx.append(np.full(len(hashes), i, dtype=np.int32))
            rows.append(np.arange(len(hashes), dtype=np.int32))
        all_keys = np.concatenate(keys) if keys else np.zeros(0, dtype="S16")
        all_parts = np.concatenate(part_idx) if part_idx else np.zeros(0, dtype=np.int32)
        all_rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int32)
        # Stable sort, then keep the first occurrence of each hash (equal texts, equal vectors).
        order = np.argsort(all_keys, kind="stable")
        all_keys, all_parts, all_rows = all_keys[order], all_parts[order], all_rows[order]
        if len(all_keys):
            first = np.concatenate([[True], all_keys[1:] != all_keys[:-1]])
            all_keys, all_parts, all_rows = all_keys[first], all_parts[first], all_rows[first]
        return cls(store.uri, endpoint_url, parts, all_keys,
                   all_parts, all_rows, int(run_manifest["dim"]), cache_bytes)

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        state["_store"] = None
        return state

    def find(self, hashes: list[str]) -> np.ndarray:
        """Position of each hash in the index, or -1. [n] int64"""
        if not hashes or not len(self.keys):
            return np.full(len(hashes), -1, dtype=np.int64)
        q = _hash_keys(hashes)
        pos = np.searchsorted(self.keys, q)
        pos_c = np.minimum(pos, len(self.keys) - 1)
        hit = self.keys[pos_c] == q
        return np.where(hit, pos_c, -1).astype(np.int64)

    def contains(self, hashes: list[str]) -> np.ndarray:
        """Whether each hash has a stored vector. [n] bool"""
        return self.find(hashes) >= 0

    def misses(self, hashes: list[str]) -> int:
        """How many distinct hashes among ``hashes`` have no stored vector (the texts the model must see)."""
        return int((~self.contains(list(set(hashes)))).sum())

    def vectors_at(self, positions: np.ndarray) -> np.ndarray:
        """Stored vectors for index positions (all >= 0). [n, dim] float32"""
        out = np.zeros((len(positions), self.dim), dtype=np.float32)
        parts = self.part_idx[positions]
        rows = self.rows[positions]
        for p in np.unique(parts):
            sel = parts == p
            out[sel] = self._part(int(p))[rows[sel]]
        return out

    def _part(self, p: int) -> np.ndarray:
        vecs = self._cache.get(p)
        if vecs is not None:
            self._cache.move_to_end(p)
            return vecs
        if self._store is None:
            self._store = open_store(self.store_uri, endpoint_url=self.endpoint_url)
        vecs = column_vectors(read_columns(self._store, self.parts[p], ["embedding"]))
        self.part_reads += 1
        self._cache[p] = vecs
        while len(self._cache) > 1 and sum(v.nbytes for v in self._cache.values()) > self.cache_bytes:
            self._cache.popitem(last=False)
        return vecs


def unit_misses(cfg: EmbedJobConfig, chunked: dict[str, Any], lookup: VectorLookup) -> int:
    """How many distinct chunk texts of a chunked unit (its chunk file in the run) need the model."""
    store = open_store(cfg.store, endpoint_url=cfg.endpoint_url)
    return lookup.misses(read_columns(store, chunked["chunk_file"]["key"], ["content_hash"]).column(0).to_pylist())


def check_runtime(live: dict[str, Any], encoder: Any) -> None:
    """Refuse a refresh model whose backend/quantization differs from the live run's: its vectors would
    sit beside the stored ones in one index but be placed slightly differently (int8 vs fp32, ONNX vs
    torch), so scores across old and new chunks would not compare."""
    from engine.embed.backends import check_same_backend, identity_backend

    got = getattr(encoder, "identity", None)
    if not isinstance(got, dict) or not got:
        return  # no identity (a test double, or a model process that failed: its error comes on first use)
    try:
        check_same_backend(live, got, what="the live run")
    except ConfigError as err:
        want, have = identity_backend(live), identity_backend(got)
        raise ConfigError(
            f"the refresh's model runs on {have[0]}/{have[1]}, but the live run's vectors were made on "
            f"{want[0]}/{want[1]}; a refresh must embed changed chunks exactly as the live run did. Refresh with "
            f"the live backend (drop --backend/--quantize), or re-embed everything with `embedctl migrate "
            f"--backend {have[0]} --quantize {have[1]}`") from err


class ReusingEncoder(Encoder):
    """An encoder that answers from a previous run's stored vectors by content hash, and sends
    only unseen texts to the real model (loaded lazily: a unit whose chunks are all unchanged
    never loads it). Its identity is the live run's model identity, verbatim."""

    def __init__(self, identity: dict[str, Any], lookup: VectorLookup,
                 load_inner: Callable[[], Encoder] | None = None, inner: Encoder | None = None):
        super().__init__(name=str(identity.get("name")), path=str(identity.get("path") or ""),
                         fingerprint=str(identity.get("fingerprint") or ""),
                         native_dim=int(identity.get("native_dim") or identity["dim"]),
                         max_seq_length=int(identity.get("max_seq_length") or 512), tokenizer=WhitespaceTokenizer(),
                         truncate_dim=identity.get("truncate_dim"), query_prompt=identity.get("query_prompt") or "",
                         passage_prompt=identity.get("passage_prompt") or "")
        self._identity = dict(identity)
        self.lookup = lookup
        self._load_inner = load_inner
        self._inner = inner
        self.fresh: dict[str, np.ndarray] = {}  # content hash -> vector embedded ahead (``embed_ahead``)
        self.counts = {"reused": 0, "embedded": 0}
        self._checked = False  # the inner model's runtime checked against the live identity (first use)

    @property
    def identity(self) -> dict[str, Any]:  # the live run's identity, verbatim
        return dict(self._identity)

    @property
    def inner(self) -> Encoder:
        if self._inner is None:
            if self._load_inner is None:
                raise ConfigError("no model to embed changed chunks with")
            self._inner = self._load_inner()
            if self._inner.dim != self.dim:
                raise ConfigError(f"the model gives {self._inner.dim}-dim vectors, the live run has {self.dim}")
        if not self._checked:
            check_runtime(self._identity, self._inner)
            self._checked = True
        return self._inner

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        """[n, dim] float32: stored vectors where the content hash is known, the model's otherwise.

        ``texts`` are the chunker's embed texts (title prefix + chunk), whose sha256 is the
        chunk's ``content_hash`` (``engine.embed.pipeline.embed_inputs``)."""
        hashes = [content_hash(t) for t in texts]
        pos = self.lookup.find(hashes)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        hit = pos >= 0
        if hit.any():
            out[hit] = self.lookup.vectors_at(pos[hit])
        misses: dict[str, list[int]] = {}
        for i in np.flatnonzero(~hit):
            misses.setdefault(hashes[i], []).append(int(i))
        todo = [h for h in misses if h not in self.fresh]
        if todo:
            vecs = self.inner.encode_passages([texts[misses[h][0]] for h in todo])  # [n_unique_misses, dim]
            self.fresh.update(zip(todo, vecs, strict=True))
        for h, idx in misses.items():
            out[idx] = self.fresh[h]
        self.counts["reused"] += int(hit.sum())
        self.counts["embedded"] += len(misses)  # unseen texts of this unit (embedded here or just ahead)
        return out

    def embed_ahead(self, texts: list[str]) -> int:
        """Embed every unseen text among ``texts`` in one pass (one model warm-up, full batches) and keep the
        vectors for the units that follow. Returns how many texts went to the model."""
        hashes = [content_hash(t) for t in texts]
        known = self.lookup.contains(hashes)
        todo: dict[str, str] = {}
        for h, t, k in zip(hashes, texts, known, strict=True):
            if not k and h not in self.fresh:
                todo.setdefault(h, t)
        if todo:
            vecs = self.inner.encode_passages(list(todo.values()))  # [n_unseen, dim]
            self.fresh.update(zip(todo, vecs, strict=True))
        return len(todo)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self.inner.encode_queries(texts)

    def _encode_raw(self, texts: list[str]) -> np.ndarray:
        return self.inner._encode_raw(texts)


class RefreshEmbedder(UnitEmbedder):
    """The embed job's ``UnitEmbedder`` with a ``ReusingEncoder``; records per-unit reuse counts
    in ``_state/refresh/<unit>.json`` after the unit's commit."""

    def __init__(self, cfg: EmbedJobConfig, run_id: str, identity: dict[str, Any], lookup: VectorLookup,
                 threads: int | None = None, encoder: Encoder | None = None,
                 load_inner: Callable[[], Encoder] | None = None):
        e = cfg.embed

        def load() -> Encoder:
            from engine.embed.encoders import encoder_from_identity

            return encoder_from_identity(identity, device=e.device, dtype=e.dtype, batch_tokens=e.batch_tokens,
                                         threads=threads, compile=e.compile)

        self.reusing = ReusingEncoder(identity, lookup, load_inner=load_inner or load, inner=encoder)
        super().__init__(cfg, run_id, threads=threads, encoder=self.reusing)
        self.units_done = 0

    def embed_unit(self, chunked: dict[str, Any], token_ids: list[Any] | None = None) -> dict[str, Any]:
        before = dict(self.reusing.counts)
        t0 = time.perf_counter()
        # No pre-tokenized ids: the reuse decision needs the texts (their content hashes).
        marker = super().embed_unit(chunked)
        stats = {"unit_id": chunked["unit_id"], "reused": self.reusing.counts["reused"] - before["reused"],
                 "embedded": self.reusing.counts["embedded"] - before["embedded"],
                 "seconds": round(time.perf_counter() - t0, 4)}
        self.store.write_bytes(state_key(self.run_id, "refresh", f"{chunked['unit_id']}.json"), json_bytes(stats))
        self.units_done += 1
        stall_point("unit", self.units_done)
        return {**marker, "refresh": stats}
