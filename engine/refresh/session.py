"""Incremental corpus refresh: diff a new snapshot by content hash, re-embed only what changed.

A refresh starts from the index version an alias names (``--from-alias live``), follows it to
the embed run it was built from (the version manifest's ``source_run``), and produces:

1. a *refresh run* ``runs/refresh-<hash>/``: a normal embed run of the new snapshot (same
   chunks/, embeddings/, rejects/, manifest.json with ``kind: "embed"``), made by the embed
   job's own stages (``engine.embed.pipeline.prepare_run``/``chunk_unit``/``UnitEmbedder``/
   ``finalize_run``). Its encoder is a ``ReusingEncoder``: a chunk whose content hash the
   parent run already embedded gets the parent's stored vector (read from the parent's
   embeddings parts, never recomputed); only the rest reach the model. The index builder
   treats it like any run;
2. a diff (``RefreshDiff``) of the two runs' chunk rows: documents and chunks that are new,
   changed, unchanged or deleted, and the chunk ids to remove from / add to the index;
3. a new index version, by an incremental update of a copy of the live shards (small change,
   quantizer still fits) or a full rebuild (see ``choose_strategy``): the choice and the
   reason go into the version manifest (``refresh``);
4. a publish through the normal CAS swap, only when the recall gate and the canary set pass.

One refresh per index at a time: a lease object (``indexes/<index>/leases/refresh.json``,
``Lease``), created with ``put_if_absent``, renewed with ``put_if_match`` by a heartbeat, and
taken over when it expired (or, on the same host, when its process is gone).

A refresh whose model or chunker config differs from the live version's is refused: every
vector would change, which is what ``embedctl migrate`` is for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from engine.core import layout
from engine.embed.chunking import ChunkConfig, content_hash
from engine.embed.config import SECTIONS, EmbedConfig, EmbedJobConfig, RuntimeConfig, from_flat
from engine.embed.corpus import CorpusConfig
from engine.embed.encoders import Encoder
from engine.core.errors import ConfigError, ConflictError, GateError, IntegrityError, NotFoundError
from engine.embed.pipeline import UnitEmbedder, state_key
from engine.core import lease as leases
from engine.core.lease import Lease, LeaseKeeper, lease_state
from engine.core.storage import Store, json_bytes, open_store
from engine.embed.tokenizers import WhitespaceTokenizer

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

LEASE_WHAT = "refresh"
STALL_ENV = "EMBEDCTL_REFRESH_STALL"  # test hook: "<stage>[:<n>]" -> touch the flag file, then hang
STALL_FLAG_ENV = "EMBEDCTL_REFRESH_STALL_FLAG"

Strategy = Literal["auto", "incremental", "rebuild"]
Executor = Literal["auto", "local", "ray"]


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefreshConfig:
    """What a refresh does. Model and chunker settings are *not* here: they come from the live
    version's source run (``overrides`` may repeat them; a different value is refused)."""

    corpus: str  # the new snapshot: Parquet file, folder or s3:// prefix
    store: str
    index: str
    from_alias: str = "live"  # the version to diff against
    publish_to: str | None = None  # alias to swap to the new version (None: build only)
    endpoint_url: str | None = None
    run_id: str | None = None  # default: refresh-<hash of parent run, config, inputs> (a rerun resumes)
    strategy: Strategy = "auto"  # incremental | rebuild | auto (decide from the change and drift)
    rebuild_fraction: float = 0.2  # auto: rebuild when (new+changed+deleted chunks)/live chunks exceeds this
    drift_threshold: float = 1.5  # auto: rebuild when new vectors sit this much farther from their IVF centroid
    max_incremental_chain: int = 20  # auto: rebuild after this many incremental versions in a row
    recall_gate: float | None = None  # min recall@10 vs exact search (None: the index builder's default)
    canary: str | None = None  # canary set to check before publishing (engine.quality.loop)
    lease_ttl_s: float = 120.0  # a crashed refresh's lease expires after this long (renewed every ttl/4)
    lease_wait_s: float = 0.0  # wait this long for a held lease before failing (a retried cluster job)
    break_lease: bool = False  # take the lease even if it looks alive (you know its holder is dead)
    executor: Executor = "auto"  # where the chunk/embed stages run (jobs/refresh.py decides for auto)
    local_max_docs: int = 50_000  # auto: chunk in the driver when the snapshot has at most this many docs
    local_max_embed: int = 1_024  # auto: embed in the driver when at most this many chunks need the model
    overrides: dict[str, Any] = field(default_factory=dict)  # embed-job keys (corpus/chunk/embed/runtime)

    def validate(self) -> None:
        from engine.core.names import check_name

        check_name("index", self.index)
        check_name("alias", self.from_alias)
        if self.publish_to is not None:
            check_name("alias", self.publish_to)
        if self.strategy not in ("auto", "incremental", "rebuild"):
            raise ConfigError(f"strategy must be auto, incremental or rebuild, got {self.strategy!r}")
        if self.executor not in ("auto", "local", "ray"):
            raise ConfigError(f"executor must be auto, local or ray, got {self.executor!r}")
        if not 0 <= self.rebuild_fraction <= 1:
            raise ConfigError(f"rebuild_fraction must be in [0, 1], got {self.rebuild_fraction}")
        if self.drift_threshold <= 0:
            raise ConfigError(f"drift_threshold must be positive, got {self.drift_threshold}")
        if self.lease_ttl_s < 1:
            raise ConfigError(f"lease_ttl_s must be at least 1 second, got {self.lease_ttl_s}")
        if self.lease_wait_s < 0:
            raise ConfigError(f"lease_wait_s must be >= 0, got {self.lease_wait_s}")
        if self.recall_gate is not None and not 0 <= self.recall_gate <= 1:
            raise ConfigError(f"recall_gate must be in [0, 1], got {self.recall_gate}")

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> RefreshConfig:
        """File + flags, one flat key space: refresh keys plus the embed job's keys.

        ``alias: live`` is shorthand for ``from_alias: live`` and ``publish_to: live``.
        """
        flat = {k.replace("-", "_"): v for k, v in flat.items() if v is not None}
        for section in ("refresh",) + tuple(SECTIONS):  # nested form ({"chunk": {...}}) too
            if isinstance(flat.get(section), dict):
                flat.update(flat.pop(section))
        if "alias" in flat:
            alias = flat.pop("alias")
            flat.setdefault("from_alias", alias)
            flat.setdefault("publish_to", alias)
        own = {f.name for f in fields(cls)} - {"overrides"}
        kwargs = {k: flat.pop(k) for k in list(flat) if k in own}
        kwargs.setdefault("endpoint_url", flat.get("endpoint_url"))
        flat.pop("endpoint_url", None)
        for k in ("corpus", "store"):
            flat.pop(k, None)
        allowed = {f.name for s in SECTIONS.values() for f in fields(s)} | {"dim"}
        unknown = set(flat) - allowed
        if unknown:
            raise ConfigError(f"unknown refresh config keys {sorted(unknown)}; allowed: "
                              f"{', '.join(sorted(own | allowed | {'alias'}))}")
        missing = [k for k in ("corpus", "store", "index") if not kwargs.get(k)]
        if missing:
            raise ConfigError(f"refresh needs {', '.join(missing)} (as flags or config keys)")
        try:
            cfg = cls(**kwargs, overrides=dict(flat))
        except TypeError as err:
            raise ConfigError(f"refresh settings: {err}") from err
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Keys that change vectors or chunk ids: a refresh must use the live version's values.
IDENTITY_KEYS = tuple(f.name for f in fields(ChunkConfig)) + (
    "model", "truncate_dim", "query_prompt", "passage_prompt", "output_dtype")
# Keys a refresh may change freely: how the snapshot is read, how the work runs.
# (Device, precision and speed knobs are not inherited from the live run: it may have run on GPUs.)
FREE_KEYS = tuple(f.name for f in fields(CorpusConfig) if f.name not in ("corpus", "endpoint_url")) + (
    "device", "dtype") + tuple(EmbedConfig.SPEED_ONLY) + tuple(f.name for f in fields(RuntimeConfig))


# ---------------------------------------------------------------------------------------------
# the live version and its source run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveVersion:
    """What the refresh starts from: the alias, the version it names, and that version's run."""

    alias: str
    alias_generation: int
    alias_etag: str | None
    weighted: bool
    version_id: str
    version_manifest: dict[str, Any]
    run_id: str
    run_manifest: dict[str, Any]

    @property
    def model(self) -> dict[str, Any]:
        return self.run_manifest.get("model") or {}


def source_run_id(version_manifest: dict[str, Any]) -> str | None:
    """The run a version was built from (``source_run`` may be an id or ``{"run_id": ...}``)."""
    src = version_manifest.get("source_run")
    if isinstance(src, dict):
        src = src.get("run_id") or src.get("id")
    return str(src) if src else None


def resolve_live(store: Store, index: str, alias: str) -> LiveVersion:
    """Alias -> version manifest -> source run manifest, each checked, with errors that say what to do."""
    from engine.publish.aliases import read_alias

    state = read_alias(store, index, alias)
    assert state is not None
    version_id = state.version  # blue while a weighted rollout runs
    try:
        vman = store.read_json(layout.version_manifest_key(index, version_id))
    except NotFoundError:
        raise NotFoundError(f"alias {alias!r} of index {index!r} names version {version_id!r}, which has no "
                            "manifest in the store; repair the alias (embedctl rollback) before refreshing") from None
    run_id = source_run_id(vman)
    if not run_id:
        raise ConfigError(f"version {version_id!r} of index {index!r} does not name the run it was built from "
                          "(no source_run in its manifest), so there are no stored vectors to reuse; build the "
                          "index from an embed run (embedctl build-index --run RUN) and refresh from that")
    try:
        rman = store.read_json(layout.run_manifest_key(run_id))
    except NotFoundError:
        raise NotFoundError(f"version {version_id!r} was built from run {run_id!r}, which is no longer in "
                            f"{store.describe()}; a refresh needs its chunks and embeddings. Re-embed the "
                            "snapshot (embedctl embed), build and publish, then refresh from there") from None
    if rman.get("kind") != "embed" or rman.get("status") != "succeeded":
        raise ConfigError(f"run {run_id!r} behind version {version_id!r} is a {rman.get('kind')!r} run with "
                          f"status {rman.get('status')!r}; a refresh needs a succeeded embed run")
    return LiveVersion(alias=alias, alias_generation=state.generation, alias_etag=state.etag,
                       weighted=state.weighted is not None, version_id=version_id, version_manifest=vman,
                       run_id=run_id, run_manifest=rman)


def embed_job_config(rcfg: RefreshConfig, live: LiveVersion) -> EmbedJobConfig:
    """The embed-job config of the refresh run: the live run's config on the new snapshot.

    Raises ConfigError (pointing to ``embedctl migrate``) when the flags ask for another model,
    chunker or vector format than the live version was built with.
    """
    parent = live.run_manifest.get("config") or {}
    flat: dict[str, Any] = {}
    flat.update(parent.get("corpus") or {})
    flat.update(parent.get("chunk") or {})
    flat.update({k: v for k, v in (parent.get("embed") or {}).items() if k in IDENTITY_KEYS})
    overrides = {("truncate_dim" if k == "dim" else k): v for k, v in rcfg.overrides.items()}
    differ = []
    for key, value in overrides.items():
        if key in IDENTITY_KEYS:
            if _canon(key, value) != _canon(key, flat.get(key)):
                differ.append(f"{key}={value!r} (live: {flat.get(key)!r})")
        elif key not in FREE_KEYS:
            raise ConfigError(f"refresh cannot change {key!r}")
    if differ:
        raise ConfigError(
            f"this refresh asks for {', '.join(differ)}, but version {live.version_id!r} on alias {live.alias!r} "
            f"was built with the live settings. A new model or chunker changes every vector and chunk id: use "
            f"`embedctl migrate --index {rcfg.index} --alias {live.alias} ...` (re-embed, validate, dual-run, "
            "cut over), or drop these flags to refresh with the live settings")
    flat.update({k: v for k, v in overrides.items() if k in FREE_KEYS})
    flat.update(corpus=rcfg.corpus, store=rcfg.store, endpoint_url=rcfg.endpoint_url, run_id=rcfg.run_id)
    try:
        cfg = from_flat(EmbedJobConfig, flat)
    except ConfigError as err:
        raise ConfigError(f"the live run's config does not apply to this refresh: {err}") from err
    check_model_unchanged(cfg, live)
    return cfg


def _canon(key: str, value: Any) -> Any:
    """Compare config values the way the run identity does (defaults and spellings folded)."""
    from engine.embed.encoders import DEFAULT_MODEL_NAME, DEFAULT_MODEL_PACKAGE

    if key == "model" and value in (None, "", "default", DEFAULT_MODEL_NAME, DEFAULT_MODEL_PACKAGE,
                                    DEFAULT_MODEL_PACKAGE.replace("_", "-"), f"sentence-transformers/{DEFAULT_MODEL_NAME}"):
        return None
    if key in ("query_prompt", "passage_prompt") and not value:
        return None
    return value


def check_model_unchanged(cfg: EmbedJobConfig, live: LiveVersion) -> None:
    """The model installed here must be the one the live vectors came from (same weights fingerprint)."""
    want = live.model
    spec = cfg.embed.model
    if spec and spec.startswith("hash:"):
        have = f"hash-v1-{int(spec.split(':', 1)[1])}"
    else:
        from engine.embed.encoders import model_fingerprint, resolve_model_path

        _name, path = resolve_model_path(spec)
        have = model_fingerprint(path)
    if want.get("fingerprint") and have != want["fingerprint"]:
        raise ConfigError(
            f"the model installed here ({spec or 'default'}: fingerprint {have[:12]}) is not the one version "
            f"{live.version_id!r} was embedded with ({want.get('name')}: {str(want['fingerprint'])[:12]}); "
            "mixing vectors of two models in one index is wrong. Install the live model version, or move to the "
            f"new model with `embedctl migrate --index {live.version_manifest.get('index', '...')}`")
    vdim = live.version_manifest.get("dim")
    if vdim and want.get("dim") and int(vdim) != int(want["dim"]):
        raise IntegrityError(f"version {live.version_id!r} has dim {vdim} but its run {live.run_id!r} has "
                             f"{want['dim']}; the store is inconsistent")


def refresh_run_id(cfg: EmbedJobConfig, live: LiveVersion, input_fingerprints: list[tuple[str, str]]) -> str:
    """Same live run + same config + same snapshot -> same id, so a rerun resumes the run. (The live *version*
    is not part of it: the run's bytes do not depend on it; the index decision checks it separately.)"""
    h = hashlib.sha256(json.dumps({"parent_run": live.run_id, "identity": cfg.identity_dict()}, sort_keys=True,
                                  default=str).encode())
    for key, fp in sorted(input_fingerprints):
        h.update(f"{key}\x00{fp}".encode())
    return f"refresh-{h.hexdigest()[:12]}"


def acquire_lease(store: Store, index: str, *, ttl_s: float, info: dict[str, Any] | None = None,
                  break_lease: bool = False) -> Lease:
    """The refresh lease of ``index`` (one refresh per index at a time); see ``engine.core.lease``."""
    return leases.acquire_lease(store, index, ttl_s=ttl_s, info=info, break_lease=break_lease, what=LEASE_WHAT)


def stall_point(stage: str, count: int | None = None) -> None:
    """Test hook for the kill test: ``EMBEDCTL_REFRESH_STALL=<stage>[:<n>]`` touches the flag file
    and hangs here (at the n-th call with ``count``), so a test can SIGKILL a known point."""
    want = os.environ.get(STALL_ENV)
    if not want:
        return
    name, _, nth = want.partition(":")
    if name != stage or (nth and count is not None and count < int(nth)):
        return
    flag = os.environ.get(STALL_FLAG_ENV)
    if flag:
        with open(flag, "w") as f:
            f.write(f"{stage} {os.getpid()}\n")
    log.warning("stall point %s reached: hanging until killed (test hook %s)", stage, STALL_ENV)
    while True:
        time.sleep(3600)


# ---------------------------------------------------------------------------------------------
# reusing stored vectors
# ---------------------------------------------------------------------------------------------


def _hash_keys(hashes: list[str]) -> np.ndarray:
    """First 128 bits of each sha256 hex content hash as sortable 16-byte keys. [n] S16"""
    return np.array([bytes.fromhex(h[:32]) for h in hashes], dtype="S16")


_FILESYSTEMS: weakref.WeakKeyDictionary[Store, Any] = weakref.WeakKeyDictionary()
_FS_LOCK = threading.Lock()


def _filesystem(store: Store) -> Any:
    """One pyarrow filesystem per store object (building an S3 one resolves credentials: ~25 ms)."""
    with _FS_LOCK:
        fs = _FILESYSTEMS.get(store)
        if fs is None:
            fs = _FILESYSTEMS[store] = store.arrow_filesystem()
        return fs


def _read_columns(store: Store, key: str, columns: list[str]) -> pa.Table:
    import pyarrow.parquet as pq

    with _filesystem(store).open_input_file(store.arrow_path(key)) as f:
        return pq.read_table(f, columns=columns)


def _vectors(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """A fixed_size_list column as a 2-D array. [rows, dim] (float32 or float16, as stored)"""
    col = table.column(column).combine_chunks()
    dim = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


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
        parts = [o["key"] for o in run_manifest["outputs"]["embeddings"]]
        keys, part_idx, rows = [], [], []
        for i, key in enumerate(parts):
            hashes = _read_columns(store, key, ["content_hash"]).column(0).to_pylist()
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
        return cls(store.uri if not store.uri.startswith("/") else store.uri, endpoint_url, parts, all_keys,
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
        return self.find(hashes) >= 0

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
        vecs = _vectors(_read_columns(self._store, self.parts[p], ["embedding"]))
        self.part_reads += 1
        self._cache[p] = vecs
        while len(self._cache) > 1 and sum(v.nbytes for v in self._cache.values()) > self.cache_bytes:
            self._cache.popitem(last=False)
        return vecs


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

    @property
    def identity(self) -> dict[str, Any]:  # type: ignore[override]
        return dict(self._identity)

    @property
    def inner(self) -> Encoder:
        if self._inner is None:
            if self._load_inner is None:
                raise ConfigError("no model to embed changed chunks with")
            self._inner = self._load_inner()
            if self._inner.dim != self.dim:
                raise ConfigError(f"the model gives {self._inner.dim}-dim vectors, the live run has {self.dim}")
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
            self.fresh.update(zip(todo, vecs))
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
        for h, t, k in zip(hashes, texts, known):
            if not k and h not in self.fresh:
                todo.setdefault(h, t)
        if todo:
            vecs = self.inner.encode_passages(list(todo.values()))  # [n_unseen, dim]
            self.fresh.update(zip(todo, vecs))
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


# ---------------------------------------------------------------------------------------------
# the diff: two runs' chunk rows compared by chunk id and content hash
# ---------------------------------------------------------------------------------------------

CATEGORIES = ("new", "changed", "unchanged", "deleted")


@dataclass
class RefreshDiff:
    """Documents and chunks of the new snapshot against the live run.

    Chunks: *unchanged* (same chunk id, same content hash), *changed* (same id, other hash),
    *new* (id only in the snapshot), *deleted* (id only in the live run). Documents:
    *unchanged* when every chunk is, *changed* when present in both otherwise, *new*/*deleted*
    when present on one side only. ``remove_ids``/``add_ids`` are the index delta: changed and
    deleted chunks leave, changed and new chunks come in."""

    docs: dict[str, int]
    chunks: dict[str, int]
    live_chunks: int
    snapshot_chunks: int
    embedded: int  # distinct texts the model had to embed (new/changed chunks with an unseen hash)
    reused_by_hash: int  # new/changed chunks whose text the live run had already embedded (moved text)
    remove_ids: list[str]
    add_ids: list[str]
    deleted_doc_ids: list[str]

    @property
    def changed_fraction(self) -> float:
        """Index churn relative to the live version: (chunks added + chunks removed) / live chunks."""
        churn = self.chunks["new"] + self.chunks["changed"] + self.chunks["deleted"]
        return churn / max(1, self.live_chunks)

    @property
    def empty(self) -> bool:
        return not (self.chunks["new"] or self.chunks["changed"] or self.chunks["deleted"])

    def summary(self) -> dict[str, Any]:
        return {"docs": dict(self.docs), "chunks": dict(self.chunks), "live_chunks": self.live_chunks,
                "snapshot_chunks": self.snapshot_chunks, "embedded": self.embedded,
                "reused_by_hash": self.reused_by_hash, "changed_fraction": round(self.changed_fraction, 6),
                "index_delta": {"remove": len(self.remove_ids), "add": len(self.add_ids)}}


def chunk_rows(store: Store, run_manifest: dict[str, Any], kind: str = "chunks") -> pa.Table:
    """(chunk_id, doc_id, content_hash) of every chunk of a run, one table."""
    import pyarrow as pa

    cols = ["chunk_id", "doc_id", "content_hash"]
    tables = [_read_columns(store, o["key"], cols) for o in run_manifest["outputs"][kind]]
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in cols})
    return pa.concat_tables(tables).combine_chunks()


def diff_runs(store: Store, live_run: dict[str, Any], new_run: dict[str, Any]) -> RefreshDiff:
    """Compare the snapshot's run with the live run, chunk by chunk (columnar, no vectors read)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    old = chunk_rows(store, live_run)
    new = chunk_rows(store, new_run)
    for name, t in (("live", old), ("snapshot", new)):
        if pc.count_distinct(t.column("chunk_id")).as_py() != t.num_rows:
            raise IntegrityError(f"the {name} run has duplicate chunk ids; it is corrupt (rebuild it with embedctl embed)")
    joined = new.rename_columns(["chunk_id", "doc_id", "hash_new"]).join(
        old.rename_columns(["chunk_id", "doc_id_old", "hash_old"]), keys="chunk_id", join_type="full outer")
    hn, ho = joined.column("hash_new"), joined.column("hash_old")
    in_new, in_old = pc.is_valid(hn), pc.is_valid(ho)
    same = pc.and_(pc.and_(in_new, in_old), pc.equal(pc.fill_null(hn, ""), pc.fill_null(ho, "")))
    changed = pc.and_(pc.and_(in_new, in_old), pc.invert(same))
    new_only = pc.and_(in_new, pc.invert(in_old))
    old_only = pc.and_(in_old, pc.invert(in_new))
    doc = pc.coalesce(joined.column("doc_id"), joined.column("doc_id_old"))
    status = pa.table({"doc": doc, "new": new_only, "old": old_only, "same": same, "changed": changed})
    chunk_counts = {"new": _true(new_only), "changed": _true(changed), "unchanged": _true(same),
                    "deleted": _true(old_only)}
    # A document: new if it has no old chunk; deleted if no new chunk; unchanged if all chunks same.
    per_doc = status.group_by("doc").aggregate([("new", "all"), ("old", "all"), ("same", "all")])
    all_new, all_old, all_same = (per_doc.column(c) for c in ("new_all", "old_all", "same_all"))
    doc_counts = {"new": _true(all_new), "deleted": _true(all_old), "unchanged": _true(all_same)}
    doc_counts["changed"] = per_doc.num_rows - sum(doc_counts.values())
    doc_counts = {k: doc_counts[k] for k in CATEGORIES}
    deleted_docs = sorted(pc.filter(per_doc.column("doc"), all_old).to_pylist())
    ids = joined.column("chunk_id")
    remove_ids = pc.filter(ids, pc.or_(changed, old_only)).to_pylist()
    add_ids = pc.filter(ids, pc.or_(changed, new_only)).to_pylist()
    # What the model had to see: distinct hashes of incoming chunks that the live run lacks.
    incoming = pc.unique(pc.filter(hn, pc.or_(changed, new_only)))
    known = pc.is_in(incoming, value_set=pc.unique(old.column("content_hash")))
    embedded = _true(pc.invert(known))
    reused_by_hash = len(add_ids) - _count_in(pc.filter(hn, pc.or_(changed, new_only)), incoming, known)
    return RefreshDiff(docs=doc_counts, chunks=chunk_counts, live_chunks=old.num_rows, snapshot_chunks=new.num_rows,
                       embedded=embedded, reused_by_hash=reused_by_hash, remove_ids=sorted(remove_ids),
                       add_ids=sorted(add_ids), deleted_doc_ids=deleted_docs)


def _true(mask: Any) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.cast(mask, "int64")).as_py() or 0)


def _count_in(hashes: Any, incoming: Any, known: Any) -> int:
    """How many of ``hashes`` (with repeats) are not in the live run: the chunks the model served."""
    import pyarrow.compute as pc

    unseen = pc.filter(incoming, pc.invert(known))
    return _true(pc.is_in(hashes, value_set=unseen))


# ---------------------------------------------------------------------------------------------
# one refresh, step by step (the local path and jobs/refresh.py share these)
# ---------------------------------------------------------------------------------------------


@dataclass
class RefreshState:
    """What the steps of one refresh hand each other."""

    live: LiveVersion
    cfg: EmbedJobConfig  # the refresh run's embed-job config
    run_id: str
    prepared: Any = None  # engine.embed.pipeline.PreparedRun
    lookup: VectorLookup | None = None
    inputs_unchanged: bool = False
    attempt_counts: dict[str, int] = field(default_factory=lambda: {"reused": 0, "embedded": 0})


class RefreshSession:
    """Holds the lease for the whole refresh; the steps run inside ``with RefreshSession(cfg) as s``.

    ``plan()`` (no writes, no lease) -> ``__enter__`` (lease + heartbeat) -> ``prepare()`` (the
    refresh run, resumable) -> chunk + embed the pending units (``embed_locally`` or Ray, see
    jobs/refresh.py) -> ``finish()`` (finalize the run, diff, build, gates, publish, summary).
    """

    def __init__(self, rcfg: RefreshConfig, *, clock: Callable[[], float] = time.perf_counter):
        rcfg.validate()
        self.rcfg = rcfg
        self.store = open_store(rcfg.store, endpoint_url=rcfg.endpoint_url)
        self.clock = clock
        self.t0 = clock()
        self.timings: dict[str, float] = {}
        self.state: RefreshState | None = None
        self.lease: Lease | None = None
        self.keeper: LeaseKeeper | None = None
        self._embedder: RefreshEmbedder | None = None
        self._resolved: tuple[LiveVersion, EmbedJobConfig] | None = None
        self._preload: Any = None  # Future[Encoder] while the model loads in the background

    # -- plan (read-only) ------------------------------------------------------------------
    def resolve(self) -> tuple[LiveVersion, EmbedJobConfig]:
        """The live version and the refresh's embed config, with every refusal (cheap: three small reads)."""
        if self._resolved is None:
            live = resolve_live(self.store, self.rcfg.index, self.rcfg.from_alias)
            if self.rcfg.publish_to:
                self._check_not_weighted(self.rcfg.publish_to)
            cfg = embed_job_config(self.rcfg, live)
            cfg.validate()
            self._resolved = (live, cfg)
        return self._resolved

    def plan(self) -> RefreshState:
        if self.state is not None:
            return self.state
        from engine.embed.corpus import plan_corpus

        live, cfg = self.resolve()
        _cstore, cplan = plan_corpus(cfg.corpus, find_duplicates=False)
        inputs = sorted((f.key, f.fingerprint) for f in cplan.files)
        if cfg.run_id is None:
            cfg = dataclasses.replace(cfg, run_id=refresh_run_id(cfg, live, inputs))
        assert cfg.run_id is not None
        self.state = RefreshState(live=live, cfg=cfg, run_id=cfg.run_id)
        # Byte-identical input files under the same chunker and model: nothing can have changed.
        live_inputs = sorted((str(f.get("key")), str(f.get("fingerprint"))) for f in live.run_manifest.get("inputs", []))
        ident = cfg.identity_dict()
        live_ident = live.run_manifest.get("identity") or {}
        same = all(json.dumps(ident.get(k), sort_keys=True, default=str) == json.dumps(live_ident.get(k), sort_keys=True,
                                                                                         default=str)
                   for k in ("chunk", "embed"))
        self.state.inputs_unchanged = bool(inputs) and inputs == live_inputs and same
        return self.state

    def up_to_date(self) -> dict[str, Any] | None:
        """The summary of a refresh with nothing to do (same input files as the live run), else None.

        Checked before the lease: an hourly schedule on an unchanged corpus costs one listing."""
        st = self.plan()
        if not st.inputs_unchanged:
            return None
        c = st.live.run_manifest.get("counts") or {}
        docs, chunks = int(c.get("accepted", 0)), int(c.get("chunks", 0))
        self.timings["wall_seconds"] = self.clock() - self.t0
        return {"index": self.rcfg.index, "from_alias": self.rcfg.from_alias, "from_version": st.live.version_id,
                "run_id": None, "status": "up_to_date", "version_id": None, "strategy": None, "published": False,
                "reason": f"the snapshot's files are byte-identical to those of the live run {st.live.run_id}",
                "docs": {"new": 0, "changed": 0, "unchanged": docs, "deleted": 0},
                "chunks": {"new": 0, "changed": 0, "unchanged": chunks, "deleted": 0}, "live_chunks": chunks,
                "snapshot_chunks": chunks, "embedding_calls": 0, "embedding_calls_this_attempt": 0,
                "reused_vectors": 0, "saved_embedding_calls": chunks, "publish_to": self.rcfg.publish_to,
                "timings": {k: round(v, 3) for k, v in self.timings.items()},
                "full_embed": full_embed_cost(baseline_of(st.live.run_manifest), chunks, self.timings["wall_seconds"])}

    def _check_not_weighted(self, alias: str) -> None:
        from engine.publish.aliases import read_alias

        state = read_alias(self.store, self.rcfg.index, alias, missing_ok=True)
        if state is not None and state.weighted is not None:
            w = state.weighted
            raise ConflictError(f"alias {alias!r} is in a weighted rollout ({w.blue} + {w.green} at "
                                f"{w.to_dict()['green_weight']}%); publishing a refresh would end it. Finish the "
                                "rollout (embedctl publish) or roll it back first, or refresh without --publish-to")

    def describe_plan(self) -> dict[str, Any]:
        """The dry run: what would be refreshed from where, with which settings (no writes)."""
        st = self.plan()
        held = self.store.get_versioned(layout.lease_key(self.rcfg.index, LEASE_WHAT))
        lease = None
        if held is not None:
            doc = json.loads(held.data)
            stale, why = lease_state(doc)
            lease = {"held_by": doc.get("by"), "run_id": doc.get("run_id"), "stage": doc.get("stage"),
                     "stale": stale, "state": why}
        return {"index": self.rcfg.index, "from_alias": self.rcfg.from_alias, "from_version": st.live.version_id,
                "alias_generation": st.live.alias_generation, "live_run": st.live.run_id, "run_id": st.run_id,
                "publish_to": self.rcfg.publish_to,
                "model": st.live.model.get("name"), "dim": st.live.model.get("dim"),
                "config": json.loads(json.dumps(st.cfg.to_dict(), default=str)),
                "refresh": {k: v for k, v in self.rcfg.to_dict().items() if k != "overrides"},
                "resumes_existing_run": self.store.exists(layout.run_manifest_key(st.run_id)), "lease": lease}

    # -- lease --------------------------------------------------------------------------------
    def __enter__(self) -> RefreshSession:
        st = self.plan()
        deadline = time.monotonic() + self.rcfg.lease_wait_s
        while True:
            try:
                self.lease = acquire_lease(self.store, self.rcfg.index, ttl_s=self.rcfg.lease_ttl_s,
                                           info={"run_id": st.run_id, "from_version": st.live.version_id,
                                                 "stage": "starting"}, break_lease=self.rcfg.break_lease)
                break
            except ConflictError:
                if time.monotonic() >= deadline:
                    raise
                log.info("refresh lease of %s is held; waiting (up to %.0f s more)", self.rcfg.index,
                         deadline - time.monotonic())
                time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
        self.keeper = LeaseKeeper(self.lease).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.keeper is not None:
            self.keeper.__exit__(*exc)

    def stage(self, name: str) -> None:
        """Record the stage in the lease (a waiting user sees it) and in the log."""
        log.info("refresh %s: %s", self.state.run_id if self.state else "?", name)
        if self.lease is not None:
            self.lease.update(stage=name, stage_at=time.time())

    # -- the refresh run ------------------------------------------------------------------------
    def prepare(self) -> RefreshState:
        """Create or resume the refresh run (``engine.embed.pipeline.prepare_run``) and index the live vectors."""
        from engine.embed.pipeline import prepare_run

        st = self.plan()
        self.stage("prepare")
        t = self.clock()
        st.prepared = prepare_run(st.cfg)
        st.lookup = VectorLookup.from_run(self.store, st.live.run_manifest, endpoint_url=self.rcfg.endpoint_url)
        self.timings["prepare_seconds"] = self.clock() - t
        log.info("refresh run %s: %d units (%d pending), %d live vectors indexed by content hash", st.run_id,
                 len(st.prepared.plan.units), len(st.prepared.pending), len(st.lookup))
        return st

    def embedder(self, *, threads: int | None = None, encoder: Encoder | None = None) -> RefreshEmbedder:
        """The driver's embedder (one per session: vectors embedded ahead are shared by every unit)."""
        st = self.state
        assert st is not None and st.lookup is not None, "prepare() first"
        if self._embedder is None:
            preload = self._preload
            self._embedder = RefreshEmbedder(st.cfg, st.run_id, st.live.model, st.lookup, threads=threads,
                                             encoder=encoder, load_inner=(preload.result if preload else None))
        return self._embedder

    def set_model_loader(self, loader: Callable[[], Encoder]) -> None:
        """Where the model comes from when a chunk needs it (jobs/refresh.py: a model process started early)."""
        f: Any = _LazyFuture(loader)
        self._preload = f

    def preload_model(self) -> None:
        """Start loading the model in a background thread, so its import (seconds) overlaps chunking."""
        if self._preload is not None:
            return
        from concurrent.futures import Future

        st = self.plan()
        e = st.cfg.embed

        def load() -> Encoder:
            from engine.embed.encoders import encoder_from_identity

            return encoder_from_identity(st.live.model, device=e.device, dtype=e.dtype, batch_tokens=e.batch_tokens,
                                         compile=e.compile)

        future: Future[Encoder] = Future()

        def run() -> None:
            try:
                future.set_result(load())
            except BaseException as err:  # noqa: BLE001 - handed to whoever waits for the model
                future.set_exception(err)

        # A daemon thread: when no chunk turns out to need the model, nothing waits for it (not even exit).
        threading.Thread(target=run, name="embedctl-model-preload", daemon=True).start()
        self._preload = future

    def chunk_locally(self) -> list[tuple[dict[str, Any], Any]]:
        """Chunk every pending unit here (the embed job's chunk stage); (summary, chunk table) per unit."""
        from engine.embed.pipeline import chunk_unit_table, plan_meta_for

        st = self.state
        assert st is not None and st.prepared is not None, "prepare() first"
        self.stage("chunk")
        meta = plan_meta_for(st.prepared)
        return [chunk_unit_table(st.cfg, meta, u, st.prepared.plan.duplicates.get(u.file, {}))
                for u in st.prepared.pending]

    def embed_ahead(self, tables: list[Any], encoder: Encoder | None = None) -> int:
        """Embed the unseen chunks of all ``tables`` in one pass; returns how many went to the model."""
        from engine.embed.pipeline import embed_inputs, make_chunker

        st = self.state
        assert st is not None
        chunker = make_chunker(st.cfg)
        texts = [t for table in tables for t in embed_inputs(table, chunker)]
        return self.embedder(encoder=encoder).reusing.embed_ahead(texts)

    def write_units(self, chunked: list[dict[str, Any]], encoder: Encoder | None = None,
                    progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Commit each chunked unit: stored and just-embedded vectors into its embeddings part."""
        if not chunked:
            return
        embedder = self.embedder(encoder=encoder)
        for c in chunked:
            marker = embedder.embed_unit(c)
            self.record_unit(marker)
            if progress:
                progress({"event": "unit", **marker})

    def unit_misses_in(self, table: Any) -> int:
        """How many distinct chunk texts of a chunk table need the model (their hash is not in the live run)."""
        st = self.state
        assert st is not None and st.lookup is not None
        hashes = list(set(table.column("content_hash").to_pylist()))
        return int((~st.lookup.contains(hashes)).sum())

    def embed_locally(self, encoder: Encoder | None = None) -> None:
        """Chunk every pending unit, embed all unseen chunks in one pass, commit the units (in this process)."""
        t = self.clock()
        if encoder is None:
            self.preload_model()
        done = self.chunk_locally()
        self.timings["chunk_seconds"] = self.clock() - t
        t = self.clock()
        self.stage("embed")
        if done:
            self.embed_ahead([table for _c, table in done], encoder)
            self.write_units([c for c, _t in done], encoder)
        self.timings["embed_seconds"] = self.clock() - t

    def record_unit(self, marker: dict[str, Any]) -> None:
        st = self.state
        assert st is not None
        stats = marker.get("refresh") or {}
        for k in ("reused", "embedded"):
            st.attempt_counts[k] += int(stats.get(k, 0))

    # -- finish -------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Finalize the run, diff it, build the version, gate it, publish it; return the summary."""
        from engine.embed.pipeline import finalize_run

        st = self.state
        assert st is not None and st.prepared is not None, "prepare() and embed first"
        stall_point("finalize")
        manifest = finalize_run(st.cfg, st.prepared, self.clock() - self.t0)
        if manifest["status"] != "succeeded":
            raise IntegrityError(f"refresh run {st.run_id} is incomplete (missing units "
                                 f"{manifest.get('missing_units')}); rerun the same refresh to finish it")
        self.stage("diff")
        t = self.clock()
        diff = diff_runs(self.store, st.live.run_manifest, manifest)
        self.timings["diff_seconds"] = self.clock() - t
        per_unit = self._unit_stats(manifest)
        refresh_info = {
            "parent_run": st.live.run_id, "parent_version": st.live.version_id, "from_alias": self.rcfg.from_alias,
            "diff": diff.summary(), "embedding_calls": per_unit["embedded"], "reused_vectors": per_unit["reused"],
            "baseline": baseline_of(st.live.run_manifest),
        }
        manifest = dict(manifest, refresh=refresh_info)
        self.store.write_json(layout.run_manifest_key(st.run_id), manifest)
        summary: dict[str, Any] = {
            "index": self.rcfg.index, "from_alias": self.rcfg.from_alias, "from_version": st.live.version_id,
            "run_id": st.run_id, "docs": diff.docs, "chunks": diff.chunks, "live_chunks": diff.live_chunks,
            "snapshot_chunks": diff.snapshot_chunks, "embedding_calls": per_unit["embedded"],
            "embedding_calls_this_attempt": st.attempt_counts["embedded"], "reused_vectors": per_unit["reused"],
            "reused_by_hash": diff.reused_by_hash, "counts": manifest.get("counts"),
            "rejects": manifest.get("rejects"), "publish_to": self.rcfg.publish_to,
        }
        if diff.empty:
            summary.update(status="up_to_date", version_id=None, strategy=None,
                           strategy_reason="the snapshot has the same chunks as the live version",
                           published=False, reason="nothing changed; the alias stays on "
                           f"{st.live.version_id}")
            return self._close(summary, manifest)
        summary.update(self.build_gate_publish(diff, manifest))
        return self._close(summary, manifest)

    def build_gate_publish(self, diff: RefreshDiff, manifest: dict[str, Any]) -> dict[str, Any]:
        """Decide incremental vs rebuild, build the version, run the gates, publish if they pass."""
        st = self.state
        assert st is not None
        out: dict[str, Any] = {"published": False, "publish": None, "gates": {}}
        self.stage("index")
        t = self.clock()
        decision = self.decide(diff, manifest)
        out.update(strategy=decision["strategy"], strategy_reason=decision["reason"], checks=decision["checks"])
        record = {**decision, "parent_version": st.live.version_id, "parent_run": st.live.run_id,
                  "refresh_run": st.run_id, "diff": diff.summary(), "incremental_chain": decision["chain"]}
        try:
            if decision["strategy"] == "incremental":
                vman = update_version(self.store, self.rcfg.index, st.live.version_manifest, decision["version_id"],
                                      manifest, diff, record, gate_recall=self.gate_threshold())
            else:
                vman = rebuild_version(self.store, self.rcfg.index, st.run_id, st.live.version_manifest, record,
                                       gate_recall=self.rcfg.recall_gate)
        except GateError as err:
            self.timings["index_seconds"] = self.clock() - t
            out.update(status="gate_failed", version_id=decision.get("version_id"), reason=str(err),
                       gates={"recall": {"passed": False, "detail": str(err)}})
            return out
        self.timings["index_seconds"] = self.clock() - t
        version_id = str(vman["version_id"])
        rg = vman.get("recall_gate") or {}
        out["version_id"] = version_id
        out["gates"]["recall"] = {"passed": bool(rg.get("passed", True)), "recall": rg.get("recall"),
                                  "threshold": rg.get("threshold"), "k": rg.get("k"),
                                  "detail": f"recall@{rg.get('k')} {rg.get('recall')} vs threshold {rg.get('threshold')}"}
        stall_point("gates")
        t = self.clock()
        if self.rcfg.canary:
            out["gates"]["canary"] = self.canary_gate(version_id, diff)
        self.timings["gate_seconds"] = self.clock() - t
        failed = [name for name, g in out["gates"].items() if g and not g.get("passed")]
        if failed:
            out.update(status="gate_failed", reason=f"gate(s) {', '.join(failed)} failed on version {version_id}; "
                       f"alias {self.rcfg.publish_to or self.rcfg.from_alias!r} left on {st.live.version_id}")
            return out
        if not self.rcfg.publish_to:
            out.update(status="built", reason=f"no --publish-to: version {version_id} is built and gated; publish it "
                       f"with embedctl publish --index {self.rcfg.index} --version {version_id} --alias "
                       f"{self.rcfg.from_alias}")
            return out
        return {**out, **self.publish(version_id, diff)}

    def gate_threshold(self) -> float | None:
        st = self.state
        assert st is not None
        if self.rcfg.recall_gate is not None:
            return self.rcfg.recall_gate
        return (st.live.version_manifest.get("recall_gate") or {}).get("threshold")

    def decide(self, diff: RefreshDiff, manifest: dict[str, Any]) -> dict[str, Any]:
        """Incremental or rebuild (saved in the run's state, so a resumed refresh keeps its choice)."""
        st = self.state
        assert st is not None
        key = state_key(st.run_id, "refresh", "decision.json")
        if self.store.exists(key):
            saved = self.store.read_json(key)
            if saved.get("parent_version") == st.live.version_id and self.rcfg.strategy in ("auto", saved["strategy"]):
                return saved  # a resumed refresh keeps its choice (and its version id)
        strategy, reason, checks = choose_strategy(self.store, self.rcfg, diff, st.live.version_manifest, manifest)
        chain = int(((st.live.version_manifest.get("refresh") or {}).get("incremental_chain")) or 0)
        decision = {"strategy": strategy, "reason": reason, "checks": checks, "parent_version": st.live.version_id,
                    "chain": chain + 1 if strategy == "incremental" else 0,
                    "version_id": new_version_id() if strategy == "incremental" else None}
        self.store.write_json(key, decision)  # under the lease: no other writer
        log.info("refresh %s: %s (%s)", st.run_id, strategy, reason)
        return decision

    def canary_gate(self, version_id: str, diff: RefreshDiff) -> dict[str, Any]:
        """The canary set on the new version against the live version as the baseline.

        Canaries whose every expected document was deleted are retired (reported, not run)."""
        from engine.quality.loop import Canary, run_canary

        st = self.state
        assert st is not None and self.rcfg.canary
        canaries = load_canaries(self.rcfg.canary, self.rcfg.endpoint_url)
        gone = set(diff.deleted_doc_ids)
        kept = [c for c in canaries if set(c.expected) - gone]
        retired = [c.id or c.query for c in canaries if not set(c.expected) - gone]
        kept = [Canary(c.query, tuple(d for d in c.expected if d not in gone), c.id) for c in kept]
        if not kept:
            return {"passed": True, "detail": f"all {len(canaries)} canaries expect deleted documents: none to run",
                    "retired": retired}
        baseline = run_canary(self.store, self.rcfg.index, kept, version=st.live.version_id)
        report = run_canary(self.store, self.rcfg.index, kept, version=version_id, baseline=baseline)
        v = report["versions"][0]
        k = report["k"]
        return {"passed": bool(report["passed"]), "failures": v["failures"], "retired": retired,
                "recall": v["stats"].get(f"recall@{k}"), "baseline_recall": baseline["versions"][0]["stats"].get(
                    f"recall@{k}"),
                "detail": (f"{len(kept)} canaries: recall@{k} {v['stats'].get(f'recall@{k}')} (live "
                           f"{baseline['versions'][0]['stats'].get(f'recall@{k}')})"
                           + (f"; {'; '.join(v['failures'])}" if v["failures"] else ""))}

    def publish(self, version_id: str, diff: RefreshDiff) -> dict[str, Any]:
        """The CAS swap (expecting the alias still on the version we diffed against)."""
        from engine.publish.aliases import publish_version

        st = self.state
        assert st is not None and self.rcfg.publish_to
        self.stage("publish")
        stall_point("publish")
        if self.keeper is not None:
            self.keeper.check()  # fencing: a refresh that lost its lease must not publish
        t = self.clock()
        expect = st.live.version_id if self.rcfg.publish_to == self.rcfg.from_alias else None
        d = diff.docs
        reason = (f"refresh {st.run_id}: {d['changed']} changed, {d['new']} new, {d['deleted']} deleted docs "
                  f"(from {st.live.version_id})")
        try:
            res = publish_version(self.store, self.rcfg.index, version_id, self.rcfg.publish_to, expect_current=expect,
                                  reason=reason)
        except ConflictError as err:
            self.timings["publish_seconds"] = self.clock() - t
            return {"status": "conflict", "published": False,
                    "reason": f"alias {self.rcfg.publish_to!r} moved while the refresh ran ({err}); version "
                              f"{version_id} is built but not published: rerun the refresh to rebase on the new live "
                              "version, or publish it yourself"}
        self.timings["publish_seconds"] = self.clock() - t
        return {"status": "published", "published": True, "reason": None,
                "publish": {"alias": res.alias, "version": res.version, "generation": res.generation,
                            "previous": res.previous, "changed": res.changed}}

    def _unit_stats(self, manifest: dict[str, Any]) -> dict[str, int]:
        """Reuse counts over every attempt (per-unit records written after each commit)."""
        st = self.state
        assert st is not None
        out = {"reused": 0, "embedded": 0, "units_without_stats": 0}
        have = set(self.store.list(state_key(st.run_id, "refresh")))
        for unit in st.prepared.plan.units:
            key = state_key(st.run_id, "refresh", f"{unit.unit_id}.json")
            if key in have:
                rec = self.store.read_json(key)
                out["reused"] += int(rec["reused"])
                out["embedded"] += int(rec["embedded"])
            else:
                out["units_without_stats"] += 1
        return out

    def _close(self, summary: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
        wall = self.clock() - self.t0
        self.timings["wall_seconds"] = wall
        summary["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        summary["full_embed"] = full_embed_cost(manifest.get("refresh", {}).get("baseline"),
                                                int(summary["snapshot_chunks"]), wall)
        summary["saved_embedding_calls"] = int(summary["snapshot_chunks"]) - int(summary["embedding_calls"])
        rec = dict(manifest.get("refresh") or {}, outcome={k: summary.get(k) for k in
                   ("status", "version_id", "strategy", "strategy_reason", "published", "reason", "gates")},
                   timings=summary["timings"], full_embed=summary["full_embed"])
        self.store.write_json(layout.run_manifest_key(summary["run_id"]), dict(manifest, refresh=rec))
        return summary


class _LazyFuture:
    """``result()`` calls the loader once (a Future-like for ``set_model_loader``)."""

    def __init__(self, loader: Callable[[], Encoder]):
        self._loader = loader
        self._value: Encoder | None = None
        self._lock = threading.Lock()

    def result(self) -> Encoder:
        with self._lock:
            if self._value is None:
                self._value = self._loader()
            return self._value


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


def run_refresh_locally(rcfg: RefreshConfig, encoder: Encoder | None = None) -> dict[str, Any]:
    """The whole refresh in this process, without Ray (tests, small corpora). ``encoder``
    replaces the model for the chunks that need one (a counting encoder in tests)."""
    session = RefreshSession(rcfg)
    quick = session.up_to_date()  # refusals (and a byte-identical snapshot) come before the lease
    if quick is not None:
        return {**quick, "executor": "none"}
    with session:
        session.prepare()
        session.embed_locally(encoder)
        summary = session.finish()
    summary["executor"] = "driver"
    return summary


# ---------------------------------------------------------------------------------------------
# the index version: incremental update of a copy of the live shards, or a rebuild
# ---------------------------------------------------------------------------------------------

MIN_DRIFT_SAMPLE = 50  # fewer added vectors than this cannot make the drift check call for a rebuild
DRIFT_SAMPLE = 2048  # vectors per side measured by the drift check
GATE_QUERIES = 256


def new_version_id() -> str:
    """The index builder's naming (``v<UTC ts>-<hex>``), so ``--version latest`` finds refreshed versions too."""
    from engine.index.version import new_version_id as builder_id

    return builder_id()


def live_build_config(store: Store, index: str, vman: dict[str, Any]) -> dict[str, Any]:
    """The build settings behind a version: carried in ``refresh.build_config`` by refreshed versions, else the
    builder's saved state (found by ``build_key``), else reconstructed from ``params``."""
    from engine.index.params import BuildConfig

    carried = (vman.get("refresh") or {}).get("build_config")
    if carried:
        return dict(carried)
    if vman.get("build_key"):
        key = layout.join(layout.index_prefix(index), "builds", str(vman["build_key"])[:24], "state.json")
        with contextlib.suppress(NotFoundError, IntegrityError):
            cfg = store.read_json(key).get("config")
            if cfg:
                return dict(cfg)
    params = vman.get("params") or {}
    names = {f.name for f in fields(BuildConfig)}
    cfg = {k: v for k, v in (params.get("overrides") or {}).items() if k in names}
    cfg.update(kind=params.get("requested_kind") or vman.get("kind") or "ivfpq",
               rescore=params.get("rescore") or "int8", memory_budget=params.get("memory_budget"))
    gate = vman.get("recall_gate") or {}
    if "threshold" in gate:
        cfg["gate_recall"] = gate["threshold"]
    if gate.get("k"):
        cfg["gate_k"] = int(gate["k"])
    return cfg


def choose_strategy(store: Store, rcfg: RefreshConfig, diff: RefreshDiff, vman: dict[str, Any],
                    run_manifest: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(strategy, reason, checks): update a copy of the live shards when the change is small and the trained
    quantizer still fits the new vectors; rebuild when much changed, when the builder would now choose another
    index for this many vectors, after a long chain of incremental versions, or when the new vectors drift."""
    from engine.index.params import BuildConfig, choose_params

    checks: dict[str, Any] = {"changed_fraction": round(diff.changed_fraction, 6),
                              "rebuild_fraction": rcfg.rebuild_fraction}
    chain = int(((vman.get("refresh") or {}).get("incremental_chain")) or 0)
    checks["incremental_chain"] = chain
    if rcfg.strategy == "rebuild":
        return "rebuild", "rebuild asked for (--strategy rebuild)", checks
    problems = _incremental_blockers(vman)
    if problems:
        if rcfg.strategy == "incremental":
            raise ConfigError(f"--strategy incremental is impossible: {problems}; use --strategy rebuild or auto")
        return "rebuild", f"the live version cannot be updated in place: {problems}", checks
    new_rows = diff.snapshot_chunks
    try:
        cfg = BuildConfig.from_dict(live_build_config(store, rcfg.index, vman))
        params = choose_params(new_rows, int(vman["dim"]), cfg, parallelism=max(1, len(vman.get("shards") or [])))
        live_p = vman.get("params") or {}
        checks["builder_would_choose"] = {"kind": params.kind, "factory": params.factory}
        same_shape = params.kind == vman.get("kind") and (params.kind == "flat" or params.factory == live_p.get("factory"))
    except ConfigError as err:
        checks["builder_would_choose"] = f"(cannot tell: {err})"
        same_shape = True
    if rcfg.strategy == "incremental":
        checks["drift"] = quantizer_drift(store, rcfg.index, vman, run_manifest, diff)
        return "incremental", "incremental asked for (--strategy incremental)", checks
    if diff.changed_fraction > rcfg.rebuild_fraction:
        return "rebuild", (f"{diff.changed_fraction:.1%} of the live chunks changed, over --rebuild-fraction "
                           f"{rcfg.rebuild_fraction:.0%}: a rebuild retrains and rebalances"), checks
    if not same_shape:
        w = checks["builder_would_choose"]
        return "rebuild", (f"at {new_rows:,} vectors the builder chooses {w['kind']} {w['factory']} instead of the live "
                           f"{vman.get('kind')} {(vman.get('params') or {}).get('factory')}"), checks
    if chain >= rcfg.max_incremental_chain:
        return "rebuild", (f"{chain} incremental versions in a row (limit --max-incremental-chain "
                           f"{rcfg.max_incremental_chain}): rebuild to reset drift and fragmentation"), checks
    drift = quantizer_drift(store, rcfg.index, vman, run_manifest, diff)
    checks["drift"] = drift
    ratio = drift.get("ratio")
    if ratio is not None and ratio > rcfg.drift_threshold and drift.get("added", 0) >= MIN_DRIFT_SAMPLE:
        return "rebuild", (f"the new vectors fit the trained quantizer {ratio:.2f}x worse than the live ones "
                           f"({drift['measure']}), over --drift-threshold {rcfg.drift_threshold}"), checks
    if ratio is None:
        fit = "no trained quantizer (exact search)" if vman.get("kind") == "flat" else f"drift: {drift.get('measure')}"
    elif drift.get("added", 0) < MIN_DRIFT_SAMPLE:
        fit = (f"drift {ratio:.2f} ({drift['measure']}) not judged: {drift.get('added', 0)} added vectors are under "
               f"the {MIN_DRIFT_SAMPLE} a rebuild decision needs")
    else:
        fit = f"the quantizer still fits: drift {ratio:.2f} <= {rcfg.drift_threshold} ({drift['measure']})"
    return "incremental", (f"{diff.changed_fraction:.1%} of the chunks changed (<= {rcfg.rebuild_fraction:.0%}); "
                           f"{fit}"), checks


def _incremental_blockers(vman: dict[str, Any]) -> str:
    shards = vman.get("shards")
    if not isinstance(shards, list) or not shards:
        return "it has no shards"
    for s in shards:
        if "index" not in (s.get("files") or {}) or "ids" not in (s.get("files") or {}):
            return f"shard {s.get('shard')} has no FAISS file or id map (not built by embedctl build-index)"
    if vman.get("kind") not in ("flat", "ivfpq", "binary-rerank"):
        return f"unknown index kind {vman.get('kind')!r}"
    return ""


def read_run_rows(store: Store, run_manifest: dict[str, Any], chunk_ids: set[str] | None = None,
                  limit: int | None = None, seed: int = 0) -> tuple[list[str], list[str], np.ndarray]:
    """(chunk ids, doc ids, vectors [n, dim] float32) of a run's rows: those in ``chunk_ids``, or a seeded
    sample of ``limit`` rows. Reads the id column of every part, vectors only of parts that hold wanted rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    dim = int(run_manifest["dim"])
    parts = [o["key"] for o in run_manifest["outputs"]["embeddings"] if int(o.get("rows", 0)) > 0]
    if chunk_ids is None and limit is not None:
        total = sum(int(o["rows"]) for o in run_manifest["outputs"]["embeddings"])
        rng = np.random.default_rng(seed)
        pick = set(rng.choice(total, size=min(limit, total), replace=False).tolist()) if total else set()
    cids: list[str] = []
    dids: list[str] = []
    vecs: list[np.ndarray] = []
    offset = 0
    for key in parts:
        ids = _read_columns(store, key, ["chunk_id"]).column(0)
        if chunk_ids is not None:
            mask = pc.is_in(ids, value_set=pa.array(sorted(chunk_ids), pa.string()))
            rows = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
        else:
            rows = np.array([r - offset for r in range(offset, offset + len(ids)) if r in pick], dtype=np.int64)
        offset += len(ids)
        if not len(rows):
            continue
        t = _read_columns(store, key, ["chunk_id", "doc_id", "embedding"]).take(pa.array(rows, pa.int64()))
        cids += t.column("chunk_id").to_pylist()
        dids += t.column("doc_id").to_pylist()
        vecs.append(_vectors(t).astype(np.float32))
    mat = np.concatenate(vecs) if vecs else np.zeros((0, dim), dtype=np.float32)
    return cids, dids, mat


def _download(store: Store, key: str, path: str) -> str:
    from engine.core.storage import LocalStore

    if isinstance(store, LocalStore):
        return str(store.local_path(key))
    store.download_file(key, path)
    return path


def quantizer_drift(store: Store, index: str, vman: dict[str, Any], run_manifest: dict[str, Any],
                    diff: RefreshDiff) -> dict[str, Any]:
    """How much worse the trained quantizer encodes the added vectors than the ones it already holds.

    Measured with the version's own trained index (``trained.faiss``): mean squared reconstruction error
    (IVF-PQ: ``sa_encode``/``sa_decode``; IVF-Flat: distance to the nearest list centroid; binary IVF: Hamming
    distance to the nearest centroid), added vectors vs a sample of unchanged ones; plus, with int8 rescore
    vectors, the share of components clipped by the stored int8 ranges. ``ratio`` = added / unchanged."""
    import tempfile

    files = vman.get("files") or {}
    out: dict[str, Any] = {"ratio": None, "added": len(diff.add_ids)}
    if not diff.add_ids or (not files.get("trained") and not files.get("rescore_ranges")):
        out["measure"] = "nothing to measure" if diff.add_ids else "no added vectors"
        return out
    added_ids = set(diff.add_ids)
    rng = np.random.default_rng(0)
    if len(added_ids) > DRIFT_SAMPLE:
        added_ids = set(rng.choice(sorted(added_ids), size=DRIFT_SAMPLE, replace=False).tolist())
    _c, _d, added = read_run_rows(store, run_manifest, added_ids)
    cids, _d2, base = read_run_rows(store, run_manifest, limit=DRIFT_SAMPLE + len(diff.add_ids), seed=1)
    keep = [i for i, c in enumerate(cids) if c not in set(diff.add_ids)][:DRIFT_SAMPLE]
    base = base[keep]
    out["baseline"] = len(base)
    if not len(base) or not len(added):
        out["measure"] = "too few vectors"
        return out
    prefix = layout.version_prefix(index, str(vman["version_id"]))
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="embedctl-drift-") as tmp:
        if files.get("trained"):
            import faiss

            path = _download(store, layout.join(prefix, files["trained"]), os.path.join(tmp, "trained.faiss"))
            binary = vman.get("kind") == "binary-rerank"
            trained = faiss.read_index_binary(path) if binary else faiss.read_index(path)
            err_a, err_b = _quantization_error(trained, added, binary), _quantization_error(trained, base, binary)
            out.update(added_error=round(err_a, 6), baseline_error=round(err_b, 6))
            if err_b > 1e-9:
                ratios["quantizer"] = err_a / err_b
        if files.get("rescore_ranges"):
            path = _download(store, layout.join(prefix, files["rescore_ranges"]), os.path.join(tmp, "ranges.npy"))
            ranges = np.load(path, allow_pickle=False).astype(np.float32)  # [2, dim] lo, hi
            clip_a, clip_b = _clip_rate(added, ranges), _clip_rate(base, ranges)
            out.update(added_int8_clipped=round(clip_a, 6), baseline_int8_clipped=round(clip_b, 6))
            ratios["int8 ranges"] = clip_a / max(clip_b, 1e-3)  # a 0.1% floor: a clean baseline is not a 0 divisor
    if ratios:
        worst = max(ratios, key=lambda k: ratios[k])
        out.update(ratio=round(ratios[worst], 4), measure=worst, ratios={k: round(v, 4) for k, v in ratios.items()})
    else:
        out["measure"] = "nothing trained"
    return out


def _quantization_error(trained: Any, x: np.ndarray, binary: bool) -> float:
    """Mean squared reconstruction error of ``x`` [n, dim] under a trained index (see ``quantizer_drift``).

    Computed from the parts (pre-transform, coarse centroid, then the product quantizer on the residual)
    rather than ``sa_encode``/``sa_decode``, which crash on a deserialised IVF-PQ fast-scan index."""
    import faiss

    from engine.index.quantize import pack_sign_bits

    if binary:
        ivf_b = faiss.downcast_IndexBinary(trained)
        if not hasattr(ivf_b, "quantizer"):
            return 0.0
        d, _ = ivf_b.quantizer.search(pack_sign_bits(x), 1)
        return float(np.mean(d))
    x = np.ascontiguousarray(x, dtype=np.float32)
    extracted = faiss.try_extract_index_ivf(trained)
    if extracted is None:
        return 0.0
    ivf: Any = faiss.downcast_index(extracted)
    xt = x
    if isinstance(trained, faiss.IndexPreTransform):  # OPQ / PCA: the lists live in the transformed space
        for i in range(trained.chain.size()):  # type: ignore[attr-defined]
            vt = faiss.downcast_VectorTransform(trained.chain.at(i))  # type: ignore[attr-defined]
            xt = np.ascontiguousarray(vt.apply(xt), dtype=np.float32)
    _, assign = ivf.quantizer.search(xt, 1)  # [n, 1] nearest list
    residual = xt - ivf.quantizer.reconstruct_batch(assign.ravel()) if getattr(ivf, "by_residual", True) else xt
    pq = getattr(ivf, "pq", None)
    if pq is None:  # IVF-Flat: the list centroid is all the quantization there is
        return float(np.mean((residual ** 2).sum(1)))
    residual = np.ascontiguousarray(residual, dtype=np.float32)
    rec = pq.decode(pq.compute_codes(residual))  # [n, d'] the residual as the PQ code gives it back
    return float(np.mean(((residual - rec) ** 2).sum(1)))


def _clip_rate(x: np.ndarray, ranges: np.ndarray) -> float:
    lo, hi = ranges[0], ranges[1]
    return float(np.mean((x < lo) | (x > hi)))


def _assign_adds(sizes: list[int], n_add: int) -> list[int]:
    """How many added rows each shard takes: fill the smallest shards first (water-filling)."""
    take = [0] * len(sizes)
    cur = list(sizes)
    for _ in range(n_add):
        i = min(range(len(cur)), key=lambda j: (cur[j], j))
        take[i] += 1
        cur[i] += 1
    return take if n_add < 100_000 else _assign_adds_fast(sizes, n_add)


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


def update_version(store: Store, index: str, live: dict[str, Any], version_id: str, run_manifest: dict[str, Any],
                   diff: RefreshDiff, record: dict[str, Any], *, gate_recall: float | None) -> dict[str, Any]:
    """The incremental path: copy the live version's shards, remove the changed/deleted chunks' ids, add the
    changed/new chunks' vectors under fresh ids (above every live id, so each shard's id map stays sorted),
    measure recall against exact search over the refresh run, and commit the manifest (create-only).

    A rerun after a crash rewrites the same files; a version whose manifest exists is returned as is."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.index.faiss_ops import index_from_bytes
    from engine.index.quantize import encode_rescore, pack_sign_bits
    from engine.index.version import read_version_manifest

    if store.exists(layout.version_manifest_key(index, version_id)):
        return read_version_manifest(store, index, version_id)
    t0 = time.perf_counter()
    src = layout.version_prefix(index, str(live["version_id"]))
    dst = layout.version_prefix(index, version_id)
    kind = str(live["kind"])
    binary = kind == "binary-rerank"
    params = live.get("params") or {}
    rescore = str(params.get("rescore") or "none")
    live_files = live.get("files") or {}
    ranges = None
    if rescore == "int8" and live_files.get("rescore_ranges"):
        ranges = np.load(_io_bytes(store.read_bytes(layout.join(src, live_files["rescore_ranges"]))),
                         allow_pickle=False)
    # The vectors that come in: changed and new chunks, from the refresh run (stored or just embedded).
    add_cids, add_dids, add_vecs = read_run_rows(store, run_manifest, set(diff.add_ids))
    order = np.argsort(np.array(add_cids, dtype=object), kind="stable") if add_cids else np.zeros(0, np.int64)
    add_cids = [add_cids[i] for i in order]
    add_dids = [add_dids[i] for i in order]
    add_vecs = add_vecs[order] if len(order) else add_vecs
    if len(add_cids) != len(diff.add_ids):
        raise IntegrityError(f"refresh run {run_manifest['run_id']} holds {len(add_cids)} of the {len(diff.add_ids)} "
                             "chunks to add; rerun the refresh (it resumes)")
    add_vecs = _normalize(add_vecs)
    remove = set(diff.remove_ids)
    shards = sorted(live["shards"], key=lambda s: int(s["shard"]))
    # Pass 1: id maps (small) -> what each shard loses, the id space's top.
    id_maps, removed_rows, max_id = [], [], -1
    for s in shards:
        t = _read_columns(store, layout.join(src, s["files"]["ids"]), ["id", "chunk_id", "doc_id"])
        id_maps.append(t)
        ids = t.column("id").to_numpy()
        if len(ids):
            max_id = max(max_id, int(ids.max()))
        gone = np.array([c in remove for c in t.column("chunk_id").to_pylist()], dtype=bool)
        removed_rows.append(gone)
    found = sum(int(g.sum()) for g in removed_rows)
    if found != len(remove):
        raise IntegrityError(f"version {live['version_id']} holds {found} of the {len(remove)} chunks the diff "
                             "removes; its id maps do not match its source run")
    takes = _assign_adds([len(t) - int(g.sum()) for t, g in zip(id_maps, removed_rows)], len(add_cids))
    new_ids = np.arange(max_id + 1, max_id + 1 + len(add_cids), dtype=np.int64)
    artifacts: list[dict[str, Any]] = []
    out_shards: list[dict[str, Any]] = []
    cursor = 0
    import faiss

    for s, t, gone, take in zip(shards, id_maps, removed_rows, takes):
        files = dict(s["files"])
        lo, hi = cursor, cursor + take
        cursor = hi
        if not gone.any() and take == 0:
            for key in files.values():  # untouched shard: same bytes under the new version
                artifacts.append(_copy_artifact(store, layout.join(src, key), layout.join(dst, key), key, live))
            out_shards.append(dict(s))
            continue
        with contextlib.ExitStack() as stack:
            import tempfile

            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="embedctl-refresh-shard-"))
            idx = index_from_bytes(store.read_bytes(layout.join(src, files["index"])), binary)
            ids = t.column("id").to_numpy()
            rows = s.get("id_mode") == "row"  # a bare BFlat shard (engine.index.build) holds id-map rows, not ids
            if gone.any():
                n = idx.remove_ids(faiss.IDSelectorBatch(np.nonzero(gone)[0] if rows else ids[gone]))
                if n != int(gone.sum()):
                    raise IntegrityError(f"shard {s['shard']}: removed {n} of {int(gone.sum())} ids")
            if take:
                x = pack_sign_bits(add_vecs[lo:hi]) if binary else add_vecs[lo:hi]
                idx.add(x) if rows else idx.add_with_ids(x, new_ids[lo:hi])
            keep = ~gone
            table = pa.table({
                "id": pa.concat_arrays([pa.array(ids[keep], pa.int64()), pa.array(new_ids[lo:hi], pa.int64())]),
                "chunk_id": pa.concat_arrays([t.column("chunk_id").combine_chunks().filter(pa.array(keep)),
                                              pa.array(add_cids[lo:hi], pa.string())]),
                "doc_id": pa.concat_arrays([t.column("doc_id").combine_chunks().filter(pa.array(keep)),
                                            pa.array(add_dids[lo:hi], pa.string())]),
            })
            if idx.ntotal != table.num_rows:
                raise IntegrityError(f"shard {s['shard']}: {idx.ntotal} vectors but {table.num_rows} id map rows")
            paths = {role: os.path.join(tmp, os.path.basename(key)) for role, key in files.items()}
            (faiss.write_index_binary if binary else faiss.write_index)(idx, paths["index"])
            pq.write_table(table, paths["ids"], compression="zstd", write_statistics=True)
            if "rescore" in files:
                old = np.load(_download(store, layout.join(src, files["rescore"]), paths["rescore"] + ".old"),
                              allow_pickle=False)
                new = np.concatenate([old[keep], encode_rescore(add_vecs[lo:hi], rescore, ranges)])
                np.save(paths["rescore"], new, allow_pickle=False)
            stall_point("shard")
            size = 0
            for role, key in files.items():
                digest = store.upload_file(layout.join(dst, key), paths[role])
                nbytes = os.path.getsize(paths[role])
                size += nbytes
                artifacts.append({"key": key, "bytes": nbytes, "sha256": digest})
            ids_now = table.column("id").to_numpy()
            out_shards.append({**s, "rows": int(table.num_rows), "bytes": size,
                               "id_start": int(ids_now.min()) if len(ids_now) else 0,
                               "id_end": int(ids_now.max()) + 1 if len(ids_now) else 0})
    for role in ("trained", "rescore_ranges"):
        if live_files.get(role):
            key = live_files[role]
            artifacts.append(_copy_artifact(store, layout.join(src, key), layout.join(dst, key), key, live))
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
                                                                 for o in run_manifest["outputs"]["embeddings"]]},
        parent_version=str(live["version_id"]), shards=out_shards, files=files_out, artifacts=artifacts,
        counts={"vectors": rows, "shards": len(out_shards)}, recall_gate=None, refresh=record,
    )
    stall_point("gate")
    t1 = time.perf_counter()
    threshold = gate_recall if gate_recall is not None else (live.get("recall_gate") or {}).get("threshold")
    gate = measure_recall(store, index, manifest, run_manifest, k=int((live.get("recall_gate") or {}).get("k") or 10),
                          threshold=threshold)
    manifest["recall_gate"] = gate
    report = {"version_id": version_id, "index": index, "refresh": record, "recall_gate": gate}
    data = json_bytes(report)
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


def _io_bytes(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


def _normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _copy_artifact(store: Store, src: str, dst: str, key: str, live: dict[str, Any]) -> dict[str, Any]:
    """Copy one artifact of the live version (verified against the live manifest's sha256)."""
    import tempfile

    want = {a["key"]: a for a in live.get("artifacts", [])}.get(key)
    from engine.core.storage import LocalStore

    if isinstance(store, LocalStore):
        digest = store.upload_file(dst, store.local_path(src), sha256=want["sha256"] if want else None)
        return {"key": key, "bytes": store.size(dst), "sha256": digest}
    with tempfile.TemporaryDirectory(prefix="embedctl-copy-") as tmp:
        path = os.path.join(tmp, "f")
        store.download_file(src, path)
        digest = store.upload_file(dst, path, sha256=want["sha256"] if want else None)
        return {"key": key, "bytes": os.path.getsize(path), "sha256": digest}


def measure_recall(store: Store, index: str, manifest: dict[str, Any], run_manifest: dict[str, Any], *, k: int,
                   threshold: float | None, queries: int = GATE_QUERIES, seed: int = 0) -> dict[str, Any]:
    """Recall@k of the (not yet committed) version against exact search over every vector of its run.

    Gate queries are vectors sampled from the run (their own chunk excluded), like the builder's gate;
    exact neighbours are computed part by part, so memory stays at one part."""
    from engine.index.faiss_ops import exact_topk, merge_topk
    from engine.index.searcher import Searcher

    t0 = time.perf_counter()
    qcids, _qd, qvecs = read_run_rows(store, run_manifest, limit=queries, seed=seed)
    qvecs = _normalize(qvecs)
    if not len(qvecs):
        return {"k": k, "queries": 0, "recall": None, "threshold": threshold, "passed": True,
                "note": "no vectors: nothing to measure"}
    depth = k + 1
    best_s, best_i, all_cids = [], [], []
    offset = 0
    for o in run_manifest["outputs"]["embeddings"]:
        if not int(o.get("rows", 0)):
            continue
        t = _read_columns(store, o["key"], ["chunk_id", "embedding"])
        v = _normalize(_vectors(t).astype(np.float32))
        ids = np.arange(offset, offset + len(v), dtype=np.int64)
        s, i = exact_topk(qvecs, v, ids, depth)
        best_s.append(s)
        best_i.append(i)
        all_cids += t.column("chunk_id").to_pylist()
        offset += len(v)
        s_m, i_m = merge_topk(best_s, best_i, depth)
        best_s, best_i = [s_m], [i_m]
    ex_s, ex_i = best_s[0], best_i[0]
    row_of = {c: r for r, c in enumerate(all_cids)}
    self_rows = np.array([row_of[c] for c in qcids], dtype=np.int64)
    searcher = Searcher.load_manifest(store, index, manifest, verify=True)
    try:
        s_f, i_f = searcher.search_ids(qvecs, depth)
        hits = searcher._hits(s_f, i_f)  # version ids -> chunk ids
    finally:
        searcher.close()
    found = np.full((len(qvecs), depth), -1, dtype=np.int64)
    for q, row in enumerate(hits):
        for j, h in enumerate(row[:depth]):
            found[q, j] = row_of.get(h.chunk_id, -2)
    from engine.index.gate import drop_self, knn_recall_mean

    _s1, f_k = drop_self(np.where(found >= 0, 0.0, -np.inf).astype(np.float32), found, self_rows, k)
    e_s, e_k = drop_self(ex_s, ex_i, self_rows, k)
    recall = knn_recall_mean(f_k, e_k, e_s, k)
    return {"k": k, "queries": int(len(qvecs)), "query_source": "vectors sampled from the refresh run, the query's "
            "own chunk excluded; exact neighbours over the whole run", "recall": round(recall, 4),
            "threshold": threshold, "passed": threshold is None or recall >= threshold,
            "seconds": round(time.perf_counter() - t0, 3),
            "nprobe": (manifest.get("params") or {}).get("nprobe"),
            "rescore_multiplier": (manifest.get("params") or {}).get("rescore_multiplier")}


def rebuild_version(store: Store, index: str, run_id: str, live: dict[str, Any], record: dict[str, Any], *,
                    gate_recall: float | None) -> dict[str, Any]:
    """The rebuild path: the index builder on the refresh run, with the live version's build settings.

    The builder resumes by its own build key. The refresh record goes into the version manifest when the
    builder takes ``manifest_extra``; otherwise into ``refresh.json`` beside the manifest (and the run)."""
    import inspect

    from engine.index.build import build_index
    from engine.index.params import BuildConfig

    cfg_d = live_build_config(store, index, live)
    if gate_recall is not None:
        cfg_d["gate_recall"] = gate_recall
    cfg = BuildConfig.from_dict(cfg_d)
    record = {**record, "build_config": cfg.to_dict()}
    kwargs: dict[str, Any] = {"parent_version": str(live["version_id"])}
    extra_ok = "manifest_extra" in inspect.signature(build_index).parameters
    if extra_ok:
        kwargs["manifest_extra"] = {"refresh": record}
    result = build_index(store, run_id, index, cfg, **kwargs)
    manifest = result.manifest
    if not extra_ok or "refresh" not in manifest:
        side = layout.join(layout.version_prefix(index, result.version_id), "refresh.json")
        if not store.exists(side):
            store.write_json(side, record)
        manifest = dict(manifest, refresh=record)  # what the summary reports (the stored manifest lacks it)
    return manifest


def load_canaries(path: str, endpoint_url: str | None = None) -> list[Any]:
    """A canary set from a local file or an s3:// object (``engine.quality.loop.read_canaries`` formats)."""
    import tempfile

    from engine.quality.loop import read_canaries

    if not path.startswith("s3://"):
        return read_canaries(path)
    parent, name = path.rsplit("/", 1)
    with tempfile.TemporaryDirectory(prefix="embedctl-canary-") as tmp:
        local = os.path.join(tmp, name)
        open_store(parent, endpoint_url=endpoint_url).download_file(name, local)
        return read_canaries(local)


def stored_samples(store: Store, run_manifest: dict[str, Any], cfg: EmbedJobConfig, n: int = 4) -> list[tuple[str, list[float]]]:
    """(embed text, stored vector) of the first ``n`` chunks of a run: what a model must reproduce to be trusted."""
    from engine.embed.pipeline import embed_inputs, make_chunker

    parts = [o["key"] for o in run_manifest["outputs"]["embeddings"] if int(o.get("rows", 0)) > 0]
    if not parts:
        return []
    t = _read_columns(store, parts[0], ["text", "title", "embedding"]).slice(0, n)
    texts = embed_inputs(t, make_chunker(cfg))
    return [(x, v.astype(np.float32).tolist()) for x, v in zip(texts, _vectors(t))]
