"""Hard-negative mining: candidates per strategy, positive-aware margin rules, exclusions, sampling, curriculum.

The flow for one query (``NegativeMiner.mine_batch`` runs it for a batch, inside a Ray actor
or in-process):

```
candidates (ranked)       embedding: exact search over the run's vectors, or the ANN index
                          bm25: rank-bm25 over the chunk texts; random: seeded uniform draws
  -> dedupe texts         one candidate per content hash (sentence-transformers dedupes its corpus)
  -> window               the first range_max + max_positives (the same window sentence-transformers searches)
  -> exclude positives    every known positive of the query (all its chunks), and any candidate
                          whose normalised text equals a positive's text
  -> margin rules         absolute_margin, relative_margin (against the query's lowest positive
                          score, as NV-Retriever / sentence-transformers), max_score, min_score
  -> rank range           survivors [range_min, range_max) (bm25 and embedding; random has no rank)
  -> sampling             top or random
  -> cross-encoder        a chosen negative the cross-encoder scores above ce_max_score is dropped
                          (a likely false negative) and replaced by the next candidate
```

Rank semantics follow ``sentence_transformers.util.mine_hard_negatives`` exactly: the
range counts candidates that survived the exclusions and margin rules, so ``range_min=10``
skips the ten most similar *valid* candidates. Every removal is counted in the summary.

Memory: a worker holds the corpus (vectors as memory-mapped ``.npy``, texts and ids as a
memory-mapped Arrow file, four uint64 key arrays) and one query batch; nothing grows with
the number of queries. Results go to one Parquet part per batch, and the summary keeps
fixed-size score histograms, never the scores themselves.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

import numpy as np

from engine import layout
from engine.errors import ConfigError, IntegrityError, NotFoundError, SchemaError
from engine.storage import Store, join, open_store, sha256_file

if TYPE_CHECKING:
    import pyarrow as pa

    from engine.embedding import Encoder

log = logging.getLogger(__name__)

Strategy = Literal["embedding", "bm25", "random", "mixed"]
Sampling = Literal["top", "random"]
SearchMode = Literal["auto", "exact", "ann"]
SOURCES = ("embedding", "bm25", "random")
CACHE_FORMAT = "mining-shard-v1"
MIN_PIECE_CHARS = 32  # a chunk shorter than this inside a positive's text is not taken for a piece of it
# Removal rules in the order they are applied (the summary lists them in this order).
RULES = ("duplicate_text", "positive", "duplicate_of_positive", "absolute_margin", "relative_margin", "max_score",
         "min_score", "beyond_range_max", "below_range_min", "cross_encoder")


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MiningConfig:
    """What makes negatives negatives. Part of the job's identity (a rerun with the same rules resumes)."""

    strategy: str = "embedding"  # embedding | bm25 | random | mixed
    range_min: int = 10  # skip the first N valid candidates (likely unlabelled positives)
    range_max: int = 100  # consider valid candidates up to this rank
    relative_margin: float | None = 0.05  # keep score <= pos - |pos| * margin (NV-Retriever TopK-PercPos)
    absolute_margin: float | None = None  # keep score <= pos - margin
    max_score: float | None = None  # keep score <= max_score
    min_score: float | None = None  # keep score >= min_score
    num_negatives: int = 5
    sampling: str = "top"  # top | random
    cross_encoder: str | None = None  # folder of a sentence-transformers CrossEncoder
    ce_max_score: float | None = None  # drop negatives the cross-encoder scores above this
    ce_batch_size: int = 64
    mix: str = "embedding=3,bm25=1,random=1"  # strategy=mixed: share of each source
    seed: int = 12345
    curriculum_stages: int = 3
    negative_text: str = "embedded"  # embedded (title prefix + chunk, what the vectors saw) | chunk
    keep_incomplete: bool = False  # write rows with fewer than num_negatives (missing ones null)
    window_extra: int | None = None  # candidates beyond range_max; None = max positives per query
    search: str = "auto"  # auto | exact | ann
    exact_max_rows: int = 2_000_000  # search=auto: exact search up to this many corpus rows

    def validate(self) -> None:
        if self.strategy not in ("embedding", "bm25", "random", "mixed"):
            raise ConfigError(f"strategy must be embedding, bm25, random or mixed, got {self.strategy!r}")
        if self.sampling not in ("top", "random"):
            raise ConfigError(f"sampling must be top or random, got {self.sampling!r}")
        if self.search not in ("auto", "exact", "ann"):
            raise ConfigError(f"search must be auto, exact or ann, got {self.search!r}")
        if self.negative_text not in ("embedded", "chunk"):
            raise ConfigError(f"negative_text must be embedded or chunk, got {self.negative_text!r}")
        if self.range_min < 0:
            raise ConfigError(f"range_min must be >= 0, got {self.range_min}")
        if self.range_max <= self.range_min:
            raise ConfigError(f"range_max ({self.range_max}) must be larger than range_min ({self.range_min})")
        if self.num_negatives < 1:
            raise ConfigError(f"num_negatives must be at least 1, got {self.num_negatives}")
        if self.num_negatives > self.range_max - self.range_min:
            raise ConfigError(
                f"cannot mine {self.num_negatives} negatives from ranks [{self.range_min}, {self.range_max}): only "
                f"{self.range_max - self.range_min} candidates fit; lower --num-negatives or --range-min, or raise "
                "--range-max")
        for name in ("relative_margin", "absolute_margin"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"{name} must be >= 0 (or unset), got {v}")
        if self.relative_margin is not None and self.relative_margin >= 1:
            raise ConfigError(f"relative_margin is a fraction of the positive score, < 1; got {self.relative_margin}")
        if self.cross_encoder and self.ce_max_score is None:
            raise ConfigError("--cross-encoder needs --ce-max-score (negatives the cross-encoder scores above it "
                              "are dropped as likely false negatives)")
        if self.ce_max_score is not None and not self.cross_encoder:
            raise ConfigError("--ce-max-score needs --cross-encoder PATH")
        if self.curriculum_stages < 1:
            raise ConfigError(f"curriculum_stages must be >= 1, got {self.curriculum_stages}")
        if self.window_extra is not None and self.window_extra < 0:
            raise ConfigError(f"window_extra must be >= 0, got {self.window_extra}")
        if self.strategy == "mixed":
            parse_mix(self.mix)

    def uses(self, source: str) -> bool:
        if self.strategy == "mixed":
            return parse_mix(self.mix).get(source, 0) > 0
        return self.strategy == source


def parse_mix(text: str) -> dict[str, float]:
    """``"embedding=3,bm25=1,random=1"`` -> weights (a missing source gets 0)."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in str(text).split(",") if p.strip()):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in SOURCES:
            raise ConfigError(f"--mix names {name!r}; use embedding, bm25 and random, e.g. embedding=3,bm25=1,random=1")
        try:
            out[name] = float(value)
        except ValueError as err:
            raise ConfigError(f"--mix weight for {name!r} is not a number: {value!r}") from err
        if out[name] < 0:
            raise ConfigError(f"--mix weight for {name!r} must be >= 0")
    if not out or sum(out.values()) <= 0:
        raise ConfigError(f"--mix {text!r} gives no source a positive weight")
    return out


def quotas(weights: dict[str, float], n: int) -> dict[str, int]:
    """Split ``n`` slots by weight, largest remainder first (ties by SOURCES order)."""
    total = sum(weights.values())
    raw = {s: n * weights.get(s, 0.0) / total for s in SOURCES}
    out = {s: int(math.floor(v)) for s, v in raw.items()}
    left = n - sum(out.values())
    for s in sorted(SOURCES, key=lambda s: (-(raw[s] - out[s]), SOURCES.index(s)))[:left]:
        out[s] += 1
    return out


@dataclass(frozen=True)
class MiningRuntime:
    """How mining is spread; never part of the job's identity."""

    address: str | None = None  # Ray address; None = RAY_ADDRESS or a local Ray
    workers: int | None = None  # mining actors; None = sized from the cluster's resources
    threads_per_worker: int | None = None
    device: str = "auto"  # query encoder (and cross-encoder) device
    batch_size: int = 256  # queries per work item (the memory grain of a worker)
    cache_dir: str | None = None  # where workers keep memory-mapped shards [<tmp>/embedctl-mining-cache]
    local: bool = False  # run in this process, without Ray


@dataclass(frozen=True)
class MiningJobConfig:
    store: str
    pairs: str
    out: str
    index: str | None = None
    version: str | None = None
    alias: str | None = None
    run: str | None = None  # mine against an embed run directly (no index version needed)
    endpoint_url: str | None = None
    overwrite: bool = False
    mining: MiningConfig = field(default_factory=MiningConfig)
    runtime: MiningRuntime = field(default_factory=MiningRuntime)

    def validate(self) -> None:
        self.mining.validate()
        if not self.store or not self.pairs or not self.out:
            raise ConfigError("--store, --pairs and --out are required")
        if self.run and self.index:
            raise ConfigError("pass either --run RUN_ID or --index NAME (with --version or --alias), not both")
        if not self.run:
            if not self.index:
                raise ConfigError("name what to mine against: --index NAME with --version V or --alias A "
                                  "(or --run RUN_ID for an embed run without an index)")
            if bool(self.version) == bool(self.alias):
                raise ConfigError("--index needs exactly one of --version V or --alias A")
        if self.runtime.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.runtime.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> MiningJobConfig:
        """Flat keys (CLI flags and a config file share them; nested ``mining:``/``runtime:`` accepted)."""
        flat = {k.replace("-", "_"): v for k, v in flat.items() if v is not None}
        for section in ("mining", "runtime"):
            if isinstance(flat.get(section), dict):
                flat.update({k.replace("-", "_"): v for k, v in flat.pop(section).items() if v is not None})
        sub: dict[str, dict[str, Any]] = {"mining": {}, "runtime": {}}
        top: dict[str, Any] = {}
        names = {"mining": {f.name for f in fields(MiningConfig)}, "runtime": {f.name for f in fields(MiningRuntime)}}
        top_names = {f.name for f in fields(cls)} - {"mining", "runtime"}
        unknown = []
        for k, v in flat.items():
            if k in top_names:
                top[k] = v
            elif k in names["mining"]:
                sub["mining"][k] = v
            elif k in names["runtime"]:
                sub["runtime"][k] = v
            else:
                unknown.append(k)
        if unknown:
            allowed = sorted(top_names | names["mining"] | names["runtime"])
            raise ConfigError(f"unknown config keys {sorted(unknown)}; allowed: {', '.join(allowed)}")
        for k in ("relative_margin", "absolute_margin", "max_score", "min_score", "ce_max_score"):
            if k in sub["mining"]:
                sub["mining"][k] = _optional_float(k, sub["mining"][k])
        try:
            cfg = cls(**top, mining=MiningConfig(**sub["mining"]), runtime=MiningRuntime(**sub["runtime"]))
        except TypeError as err:
            raise ConfigError(f"incomplete mining config: {err}") from err
        cfg.validate()
        return cfg

    def identity(self) -> dict[str, Any]:
        """What makes two mining jobs the same job (for resume and idempotent reruns)."""
        d = asdict(self.mining)
        d.update(store=self.store, index=self.index, version=self.version, alias=self.alias, run=self.run,
                 pairs=self.pairs)
        return d


def _optional_float(name: str, value: Any) -> float | None:
    """Margins and thresholds accept a number, or none/off to disable them."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "off", "null", "")):
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{name} must be a number or 'none', got {value!r}") from err


# ---------------------------------------------------------------------------------------------
# keys and hashing
# ---------------------------------------------------------------------------------------------

_WS = re.compile(r"\s+")


def stable_u64(text: str, salt: str = "") -> int:
    """A 64-bit key for an id or text (blake2b), stable across processes and machines."""
    h = hashlib.blake2b((salt + "\x00" + text).encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def norm_text(text: str) -> str:
    """The form two texts must share to count as duplicates: NFKC, casefolded, whitespace collapsed."""
    from engine.chunking import normalize_text

    return _WS.sub(" ", normalize_text(text or "").casefold()).strip()


def norm_key(text: str) -> int:
    return stable_u64(norm_text(text), "norm")


def doc_key(doc_id: str) -> int:
    return stable_u64(str(doc_id), "doc")


def chunk_key(chunk_id: str) -> int:
    return stable_u64(str(chunk_id), "chunk")


# ---------------------------------------------------------------------------------------------
# pairs
# ---------------------------------------------------------------------------------------------

QUERY_COLUMNS = ("query", "anchor", "question")
POSITIVE_COLUMNS = ("positive", "answer", "passage")
POSITIVE_ID_COLUMNS = ("positive_id", "doc_id", "positive_doc_id", "chunk_id")


@dataclass
class QueryGroup:
    """One query and every positive the pair set knows for it (one output row per positive)."""

    key: str  # query_id, or the query text when there is no id
    query_id: str | None
    query: str
    positives: list[tuple[str | None, str | None]]  # (positive_id, positive_text), input order, deduplicated

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "query_id": self.query_id, "query": self.query, "positives": self.positives}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QueryGroup:
        return cls(d["key"], d.get("query_id"), d["query"], [tuple(p) for p in d["positives"]])  # type: ignore[misc]


@dataclass
class PairSet:
    groups: list[QueryGroup]
    pairs: int
    rejects: dict[str, int]
    sha256: str
    columns: dict[str, str | None]

    @property
    def max_positives(self) -> int:
        return max((len(g.positives) for g in self.groups), default=1)


def _pick(names: list[str], options: tuple[str, ...]) -> str | None:
    lower = {n.lower(): n for n in names}
    return next((lower[o] for o in options if o in lower), None)


def read_pairs(uri: str, endpoint_url: str | None = None) -> PairSet:
    """Read (query, positive) pairs from Parquet: ``query`` plus ``positive`` text and/or ``positive_id``.

    Optional ``query_id`` groups pairs by query (else the query text does, as in
    sentence-transformers). Rows with an empty query, or neither a positive text nor an id,
    are counted as rejects, never dropped silently.
    """
    import pyarrow.parquet as pq

    store, key = split_uri(uri, endpoint_url)
    if not store.exists(key):
        raise NotFoundError(f"pairs file {uri!r} does not exist")
    with tempfile.TemporaryDirectory(prefix="embedctl-pairs-") as tmp:
        local = os.path.join(tmp, "pairs.parquet")
        store.download_file(key, local)
        digest = sha256_file(local)
        try:
            table = pq.read_table(local)
        except Exception as err:  # noqa: BLE001 - any arrow/parquet failure is a bad input file
            raise SchemaError(f"pairs file {uri!r} is not readable Parquet: {err}") from err
    names = table.column_names
    q_col = _pick(names, QUERY_COLUMNS)
    p_col = _pick(names, POSITIVE_COLUMNS)
    pid_col = _pick(names, POSITIVE_ID_COLUMNS)
    qid_col = _pick(names, ("query_id", "qid"))
    if q_col is None or (p_col is None and pid_col is None):
        raise SchemaError(
            f"pairs file {uri!r} has columns {names}; it needs a query column ({'/'.join(QUERY_COLUMNS)}) and a "
            f"positive text ({'/'.join(POSITIVE_COLUMNS)}) and/or id ({'/'.join(POSITIVE_ID_COLUMNS)}) column")

    def col(name: str | None) -> list[Any]:
        if name is None:
            return [None] * table.num_rows
        return [None if v is None else str(v) for v in table.column(name).to_pylist()]

    queries, positives, pos_ids, qids = col(q_col), col(p_col), col(pid_col), col(qid_col)
    groups: dict[str, QueryGroup] = {}
    rejects: dict[str, int] = {}
    pairs = 0
    for q, p, pid, qid in zip(queries, positives, pos_ids, qids, strict=True):
        if not q or not q.strip():
            rejects["empty_query"] = rejects.get("empty_query", 0) + 1
            continue
        if not (p and p.strip()) and not pid:
            rejects["no_positive"] = rejects.get("no_positive", 0) + 1
            continue
        gkey = qid if qid else q
        g = groups.get(gkey)
        if g is None:
            g = groups[gkey] = QueryGroup(gkey, qid, q, [])
        entry = (pid or None, p if p and p.strip() else None)
        if entry in g.positives:
            rejects["duplicate_pair"] = rejects.get("duplicate_pair", 0) + 1
            continue
        g.positives.append(entry)
        pairs += 1
    if not groups:
        raise SchemaError(f"pairs file {uri!r} holds no usable (query, positive) pair (rejects: {rejects})")
    return PairSet(list(groups.values()), pairs, rejects, digest,
                   {"query": q_col, "positive": p_col, "positive_id": pid_col, "query_id": qid_col})


def split_uri(uri: str, endpoint_url: str | None = None) -> tuple[Store, str]:
    """``/a/b/file.parquet`` or ``s3://bucket/a/file.parquet`` -> (store at the parent, key)."""
    text = os.fspath(uri).rstrip("/")
    if text.startswith("s3://") or text.startswith("file://"):
        parent, _, name = text.rpartition("/")
        return open_store(parent, endpoint_url=endpoint_url), name
    path = Path(text).expanduser().resolve()
    return open_store(str(path.parent)), path.name


# ---------------------------------------------------------------------------------------------
# the source: an index version (its source run) or an embed run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MiningSource:
    """Everything a worker needs to open the corpus and the model (small, picklable)."""

    store: str
    endpoint_url: str | None
    run_id: str
    model: dict[str, Any]
    dim: int
    rows: int
    parts: tuple[tuple[str, int, str], ...]  # (key, rows, sha256) of each embeddings part
    run_config: dict[str, Any]
    index: str | None = None
    version_id: str | None = None
    ann: bool = False  # the version holds FAISS shards that engine.search can load
    index_kind: str | None = None  # ivfpq | binary-rerank | flat

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["parts"] = [list(p) for p in self.parts]
        d.pop("run_config")
        return d


def resolve_version_id(store: Store, index: str, version: str | None, alias: str | None) -> str:
    """The version an index/version/alias names: engine.index's resolver when present, else the alias document."""
    resolve_version: Callable[..., Any] | None
    try:
        from engine.search import resolve_version  # the index builder's, authoritative ("latest" too)
    except ImportError:
        resolve_version = None
    if resolve_version is not None:
        resolved = resolve_version(store, index, version=version, alias=alias)
        return str(resolved if isinstance(resolved, str) else getattr(resolved, "version_id", resolved))
    if version:
        return version
    from engine.publish import read_alias

    state = read_alias(store, index, str(alias))
    assert state is not None
    if state.weighted is not None:
        log.warning("alias %s of %s is a weighted rollout (%s); mining against its blue version %s",
                    alias, index, state.target.describe(), state.version)
    return state.version


def resolve_source(cfg: MiningJobConfig) -> MiningSource:
    """Find the embed run behind the index version (its ``source_run``) and list its embedding parts."""
    store = open_store(cfg.store, endpoint_url=cfg.endpoint_url)
    version_id = None
    ann = False
    index_kind = None
    run_id = cfg.run
    if cfg.index:
        version_id = resolve_version_id(store, cfg.index, cfg.version, cfg.alias)
        mkey = layout.version_manifest_key(cfg.index, version_id)
        if not store.exists(mkey):
            raise NotFoundError(f"index {cfg.index!r} has no version {version_id!r} in {cfg.store} "
                                "(see `embedctl status --index NAME`)")
        vman = store.read_json(mkey)
        run_id = vman.get("source_run")
        if not run_id:
            raise NotFoundError(f"version {version_id!r} of index {cfg.index!r} names no source_run; mining needs the "
                                "embed run's vectors and texts (pass --run RUN_ID)")
        ann = bool(vman.get("shards"))
        index_kind = str(vman.get("kind") or "")
    assert run_id
    rkey = layout.run_manifest_key(run_id)
    if not store.exists(rkey):
        raise NotFoundError(f"embed run {run_id!r} does not exist in {cfg.store}")
    man = store.read_json(rkey)
    if man.get("kind") != "embed":
        raise ConfigError(f"run {run_id!r} is a {man.get('kind')!r} run, not an embed run")
    if man.get("status") != "succeeded":
        raise ConfigError(f"embed run {run_id!r} is {man.get('status')!r}; finish it (rerun the embed command) first")
    parts = tuple((str(p["key"]), int(p["rows"]), str(p["sha256"])) for p in man["outputs"]["embeddings"]
                  if int(p["rows"]) > 0)
    if not parts:
        raise NotFoundError(f"embed run {run_id!r} has no embeddings to mine from")
    return MiningSource(store=cfg.store, endpoint_url=cfg.endpoint_url, run_id=run_id, model=man["model"],
                        dim=int(man["dim"]), rows=sum(p[1] for p in parts), parts=parts,
                        run_config=man.get("config") or {}, index=cfg.index, version_id=version_id, ann=ann,
                        index_kind=index_kind)


def run_chunker(run_config: dict[str, Any]) -> Any:
    """The chunker the run used, for its title prefix: negatives carry the text the vectors were made from."""
    from engine.config import EmbedJobConfig
    from engine.pipeline import make_chunker

    flat = json.loads(json.dumps(run_config))
    flat.pop("runtime", None)
    if not flat.get("chunk"):
        log.warning("the run manifest records no chunker settings; negatives carry chunk texts without a title prefix")
        return _NoPrefix()
    return make_chunker(EmbedJobConfig.from_flat(flat))


class _NoPrefix:
    @staticmethod
    def prefix_for(title: str | None) -> str:
        return ""


# ---------------------------------------------------------------------------------------------
# the corpus, memory-mapped
# ---------------------------------------------------------------------------------------------

KEY_DOC, KEY_CHUNK, KEY_CONTENT, KEY_NORM, KEY_CHUNK_NORM = range(5)


def default_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "embedctl-mining-cache")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def materialize_part(store: Store, part: tuple[str, int, str], prefix_for: Callable[[str | None], str],
                     cache_root: str) -> Path:
    """Turn one embeddings part into ``vectors.npy`` + ``meta.arrow`` + ``keys.npy`` in a local cache.

    Checked against the run manifest's sha256 first. Written to a temp folder and renamed,
    under a file lock, so actors sharing a node convert each part once. Streams the part by
    record batch: peak memory is one batch, whatever the part's size.
    """
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    key, rows, sha = part
    final = Path(cache_root) / f"{CACHE_FORMAT}-{sha[:32]}"
    if (final / "DONE").exists():
        return final
    with _file_lock(Path(cache_root) / f".{sha[:32]}.lock"):
        if (final / "DONE").exists():
            return final
        tmp = Path(cache_root) / f".tmp-{sha[:16]}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            src = tmp / "part.parquet"
            store.download_file(key, src)
            got = sha256_file(src)
            if got != sha:
                raise IntegrityError(f"{store.describe(key)} has sha256 {got[:12]} but the run manifest says "
                                     f"{sha[:12]}; the run is corrupt (re-run the embed job)")
            pf = pq.ParquetFile(src)
            emb_type = pf.schema_arrow.field("embedding").type
            dim = emb_type.list_size
            dtype = np.float16 if emb_type.value_type == pa.float16() else np.float32
            n = pf.metadata.num_rows
            vectors = np.lib.format.open_memmap(tmp / "vectors.npy", mode="w+", dtype=dtype, shape=(n, dim))
            keys = np.lib.format.open_memmap(tmp / "keys.npy", mode="w+", dtype=np.uint64, shape=(n, 5))
            schema = pa.schema([("chunk_id", pa.string()), ("doc_id", pa.string()), ("text", pa.string()),
                                ("chunk_text", pa.string())])
            have = set(pf.schema_arrow.names)
            missing = {"chunk_id", "doc_id", "text", "embedding"} - have
            if missing:
                raise SchemaError(f"{store.describe(key)} lacks column(s) {sorted(missing)} of the embed run contract")
            cols = [c for c in ("chunk_id", "doc_id", "text", "title", "content_hash", "embedding") if c in have]
            off = 0
            with ipc.new_file(str(tmp / "meta.arrow"), schema) as writer:
                for batch in pf.iter_batches(batch_size=4096, columns=cols):
                    b = batch.num_rows
                    emb = batch.column("embedding")
                    vectors[off:off + b] = emb.flatten().to_numpy(zero_copy_only=False).reshape(b, dim)
                    chunk_ids = batch.column("chunk_id").to_pylist()
                    doc_ids = batch.column("doc_id").to_pylist()
                    texts = batch.column("text").to_pylist()
                    titles = batch.column("title").to_pylist() if "title" in have else [None] * b
                    embedded = [prefix_for(t) + x for t, x in zip(titles, texts, strict=True)]
                    hashes = batch.column("content_hash").to_pylist() if "content_hash" in have else \
                        [hashlib.sha256(e.encode("utf-8", "surrogatepass")).hexdigest() for e in embedded]
                    for i in range(b):
                        keys[off + i] = (doc_key(doc_ids[i]), chunk_key(chunk_ids[i]), int(hashes[i][:16], 16),
                                         norm_key(embedded[i]), norm_key(texts[i]))
                    arrays = [pa.array(v, pa.string()) for v in (chunk_ids, doc_ids, embedded, texts)]
                    writer.write_batch(pa.record_batch(arrays, schema=schema))
                    off += b
            if off != rows:
                raise IntegrityError(f"{store.describe(key)} holds {off} rows, the run manifest says {rows}")
            vectors.flush()
            keys.flush()
            del vectors, keys
            src.unlink()
            (tmp / "DONE").write_text(json.dumps({"key": key, "rows": rows, "sha256": sha}))
            if final.exists():  # a half-written folder from a crash without DONE
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


class _SortedIndex:
    """key -> rows, as two sorted arrays (16 bytes a row; no Python dict)."""

    def __init__(self, keys: np.ndarray):
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.rows = order.astype(np.int64)

    def lookup(self, key: int) -> np.ndarray:
        k = np.uint64(key)
        lo = np.searchsorted(self.keys, k, side="left")
        hi = np.searchsorted(self.keys, k, side="right")
        return self.rows[lo:hi]


class MinedCorpus:
    """The run's chunks as the miner sees them: memory-mapped vectors, ids, texts and keys.

    Global row ``r`` is part ``s``'s local row ``r - offsets[s]``.
    """

    def __init__(self, folders: list[Path]):
        import pyarrow as pa
        import pyarrow.ipc as ipc

        self.vectors = [np.load(f / "vectors.npy", mmap_mode="r") for f in folders]  # each [n_s, dim]
        self.metas: list[pa.Table] = [ipc.open_file(pa.memory_map(str(f / "meta.arrow"))).read_all() for f in folders]
        self.keys = [np.load(f / "keys.npy", mmap_mode="r") for f in folders]  # each [n_s, 5] uint64
        sizes = [v.shape[0] for v in self.vectors]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        self.dim = int(self.vectors[0].shape[1])
        self._indexes: dict[int, _SortedIndex] = {}

    @classmethod
    def open(cls, source: MiningSource, cache_dir: str | None = None) -> MinedCorpus:
        store = open_store(source.store, endpoint_url=source.endpoint_url)
        chunker = run_chunker(source.run_config)
        root = cache_dir or default_cache_dir()
        folders = [materialize_part(store, p, chunker.prefix_for, root) for p in source.parts]
        return cls(folders)

    def _index(self, which: int) -> _SortedIndex:
        idx = self._indexes.get(which)
        if idx is None:
            idx = self._indexes[which] = _SortedIndex(np.concatenate([np.asarray(k[:, which]) for k in self.keys]))
        return idx

    def rows_for_id(self, ident: str) -> np.ndarray:
        """All chunks of a document id, else the chunk with that chunk id."""
        rows = self._index(KEY_DOC).lookup(doc_key(ident))
        return rows if rows.size else self._index(KEY_CHUNK).lookup(chunk_key(ident))

    def rows_of_documents(self, rows: np.ndarray) -> np.ndarray:
        """Every row of the documents that ``rows`` belong to (sorted, unique)."""
        doc_keys = np.unique(self.key_rows(rows)[:, KEY_DOC])
        idx = self._index(KEY_DOC)
        return np.unique(np.concatenate([idx.lookup(int(k)) for k in doc_keys] + [np.asarray(rows, np.int64)]))

    def rows_for_chunk_ids(self, chunk_ids: list[str]) -> np.ndarray:
        idx = self._index(KEY_CHUNK)
        out = np.full(len(chunk_ids), -1, dtype=np.int64)
        for i, c in enumerate(chunk_ids):
            r = idx.lookup(chunk_key(c))
            if r.size:
                out[i] = r[0]
        return out

    def rows_for_text(self, text: str) -> np.ndarray:
        k = norm_key(text)
        rows = self._index(KEY_NORM).lookup(k)
        return rows if rows.size else self._index(KEY_CHUNK_NORM).lookup(k)

    def _split(self, rows: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(shard, positions in ``rows``, local rows) per shard touched."""
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        out = []
        for s in np.unique(shard):
            pos = np.nonzero(shard == s)[0]
            out.append((int(s), pos, rows[pos] - self.offsets[s]))
        return out

    def vectors_for(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), dim] float32."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.size, self.dim), dtype=np.float32)
        for s, pos, local in self._split(rows):
            out[pos] = self.vectors[s][local]
        return out

    def key_rows(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), 5] uint64 (doc, chunk, content, norm, chunk-norm)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.size, 5), dtype=np.uint64)
        for s, pos, local in self._split(rows):
            out[pos] = self.keys[s][local]
        return out

    def column(self, rows: np.ndarray, name: str) -> list[str]:
        rows = np.asarray(rows, dtype=np.int64)
        out: list[Any] = [None] * rows.size
        for s, pos, local in self._split(rows):
            vals = self.metas[s].column(name).take(local).to_pylist()
            for p, v in zip(pos.tolist(), vals, strict=True):
                out[p] = v
        return out

    def iter_column(self, name: str) -> Iterator[list[str]]:
        for meta in self.metas:
            for chunk in meta.column(name).chunks:
                yield chunk.to_pylist()

    def search_exact(self, queries: np.ndarray, k: int, block_rows: int = 32768) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner-product top-k over every part: ([B, k] scores, [B, k] rows), best first.

        Blocked so the score matrix is at most ``B x block_rows``; ties go to the lower row.
        """
        b = queries.shape[0]
        k = min(k, self.n)
        best_s = np.empty((b, 0), dtype=np.float32)
        best_r = np.empty((b, 0), dtype=np.int64)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        for s, vecs in enumerate(self.vectors):
            for start in range(0, vecs.shape[0], block_rows):
                block = np.asarray(vecs[start:start + block_rows], dtype=np.float32)  # [m, dim]
                scores = q @ block.T  # [B, m]
                rows = np.broadcast_to(np.arange(start, start + block.shape[0], dtype=np.int64) + self.offsets[s],
                                       scores.shape)
                best_s, best_r = _keep_top(np.concatenate([best_s, scores], axis=1),
                                           np.concatenate([best_r, rows], axis=1), k)
        order = np.lexsort((best_r, -best_s), axis=1) if best_s.size else np.zeros_like(best_r)
        return np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_r, order, axis=1)


def _keep_top(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if scores.shape[1] <= k:
        return scores, rows
    # argpartition on (-score); among equal scores at the cut the choice is arbitrary but the
    # final lexsort orders whatever is kept deterministically.
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return np.take_along_axis(scores, idx, axis=1), np.take_along_axis(rows, idx, axis=1)


# ---------------------------------------------------------------------------------------------
# candidate sources
# ---------------------------------------------------------------------------------------------


@dataclass
class Candidates:
    """One query's candidates from one source, best first."""

    rows: np.ndarray  # int64 [m] corpus rows
    scores: np.ndarray  # float32 [m] embedding similarity to the query (what the margin rules use)
    ranks: np.ndarray  # int32 [m] position in the source's own ranking (0 = best), before any removal
    source: str

    def take(self, idx: np.ndarray) -> Candidates:
        return Candidates(self.rows[idx], self.scores[idx], self.ranks[idx], self.source)

    def __len__(self) -> int:
        return int(self.rows.size)


_TOKEN = re.compile(r"\w+", re.UNICODE)
STOPWORDS = frozenset(
    "a an and are as at be by for from has have in is it its of on or that the this to was were what which with"
    .split())


def bm25_tokens(text: str) -> list[str]:
    return [t for t in _TOKEN.findall((text or "").lower()) if t not in STOPWORDS]


class Bm25Candidates:
    """BM25 (Okapi, rank-bm25) over the chunks' embedded texts; built once per worker.

    rank-bm25 scores a query against every document in Python (O(corpus) per query term):
    fine to a few hundred thousand chunks; beyond that use the embedding strategy.
    """

    def __init__(self, corpus: MinedCorpus):
        from rank_bm25 import BM25Okapi

        t0 = time.perf_counter()
        tokenized = [bm25_tokens(t) for batch in corpus.iter_column("text") for t in batch]
        self.bm25 = BM25Okapi(tokenized)
        log.info("BM25 over %d chunks built in %.1f s", len(tokenized), time.perf_counter() - t0)

    def top(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, bm25 scores) best first, only rows sharing a term with the query."""
        scores = np.asarray(self.bm25.get_scores(bm25_tokens(query)), dtype=np.float64)
        k = min(k, scores.size)
        idx = np.argpartition(-scores, k - 1)[:k]
        idx = idx[np.lexsort((idx, -scores[idx]))]
        idx = idx[scores[idx] > 0]
        return idx.astype(np.int64), scores[idx]


def query_rng(seed: int, key: str) -> np.random.Generator:
    """Per-query randomness: the same query gets the same draws whatever its batch or worker."""
    return np.random.default_rng([seed, stable_u64(key, "rng") & 0xFFFFFFFF, stable_u64(key, "rng") >> 32])


# ---------------------------------------------------------------------------------------------
# rules
# ---------------------------------------------------------------------------------------------


@dataclass
class PositiveInfo:
    """What a query's positives exclude, and the score the margins are measured against."""

    rows: np.ndarray  # corpus rows of every positive (all chunks of a positive document)
    norm_keys: set[int]  # normalised-text keys of every positive
    margin_score: float  # the lowest positive score (sentence-transformers: the safe side)
    # normalised texts of positives found in no document: a chunk they contain is a piece of them
    containers: list[str] = field(default_factory=list)
    dup_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # rows found to be such pieces


def apply_rules(c: Candidates, keys: np.ndarray, pos: PositiveInfo, cfg: MiningConfig, window: int | None,
                ranked: bool, counts: dict[str, int]) -> Candidates:
    """Dedupe, window, exclude positives, margin rules, rank range. ``keys``: [m, 5] of ``c.rows``.

    Returns the pool sampling draws from, in rank order. ``counts`` gets one entry per rule.
    """
    m = len(c)
    if m == 0:
        return c
    # one candidate per content hash, the best-ranked one
    _, first = np.unique(keys[:, KEY_CONTENT], return_index=True)
    keep = np.zeros(m, dtype=bool)
    keep[first] = True
    counts["duplicate_text"] += int(m - keep.sum())
    c, keys = c.take(np.nonzero(keep)[0]), keys[keep]
    if window is not None and len(c) > window:
        c, keys = c.take(np.arange(window)), keys[:window]
    drop = np.isin(c.rows, pos.rows)
    counts["positive"] += int(drop.sum())
    alive = ~drop
    if pos.norm_keys or pos.dup_rows.size:
        pk = np.fromiter(pos.norm_keys, dtype=np.uint64, count=len(pos.norm_keys))
        dup = alive & (np.isin(keys[:, KEY_NORM], pk) | np.isin(keys[:, KEY_CHUNK_NORM], pk)
                       | np.isin(c.rows, pos.dup_rows))
        counts["duplicate_of_positive"] += int(dup.sum())
        alive &= ~dup
    s = c.scores
    p = pos.margin_score
    for rule, bad in (
        ("absolute_margin", (s + cfg.absolute_margin > p) if cfg.absolute_margin is not None else None),
        ("relative_margin", (s > p - abs(p) * cfg.relative_margin) if cfg.relative_margin is not None else None),
        ("max_score", (s > cfg.max_score) if cfg.max_score is not None else None),
        ("min_score", (s < cfg.min_score) if cfg.min_score is not None else None),
    ):
        if bad is not None:
            hit = alive & bad
            counts[rule] += int(hit.sum())
            alive &= ~hit
    pool = c.take(np.nonzero(alive)[0])
    if ranked:
        if len(pool) > cfg.range_max:
            counts["beyond_range_max"] += len(pool) - cfg.range_max
            pool = pool.take(np.arange(cfg.range_max))
        skipped = min(cfg.range_min, len(pool))
        counts["below_range_min"] += skipped
        pool = pool.take(np.arange(skipped, len(pool)))
    return pool


def sample_order(pool: Candidates, sampling: str, rng: np.random.Generator) -> np.ndarray:
    """The order in which the pool is drawn from: rank order (top) or a seeded permutation (random)."""
    if sampling == "top":
        return np.arange(len(pool))
    return rng.permutation(len(pool))


# ---------------------------------------------------------------------------------------------
# score statistics (fixed size, mergeable across workers)
# ---------------------------------------------------------------------------------------------


class ScoreHistogram:
    """Count, mean, std, min, max exactly; quantiles to ``(hi - lo) / bins``."""

    def __init__(self, lo: float = -2.0, hi: float = 2.0, bins: int = 4000):
        self.lo, self.hi, self.bins = lo, hi, bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.n = 0
        self.sum = 0.0
        self.sumsq = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, values: Any) -> None:
        v = np.asarray(values, dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        if not v.size:
            return
        idx = np.clip(((v - self.lo) / (self.hi - self.lo) * self.bins).astype(np.int64), 0, self.bins - 1)
        np.add.at(self.counts, idx, 1)
        self.n += int(v.size)
        self.sum += float(v.sum())
        self.sumsq += float((v * v).sum())
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))

    def merge(self, other: ScoreHistogram) -> None:
        self.counts += other.counts
        self.n += other.n
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float | None:
        if not self.n:
            return None
        target = q * self.n
        i = int(np.searchsorted(np.cumsum(self.counts), max(target, 1), side="left"))
        mid = self.lo + (i + 0.5) * (self.hi - self.lo) / self.bins
        return float(min(max(mid, self.min), self.max))

    def summary(self) -> dict[str, Any]:
        if not self.n:
            return {"count": 0}
        mean = self.sum / self.n
        var = max(0.0, self.sumsq / self.n - mean * mean) * self.n / max(1, self.n - 1)
        return {"count": self.n, "mean": round(mean, 4), "std": round(math.sqrt(var), 4), "min": round(self.min, 4),
                "p25": _r(self.quantile(0.25)), "median": _r(self.quantile(0.5)), "p75": _r(self.quantile(0.75)),
                "max": round(self.max, 4)}

    def to_dict(self) -> dict[str, Any]:
        nz = np.nonzero(self.counts)[0]
        return {"lo": self.lo, "hi": self.hi, "bins": self.bins, "n": self.n, "sum": self.sum, "sumsq": self.sumsq,
                "min": self.min if self.n else None, "max": self.max if self.n else None,
                "idx": nz.tolist(), "cnt": self.counts[nz].tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScoreHistogram:
        h = cls(d["lo"], d["hi"], d["bins"])
        h.counts[np.asarray(d["idx"], dtype=np.int64)] = np.asarray(d["cnt"], dtype=np.int64)
        h.n, h.sum, h.sumsq = int(d["n"]), float(d["sum"]), float(d["sumsq"])
        h.min = math.inf if d["min"] is None else float(d["min"])
        h.max = -math.inf if d["max"] is None else float(d["max"])
        return h


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


HISTOGRAMS = ("positive", "negative", "difference", "difficulty")


@dataclass
class BatchStats:
    """What one batch reports back (small; the driver merges these)."""

    batch: int
    queries: int = 0
    pairs: int = 0
    rows_written: int = 0
    rows_incomplete: int = 0
    queries_incomplete: int = 0
    pairs_unresolved: int = 0
    negatives: int = 0
    candidates: int = 0
    ce_scored: int = 0
    by_source: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SOURCES})
    removed: dict[str, int] = field(default_factory=lambda: {r: 0 for r in RULES})
    hist: dict[str, ScoreHistogram] = field(default_factory=lambda: {h: ScoreHistogram() for h in HISTOGRAMS})
    seconds: dict[str, float] = field(default_factory=lambda: {"encode": 0.0, "search": 0.0, "select": 0.0,
                                                                "cross_encoder": 0.0, "write": 0.0, "total": 0.0})
    part: dict[str, Any] | None = None
    worker: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "hist"}
        d["hist"] = {k: h.to_dict() for k, h in self.hist.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BatchStats:
        d = dict(d)
        hist = {k: ScoreHistogram.from_dict(v) for k, v in d.pop("hist").items()}
        return cls(**d, hist=hist)

    def merge(self, o: BatchStats) -> None:
        for k in ("queries", "pairs", "rows_written", "rows_incomplete", "queries_incomplete", "pairs_unresolved",
                  "negatives", "candidates", "ce_scored"):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        for k, v in o.by_source.items():
            self.by_source[k] = self.by_source.get(k, 0) + v
        for k, v in o.removed.items():
            self.removed[k] = self.removed.get(k, 0) + v
        for k, h in o.hist.items():
            self.hist[k].merge(h)
        for k, v in o.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v


# ---------------------------------------------------------------------------------------------
# the miner (one per worker)
# ---------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux ru_maxrss is KiB)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # psutil is optional; /proc is enough on Linux
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class NegativeMiner:
    """Holds the corpus (memory-mapped), the query encoder and, when asked, BM25, an ANN searcher and a
    cross-encoder, each loaded once. ``mine_batch`` turns a batch of query groups into rows + stats."""

    def __init__(self, cfg: MiningJobConfig, source: MiningSource, *, max_positives: int,
                 encoder: Encoder | None = None, threads: int | None = None):
        from engine.embedding import encoder_from_identity

        t0 = time.perf_counter()
        self.cfg = cfg
        self.rules = cfg.mining
        self.source = source
        self.corpus = MinedCorpus.open(source, cfg.runtime.cache_dir)
        device = cfg.runtime.device
        self.encoder = encoder or encoder_from_identity(source.model, device=device if device != "auto" else "auto",
                                                        threads=threads)
        self.window = self.rules.range_max + (self.rules.window_extra if self.rules.window_extra is not None
                                              else max_positives)
        self.search_mode = self._search_mode()
        self._bm25: Bm25Candidates | None = None
        self._ann: Any = None
        self._ce: Any = None
        self.load_seconds = time.perf_counter() - t0

    # -- setup ------------------------------------------------------------------------------
    def _search_mode(self) -> str:
        mode = self.rules.search
        if mode == "auto":
            # exact search over the run's vectors is affordable up to exact_max_rows and never misses a
            # candidate; past that (and when the version is a real ANN index) the index does the search
            big = self.corpus.n > self.rules.exact_max_rows
            mode = "ann" if self.source.ann and self.source.index_kind != "flat" and big else "exact"
        if mode == "ann" and not (self.source.index and self.source.ann):
            raise ConfigError("--search ann needs --index with --version/--alias naming a version with FAISS shards "
                              "(a run alone has no ANN index); use --search exact")
        return mode

    @property
    def bm25(self) -> Bm25Candidates:
        if self._bm25 is None:
            self._bm25 = Bm25Candidates(self.corpus)
        return self._bm25

    @property
    def ann(self) -> Any:
        if self._ann is None:
            try:
                from engine.search import Searcher
            except ImportError as err:
                raise ConfigError("--search ann needs engine.search (the index searcher), which this install "
                                  "lacks; use --search exact") from err
            store = open_store(self.source.store, endpoint_url=self.source.endpoint_url)
            self._ann = Searcher.load(store, str(self.source.index), str(self.source.version_id))
        return self._ann

    @property
    def cross_encoder(self) -> Any:
        if self._ce is None:
            self._ce = load_cross_encoder(str(self.rules.cross_encoder), self.cfg.runtime.device)
        return self._ce

    # -- candidates -------------------------------------------------------------------------
    def query_window(self, g: QueryGroup, pos: PositiveInfo) -> int:
        """range_max + max positives per query (sentence-transformers' window), widened by the extra
        chunks of multi-chunk positive documents, which would otherwise eat into it."""
        return self.window + max(0, int(pos.rows.size) - len(g.positives))

    def _embedding_candidates(self, qvecs: np.ndarray, window: int) -> list[Candidates]:
        """Top ``window`` by embedding similarity (+ slack for duplicate texts), per query."""
        k = min(self.corpus.n, window + max(8, window // 8))
        if self.search_mode == "ann":
            rows, scores = self._ann_search(qvecs, k)
        else:
            scores, rows = self.corpus.search_exact(qvecs, k)
        out = []
        for i in range(qvecs.shape[0]):
            r = rows[i]
            ok = r >= 0
            out.append(Candidates(r[ok], scores[i][ok].astype(np.float32), np.nonzero(ok)[0].astype(np.int32),
                                  "embedding"))
        return out

    def _ann_search(self, qvecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """ANN candidates from the index version, rescored exactly with the run's vectors (ANN scores
        are approximate; margins need true scores), re-sorted by the exact score."""
        hits = self.ann.search_vectors(qvecs, k=k, model=self.source.model)
        rows = np.full((qvecs.shape[0], k), -1, dtype=np.int64)
        for i, hs in enumerate(hits):
            ids = [h["chunk_id"] if isinstance(h, dict) else h.chunk_id for h in hs][:k]
            rows[i, :len(ids)] = self.corpus.rows_for_chunk_ids(ids)
        scores = np.full(rows.shape, -np.inf, dtype=np.float32)
        for i in range(rows.shape[0]):
            ok = rows[i] >= 0
            scores[i, ok] = self.corpus.vectors_for(rows[i, ok]) @ qvecs[i]
            order = np.lexsort((rows[i], -scores[i]))
            rows[i], scores[i] = rows[i][order], scores[i][order]
        return rows, scores

    def _bm25_candidates(self, query: str, qvec: np.ndarray, window: int) -> Candidates:
        rows, _ = self.bm25.top(query, window + max(8, window // 8))
        scores = self.corpus.vectors_for(rows) @ qvec if rows.size else np.zeros(0, dtype=np.float32)
        return Candidates(rows, scores.astype(np.float32), np.arange(rows.size, dtype=np.int32), "bm25")

    def _random_candidates(self, rng: np.random.Generator, qvec: np.ndarray, window: int) -> Candidates:
        m = min(self.corpus.n, window)
        rows = rng.choice(self.corpus.n, size=m, replace=False).astype(np.int64)  # random order
        scores = self.corpus.vectors_for(rows) @ qvec
        return Candidates(rows, scores.astype(np.float32), np.full(rows.size, -1, dtype=np.int32), "random")

    # -- positives --------------------------------------------------------------------------
    def _positives(self, groups: list[QueryGroup], qvecs: np.ndarray, st: BatchStats
                   ) -> tuple[list[PositiveInfo], list[list[tuple[float, str, str] | None]]]:
        """Per query: what to exclude and the margin score; per pair: (score, text, id) or None if unresolvable."""
        pending: list[tuple[int, int, str]] = []  # (query, pair, text) that must be encoded
        infos: list[PositiveInfo] = []
        per_pair: list[list[tuple[float, str, str] | None]] = []
        for qi, g in enumerate(groups):
            rows_all: list[np.ndarray] = []
            norms: set[int] = set()
            containers: list[str] = []
            resolved: list[tuple[float, str, str] | None] = []
            for pi, (pid, ptext) in enumerate(g.positives):
                rows = self.corpus.rows_for_id(pid) if pid else np.zeros(0, dtype=np.int64)
                if not rows.size and ptext:
                    rows = self.corpus.rows_for_text(ptext)
                if ptext:
                    norms.add(norm_key(ptext))
                if rows.size:
                    # the positive is a document: every chunk of it is excluded (a chunk id or a text
                    # names one chunk; its siblings are just as relevant), and so are copies of them
                    doc_rows = self.corpus.rows_of_documents(rows)
                    rows_all.append(doc_rows)
                    scores = self.corpus.vectors_for(rows) @ qvecs[qi]
                    best = int(np.argmax(scores))
                    keys = self.corpus.key_rows(doc_rows)
                    norms.update(int(k) for k in keys[:, KEY_NORM])
                    norms.update(int(k) for k in keys[:, KEY_CHUNK_NORM])
                    text = ptext or self.corpus.column(rows[best:best + 1], self._text_col())[0]
                    ident = pid or self.corpus.column(rows[best:best + 1], "doc_id")[0]
                    resolved.append((float(scores[best]), text, ident))
                elif ptext:
                    resolved.append(None)
                    pending.append((qi, pi, ptext))
                    containers.append(norm_text(ptext))
                else:
                    resolved.append(None)  # an id that is not in the corpus and no text: cannot score
            infos.append(PositiveInfo(np.unique(np.concatenate(rows_all)) if rows_all else np.zeros(0, np.int64),
                                      norms, math.nan, containers))
            per_pair.append(resolved)
        if pending:
            t0 = time.perf_counter()
            pvecs = self.encoder.encode_passages([t for _, _, t in pending])  # [p, dim]
            st.seconds["encode"] += time.perf_counter() - t0
            for (qi, pi, text), v in zip(pending, pvecs, strict=True):
                per_pair[qi][pi] = (float(v @ qvecs[qi]), text, groups[qi].positives[pi][0] or "")
        for qi, info in enumerate(infos):
            scores = [p[0] for p in per_pair[qi] if p is not None]
            st.pairs_unresolved += sum(1 for p in per_pair[qi] if p is None)
            info.margin_score = min(scores) if scores else math.nan
        return infos, per_pair

    def _with_pieces(self, pos: PositiveInfo, rows: np.ndarray) -> PositiveInfo:
        """Mark candidates whose chunk text lies inside a positive's text (the positive is a whole document
        given as text, the corpus holds its chunks): they are that positive, not negatives."""
        texts = self.corpus.column(rows, "chunk_text")
        pieces = [r for r, t in zip(rows.tolist(), texts, strict=True)
                  if len(t or "") >= MIN_PIECE_CHARS and any(norm_text(t) in c for c in pos.containers)]
        if not pieces:
            return pos
        return PositiveInfo(pos.rows, pos.norm_keys, pos.margin_score, pos.containers,
                            np.union1d(pos.dup_rows, np.asarray(pieces, dtype=np.int64)))

    def _text_col(self) -> str:
        return "text" if self.rules.negative_text == "embedded" else "chunk_text"

    # -- selection --------------------------------------------------------------------------
    def _select(self, g: QueryGroup, qvec: np.ndarray, emb: Candidates | None, pos: PositiveInfo, st: BatchStats
                ) -> tuple[list[tuple[int, float, int, str]], list[tuple[int, float, int, str]]]:
        """(chosen, reserve): negatives as (row, score, rank, source); the reserve refills cross-encoder drops."""
        rules = self.rules
        rng = query_rng(rules.seed, g.key)
        n = rules.num_negatives
        window = self.query_window(g, pos)
        if rules.strategy == "mixed":
            want = quotas(parse_mix(rules.mix), n)
        else:
            want = {s: (n if s == rules.strategy else 0) for s in SOURCES}
        pools: dict[str, list[tuple[int, float, int, str]]] = {}
        for source in SOURCES:
            if not rules.uses(source):
                continue
            if source == "embedding":
                assert emb is not None
                cands = emb
            elif source == "bm25":
                cands = self._bm25_candidates(g.query, qvec, window)
            else:
                cands = self._random_candidates(rng, qvec, window)
            st.candidates += len(cands)
            if pos.containers:
                pos = self._with_pieces(pos, cands.rows[:window])
            pool = apply_rules(cands, self.corpus.key_rows(cands.rows), pos, rules,
                               window if source != "random" else None, ranked=source != "random",
                               counts=st.removed)
            order = sample_order(pool, rules.sampling, rng)
            pools[source] = [(int(pool.rows[i]), float(pool.scores[i]), int(pool.ranks[i]), source) for i in order]
        chosen: list[tuple[int, float, int, str]] = []
        seen: set[int] = set()
        keys_of = {}

        def content(row: int) -> int:
            if row not in keys_of:
                keys_of[row] = int(self.corpus.key_rows(np.array([row]))[0, KEY_CONTENT])
            return keys_of[row]

        def take(items: list[tuple[int, float, int, str]], limit: int) -> None:
            while items and limit > 0 and len(chosen) < n:
                item = items.pop(0)
                ck = content(item[0])
                if ck in seen:
                    continue
                seen.add(ck)
                chosen.append(item)
                limit -= 1

        for source in SOURCES:  # each source's share
            if source in pools:
                take(pools[source], want.get(source, 0))
        for source in SOURCES:  # a short source's share goes to the others, embedding first
            if source in pools:
                take(pools[source], n)
        reserve: list[tuple[int, float, int, str]] = []
        for source in SOURCES:  # what is left, in fill order, one entry per text
            for item in pools.get(source, []):
                ck = content(item[0])
                if ck not in seen:
                    seen.add(ck)
                    reserve.append(item)
        return chosen, reserve

    def _cross_encoder_filter(self, groups: list[QueryGroup], chosen: list[list[tuple[int, float, int, str]]],
                              reserve: list[list[tuple[int, float, int, str]]], st: BatchStats) -> None:
        """Score chosen negatives with the cross-encoder; drop those above ce_max_score (likely false
        negatives) and refill from the reserve in its order (rank order for top sampling, the seeded
        draw order for random). Refills are scored a few at a time per query, all queries of the batch
        in one ``predict`` call per round, so a batch needs a handful of calls, not one per drop."""
        t0 = time.perf_counter()
        limit = float(self.rules.ce_max_score)  # type: ignore[arg-type]
        kept: list[list[tuple[int, float, int, str]]] = [[] for _ in groups]
        need = [len(c) for c in chosen]
        todo = [list(c) for c in chosen]
        while any(todo):
            pairs_idx = [(qi, item) for qi, items in enumerate(todo) for item in items]
            texts = self.corpus.column(np.array([it[0] for _, it in pairs_idx], dtype=np.int64), self._text_col())
            inputs = [(groups[qi].query, t) for (qi, _), t in zip(pairs_idx, texts, strict=True)]
            scores = self.cross_encoder.predict(inputs, batch_size=self.rules.ce_batch_size, show_progress_bar=False)
            st.ce_scored += len(pairs_idx)
            for (qi, item), s in zip(pairs_idx, np.asarray(scores, dtype=np.float64).ravel(), strict=True):
                if s > limit:
                    st.removed["cross_encoder"] += 1
                elif len(kept[qi]) < need[qi]:
                    kept[qi].append(item)
                else:  # scored as a spare and not needed: back to the front of the reserve
                    reserve[qi].insert(0, item)
            todo = [[] for _ in groups]
            for qi in range(len(groups)):
                short = need[qi] - len(kept[qi])
                if short > 0 and reserve[qi]:
                    take = min(len(reserve[qi]), max(2 * short, 4))  # a few spares: fewer rounds
                    todo[qi], reserve[qi] = reserve[qi][:take], reserve[qi][take:]
        for qi in range(len(groups)):
            chosen[qi] = kept[qi]
        st.seconds["cross_encoder"] += time.perf_counter() - t0

    # -- a batch ----------------------------------------------------------------------------
    def mine_batch(self, batch_index: int, groups: list[QueryGroup]) -> tuple[pa.Table, BatchStats]:
        t_start = time.perf_counter()
        st = BatchStats(batch=batch_index, queries=len(groups), pairs=sum(len(g.positives) for g in groups))
        t0 = time.perf_counter()
        qvecs = self.encoder.encode_queries([g.query for g in groups])  # [B, dim] float32, L2-normalised
        st.seconds["encode"] += time.perf_counter() - t0
        infos, per_pair = self._positives(groups, qvecs, st)
        t0 = time.perf_counter()
        window = max((self.query_window(g, p) for g, p in zip(groups, infos, strict=True)), default=self.window)
        emb = self._embedding_candidates(qvecs, window) if self.rules.uses("embedding") else [None] * len(groups)
        st.seconds["search"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        chosen: list[list[tuple[int, float, int, str]]] = []
        reserve: list[list[tuple[int, float, int, str]]] = []
        for qi, g in enumerate(groups):
            if math.isnan(infos[qi].margin_score):  # no positive could be scored: nothing to mine against
                chosen.append([])
                reserve.append([])
                continue
            c, r = self._select(g, qvecs[qi], emb[qi], infos[qi], st)
            chosen.append(c)
            reserve.append(r)
        st.seconds["select"] += time.perf_counter() - t0
        if self.rules.cross_encoder:
            self._cross_encoder_filter(groups, chosen, reserve, st)
        table = self._rows(groups, chosen, per_pair, st)
        st.seconds["total"] += time.perf_counter() - t_start
        return table, st

    def _rows(self, groups: list[QueryGroup], chosen: list[list[tuple[int, float, int, str]]],
              per_pair: list[list[tuple[float, str, str] | None]], st: BatchStats) -> pa.Table:
        n = self.rules.num_negatives
        cols: dict[str, list[Any]] = {k: [] for k in output_columns(n)}
        all_rows = np.array([it[0] for c in chosen for it in c], dtype=np.int64)
        texts = iter(self.corpus.column(all_rows, self._text_col()))
        chunk_ids = iter(self.corpus.column(all_rows, "chunk_id"))
        doc_ids = iter(self.corpus.column(all_rows, "doc_id"))
        for g, negs, pairs in zip(groups, chosen, per_pair, strict=True):
            negs = sorted(negs, key=lambda it: -it[1])  # highest score first, as sentence-transformers resorts
            neg_text = [next(texts) for _ in negs]
            neg_chunk = [next(chunk_ids) for _ in negs]
            neg_doc = [next(doc_ids) for _ in negs]
            complete = len(negs) == n
            if not complete and any(p is not None for p in pairs):
                st.queries_incomplete += 1
            for pair in pairs:
                if pair is None:
                    continue
                if not complete:
                    st.rows_incomplete += 1
                    if not self.rules.keep_incomplete or not negs:
                        continue
                pscore, ptext, pid = pair
                scores = [it[1] for it in negs]
                cols["query"].append(g.query)
                cols["positive"].append(ptext)
                cols["query_id"].append(g.query_id)
                cols["positive_id"].append(pid or None)
                cols["positive_score"].append(pscore)
                for j in range(n):
                    have = j < len(negs)
                    cols[f"negative_{j + 1}"].append(neg_text[j] if have else None)
                    cols[f"negative_{j + 1}_id"].append(neg_chunk[j] if have else None)
                    cols[f"negative_{j + 1}_doc_id"].append(neg_doc[j] if have else None)
                    cols[f"negative_{j + 1}_score"].append(scores[j] if have else None)
                    cols[f"negative_{j + 1}_rank"].append(negs[j][2] if have else None)
                    cols[f"negative_{j + 1}_source"].append(negs[j][3] if have else None)
                difficulty = float(np.mean(scores)) - pscore
                cols["difficulty"].append(difficulty)
                cols["curriculum_stage"].append(None)  # set by finalize from the global distribution
                st.rows_written += 1
                st.negatives += len(negs)
                for it in negs:
                    st.by_source[it[3]] += 1
                st.hist["positive"].add([pscore])
                st.hist["negative"].add(scores)
                st.hist["difference"].add([pscore - s for s in scores])
                st.hist["difficulty"].add([difficulty])
        return output_table(cols, n)


def output_columns(n: int) -> list[str]:
    """The triplet layout: text columns first (query, positive, negative_1..n: what sentence-transformers
    trains on, in order), then ids, scores, ranks, sources and the curriculum fields."""
    cols = ["query", "positive"] + [f"negative_{j}" for j in range(1, n + 1)]
    cols += ["query_id", "positive_id"] + [f"negative_{j}_id" for j in range(1, n + 1)]
    cols += [f"negative_{j}_doc_id" for j in range(1, n + 1)]
    cols += ["positive_score"] + [f"negative_{j}_score" for j in range(1, n + 1)]
    cols += [f"negative_{j}_rank" for j in range(1, n + 1)] + [f"negative_{j}_source" for j in range(1, n + 1)]
    cols += ["difficulty", "curriculum_stage"]
    return cols


def output_schema(n: int) -> pa.Schema:
    import pyarrow as pa

    types: dict[str, pa.DataType] = {}
    for c in output_columns(n):
        if c.endswith("_score") or c == "difficulty":
            types[c] = pa.float32()
        elif c.endswith("_rank"):
            types[c] = pa.int32()
        elif c == "curriculum_stage":
            types[c] = pa.int8()
        else:
            types[c] = pa.string()
    return pa.schema([(c, types[c]) for c in output_columns(n)])


def output_table(cols: dict[str, list[Any]], n: int) -> pa.Table:
    import pyarrow as pa

    schema = output_schema(n)
    return pa.Table.from_arrays([pa.array(cols[f.name], type=f.type) for f in schema], schema=schema)


def load_cross_encoder(path: str, device: str = "auto") -> Any:
    """A sentence-transformers CrossEncoder from a local folder (never downloads)."""
    from engine.embedding import resolve_model_path

    _, folder = resolve_model_path(path)
    from sentence_transformers import CrossEncoder

    kwargs: dict[str, Any] = {"local_files_only": True}
    if device != "auto":
        kwargs["device"] = device
    try:
        return CrossEncoder(folder, **kwargs)
    except Exception as err:  # noqa: BLE001 - any load failure: say which folder and what to pass
        raise ConfigError(f"cannot load a cross-encoder from {folder!r}: {err}") from err


# ---------------------------------------------------------------------------------------------
# the job around the miner: plan, stage, resume, finalize
# ---------------------------------------------------------------------------------------------


@dataclass
class Output:
    """Where results go: ``--out x.parquet`` is one file (+ ``x.summary.json``); anything else a folder."""

    store: Store
    single_file: str | None  # key of the file, or None for a folder of parts
    prefix: str  # folder prefix ("" = the store root)
    uri: str

    @classmethod
    def for_uri(cls, uri: str, endpoint_url: str | None) -> Output:
        if uri.rstrip("/").endswith(".parquet"):
            store, name = split_uri(uri, endpoint_url)
            return cls(store, name, "", uri)
        return cls(open_store(uri, endpoint_url=endpoint_url), None, "", uri)

    @property
    def staging(self) -> str:
        return f"{self.single_file}.parts" if self.single_file else "_parts"

    @property
    def summary_key(self) -> str:
        if self.single_file:
            return self.single_file[: -len(".parquet")] + ".summary.json"
        return "summary.json"

    def batch_part(self, i: int) -> str:
        return join(self.staging, f"batch-{i:06d}.parquet")

    def batch_stats(self, i: int) -> str:
        return join(self.staging, f"batch-{i:06d}.json")


@dataclass
class PreparedMining:
    cfg: MiningJobConfig
    source: MiningSource
    pairs: PairSet
    output: Output
    batches: list[list[QueryGroup]]
    pending: list[int]
    identity: str
    finished: dict[str, Any] | None = None  # the summary of an identical finished job


def job_identity(cfg: MiningJobConfig, source: MiningSource, pairs: PairSet) -> str:
    d = cfg.identity()
    d.update(run_id=source.run_id, version_id=source.version_id, pairs_sha256=pairs.sha256,
             batch_size=cfg.runtime.batch_size, model=source.model.get("fingerprint"))
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_mining(cfg: MiningJobConfig) -> PreparedMining:
    """Validate everything before any work: source, pairs, output; list the batches still to do."""
    cfg.validate()
    source = resolve_source(cfg)
    pairs = read_pairs(cfg.pairs, cfg.endpoint_url)
    out = Output.for_uri(cfg.out, cfg.endpoint_url)
    ident = job_identity(cfg, source, pairs)
    b = cfg.runtime.batch_size
    batches = [pairs.groups[i:i + b] for i in range(0, len(pairs.groups), b)]
    job_key = join(out.staging, "job.json")
    if out.store.exists(out.summary_key) and not out.store.exists(job_key):
        previous = out.store.read_json(out.summary_key)
        if previous.get("identity") == ident and not cfg.overwrite:
            return PreparedMining(cfg, source, pairs, out, batches, [], ident, finished=previous)
        if not cfg.overwrite:
            raise ConfigError(f"{cfg.out} already holds triplets mined with other settings or inputs; pass "
                              "--overwrite to replace them, or choose another --out")
    if cfg.overwrite:
        out.store.delete_prefix(out.staging)
    if out.store.exists(job_key) and out.store.read_json(job_key).get("identity") != ident:
        raise ConfigError(f"{cfg.out} holds an unfinished mining job with other settings; rerun it with the same "
                          "flags to resume, or pass --overwrite")
    out.store.write_json(job_key, {"identity": ident, "batches": len(batches), "started_at": _now()})
    done = {i for i in range(len(batches)) if out.store.exists(out.batch_stats(i))}
    pending = [i for i in range(len(batches)) if i not in done]
    return PreparedMining(cfg, source, pairs, out, batches, pending, ident)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class BatchRunner:
    """The worker side: a miner plus the staging writes. One per Ray actor (or one in-process)."""

    def __init__(self, cfg: MiningJobConfig, source: MiningSource, *, max_positives: int,
                 encoder: Encoder | None = None, threads: int | None = None):
        self.miner = NegativeMiner(cfg, source, max_positives=max_positives, encoder=encoder, threads=threads)
        self.out = Output.for_uri(cfg.out, cfg.endpoint_url)

    def run(self, batch_index: int, groups: list[dict[str, Any]] | list[QueryGroup]) -> dict[str, Any]:
        from engine.pipeline import write_part

        gs = [g if isinstance(g, QueryGroup) else QueryGroup.from_dict(g) for g in groups]
        table, st = self.miner.mine_batch(batch_index, gs)
        t0 = time.perf_counter()
        st.part = write_part(self.out.store, self.out.batch_part(batch_index), table)
        st.seconds["write"] += time.perf_counter() - t0
        st.worker = {"pid": os.getpid(), "peak_rss_bytes": peak_rss_bytes(), "rss_bytes": current_rss_bytes(),
                     "load_seconds": round(self.miner.load_seconds, 3), "search": self.miner.search_mode}
        d = st.to_dict()
        # the commit marker: written after the part, so a batch with stats has its rows
        self.out.store.write_json(self.out.batch_stats(batch_index), d)
        return d


def finalize_mining(prep: PreparedMining, wall_seconds: float, workers: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """Merge batch stats, set each row's curriculum stage from the global difficulty distribution,
    write the output (streaming one batch at a time) and the summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg, out = prep.cfg, prep.output
    total = BatchStats(batch=-1)
    per_worker: dict[int, dict[str, Any]] = {}
    missing = []
    for i in range(len(prep.batches)):
        if not out.store.exists(out.batch_stats(i)):
            missing.append(i)
            continue
        st = BatchStats.from_dict(out.store.read_json(out.batch_stats(i)))
        total.merge(st)
        w = st.worker or {}
        if w.get("pid") is not None:
            cur = per_worker.setdefault(int(w["pid"]), {"batches": 0, "queries": 0, "peak_rss_bytes": 0})
            cur["batches"] += 1
            cur["queries"] += st.queries
            cur["peak_rss_bytes"] = max(cur["peak_rss_bytes"], int(w.get("peak_rss_bytes", 0)))
            cur["search"] = w.get("search")
    if missing:
        raise ConfigError(f"{len(missing)} mining batches did not finish (first: {missing[:5]}); rerun the same "
                          "command to resume them")
    stages = cfg.mining.curriculum_stages
    diff = total.hist["difficulty"]
    cuts = [diff.quantile(i / stages) for i in range(1, stages)] if diff.n else []
    cuts_arr = np.asarray([c for c in cuts if c is not None], dtype=np.float64)
    n = cfg.mining.num_negatives
    schema = output_schema(n)
    written: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="embedctl-mined-") as tmp:
        writer = None
        local_single = os.path.join(tmp, "out.parquet")
        if out.single_file:
            writer = pq.ParquetWriter(local_single, schema, compression="zstd")
        part_no = 0
        for i in range(len(prep.batches)):
            local = os.path.join(tmp, "batch.parquet")
            out.store.download_file(out.batch_part(i), local)
            table = pq.read_table(local)
            if table.num_rows:
                d = table.column("difficulty").to_numpy(zero_copy_only=False).astype(np.float64)
                stage = np.searchsorted(cuts_arr, d, side="right").astype(np.int8) if cuts_arr.size else \
                    np.zeros(len(d), np.int8)
                table = table.set_column(table.schema.get_field_index("curriculum_stage"),
                                         pa.field("curriculum_stage", pa.int8()), pa.array(stage, pa.int8()))
                if writer is not None:
                    writer.write_table(table, row_group_size=8192)
                else:
                    from engine.pipeline import write_part

                    if part_no == 0:  # parts of an earlier job in this folder (--overwrite) must not linger
                        for key in out.store.list(""):
                            if re.fullmatch(r"part-\d+\.parquet", key):
                                out.store.delete(key)
                    written.append(write_part(out.store, f"part-{part_no:06d}.parquet", table))
                    part_no += 1
            os.unlink(local)
        if writer is not None:
            writer.close()
            digest, size = sha256_file(local_single), os.path.getsize(local_single)
            out.store.upload_file(out.single_file, local_single)
            written = [{"key": out.single_file, "rows": total.rows_written, "bytes": size, "sha256": digest}]
    summary = build_summary(prep, total, cuts, wall_seconds, written, per_worker, workers)
    out.store.write_json(out.summary_key, summary)
    out.store.delete_prefix(out.staging)
    return summary


def build_summary(prep: PreparedMining, total: BatchStats, cuts: list[float | None], wall_seconds: float,
                  files: list[dict[str, Any]], per_worker: dict[int, dict[str, Any]],
                  workers: dict[str, Any] | None) -> dict[str, Any]:
    cfg = prep.cfg
    considered = total.candidates
    mining_s = float((workers or {}).get("mining_seconds") or wall_seconds)
    removed = {k: {"count": v, "share": round(v / considered, 4) if considered else 0.0}
               for k, v in total.removed.items() if k in RULES}
    return {
        "kind": "mine-negatives",
        "identity": prep.identity,
        "status": "succeeded",
        "finished_at": _now(),
        "out": cfg.out,
        "files": files,
        "source": {**prep.source.to_dict(), "search": next((w.get("search") for w in per_worker.values()), None)},
        "pairs": {"uri": cfg.pairs, "sha256": prep.pairs.sha256, "pairs": prep.pairs.pairs,
                  "queries": len(prep.pairs.groups), "max_positives_per_query": prep.pairs.max_positives,
                  "rejects": prep.pairs.rejects, "columns": prep.pairs.columns},
        "config": asdict(cfg.mining),
        "counts": {"queries": total.queries, "pairs": total.pairs, "rows": total.rows_written,
                   "negatives": total.negatives, "rows_incomplete": total.rows_incomplete,
                   "queries_incomplete": total.queries_incomplete, "pairs_unresolved": total.pairs_unresolved,
                   "candidates_considered": considered, "cross_encoder_scored": total.ce_scored,
                   "negatives_by_source": total.by_source},
        "removed": removed,
        "scores": {"positive": total.hist["positive"].summary(), "negative": total.hist["negative"].summary(),
                   "difference": total.hist["difference"].summary()},
        "curriculum": {"field": "curriculum_stage", "stages": cfg.mining.curriculum_stages,
                       "difficulty": "mean negative score - positive score (higher = harder)",
                       "cut_points": [_r(c) for c in cuts], "distribution": total.hist["difficulty"].summary()},
        "timings": {"wall_seconds": round(wall_seconds, 3), "mining_seconds": round(mining_s, 3),
                    **{f"worker_{k}_seconds": round(v, 3) for k, v in total.seconds.items()}},
        "throughput": {
            # the mining phase (workers loaded, batches flowing) and the whole command (start-up included)
            "queries_per_second": round(total.queries / mining_s, 2) if mining_s else None,
            "end_to_end_queries_per_second": round(total.queries / wall_seconds, 2) if wall_seconds else None},
        "workers": {"pool": workers, "processes": [{"pid": pid, **w} for pid, w in sorted(per_worker.items())],
                    "peak_rss_bytes_max": max((w["peak_rss_bytes"] for w in per_worker.values()), default=None)},
    }


def run_mining_locally(cfg: MiningJobConfig, encoder: Encoder | None = None,
                       progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The whole job in this process, without Ray (tests, small corpora, ``--local``)."""
    t0 = time.perf_counter()
    prep = prepare_mining(cfg)
    if prep.finished is not None:
        return prep.finished
    info: dict[str, Any] = {"mode": "local", "actors": 1}
    if progress:
        progress({"event": "planned", "queries": len(prep.pairs.groups), "pairs": prep.pairs.pairs,
                  "batches": len(prep.batches), "pending": len(prep.pending), "corpus_rows": prep.source.rows})
    if prep.pending:
        runner = BatchRunner(cfg, prep.source, max_positives=prep.pairs.max_positives, encoder=encoder)
        info["startup_seconds"] = round(time.perf_counter() - t0, 3)
        t_mine = time.perf_counter()
        for i in prep.pending:
            d = runner.run(i, prep.batches[i])
            if progress:
                progress({"event": "batch", "batch": i, "queries": d["queries"], "rows": d["rows_written"]})
        info["mining_seconds"] = round(time.perf_counter() - t_mine, 3)
    return finalize_mining(prep, time.perf_counter() - t0, info)


def format_summary(summary: dict[str, Any]) -> str:
    """A table in the manner of sentence-transformers' mining printout, plus the removal counts."""
    s = summary["scores"]
    lines = [f"{'Metric':<8}{'Positive':>12}{'Negative':>12}{'Difference':>12}"]
    for k in ("count", "mean", "std", "min", "p25", "median", "p75", "max"):
        vals = [s[w].get(k) for w in ("positive", "negative", "difference")]
        lines.append(f"{k.capitalize():<8}" + "".join(f"{'' if v is None else v:>12}" for v in vals))
    c = summary["counts"]
    lines.append(f"{c['rows']} rows ({c['queries']} queries, {c['pairs']} pairs), {c['negatives']} negatives "
                 f"{c['negatives_by_source']}; {c['candidates_considered']} candidates considered")
    for rule, v in summary["removed"].items():
        if v["count"]:
            lines.append(f"removed {v['count']:>8} ({v['share']:.2%}) by {rule}")
    if c["rows_incomplete"]:
        lines.append(f"{c['rows_incomplete']} rows ({c['queries_incomplete']} queries) found fewer than "
                     f"{summary['config']['num_negatives']} negatives"
                     + (" and were written with nulls" if summary["config"]["keep_incomplete"]
                        else " and were left out")
                     + "; widen --range-max or loosen the margins to find more")
    if c["pairs_unresolved"]:
        lines.append(f"{c['pairs_unresolved']} pairs named a positive id that is not in the corpus and gave no text")
    t = summary["throughput"]
    lines.append(f"{summary['timings']['wall_seconds']:.1f} s, {t['queries_per_second']} queries/s; "
                 f"worker peak RSS {(summary['workers']['peak_rss_bytes_max'] or 0) / 2**20:.0f} MiB")
    return "\n".join(lines)


__all__ = [
    "MiningConfig", "MiningRuntime", "MiningJobConfig", "MiningSource", "NegativeMiner", "BatchRunner",
    "prepare_mining", "finalize_mining", "run_mining_locally", "read_pairs", "resolve_source", "apply_rules",
    "Candidates", "PositiveInfo", "ScoreHistogram", "quotas", "parse_mix", "format_summary",
]
