"""Index builds: an embed run becomes a sharded, versioned FAISS index (IVF-PQ, binary+rerank or flat) behind a recall gate.

A build is a sequence of explicit steps, each safe to crash after:

1. **plan**: read the run manifest (parts, rows, dim, model), choose parameters from the corpus
   size, the dimension and the memory budget (``choose_params``; every choice comes with its
   reason, and every parameter can be overridden);
2. **sample**: training vectors drawn uniformly over the whole run, plus held-out gate queries
   (corpus vectors *not* in the training sample);
3. **train** once, in the driver: the IVF-PQ (or binary IVF) quantizer and the int8 rescore
   ranges are uploaded as artifacts of the version, so a resumed build never retrains;
4. **add**: one task per index shard (``build_shard``: pure, idempotent, run by whatever
   ``mapper`` the caller gives; ``jobs/build_index.py`` gives Ray tasks). A shard reads its row
   range, encodes and adds it, writes the FAISS file, the id map (Parquet) and the rescore
   vectors (``.npy``, memory-mappable), uploads them, and commits a marker. It also computes the
   exact top neighbours of the gate queries within its rows, so the gate needs no second pass;
5. **gate**: the version is loaded exactly as a searcher loads it; the default ``nprobe`` /
   rescore multiplier are tuned on the gate queries and recall@k against exact search is
   measured. Below ``gate_recall`` the build fails with the figure and nothing is published;
6. **commit**: the version manifest (``engine/layout.py`` contract) is written last, create-only.

Build state lives under ``indexes/<name>/builds/<build key>/`` (the key hashes the run's
embedding files and the build config): rerunning the same command after a crash reuses the
version id, the trained quantizer and every committed shard; rerunning it after success returns
the finished version.

Every built file loads with plain ``faiss.read_index`` / ``faiss.read_index_binary``; ids in the
FAISS files are global int64 row ids, and ``shards/shard-NNNNN.ids.parquet`` maps them to
``chunk_id`` / ``doc_id``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from engine import __version__
from engine.core import layout
from engine.core.errors import ConfigError, ConflictError, GateError, IntegrityError, NotFoundError, SchemaError
from engine.core.storage import LocalStore, Store, check_key, join, json_bytes, sha256_file

if TYPE_CHECKING:
    import faiss
    import pyarrow as pa

log = logging.getLogger(__name__)

Kind = Literal["ivfpq", "binary-rerank", "flat"]
RescoreDtype = Literal["int8", "fp16", "none"]
KINDS: tuple[str, ...] = ("ivfpq", "binary-rerank", "flat")
RESCORE_DTYPES: tuple[str, ...] = ("int8", "fp16", "none")

# Below this many vectors an IVF index buys no speed (a flat scan of 10k x 384 takes ~1 ms)
# and its k-means has too few points per list: auto parameters fall back to flat.
FLAT_BELOW = 10_000
# FAISS k-means warns below 39 training points per centroid; its guidance is 30-256.
MIN_TRAIN_PER_LIST = 39
TRAIN_PER_LIST = 64
MAX_TRAIN_PER_LIST = 256
# Auto shard sizing: one shard per this many vectors, and no shard smaller than the second
# figure just to keep workers busy.
ROWS_PER_SHARD = 1_000_000
MIN_ROWS_PER_PARALLEL_SHARD = 50_000
ID_BYTES = 8  # an int64 id per vector in IVF lists / IDMap
IVFPQ_RESCORE_MULTIPLIER = 4
DEFAULT_RESCORE_MULTIPLIER = {"ivfpq": IVFPQ_RESCORE_MULTIPLIER, "binary-rerank": 8}
RESCORE_MULTIPLIERS = (1, 2, 4, 8, 16, 32)
PLATEAU = 0.001  # tuning stops when doubling nprobe / the multiplier gains less recall than this
DEFAULT_PQ_NBITS = 4  # 4-bit fast-scan PQ: trains in seconds, searches with SIMD lookups
CALIBRATION_ROWS = 100_000  # int8 range calibration sample for binary-rerank (no other training)

MANIFEST_FORMAT = 1
TRAINED_KEY = "trained.faiss"
RANGES_KEY = "rescore-ranges.npy"
REPORT_KEY = "build-report.json"
MANIFEST_KEYS = frozenset({
    "format", "version_id", "index", "created_at", "engine_version", "model", "dim", "metric", "kind", "params",
    "source_run", "source", "parent_version", "shards", "files", "artifacts", "counts", "recall_gate", "thresholds",
    "build_key", "timings"})

Progress = Callable[[dict[str, Any]], None]
Mapper = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]


def local_mapper(fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]:
    """Run ``fn`` over ``items`` one after the other in this process (FAISS uses every core)."""
    for item in items:
        yield fn(item)


# =============================================================================================
# configuration and automatic parameters
# =============================================================================================

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_bytes(value: str | int | float | None) -> int | None:
    """``"4GB"`` -> 4e9, ``"512MiB"`` -> 512 * 2**20, ``1e9`` -> 10**9; None stays None."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ConfigError(f"memory budget {value!r} is not a size; write e.g. 4GB, 512MiB or 2000000000")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ConfigError(f"memory budget must be positive, got {value!r}")
    return n


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class BuildConfig:
    """What to build. ``None`` means "choose automatically" (and the manifest records why)."""

    kind: str = "ivfpq"  # ivfpq | binary-rerank | flat
    factory: str | None = None  # a FAISS factory string for the float index ("OPQ48,IVF1024,PQ48x4fs")
    #                            or, for binary-rerank, a binary one ("BIVF1024"; default BFlat)
    shards: int | None = None
    memory_budget: int | None = None  # bytes of RAM for the searchable index (all shards)
    nlist: int | None = None
    pq_m: int | None = None
    pq_nbits: int | None = None  # 4 (fast scan, default) or 5..8
    train_size: int | None = None
    rescore: str = "int8"  # int8 | fp16 | none: vectors stored beside each shard to rerank candidates
    rescore_multiplier: int | None = None  # candidates per shard = k x this; None = tuned by the gate
    nprobe: int | None = None  # None = tuned by the gate
    gate_recall: float | None = 0.9  # fail below this recall@gate_k against exact; None = measure only
    gate_k: int = 10
    gate_queries: int = 256
    target_recall: float = 0.95  # what nprobe / multiplier tuning aims for (at least gate_recall)
    seed: int = 0

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"index kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.rescore not in RESCORE_DTYPES:
            raise ConfigError(f"rescore must be one of {', '.join(RESCORE_DTYPES)}, got {self.rescore!r}")
        if self.kind == "binary-rerank" and self.rescore == "none":
            raise ConfigError("binary-rerank needs rescore vectors: use --rescore int8 (default) or fp16")
        for name in ("shards", "nlist", "pq_m", "train_size", "rescore_multiplier", "nprobe"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.pq_nbits is not None and self.pq_nbits not in (4, 5, 6, 7, 8):
            raise ConfigError(f"pq_nbits must be 4 (fast scan) or 5..8, got {self.pq_nbits!r}")
        if self.gate_recall is not None and not 0.0 <= self.gate_recall <= 1.0:
            raise ConfigError(f"gate_recall must be within [0, 1], got {self.gate_recall!r}")
        if not 0.0 < self.target_recall <= 1.0:
            raise ConfigError(f"target_recall must be within (0, 1], got {self.target_recall!r}")
        if self.gate_k < 1 or self.gate_queries < 1:
            raise ConfigError("gate_k and gate_queries must be positive")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ConfigError(f"memory_budget must be positive, got {self.memory_budget!r}")
        if self.factory is not None and not self.factory.strip():
            raise ConfigError("factory must be a FAISS factory string, got an empty one")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BuildConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown build settings {sorted(unknown)}; allowed: {', '.join(sorted(names))}")
        kwargs = dict(d)
        if "memory_budget" in kwargs:
            kwargs["memory_budget"] = parse_bytes(kwargs["memory_budget"])
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg


@dataclass(frozen=True)
class IndexParams:
    """The parameters a build uses, with the reasons for each automatic choice."""

    kind: str  # what is built (a small corpus may turn ivfpq into flat)
    requested_kind: str
    factory: str  # FAISS factory string of each shard's index (binary factory for binary-rerank)
    dim: int
    rows: int
    shards: int
    nlist: int | None
    pq_m: int | None
    pq_nbits: int | None
    train_size: int  # vectors sampled for training (or int8 calibration)
    rescore: str
    rescore_multiplier: int | None  # None: tuned by the gate
    nprobe: int | None  # None: tuned by the gate (IVF kinds only)
    memory_budget: int | None
    ram_bytes: int  # estimated RAM of the searchable index, all shards
    rescore_bytes: int  # rescore vectors on disk (memory-mapped; only candidates' pages are read)
    reasoning: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def trained(self) -> bool:
        """Whether the shards share a trained quantizer (IVF float or binary IVF)."""
        return self.nlist is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _pow2_near(x: float) -> int:
    return 1 << max(0, round(math.log2(max(x, 1.0))))


def _floor_pow2(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1.0)))))


def _code_bytes(m: int, nbits: int) -> int:
    return (m * nbits + 7) // 8


def _describe_factory_ivf(factory: str, dim: int, binary: bool) -> tuple[int | None, int | None, int | None]:
    """(nlist, pq_m, pq_nbits) of a factory string, by building the (empty) index."""
    faiss = import_faiss()

    try:
        if binary:
            bits = _binary_bits(dim)
            idx_b = faiss.index_binary_factory(bits, factory)
            ivf_b = faiss.downcast_IndexBinary(idx_b)
            return (int(ivf_b.nlist), None, None) if hasattr(ivf_b, "nlist") else (None, None, None)
        idx = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ConfigError(f"FAISS rejects the factory string {factory!r} for dimension {dim}: "
                          f"{str(err).splitlines()[0][:200]}") from None
    ivf = faiss.try_extract_index_ivf(idx)
    if ivf is None:
        return None, None, None
    ivf = faiss.downcast_index(ivf)
    pq = getattr(ivf, "pq", None)
    return int(ivf.nlist), (int(pq.M) if pq is not None else None), (int(pq.nbits) if pq is not None else None)


def _binary_bits(dim: int) -> int:
    """FAISS binary indexes need a multiple of 8 bits; ``np.packbits`` pads with zeros."""
    return ((dim + 7) // 8) * 8


def ivf_ram(rows: int, dim: int, nlist: int, shards: int, code: int, fast_scan: bool) -> int:
    """Bytes of IVF shards in RAM: codes + int64 ids, plus per shard its own copy of the coarse
    centroids (each shard file loads on its own), plus for fast-scan codes the padding of every
    list to blocks of 32 (half a block per list on average)."""
    padded = rows + (max(shards, 1) * nlist * 16 if fast_scan else 0)
    return padded * code + rows * ID_BYTES + max(shards, 1) * nlist * dim * 4


def _leave_gate_out(train: int, rows: int, cfg: BuildConfig) -> int:
    """Shrink an automatic training sample so the gate's queries stay out of it (when rows allow)."""
    if cfg.train_size:
        return train
    return max(1, min(train, max(rows - cfg.gate_queries, rows // 2)))


def auto_shards(rows: int, parallelism: int) -> tuple[int, str]:
    if rows == 0:
        return 0, "empty run: no shards"
    by_size = math.ceil(rows / ROWS_PER_SHARD)
    by_workers = min(max(1, parallelism), max(1, rows // MIN_ROWS_PER_PARALLEL_SHARD))
    n = max(by_size, by_workers)
    return n, (f"{n} shard(s): at most {ROWS_PER_SHARD:,} vectors per shard, and one per worker "
               f"({parallelism}) while each keeps >= {MIN_ROWS_PER_PARALLEL_SHARD:,} vectors")


def choose_params(rows: int, dim: int, cfg: BuildConfig, *, parallelism: int = 1) -> IndexParams:
    """Pick index parameters for ``rows`` vectors of ``dim`` under ``cfg`` (overrides win).

    - IVF lists: ~4·sqrt(N) rounded to a power of two (the FAISS guidance is 4·sqrt(N) to
      16·sqrt(N)), capped so that every list gets >= 39 training points;
    - training sample: 64 points per list (FAISS: 30-256), at least 39 x the PQ codebook size;
    - PQ code: 4-bit fast-scan codes, the largest number of sub-quantizers that divides the
      dimension, keeps >= 8x compression against float32, and fits the memory budget;
    - fewer than 10,000 vectors (or too few to train the lists asked for): flat, exact.
    """
    cfg.validate()
    reasons: list[str] = []
    overrides = {k: v for k, v in cfg.to_dict().items()
                 if v is not None and k in ("factory", "shards", "nlist", "pq_m", "pq_nbits", "train_size",
                                            "nprobe", "rescore_multiplier")}
    budget = cfg.memory_budget
    if cfg.shards is not None:
        shards = min(cfg.shards, rows) if rows else 0
        reasons.append(f"{shards} shard(s) as asked" + (f" (capped at {rows} rows)" if cfg.shards > rows else ""))
    else:
        shards, why = auto_shards(rows, parallelism)
        reasons.append(why)
    rescore = cfg.rescore
    kind = cfg.kind

    def flat(why: str) -> IndexParams:
        reasons.append(why)
        if rescore != "none":
            reasons.append("rescore off: a flat index already scores exactly")
        ram = rows * (dim * 4 + ID_BYTES)
        return IndexParams(kind="flat", requested_kind=cfg.kind, factory="Flat", dim=dim, rows=rows, shards=shards,
                           nlist=None, pq_m=None, pq_nbits=None, train_size=0, rescore="none",
                           rescore_multiplier=None, nprobe=None, memory_budget=budget, ram_bytes=ram,
                           rescore_bytes=0, reasoning=reasons, overrides=overrides)

    rescore_row = {"int8": dim, "fp16": 2 * dim, "none": 0}[rescore]
    if rows == 0:
        return flat("empty run: an empty flat index (searches return nothing)")
    if kind == "flat":
        return flat("flat as asked: exact inner-product search")

    if kind == "binary-rerank":
        factory = cfg.factory or "BFlat"
        nlist, _, _ = _describe_factory_ivf(factory, dim, binary=True) if cfg.factory else (None, None, None)
        if nlist is not None and rows < nlist:
            return flat(f"{rows} vectors cannot train a binary IVF with {nlist} lists: flat instead")
        code = _binary_bits(dim) // 8
        ram = rows * (code + ID_BYTES) + (nlist or 0) * code
        if nlist is None and rescore != "int8":
            train = 0  # BFlat + fp16: nothing to train or calibrate
        else:
            train = min(cfg.train_size or max(CALIBRATION_ROWS, (nlist or 0) * TRAIN_PER_LIST), rows)
            train = _leave_gate_out(train, rows, cfg)
        reasons.append(f"binary codes: {dim} sign bits packed into {code} bytes per vector "
                       f"({dim * 4 / code:.0f}x smaller than float32), {factory} (Hamming search)")
        if rescore != "none":
            reasons.append(f"rescore vectors {rescore} ({rescore_row} B/vector) beside each shard, memory-mapped; "
                           f"calibrated on {train:,} sampled vectors")
        if budget is not None and ram > budget:
            raise ConfigError(f"binary codes for {rows:,} vectors need ~{human_bytes(ram)} of RAM, over the memory "
                              f"budget of {human_bytes(budget)}; raise --memory-budget")
        return IndexParams(kind="binary-rerank", requested_kind=cfg.kind, factory=factory, dim=dim, rows=rows,
                           shards=shards, nlist=nlist, pq_m=None, pq_nbits=None, train_size=train, rescore=rescore,
                           rescore_multiplier=cfg.rescore_multiplier, nprobe=cfg.nprobe if nlist else None,
                           memory_budget=budget, ram_bytes=ram, rescore_bytes=rows * rescore_row, reasoning=reasons,
                           overrides=overrides)

    # --- ivfpq --------------------------------------------------------------------------------
    explicit = cfg.factory is not None or cfg.nlist is not None or cfg.pq_m is not None
    if rows < FLAT_BELOW and not explicit:
        return flat(f"{rows:,} vectors < {FLAT_BELOW:,}: an IVF index would not be faster and its lists could "
                    "not be trained well, so flat (exact) instead of IVF-PQ")
    nbits = cfg.pq_nbits or DEFAULT_PQ_NBITS
    if cfg.factory:
        factory = cfg.factory
        nlist, pq_m, f_nbits = _describe_factory_ivf(factory, dim, binary=False)
        if nlist is None:
            raise ConfigError(f"factory {factory!r} has no IVF stage; use --kind flat for exact search, or an "
                              "IVF factory such as 'IVF1024,PQ48x4fs'")
        nbits = f_nbits or nbits
        reasons.append(f"factory {factory!r} as asked ({nlist} lists" + (f", PQ{pq_m}x{nbits}" if pq_m else "") + ")")
    else:
        if cfg.nlist:
            nlist = cfg.nlist
            reasons.append(f"{nlist} lists as asked")
        else:
            target = 4 * math.sqrt(rows)
            nlist = min(_pow2_near(target), _floor_pow2(rows / MIN_TRAIN_PER_LIST))
            nlist = max(nlist, 1)
            reasons.append(f"{nlist} lists: ~4*sqrt(N) = {target:.0f} rounded to a power of two, at most "
                           f"N/{MIN_TRAIN_PER_LIST} = {rows // MIN_TRAIN_PER_LIST} so each list trains on "
                           f">= {MIN_TRAIN_PER_LIST} points")
        if cfg.pq_m:
            if dim % cfg.pq_m:
                raise ConfigError(f"pq_m={cfg.pq_m} must divide the dimension {dim}")
            pq_m = cfg.pq_m
            reasons.append(f"PQ{pq_m}x{nbits} as asked ({_code_bytes(pq_m, nbits)} B/vector)")
        else:
            # The largest sub-quantizer count that divides dim, compresses >= 8x and fits the budget.
            # With rescore vectors the codes only have to find candidates: 2 dims per sub-quantizer
            # (16x with 4-bit codes) trains faster than 1 and, on MiniLM vectors, gave the same
            # recall after the rerank (benchmarks/bench_index.py).
            max_m = dim // 2 if rescore != "none" and dim >= 2 else dim
            cands = [m for m in range(max_m, 0, -1) if dim % m == 0 and _code_bytes(m, nbits) * 8 <= dim * 4]
            fits = [m for m in cands if budget is None or ivf_ram(rows, dim, nlist, shards, _code_bytes(m, nbits),
                                                                  nbits == 4) <= budget]
            if not fits:
                smallest = ivf_ram(rows, dim, nlist, shards, _code_bytes(cands[-1], nbits), nbits == 4) if cands else 0
                raise ConfigError(f"{rows:,} vectors do not fit a memory budget of {human_bytes(budget or 0)} even "
                                  f"with the smallest PQ code (~{human_bytes(smallest)}); raise --memory-budget")
            pq_m = fits[0]
            code = _code_bytes(pq_m, nbits)
            why = "fits the memory budget of " + human_bytes(budget) if budget else "no memory budget given"
            reasons.append(f"PQ{pq_m}x{nbits}: {code} B/vector, {dim * 4 / code:.0f}x smaller than float32; the "
                           f"largest code with {dim // pq_m} dim(s) per sub-quantizer"
                           + (" (rescore vectors re-rank its candidates)" if rescore != "none" else "")
                           + f" and >= 8x compression ({why})")
        fs = "fs" if nbits == 4 else "np"  # 4-bit: SIMD fast scan; 8-bit: no polysemous training (slow, unused)
        factory = f"IVF{nlist},PQ{pq_m}x{nbits}{fs}" if nbits != 8 else f"IVF{nlist},PQ{pq_m}np"
    if rows < nlist:
        return flat(f"{rows:,} vectors cannot train {nlist} IVF lists: flat instead")
    code = _code_bytes(pq_m or 0, nbits) if pq_m else dim * 4
    ram = ivf_ram(rows, dim, nlist, shards, code, "fs" in factory.split(",")[-1])
    reasons.append(f"estimated RAM {human_bytes(ram)} over {max(shards, 1)} shard(s): {rows * dim * 4 / ram:.1f}x "
                   "smaller than float32, counting ids, each shard's centroids and fast-scan block padding")
    if budget is not None and ram > budget:
        raise ConfigError(f"{factory} over {rows:,} vectors needs ~{human_bytes(ram)} of RAM, over the memory budget "
                          f"of {human_bytes(budget)}; lower pq_m or raise --memory-budget")
    if cfg.train_size:
        train = min(cfg.train_size, rows)
        reasons.append(f"training on {train:,} vectors as asked")
    else:
        lo = max(MIN_TRAIN_PER_LIST * nlist, MIN_TRAIN_PER_LIST * (1 << nbits) if pq_m else 0)
        train = min(rows, max(lo, min(TRAIN_PER_LIST * nlist, MAX_TRAIN_PER_LIST * nlist)))
        train = _leave_gate_out(train, rows, cfg)
        reasons.append(f"training on {train:,} sampled vectors ({train / nlist:.0f} per list; FAISS guidance "
                       f"30-256)")
    if rescore != "none":
        times = cfg.rescore_multiplier or "multiplier (tuned by the gate)"
        reasons.append(f"rescore: top k x {times} PQ candidates per shard re-ranked with {rescore} vectors "
                       f"({rescore_row} B/vector on disk, memory-mapped)")
    return IndexParams(kind="ivfpq", requested_kind=cfg.kind, factory=factory, dim=dim, rows=rows, shards=shards,
                       nlist=nlist, pq_m=pq_m, pq_nbits=nbits if pq_m else None, train_size=train, rescore=rescore,
                       rescore_multiplier=cfg.rescore_multiplier if rescore != "none" else None, nprobe=cfg.nprobe, memory_budget=budget, ram_bytes=ram,
                       rescore_bytes=rows * rescore_row, reasoning=reasons, overrides=overrides)


# =============================================================================================
# quantization helpers (pure numpy)
# =============================================================================================


def pack_sign_bits(x: np.ndarray) -> np.ndarray:
    """``ubinary``: one bit per dimension (1 where > 0), packed big-endian. [n, d] -> [n, ceil(d/8)] uint8."""
    return np.packbits(np.asarray(x) > 0, axis=-1)


def int8_ranges(sample: np.ndarray) -> np.ndarray:
    """Per-dimension [min, max] of a calibration sample: [2, d] float32."""
    if len(sample) == 0:
        raise ValueError("cannot calibrate int8 ranges on an empty sample")
    lo = sample.min(axis=0).astype(np.float32)
    hi = sample.max(axis=0).astype(np.float32)
    hi = np.where(hi > lo, hi, lo + 1e-6).astype(np.float32)  # a constant dimension still gets a step
    return np.stack([lo, hi])


def _int8_step(ranges: np.ndarray) -> np.ndarray:
    return ((ranges[1] - ranges[0]) / 255.0).astype(np.float32)


def quantize_int8(x: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """255 buckets per dimension over the calibrated range (values outside are clipped). [n, d] int8."""
    step = _int8_step(ranges)
    q = np.rint((np.asarray(x, dtype=np.float32) - ranges[0]) / step) - 128.0
    return np.clip(q, -128, 127).astype(np.int8)


def dequantize_int8(codes: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    return (ranges[0] + (codes.astype(np.float32) + 128.0) * _int8_step(ranges)).astype(np.float32)


def encode_rescore(x: np.ndarray, dtype: str, ranges: np.ndarray | None) -> np.ndarray:
    """The stored rescore vectors: int8 [n, d] (needs ``ranges``) or float16 [n, d]."""
    if dtype == "int8":
        if ranges is None:
            raise ValueError("int8 rescore vectors need calibrated ranges")
        return quantize_int8(x, ranges)
    if dtype == "fp16":
        return np.asarray(x, dtype=np.float16)
    raise ValueError(f"no rescore vectors for dtype {dtype!r}")


def rescore_scores(queries: np.ndarray, candidates: np.ndarray, dtype: str, ranges: np.ndarray | None) -> np.ndarray:
    """Inner products of each query with its candidates' stored vectors.

    queries [q, d] float32; candidates [q, c, d] int8 or float16 -> scores [q, c] float32. One
    matrix-vector product per query, so a query scores the same alone or in any batch.
    """
    q = np.asarray(queries, dtype=np.float32)
    if dtype == "int8":
        if ranges is None:
            raise ValueError("int8 rescore vectors need calibrated ranges")
        cand = dequantize_int8(candidates, ranges)  # [q, c, d]
    else:
        cand = np.asarray(candidates, dtype=np.float32)
    return np.matmul(cand, q[:, :, None])[:, :, 0]


# =============================================================================================
# reading runs
# =============================================================================================


@dataclass(frozen=True)
class PartRef:
    key: str  # store-relative key of an embeddings Parquet part
    rows: int
    sha256: str | None
    start: int  # global row id of its first row


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    manifest: dict[str, Any]
    manifest_sha256: str
    parts: tuple[PartRef, ...]
    rows: int
    dim: int
    metric: str
    model: dict[str, Any]

    def fingerprint(self) -> list[list[Any]]:
        return [[p.key, p.rows, p.sha256] for p in self.parts]


def read_run(store: Store, run_id: str) -> RunInfo:
    """The embed run's manifest and its embedding parts (in manifest order, with global row offsets)."""
    key = layout.run_manifest_key(run_id)
    try:
        raw = store.read_bytes(key)
    except NotFoundError:
        raise NotFoundError(f"run {run_id!r} not found in {store.describe()} (no {key}); list runs under "
                            f"{store.describe('runs')}") from None
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as err:
        raise IntegrityError(f"{store.describe(key)} is not valid JSON: {err}") from None
    status = manifest.get("status")
    if status != "succeeded":
        raise ConfigError(f"run {run_id!r} is not complete (status {status!r}); rerun its embed command to finish "
                          "it (it resumes), then build the index")
    model = manifest.get("model")
    dim = manifest.get("dim") or (model or {}).get("dim")
    if not isinstance(model, dict) or not dim:
        raise SchemaError(f"run {run_id!r} manifest names no model identity or dimension")
    outputs = (manifest.get("outputs") or {}).get("embeddings")
    if outputs is None:
        raise SchemaError(f"run {run_id!r} manifest lists no embeddings outputs")
    parts: list[PartRef] = []
    start = 0
    for out in outputs:
        rows = int(out.get("rows", 0))
        if rows <= 0:
            continue
        part_key = check_key(str(out["key"]))
        if not part_key.startswith(layout.run_prefix(run_id) + "/"):
            part_key = join(layout.run_prefix(run_id), part_key)
        parts.append(PartRef(part_key, rows, out.get("sha256"), start))
        start += rows
    metric = str(manifest.get("metric") or "cosine")
    if metric not in ("cosine", "ip"):
        raise SchemaError(f"run {run_id!r} has metric {metric!r}; indexes support cosine/ip (normalised vectors)")
    return RunInfo(run_id, manifest, hashlib.sha256(raw).hexdigest(), tuple(parts), start, int(dim), metric, model)


def vectors_from_column(col: pa.ChunkedArray | pa.Array, dim: int, where: str = "") -> np.ndarray:
    """A ``fixed_size_list<float16|float32>[dim]`` column as float32 [n, dim]."""
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not pa.types.is_fixed_size_list(arr.type) or arr.type.list_size != dim:
        raise SchemaError(f"{where}: embedding column has type {arr.type}, expected fixed_size_list<float>[{dim}]")
    if arr.null_count:
        raise SchemaError(f"{where}: {arr.null_count} null embeddings")
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    out = np.array(flat, dtype=np.float32).reshape(len(arr), dim)  # a writable copy
    if not np.isfinite(out).all():
        raise SchemaError(f"{where}: embeddings contain NaN or infinity")
    return out


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise in place (zero rows stay zero): stored fp16 vectors drift off unit length."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, np.maximum(norms, 1e-12), out=x)
    return x


def read_part(store: Store, part: PartRef, dim: int, *, columns: Sequence[str] = ("chunk_id", "doc_id"),
              rows: np.ndarray | slice | None = None) -> tuple[np.ndarray, dict[str, pa.Array]]:
    """Vectors [n, dim] float32 (normalised) and the requested columns of one part (or some of its rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = store.describe(part.key)
    try:
        with store.arrow_filesystem().open_input_file(store.arrow_path(part.key)) as f:
            table = pq.read_table(f, columns=["embedding", *columns])
    except (OSError, pa.ArrowInvalid) as err:
        raise SchemaError(f"cannot read {where}: {err}") from None
    except KeyError as err:
        raise SchemaError(f"{where} lacks a column: {err}") from None
    if table.num_rows != part.rows:
        raise IntegrityError(f"{where} has {table.num_rows} rows, the run manifest says {part.rows}")
    if isinstance(rows, slice):
        table = table.slice(rows.start or 0, (rows.stop or table.num_rows) - (rows.start or 0))
    elif rows is not None:
        table = table.take(pa.array(rows, type=pa.int64()))
    vecs = normalize_rows(vectors_from_column(table.column("embedding"), dim, where))
    return vecs, {c: table.column(c).combine_chunks() for c in columns}


@dataclass(frozen=True)
class _RowsRequest:
    store: Store
    part: PartRef
    dim: int
    rows: tuple[int, ...]  # row positions inside the part


def _read_rows(req: _RowsRequest) -> np.ndarray:
    vecs, _ = read_part(req.store, req.part, req.dim, columns=(), rows=np.asarray(req.rows, dtype=np.int64))
    return vecs


def gather_rows(store: Store, run: RunInfo, ids: np.ndarray, mapper: Mapper = local_mapper) -> np.ndarray:
    """Vectors of the global row ``ids`` (sorted or not), reading only the parts that hold them."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.zeros((len(ids), run.dim), dtype=np.float32)
    if len(ids) == 0:
        return out
    starts = np.array([p.start for p in run.parts], dtype=np.int64)
    part_of = np.searchsorted(starts, ids, side="right") - 1
    reqs, slots = [], []
    for pi in np.unique(part_of):
        sel = np.nonzero(part_of == pi)[0]
        part = run.parts[int(pi)]
        reqs.append(_RowsRequest(store, part, run.dim, tuple(int(i) for i in ids[sel] - part.start)))
        slots.append(sel)
    for sel, vecs in zip(slots, _ordered(mapper, _read_rows, reqs)):
        out[sel] = vecs
    return out


def _ordered(mapper: Mapper, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """Results in item order whatever order the mapper yields them in."""
    tagged = list(mapper(_Tagged(fn), list(enumerate(items))))
    return [r for _, r in sorted(tagged, key=lambda t: t[0])]


@dataclass(frozen=True)
class _Tagged:
    fn: Callable[[Any], Any]

    def __call__(self, item: tuple[int, Any]) -> tuple[int, Any]:
        return item[0], self.fn(item[1])


def read_run_vectors(store: Store, run_id: str) -> tuple[np.ndarray, list[str], list[str]]:
    """Every vector of a run with its chunk and doc ids (exact baselines, small runs)."""
    run = read_run(store, run_id)
    vecs, chunk_ids, doc_ids = [], [], []
    for part in run.parts:
        v, cols = read_part(store, part, run.dim)
        vecs.append(v)
        chunk_ids += cols["chunk_id"].to_pylist()
        doc_ids += cols["doc_id"].to_pylist()
    mat = np.concatenate(vecs) if vecs else np.zeros((0, run.dim), dtype=np.float32)
    return mat, chunk_ids, doc_ids


# =============================================================================================
# versions: ids, listing, verification
# =============================================================================================


def new_version_id(now: datetime | None = None) -> str:
    """``v<UTC yyyymmddHHMMSS>-<6 hex>``: sorts by creation time as a string, to the microsecond
    (the first 5 hex digits are the microseconds; the last is random)."""
    now = now or datetime.now(timezone.utc)
    return f"v{now:%Y%m%d%H%M%S}-{now.microsecond:05x}{secrets.randbelow(16):x}"


def list_versions(store: Store, index: str) -> list[str]:
    """Complete versions (those with a manifest) of ``index``, oldest first."""
    prefix = join(layout.index_prefix(index), "versions")
    out = []
    for key in store.list(prefix):
        rest = key[len(prefix) + 1:].split("/")
        if len(rest) == 2 and rest[1] == "manifest.json":
            out.append(rest[0])
    return sorted(out)


def read_version_manifest(store: Store, index: str, version_id: str) -> dict[str, Any]:
    key = layout.version_manifest_key(index, version_id)
    try:
        manifest = store.read_json(key)
    except NotFoundError:
        raise NotFoundError(f"version {version_id!r} of index {index!r} not found in {store.describe()} (no "
                            f"manifest: it does not exist or its build never finished)") from None
    if not isinstance(manifest, dict):
        raise IntegrityError(f"{store.describe(key)} is not a JSON object")
    if manifest.get("version_id") != version_id:
        raise IntegrityError(f"{store.describe(key)} describes version {manifest.get('version_id')!r}, "
                             f"not {version_id!r}")
    return manifest


def _check_manifest_shape(manifest: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    for name in ("version_id", "dim", "kind", "shards", "artifacts", "model"):
        if name not in manifest:
            raise IntegrityError(f"{where} lacks {name!r}; it is not an index version manifest")
    artifacts = manifest["artifacts"]
    if not isinstance(artifacts, list) or not all(isinstance(a, Mapping) and {"key", "bytes", "sha256"} <= set(a)
                                                  for a in artifacts):
        raise IntegrityError(f"{where}: 'artifacts' must be a list of {{key, bytes, sha256}}")
    listed = set()
    for art in artifacts:
        key = check_key(str(art["key"]))
        if key == "manifest.json" or key != art["key"]:
            raise IntegrityError(f"{where}: artifact key {art['key']!r} is not a plain relative key of the version")
        listed.add(key)
    for shard in manifest["shards"]:
        for role, key in (shard.get("files") or {}).items():
            if key not in listed:
                raise IntegrityError(f"{where}: shard {shard.get('shard')} file {role}={key!r} is not in artifacts")
    for role, key in (manifest.get("files") or {}).items():
        if key not in listed:
            raise IntegrityError(f"{where}: file {role}={key!r} is not in artifacts")
    return list(artifacts)


def verify_version(store: Store, index: str, version_id: str, *,
                   files: Mapping[str, str | os.PathLike[str]] | None = None) -> dict[str, Any]:
    """Check that a version is complete and intact; return its manifest.

    Every artifact key must be a safe relative key (``storage.check_key``), exist in the store
    with the size the manifest records, and hash to its sha256 — hashed from ``files`` (artifact
    key -> local copy, e.g. a searcher's download cache) when given, else streamed from the
    store. Raises IntegrityError naming the first bad file, NotFoundError for a missing version.
    """
    manifest = read_version_manifest(store, index, version_id)
    verify_artifacts(store, index, manifest, files=files)
    return manifest


def verify_artifacts(store: Store, index: str, manifest: Mapping[str, Any], *,
                     files: Mapping[str, str | os.PathLike[str]] | None = None) -> None:
    """``verify_version`` for a manifest in hand (the build's gate checks a version before it commits)."""
    from concurrent.futures import ThreadPoolExecutor

    version_id = str(manifest.get("version_id"))
    where = store.describe(layout.version_manifest_key(index, version_id))
    if manifest.get("index", index) != index:
        raise IntegrityError(f"{where} describes index {manifest.get('index')!r}, not {index!r}")
    artifacts = _check_manifest_shape(manifest, where)
    prefix = layout.version_prefix(index, version_id)
    local = {k: os.fspath(v) for k, v in (files or {}).items()}

    def check(art: Mapping[str, Any]) -> None:
        key = str(art["key"])
        full = join(prefix, key)
        try:
            size = store.size(full)
        except NotFoundError:
            raise IntegrityError(f"{store.describe(full)} is missing (listed in {where})") from None
        if size != int(art["bytes"]):
            raise IntegrityError(f"{store.describe(full)} is {size} bytes; the manifest says {art['bytes']}")
        if key in local:
            if os.path.getsize(local[key]) != size:
                raise IntegrityError(f"local copy {local[key]} of {store.describe(full)} has the wrong size")
            got = sha256_file(local[key])
        elif isinstance(store, LocalStore):
            got = sha256_file(store.local_path(full))
        else:
            got = store.sha256(full)
        if got != art["sha256"]:
            raise IntegrityError(f"{store.describe(full)} is corrupt: sha256 {got[:12]}..., the manifest says "
                                 f"{str(art['sha256'])[:12]}...; rebuild or re-upload this version")

    if artifacts:
        with ThreadPoolExecutor(max_workers=min(8, len(artifacts))) as pool:
            list(pool.map(check, artifacts))


# =============================================================================================
# FAISS helpers
# =============================================================================================


def import_faiss() -> Any:
    """``import faiss``, with OpenMP threads that sleep instead of spinning while they wait.

    On a machine shared with other busy processes (CI, a Ray node), spinning OpenMP threads
    turned a 0.8 s PQ training into 40 s here; passive waiting costs little when the machine is
    idle. Effective only if set before libgomp loads; an explicit OMP_WAIT_POLICY wins.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import faiss

    return faiss


def make_float_index(factory: str, dim: int) -> faiss.Index:
    faiss = import_faiss()
    if factory == "Flat":
        return faiss.IndexIDMap(faiss.IndexFlatIP(dim))
    idx = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(idx)
    if ivf is not None:
        ivf = faiss.downcast_index(ivf)
        if hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False  # minutes of training for a search mode we never use
    return idx


def make_binary_index(factory: str, dim: int) -> faiss.IndexBinary:
    """``BFlat``: a bare IndexBinaryFlat holding only the codes — its result positions are rows of
    the shard's id map (``id_mode: row``), which saves the 8-byte id per vector an IDMap would
    keep in RAM (1/7 of a 384-bit code). Other factories keep global ids."""
    faiss = import_faiss()
    bits = _binary_bits(dim)
    if factory == "BFlat":
        return faiss.IndexBinaryFlat(bits)
    return faiss.index_binary_factory(bits, factory)


def id_mode_for(kind: str, factory: str) -> str:
    """``row``: the FAISS file returns positions in the shard's id map; ``global``: it returns ids."""
    return "row" if kind == "binary-rerank" and factory == "BFlat" else "global"


def index_to_bytes(index: Any, binary: bool) -> bytes:
    faiss = import_faiss()
    arr = faiss.serialize_index_binary(index) if binary else faiss.serialize_index(index)
    return arr.tobytes()


def index_from_bytes(data: bytes, binary: bool) -> Any:
    faiss = import_faiss()
    arr = np.frombuffer(data, dtype=np.uint8)
    return faiss.deserialize_index_binary(arr) if binary else faiss.deserialize_index(arr)


# =============================================================================================
# shard tasks
# =============================================================================================


@dataclass(frozen=True)
class ShardTask:
    """Everything one shard task needs (picklable: it travels to Ray workers)."""

    store: Store
    index: str
    version_id: str
    state_prefix: str  # indexes/<name>/builds/<build key>
    shard: int
    id_start: int
    id_end: int
    parts: tuple[PartRef, ...]  # the parts overlapping [id_start, id_end)
    dim: int
    kind: str
    factory: str
    trained: dict[str, Any] | None  # {"key", "sha256", "bytes"} of the trained empty index
    rescore: str
    ranges: np.ndarray | None  # [2, dim] int8 calibration
    gate_queries: np.ndarray  # [g, dim] float32
    gate_depth: int  # exact neighbours per gate query to return
    threads: int | None = None  # FAISS OpenMP threads inside the task (None: leave as is)


def shard_files(shard: int, rescore: str) -> dict[str, str]:
    base = f"shards/shard-{shard:05d}"
    files = {"index": f"{base}.faiss", "ids": f"{base}.ids.parquet"}
    if rescore != "none":
        files["rescore"] = f"{base}.rescore.npy"
    return files


def _marker_key(state_prefix: str, shard: int) -> str:
    return join(state_prefix, f"shard-{shard:05d}.json")


def _exact_key(state_prefix: str, shard: int) -> str:
    return join(state_prefix, f"shard-{shard:05d}.exact.npz")


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _committed(store: Store, prefix: str, marker: Mapping[str, Any]) -> bool:
    """A shard marker counts only while every file it names is in the store with its size."""
    try:
        return all(store.size(join(prefix, f["key"])) == f["bytes"] for f in marker["files"].values())
    except NotFoundError:
        return False


def exact_topk(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top ``depth``: (scores [q, depth] float32, ids [q, depth] int64, -1 padded)."""
    q = len(queries)
    scores = np.full((q, depth), -np.inf, dtype=np.float32)
    out = np.full((q, depth), -1, dtype=np.int64)
    if q == 0 or len(vectors) == 0:
        return scores, out
    faiss = import_faiss()
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
    kk = min(depth, len(vectors))
    d, i = flat.search(np.ascontiguousarray(queries, dtype=np.float32), kk)
    scores[:, :kk] = d
    out[:, :kk] = np.where(i >= 0, ids[np.clip(i, 0, None)], -1)
    return scores, out


def merge_topk(scores: Sequence[np.ndarray], ids: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard results [q, k_s] into the global top ``k`` (ties broken by smaller id)."""
    s = np.concatenate(scores, axis=1) if scores else np.zeros((0, 0), dtype=np.float32)
    i = np.concatenate(ids, axis=1) if ids else np.zeros((0, 0), dtype=np.int64)
    s = np.where(i >= 0, s, -np.inf)
    order = np.lexsort((i, -s), axis=-1)[:, :k]
    s_top = np.take_along_axis(s, order, axis=1)
    i_top = np.take_along_axis(i, order, axis=1)
    if s_top.shape[1] < k:
        pad = k - s_top.shape[1]
        s_top = np.pad(s_top, ((0, 0), (0, pad)), constant_values=-np.inf)
        i_top = np.pad(i_top, ((0, 0), (0, pad)), constant_values=-1)
    return s_top.astype(np.float32), i_top.astype(np.int64)


def build_shard(task: ShardTask) -> dict[str, Any]:
    """Build, upload and commit one index shard; idempotent (a committed shard is returned as is).

    Returns the shard's marker: ``{"shard", "rows", "id_start", "id_end", "files": {role: {key,
    bytes, sha256}}, "seconds", "skipped"}`` plus ``"exact": {"scores", "ids"}`` arrays.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = task.store
    prefix = layout.version_prefix(task.index, task.version_id)
    mkey = _marker_key(task.state_prefix, task.shard)
    if store.exists(mkey):
        marker = store.read_json(mkey)
        if _committed(store, prefix, marker) and store.exists(_exact_key(task.state_prefix, task.shard)):
            exact = _load_npz(store.read_bytes(_exact_key(task.state_prefix, task.shard)))
            return {**marker, "exact": exact, "skipped": True}
    faiss = import_faiss()
    if task.threads:
        faiss.omp_set_num_threads(task.threads)
    t0, cpu0 = time.perf_counter(), time.process_time()
    vec_parts, chunk_parts, doc_parts = [], [], []
    for part in task.parts:
        lo = max(task.id_start, part.start) - part.start
        hi = min(task.id_end, part.start + part.rows) - part.start
        v, cols = read_part(store, part, task.dim, rows=slice(lo, hi))
        vec_parts.append(v)
        chunk_parts.append(cols["chunk_id"])
        doc_parts.append(cols["doc_id"])
    vecs = np.concatenate(vec_parts) if vec_parts else np.zeros((0, task.dim), dtype=np.float32)
    ids = np.arange(task.id_start, task.id_end, dtype=np.int64)
    if len(vecs) != len(ids):
        raise IntegrityError(f"shard {task.shard}: read {len(vecs)} vectors for ids [{task.id_start}, {task.id_end})")
    t_read = time.perf_counter() - t0

    # Exact neighbours of the gate queries within this shard (merged by the driver).
    ex_scores, ex_ids = exact_topk(task.gate_queries, vecs, ids, task.gate_depth)

    binary = task.kind == "binary-rerank"
    if task.trained is not None:
        trained = store.read_bytes(join(prefix, task.trained["key"]))
        if hashlib.sha256(trained).hexdigest() != task.trained["sha256"]:
            raise IntegrityError(f"trained quantizer {store.describe(join(prefix, task.trained['key']))} is corrupt")
        index = index_from_bytes(trained, binary)
    else:
        index = make_binary_index(task.factory, task.dim) if binary else make_float_index(task.factory, task.dim)
    t1 = time.perf_counter()
    x = pack_sign_bits(vecs) if binary else vecs
    if id_mode_for(task.kind, task.factory) == "row":
        index.add(x)
    else:
        index.add_with_ids(x, ids)
    t_add = time.perf_counter() - t1

    names = shard_files(task.shard, task.rescore)
    tmp = tempfile.mkdtemp(prefix="embedctl-shard-")
    try:
        paths = {role: os.path.join(tmp, os.path.basename(key)) for role, key in names.items()}
        (faiss.write_index_binary if binary else faiss.write_index)(index, paths["index"])
        table = pa.table({"id": pa.array(ids, type=pa.int64()),
                          "chunk_id": pa.concat_arrays(chunk_parts) if chunk_parts else pa.array([], pa.string()),
                          "doc_id": pa.concat_arrays(doc_parts) if doc_parts else pa.array([], pa.string())})
        pq.write_table(table, paths["ids"], compression="zstd", write_statistics=True)
        if "rescore" in paths:
            np.save(paths["rescore"], encode_rescore(vecs, task.rescore, task.ranges), allow_pickle=False)
        files = {}
        for role, key in names.items():
            digest = store.upload_file(join(prefix, key), paths[role])
            files[role] = {"key": key, "bytes": os.path.getsize(paths[role]), "sha256": digest}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    marker = {"shard": task.shard, "rows": int(len(ids)), "id_start": task.id_start, "id_end": task.id_end,
              "id_mode": id_mode_for(task.kind, task.factory),
              "files": files, "seconds": {"read": round(t_read, 3), "add": round(t_add, 3),
                                          "total": round(time.perf_counter() - t0, 3),
                                          "cpu": round(time.process_time() - cpu0, 3)}}
    store.write_bytes(_exact_key(task.state_prefix, task.shard), _npz_bytes(scores=ex_scores, ids=ex_ids))
    store.write_json(mkey, marker)  # the commit point of this shard
    return {**marker, "exact": {"scores": ex_scores, "ids": ex_ids}, "skipped": False}


# =============================================================================================
# the build
# =============================================================================================


@dataclass
class BuildResult:
    index: str
    version_id: str
    manifest: dict[str, Any]
    reused: bool  # the same build had already finished: nothing was rebuilt
    resumed: bool  # an interrupted build was continued

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {"index": self.index, "version": self.version_id, "kind": m["kind"], "rows": m["counts"]["vectors"],
                "shards": len(m["shards"]), "dim": m["dim"], "recall_gate": m["recall_gate"],
                "params": {k: m["params"].get(k) for k in ("factory", "nlist", "pq_m", "pq_nbits", "nprobe",
                                                           "rescore", "rescore_multiplier", "ram_bytes")},
                "timings": m["timings"], "reused": self.reused, "resumed": self.resumed,
                "bytes": sum(a["bytes"] for a in m["artifacts"])}


def build_key_for(run: RunInfo, cfg: BuildConfig) -> str:
    ident = {"run_id": run.run_id, "inputs": run.fingerprint(), "config": cfg.to_dict(), "format": MANIFEST_FORMAT}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sample_ids(rows: int, train_size: int, gate: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Training ids and gate query ids (disjoint when the corpus allows), sorted."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(rows) if rows <= 10_000_000 else None
    if perm is None:  # very large corpora: sample without materialising a full permutation
        chosen = np.unique(rng.integers(0, rows, size=train_size + gate * 2, dtype=np.int64))
        rng.shuffle(chosen)
        perm = chosen
    train = np.sort(perm[:train_size])
    rest = perm[train_size:]
    if len(rest) >= 1:
        g = np.sort(rest[:gate])
        how = "held-out corpus vectors (not in the training sample), the query's own vector excluded"
    else:
        g = np.sort(perm[:gate])
        how = "corpus vectors (the training sample is the whole corpus), the query's own vector excluded"
    return train.astype(np.int64), g.astype(np.int64), how


def _shard_ranges(rows: int, shards: int) -> list[tuple[int, int]]:
    if shards == 0:
        return []
    bounds = np.linspace(0, rows, shards + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _parts_for(run: RunInfo, start: int, end: int) -> tuple[PartRef, ...]:
    return tuple(p for p in run.parts if p.start < end and p.start + p.rows > start)


def _upload_bytes(store: Store, key: str, data: bytes) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(prefix="embedctl-", delete=False) as f:
        f.write(data)
        path = f.name
    try:
        digest = store.upload_file(key, path)
    finally:
        os.unlink(path)
    return {"bytes": len(data), "sha256": digest}


class _Builder:
    """One build: holds the run, the config, the state keys; each method is one step."""

    def __init__(self, store: Store, run: RunInfo, index: str, cfg: BuildConfig, *, mapper: Mapper,
                 progress: Progress | None, parallelism: int, task_threads: int | None):
        self.store, self.run, self.index, self.cfg = store, run, index, cfg
        self.mapper, self.progress = mapper, progress
        self.parallelism, self.task_threads = parallelism, task_threads
        self.key = build_key_for(run, cfg)
        self.state_prefix = join(layout.index_prefix(index), "builds", self.key[:24])
        self.state_key = join(self.state_prefix, "state.json")
        self.timings: dict[str, float] = {}

    def emit(self, event: str, **info: Any) -> None:
        log.info("build %s: %s %s", self.index, event, {k: v for k, v in info.items() if k != "exact"})
        if self.progress:
            self.progress({"event": event, "index": self.index, **info})

    # --- state --------------------------------------------------------------------------------
    def read_state(self) -> dict[str, Any] | None:
        try:
            return self.store.read_json(self.state_key)
        except NotFoundError:
            return None

    def write_state(self, state: dict[str, Any]) -> None:
        self.store.write_json(self.state_key, state)

    # --- steps --------------------------------------------------------------------------------
    def sample(self, params: IndexParams, state: dict[str, Any]) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, str]:
        """(training vectors or None when a trained quantizer exists, gate vectors, gate ids, how)."""
        t0 = time.perf_counter()
        gate_n = min(self.cfg.gate_queries, params.rows)
        train_ids, gate_ids, how = _sample_ids(params.rows, params.train_size, gate_n, self.cfg.seed)
        gate_key = join(self.state_prefix, "gate.npz")
        need_train = params.train_size > 0 and "trained_at" not in state
        if not need_train and self.store.exists(gate_key):
            saved = _load_npz(self.store.read_bytes(gate_key))
            if np.array_equal(saved["ids"], gate_ids):
                self.timings["sample_s"] = time.perf_counter() - t0
                return None, saved["vectors"], gate_ids, how
        want = np.union1d(train_ids, gate_ids) if need_train else gate_ids
        vecs = gather_rows(self.store, self.run, want, self.mapper)
        pos = {int(i): n for n, i in enumerate(want)}
        gate_vecs = vecs[[pos[int(i)] for i in gate_ids]] if len(gate_ids) else np.zeros((0, params.dim), np.float32)
        train_vecs = vecs[[pos[int(i)] for i in train_ids]] if need_train else None
        self.store.write_bytes(gate_key, _npz_bytes(ids=gate_ids, vectors=gate_vecs))
        self.timings["sample_s"] = time.perf_counter() - t0
        self.emit("sampled", train=len(train_ids) if need_train else 0, gate=len(gate_ids))
        return train_vecs, gate_vecs, gate_ids, how

    def train(self, params: IndexParams, sample: np.ndarray | None, state: dict[str, Any], prefix: str) -> None:
        """Train the quantizer and calibrate int8 ranges once; both become version artifacts."""
        if sample is None:
            self.timings["train_s"] = 0.0
            if "trained_at" in state:
                self.emit("trained", reused=True, seconds=0.0)
            return
        t0 = time.perf_counter()
        trained: dict[str, Any] = {}
        binary = params.kind == "binary-rerank"
        if params.trained:
            faiss = import_faiss()
            faiss.omp_set_num_threads(os.cpu_count() or 1)
            index = make_binary_index(params.factory, params.dim) if binary else make_float_index(params.factory,
                                                                                                   params.dim)
            index.train(pack_sign_bits(sample) if binary else sample)
            trained["trained"] = {"key": TRAINED_KEY, **_upload_bytes(self.store, join(prefix, TRAINED_KEY),
                                                                      index_to_bytes(index, binary))}
        if params.rescore == "int8":
            ranges = int8_ranges(sample)
            trained["ranges"] = {"key": RANGES_KEY, **_upload_bytes(self.store, join(prefix, RANGES_KEY),
                                                                    _npy_bytes(ranges))}
        state.update(trained)
        state["trained_at"] = _now_iso()
        self.write_state(state)  # from here on a crash resumes without retraining
        self.timings["train_s"] = time.perf_counter() - t0
        self.emit("trained", reused=False, seconds=round(self.timings["train_s"], 3), vectors=len(sample))

    def add_shards(self, params: IndexParams, state: dict[str, Any], gate_vecs: np.ndarray) -> list[dict[str, Any]]:
        prefix = layout.version_prefix(self.index, state["version_id"])
        ranges = None
        if params.rescore == "int8":
            data = self.store.read_bytes(join(prefix, state["ranges"]["key"]))
            ranges = np.load(io.BytesIO(data), allow_pickle=False)
        depth = 2 * self.cfg.gate_k + 1
        tasks = [ShardTask(store=self.store, index=self.index, version_id=state["version_id"],
                           state_prefix=self.state_prefix, shard=s, id_start=a, id_end=b,
                           parts=_parts_for(self.run, a, b), dim=params.dim, kind=params.kind,
                           factory=params.factory, trained=state.get("trained"), rescore=params.rescore,
                           ranges=ranges, gate_queries=gate_vecs, gate_depth=depth, threads=self.task_threads)
                 for s, (a, b) in enumerate(_shard_ranges(params.rows, params.shards))]
        t0 = time.perf_counter()
        results: dict[int, dict[str, Any]] = {}
        for res in self.mapper(build_shard, tasks):
            results[res["shard"]] = res
            self.emit("shard_done", shard=res["shard"], rows=res["rows"], skipped=res["skipped"],
                      done=len(results), total=len(tasks))
        self.timings["add_s"] = time.perf_counter() - t0
        built = [r["seconds"] for r in results.values() if not r["skipped"]]
        self.timings["add_task_s"] = sum(s["total"] for s in built)  # wall seconds inside the tasks
        self.timings["add_task_cpu_s"] = sum(s.get("cpu", 0.0) for s in built)  # their CPU seconds
        missing = [t.shard for t in tasks if t.shard not in results]
        if missing:
            raise IntegrityError(f"shards {missing} returned no result; rerun the build (it resumes)")
        return [results[s] for s in sorted(results)]

    def gate(self, params: IndexParams, manifest: dict[str, Any], shard_results: list[dict[str, Any]],
             gate_vecs: np.ndarray, gate_ids: np.ndarray, how: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Tune the default nprobe / rescore multiplier and measure recall@k; (recall_gate, tuning)."""
        from engine.index.searcher import Searcher

        t0 = time.perf_counter()
        k = self.cfg.gate_k
        depth = 2 * k + 1
        if not shard_results or len(gate_ids) == 0:
            return {"k": k, "queries": 0, "recall": None, "threshold": self.cfg.gate_recall, "passed": True,
                    "note": "no vectors: nothing to measure"}, {}
        ex = merge_topk([r["exact"]["scores"] for r in shard_results], [r["exact"]["ids"] for r in shard_results],
                        depth)
        ex_scores, ex_ids = _drop_self(ex[0], ex[1], gate_ids, depth - 1)
        searcher = Searcher.load_manifest(self.store, self.index, manifest, verify=True)
        try:
            def recall(**knobs: Any) -> float:
                s, i = searcher.search_ids(gate_vecs, k + 1, **knobs)
                _, found = _drop_self(s, i, gate_ids, k)
                return float(knn_recall_mean(found, ex_ids, ex_scores, k))

            aim = max(self.cfg.target_recall, self.cfg.gate_recall or 0.0)
            tuning: dict[str, Any] = {}
            knobs: dict[str, Any] = {}
            # First the candidate depth, with every list probed (so only the depth limits recall);
            # then the fewest lists that keep that recall.
            if params.nlist is not None:
                knobs["nprobe"] = params.nprobe or params.nlist
            if params.rescore != "none":
                knobs["rescore_multiplier"] = params.rescore_multiplier or DEFAULT_RESCORE_MULTIPLIER[params.kind]
                if params.rescore_multiplier is None:
                    knobs["rescore_multiplier"], tuning["rescore_multiplier"] = _tune(
                        recall, "rescore_multiplier", RESCORE_MULTIPLIERS, knobs, aim)
            if params.nlist is not None and params.nprobe is None:
                m_curve = tuning.get("rescore_multiplier", {}).get("curve", [])
                reached = next((c["recall"] for c in m_curve if c["rescore_multiplier"] == knobs.get(
                    "rescore_multiplier")), aim)
                knobs["nprobe"], tuning["nprobe"] = _tune(recall, "nprobe", _nprobe_candidates(params.nlist), knobs,
                                                          min(aim, reached))
            measured = recall(**knobs)
        finally:
            searcher.close()
        threshold = self.cfg.gate_recall
        gate = {"k": k, "queries": int(len(gate_ids)), "query_source": how, "recall": round(measured, 4),
                "threshold": threshold, "passed": threshold is None or measured >= threshold,
                "seconds": round(time.perf_counter() - t0, 3), **knobs}
        self.timings["gate_s"] = time.perf_counter() - t0
        return gate, tuning


def knn_recall_mean(found: np.ndarray, exact_ids: np.ndarray, exact_scores: np.ndarray, k: int) -> float:
    from engine.index.recall import knn_recall

    return float(knn_recall(found, exact_ids, exact_scores, k).mean()) if len(found) else 1.0


def _drop_self(scores: np.ndarray, ids: np.ndarray, self_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own id from its result row and keep the first ``k`` of the rest."""
    keep = ids != self_ids[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    s = np.take_along_axis(np.where(keep, scores, -np.inf), order, axis=1)
    i = np.take_along_axis(np.where(keep, ids, -1), order, axis=1)
    return s, i


def _tune(recall: Callable[..., float], knob: str, candidates: Sequence[int], knobs: Mapping[str, Any],
          aim: float) -> tuple[int, dict[str, Any]]:
    """The smallest candidate whose recall reaches ``aim``, or where recall stops improving
    (another doubling gains < ``PLATEAU`` — the rescore precision, not the candidates, is then
    the limit); the largest otherwise. Returns it with the curve measured."""
    curve: list[dict[str, Any]] = []
    chosen = candidates[-1]
    prev: tuple[int, float] | None = None
    for value in candidates:
        r = recall(**{**knobs, knob: value})
        curve.append({knob: value, "recall": round(r, 4)})
        if r >= aim:
            chosen = value
            break
        if prev is not None and r - prev[1] < PLATEAU:
            chosen = prev[0]
            break
        prev = (value, r)
    return chosen, {"target": aim, "curve": curve, "chosen": chosen}


def _nprobe_candidates(nlist: int) -> list[int]:
    out, n = [], 1
    while n < nlist:
        out.append(n)
        n *= 2
    return out + [nlist]


def build_index(store: Store, run_id: str, index: str, cfg: BuildConfig | None = None, *,
                mapper: Mapper | None = None, progress: Progress | None = None, parallelism: int = 1,
                task_threads: int | None = None, parent_version: str | None = None,
                force: bool = False, manifest_extra: Mapping[str, Any] | None = None) -> BuildResult:
    """Build (or resume, or return the finished) index version of ``run_id`` under ``index``.

    ``mapper`` spreads the shard tasks (default: one after the other in this process);
    ``parallelism`` is how many run at once, used to choose the shard count. ``parent_version``
    defaults to the newest existing version of the index. ``force`` starts a new version even
    if the same build finished before. ``manifest_extra`` adds top-level keys to the manifest
    (e.g. a refresh record); it may not replace the builder's own. Raises GateError when recall
    is below the gate.
    """
    from engine.core.names import check_name

    cfg = cfg or BuildConfig()
    cfg.validate()
    check_name("index", index)
    clash = set(manifest_extra or {}) & MANIFEST_KEYS
    if clash:
        raise ConfigError(f"manifest_extra may not replace the builder's manifest keys {sorted(clash)}")
    mapper = mapper or local_mapper
    t_start = time.perf_counter()
    run = read_run(store, run_id)
    b = _Builder(store, run, index, cfg, mapper=mapper, progress=progress, parallelism=parallelism,
                 task_threads=task_threads)
    state = b.read_state()
    resumed = False
    if state is not None and not force:
        if state.get("status") == "complete":
            vid = state["version_id"]
            if store.exists(layout.version_manifest_key(index, vid)):
                manifest = read_version_manifest(store, index, vid)
                b.emit("reused", version=vid)
                return BuildResult(index, vid, manifest, reused=True, resumed=False)
        elif state.get("status") == "building":
            resumed = True
    if state is None or force or state.get("status") != "building":
        params = choose_params(run.rows, run.dim, cfg, parallelism=parallelism)
        state = {"status": "building", "version_id": new_version_id(), "build_key": b.key, "run_id": run_id,
                 "started_at": _now_iso(), "config": cfg.to_dict(), "params": params.to_dict()}
        b.write_state(state)
    else:
        # A resume keeps the first attempt's parameters (the shard layout depends on them, and
        # the cluster it resumes on may have another size).
        params = IndexParams(**state["params"])
    version_id = state["version_id"]
    prefix = layout.version_prefix(index, version_id)
    lost = [state[r]["key"] for r in ("trained", "ranges") if r in state
            and not _committed(store, prefix, {"files": {r: state[r]}})]
    if lost:  # e.g. gc removed an abandoned build's files: train again rather than fail
        log.warning("build %s: trained artifacts %s are gone; training again", index, lost)
        for r in ("trained", "ranges", "trained_at"):
            state.pop(r, None)
    if store.exists(layout.version_manifest_key(index, version_id)):
        raise ConflictError(f"version {version_id} of {index} already has a manifest but its build state says "
                            "building; remove the build state or rerun with --force")
    b.emit("planned", version=version_id, rows=run.rows, dim=run.dim, kind=params.kind, factory=params.factory,
           shards=params.shards, resumed=resumed, reasoning=params.reasoning)
    if parent_version is None:
        older = [v for v in list_versions(store, index) if v != version_id]
        parent_version = older[-1] if older else None

    train_vecs, gate_vecs, gate_ids, how = b.sample(params, state)
    b.train(params, train_vecs, state, prefix)
    del train_vecs
    shard_results = b.add_shards(params, state, gate_vecs)

    # The manifest (without the gate result) is what the gate loads, exactly as a searcher would.
    artifacts: list[dict[str, Any]] = []
    files: dict[str, str] = {}
    for role in ("trained", "ranges"):
        if role in state:
            artifacts.append(dict(state[role]))
            files[{"trained": "trained", "ranges": "rescore_ranges"}[role]] = state[role]["key"]
    shards = []
    for r in shard_results:
        shards.append({"shard": r["shard"], "rows": r["rows"], "id_start": r["id_start"], "id_end": r["id_end"],
                       "id_mode": r["id_mode"],
                       "bytes": sum(f["bytes"] for f in r["files"].values()),
                       "files": {role: f["key"] for role, f in r["files"].items()}})
        artifacts.extend(dict(f) for f in r["files"].values())
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT, "version_id": version_id, "index": index, "created_at": _now_iso(),
        "engine_version": __version__, "model": run.model, "dim": run.dim, "metric": run.metric,
        "kind": params.kind, "params": params.to_dict(), "source_run": run_id,
        "source": {"run_id": run_id, "run_manifest_sha256": run.manifest_sha256, "embeddings": run.fingerprint()},
        "parent_version": parent_version, "shards": shards, "files": files, "artifacts": artifacts,
        "counts": {"vectors": run.rows, "shards": len(shards)}, "recall_gate": None, "thresholds": {},
        "build_key": b.key,
    }
    gate, tuning = b.gate(params, manifest, shard_results, gate_vecs, gate_ids, how)
    b.emit("gate", **gate)
    if not gate["passed"]:
        state["status"] = "gate_failed"
        state["recall_gate"] = gate
        b.write_state(state)
        store.delete_prefix(prefix)  # nothing of a failed build stays where searchers look
        raise GateError(f"recall gate failed for {index}: recall@{gate['k']} = {gate['recall']:.4f} against exact "
                        f"search on {gate['queries']} queries is below --gate-recall {gate['threshold']} "
                        f"({params.factory}, nprobe={gate.get('nprobe')}, rescore x{gate.get('rescore_multiplier')}); "
                        "nothing was published. Raise nlist/pq_m, use --rescore int8, or lower the gate")
    params_dict = params.to_dict()
    for knob in ("nprobe", "rescore_multiplier"):
        if gate.get(knob) is not None:
            params_dict[knob] = gate[knob]
    params_dict["tuning"] = tuning
    t_total = time.perf_counter() - t_start
    timings = {k: round(v, 3) for k, v in b.timings.items()}
    timings["total_s"] = round(t_total, 3)
    build_s = b.timings.get("train_s", 0.0) + b.timings.get("add_s", 0.0) + b.timings.get("sample_s", 0.0)
    timings["build_s_per_100k"] = round(build_s / max(run.rows, 1) * 100_000, 3) if run.rows else None
    report = {"version_id": version_id, "index": index, "params": params_dict, "recall_gate": gate,
              "timings": timings, "shards": [{k: v for k, v in r.items() if k != "exact"} for r in shard_results],
              "build_key": b.key, "resumed": resumed}
    manifest["artifacts"].append({"key": REPORT_KEY, **_upload_bytes(store, join(prefix, REPORT_KEY),
                                                                     json_bytes(report))})
    manifest["files"]["report"] = REPORT_KEY
    manifest.update(params=params_dict, recall_gate=gate, timings=timings)
    assert set(manifest) <= MANIFEST_KEYS, set(manifest) - MANIFEST_KEYS
    manifest.update(manifest_extra or {})
    try:
        store.put_if_absent(layout.version_manifest_key(index, version_id), json_bytes(manifest))
    except ConflictError:
        # A twin of this build (same key, same version id) committed first: use its manifest.
        manifest = read_version_manifest(store, index, version_id)
    state.update(status="complete", finished_at=_now_iso())
    b.write_state(state)
    b.emit("published", version=version_id, recall=gate.get("recall"))
    return BuildResult(index, version_id, manifest, reused=False, resumed=resumed)
