"""Index parameters: the build config and the automatic choice of kind, lists, PQ code and shards, with reasons."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.core.errors import ConfigError
from engine.index.faiss_ops import binary_bits, import_faiss

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
SPARSE_KINDS: tuple[str, ...] = ("none", "bm25")  # none: dense only; bm25: BM25 shards beside the dense ones
SPARSE_GRANULARITIES: tuple[str, ...] = ("chunk", "doc")  # what one BM25 row is: a chunk, or a whole document


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
    sparse: str = "none"  # none | bm25: BM25 shards beside the dense ones, over the same chunks
    sparse_granularity: str = "chunk"  # chunk: one BM25 row per chunk; doc: per document (its chunks joined)

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
        if self.sparse not in SPARSE_KINDS:
            raise ConfigError(f"sparse must be one of {', '.join(SPARSE_KINDS)}, got {self.sparse!r}")
        if self.sparse_granularity not in SPARSE_GRANULARITIES:
            raise ConfigError(f"sparse_granularity must be one of {', '.join(SPARSE_GRANULARITIES)}, "
                              f"got {self.sparse_granularity!r}")
        if self.sparse_granularity != "chunk" and self.sparse == "none":
            raise ConfigError(f"sparse_granularity {self.sparse_granularity} needs BM25 shards: add --sparse bm25")

    def to_dict(self) -> dict[str, Any]:
        """The settings; ``sparse`` (and a ``sparse_granularity`` other than chunk) only when asked for, so
        dense-only and chunk-BM25 builds keep their build keys."""
        d = dataclasses.asdict(self)
        if d["sparse"] == "none":
            del d["sparse"]
        if d["sparse_granularity"] == "chunk" or "sparse" not in d:
            del d["sparse_granularity"]
        return d

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
            bits = binary_bits(dim)
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


@dataclass
class _Plan:
    """What every kind's choice shares: the corpus shape, the config, the shard count and the reasons so far."""

    rows: int
    dim: int
    cfg: BuildConfig
    shards: int
    reasons: list[str]
    overrides: dict[str, Any]

    @property
    def budget(self) -> int | None:
        return self.cfg.memory_budget

    @property
    def rescore_row(self) -> int:
        """Bytes per vector of the rescore vectors stored beside each shard."""
        return {"int8": self.dim, "fp16": 2 * self.dim, "none": 0}[self.cfg.rescore]

    def params(self, **kw: Any) -> IndexParams:
        return IndexParams(requested_kind=self.cfg.kind, dim=self.dim, rows=self.rows, shards=self.shards,
                           memory_budget=self.budget, reasoning=self.reasons, overrides=self.overrides, **kw)


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
    if cfg.shards is not None:
        shards = min(cfg.shards, rows) if rows else 0
        reasons.append(f"{shards} shard(s) as asked" + (f" (capped at {rows} rows)" if cfg.shards > rows else ""))
    else:
        shards, why = auto_shards(rows, parallelism)
        reasons.append(why)
    plan = _Plan(rows, dim, cfg, shards, reasons, overrides)
    if rows == 0:
        return _flat_params(plan, "empty run: an empty flat index (searches return nothing)")
    if cfg.kind == "flat":
        return _flat_params(plan, "flat as asked: exact inner-product search")
    if cfg.kind == "binary-rerank":
        return _binary_params(plan)
    return _ivfpq_params(plan)


def _flat_params(plan: _Plan, why: str) -> IndexParams:
    plan.reasons.append(why)
    if plan.cfg.rescore != "none":
        plan.reasons.append("rescore off: a flat index already scores exactly")
    ram = plan.rows * (plan.dim * 4 + ID_BYTES)
    return plan.params(kind="flat", factory="Flat", nlist=None, pq_m=None, pq_nbits=None, train_size=0,
                       rescore="none", rescore_multiplier=None, nprobe=None, ram_bytes=ram, rescore_bytes=0)


def _binary_params(plan: _Plan) -> IndexParams:
    cfg, rows, dim, rescore = plan.cfg, plan.rows, plan.dim, plan.cfg.rescore
    factory = cfg.factory or "BFlat"
    nlist, _, _ = _describe_factory_ivf(factory, dim, binary=True) if cfg.factory else (None, None, None)
    if nlist is not None and rows < nlist:
        return _flat_params(plan, f"{rows} vectors cannot train a binary IVF with {nlist} lists: flat instead")
    code = binary_bits(dim) // 8
    ram = rows * (code + ID_BYTES) + (nlist or 0) * code
    if nlist is None and rescore != "int8":
        train = 0  # BFlat + fp16: nothing to train or calibrate
    else:
        train = min(cfg.train_size or max(CALIBRATION_ROWS, (nlist or 0) * TRAIN_PER_LIST), rows)
        train = _leave_gate_out(train, rows, cfg)
    plan.reasons.append(f"binary codes: {dim} sign bits packed into {code} bytes per vector "
                        f"({dim * 4 / code:.0f}x smaller than float32), {factory} (Hamming search)")
    if rescore != "none":
        plan.reasons.append(f"rescore vectors {rescore} ({plan.rescore_row} B/vector) beside each shard, "
                            f"memory-mapped; calibrated on {train:,} sampled vectors")
    if plan.budget is not None and ram > plan.budget:
        raise ConfigError(f"binary codes for {rows:,} vectors need ~{human_bytes(ram)} of RAM, over the memory "
                          f"budget of {human_bytes(plan.budget)}; raise --memory-budget")
    return plan.params(kind="binary-rerank", factory=factory, nlist=nlist, pq_m=None, pq_nbits=None,
                       train_size=train, rescore=rescore, rescore_multiplier=cfg.rescore_multiplier,
                       nprobe=cfg.nprobe if nlist else None, ram_bytes=ram, rescore_bytes=rows * plan.rescore_row)


def _ivfpq_params(plan: _Plan) -> IndexParams:
    cfg, rows, dim, rescore = plan.cfg, plan.rows, plan.dim, plan.cfg.rescore
    explicit = cfg.factory is not None or cfg.nlist is not None or cfg.pq_m is not None
    if rows < FLAT_BELOW and not explicit:
        return _flat_params(plan, f"{rows:,} vectors < {FLAT_BELOW:,}: an IVF index would not be faster and its "
                                  "lists could not be trained well, so flat (exact) instead of IVF-PQ")
    nbits = cfg.pq_nbits or DEFAULT_PQ_NBITS
    if cfg.factory:
        factory = cfg.factory
        nlist, pq_m, f_nbits = _describe_factory_ivf(factory, dim, binary=False)
        if nlist is None:
            raise ConfigError(f"factory {factory!r} has no IVF stage; use --kind flat for exact search, or an "
                              "IVF factory such as 'IVF1024,PQ48x4fs'")
        nbits = f_nbits or nbits
        plan.reasons.append(f"factory {factory!r} as asked ({nlist} lists"
                            + (f", PQ{pq_m}x{nbits}" if pq_m else "") + ")")
    else:
        nlist = _choose_nlist(plan)
        pq_m = _choose_pq_m(plan, nlist, nbits)
        fs = "fs" if nbits == 4 else "np"  # 4-bit: SIMD fast scan; 8-bit: no polysemous training (slow, unused)
        factory = f"IVF{nlist},PQ{pq_m}x{nbits}{fs}" if nbits != 8 else f"IVF{nlist},PQ{pq_m}np"
    if rows < nlist:
        return _flat_params(plan, f"{rows:,} vectors cannot train {nlist} IVF lists: flat instead")
    code = _code_bytes(pq_m or 0, nbits) if pq_m else dim * 4
    ram = ivf_ram(rows, dim, nlist, plan.shards, code, "fs" in factory.split(",")[-1])
    plan.reasons.append(f"estimated RAM {human_bytes(ram)} over {max(plan.shards, 1)} shard(s): "
                        f"{rows * dim * 4 / ram:.1f}x smaller than float32, counting ids, each shard's centroids "
                        "and fast-scan block padding")
    if plan.budget is not None and ram > plan.budget:
        raise ConfigError(f"{factory} over {rows:,} vectors needs ~{human_bytes(ram)} of RAM, over the memory budget "
                          f"of {human_bytes(plan.budget)}; lower pq_m or raise --memory-budget")
    train = _ivf_train_size(plan, nlist, nbits, pq_m)
    if rescore != "none":
        times = cfg.rescore_multiplier or "multiplier (tuned by the gate)"
        plan.reasons.append(f"rescore: top k x {times} PQ candidates per shard re-ranked with {rescore} vectors "
                            f"({plan.rescore_row} B/vector on disk, memory-mapped)")
    return plan.params(kind="ivfpq", factory=factory, nlist=nlist, pq_m=pq_m, pq_nbits=nbits if pq_m else None,
                       train_size=train, rescore=rescore,
                       rescore_multiplier=cfg.rescore_multiplier if rescore != "none" else None, nprobe=cfg.nprobe,
                       ram_bytes=ram, rescore_bytes=rows * plan.rescore_row)


def _choose_nlist(plan: _Plan) -> int:
    if plan.cfg.nlist:
        plan.reasons.append(f"{plan.cfg.nlist} lists as asked")
        return plan.cfg.nlist
    target = 4 * math.sqrt(plan.rows)
    nlist = max(min(_pow2_near(target), _floor_pow2(plan.rows / MIN_TRAIN_PER_LIST)), 1)
    plan.reasons.append(f"{nlist} lists: ~4*sqrt(N) = {target:.0f} rounded to a power of two, at most "
                        f"N/{MIN_TRAIN_PER_LIST} = {plan.rows // MIN_TRAIN_PER_LIST} so each list trains on "
                        f">= {MIN_TRAIN_PER_LIST} points")
    return nlist


def _choose_pq_m(plan: _Plan, nlist: int, nbits: int) -> int:
    cfg, dim, rows, budget = plan.cfg, plan.dim, plan.rows, plan.budget
    if cfg.pq_m:
        if dim % cfg.pq_m:
            raise ConfigError(f"pq_m={cfg.pq_m} must divide the dimension {dim}")
        plan.reasons.append(f"PQ{cfg.pq_m}x{nbits} as asked ({_code_bytes(cfg.pq_m, nbits)} B/vector)")
        return cfg.pq_m
    # The largest sub-quantizer count that divides dim, compresses >= 8x and fits the budget.
    # With rescore vectors the codes only have to find candidates: 2 dims per sub-quantizer
    # (16x with 4-bit codes) trains faster than 1 and, on MiniLM vectors, gave the same
    # recall after the rerank (benchmarks/bench_index.py).
    rescore = cfg.rescore != "none"
    max_m = dim // 2 if rescore and dim >= 2 else dim
    cands = [m for m in range(max_m, 0, -1) if dim % m == 0 and _code_bytes(m, nbits) * 8 <= dim * 4]
    fits = [m for m in cands if budget is None or ivf_ram(rows, dim, nlist, plan.shards, _code_bytes(m, nbits),
                                                          nbits == 4) <= budget]
    if not fits:
        smallest = ivf_ram(rows, dim, nlist, plan.shards, _code_bytes(cands[-1], nbits), nbits == 4) if cands else 0
        raise ConfigError(f"{rows:,} vectors do not fit a memory budget of {human_bytes(budget or 0)} even "
                          f"with the smallest PQ code (~{human_bytes(smallest)}); raise --memory-budget")
    pq_m = fits[0]
    code = _code_bytes(pq_m, nbits)
    why = "fits the memory budget of " + human_bytes(budget) if budget else "no memory budget given"
    plan.reasons.append(f"PQ{pq_m}x{nbits}: {code} B/vector, {dim * 4 / code:.0f}x smaller than float32; the "
                        f"largest code with {dim // pq_m} dim(s) per sub-quantizer"
                        + (" (rescore vectors re-rank its candidates)" if rescore else "")
                        + f" and >= 8x compression ({why})")
    return pq_m


def _ivf_train_size(plan: _Plan, nlist: int, nbits: int, pq_m: int | None) -> int:
    if plan.cfg.train_size:
        train = min(plan.cfg.train_size, plan.rows)
        plan.reasons.append(f"training on {train:,} vectors as asked")
        return train
    lo = max(MIN_TRAIN_PER_LIST * nlist, MIN_TRAIN_PER_LIST * (1 << nbits) if pq_m else 0)
    train = min(plan.rows, max(lo, min(TRAIN_PER_LIST * nlist, MAX_TRAIN_PER_LIST * nlist)))
    train = _leave_gate_out(train, plan.rows, plan.cfg)
    plan.reasons.append(f"training on {train:,} sampled vectors ({train / nlist:.0f} per list; FAISS guidance "
                        f"30-256)")
    return train
