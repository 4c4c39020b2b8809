"""Mining configuration: the rules (part of a job's identity), the runtime knobs, the job config."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from engine.core.config import from_flat
from engine.core.errors import ConfigError

log = logging.getLogger(__name__)


Strategy = Literal["embedding", "bm25", "random", "mixed"]
Sampling = Literal["top", "random"]
SearchMode = Literal["auto", "exact", "ann"]
SOURCES = ("embedding", "bm25", "random")
# Removal rules in the order they are applied (the summary lists them in this order).
RULES = ("duplicate_text", "positive", "duplicate_of_positive", "absolute_margin", "relative_margin", "max_score",
         "min_score", "beyond_range_max", "below_range_min", "cross_encoder")


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
    ce_max_checks: int | None = None  # cross-encoder scorings per query at most [4 x num_negatives]
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
        if self.ce_max_checks is not None and self.ce_max_checks < self.num_negatives:
            raise ConfigError(f"ce_max_checks ({self.ce_max_checks}) must be at least num_negatives "
                              f"({self.num_negatives})")
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
    shared_filesystem: bool = False  # a local-path store is mounted on every Ray node (else refused on >1 node)
    workers: int | None = None  # mining actors; None = sized from the cluster's resources
    threads_per_worker: int | None = None
    device: str = "auto"  # query encoder (and cross-encoder) device
    batch_size: int = 256  # queries per work item (the memory grain of a worker)
    # padded tokens per forward pass of the query encoder; None = 1024 on CPU (short queries sorted by
    # length into small batches pad little: 2.8x faster than one 16k-token batch), 16384 on GPU
    query_batch_tokens: int | None = None
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

    def with_absolute_paths(self) -> MiningJobConfig:
        """The same job with its local paths (store, pairs, out, cache) absolute: the Ray actors it is sent to
        run in another working folder, where ``./store`` is another folder (or none)."""
        from engine.core.storage import absolute_uri

        return replace(self, store=str(absolute_uri(self.store)), pairs=str(absolute_uri(self.pairs)),
                       out=str(absolute_uri(self.out)),
                       runtime=replace(self.runtime, cache_dir=absolute_uri(self.runtime.cache_dir)))

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> MiningJobConfig:
        """Flat keys (CLI flags and a config file share them; nested ``mining:``/``runtime:`` accepted)."""
        return from_flat(cls, flat, label="mining config",
                         coerce={k: functools.partial(_optional_float, k) for k in OPTIONAL_FLOATS})

    def identity(self) -> dict[str, Any]:
        """What makes two mining jobs the same job (for resume and idempotent reruns)."""
        d = asdict(self.mining)
        d.update(store=self.store, index=self.index, version=self.version, alias=self.alias, run=self.run,
                 pairs=self.pairs)
        return d


OPTIONAL_FLOATS = ("relative_margin", "absolute_margin", "max_score", "min_score", "ce_max_score")


def _optional_float(name: str, value: Any) -> float | None:
    """Margins and thresholds accept a number, or none/off to disable them."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "off", "null", "")):
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{name} must be a number or 'none', got {value!r}") from err
