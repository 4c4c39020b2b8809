"""What a refresh does (RefreshConfig), read from the same flat keys as the embed job's."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

from engine.core.config import FlatConfig, allowed_keys, from_flat, normalize_key, sections_of
from engine.core.errors import ConfigError
from engine.embed.chunking import ChunkConfig
from engine.embed.config import ALIASES as EMBED_ALIASES
from engine.embed.config import EmbedConfig, EmbedJobConfig, RuntimeConfig
from engine.embed.corpus import CorpusConfig

Strategy = Literal["auto", "incremental", "rebuild"]
Executor = Literal["auto", "local", "ray"]


@dataclass(frozen=True)
class RefreshConfig(FlatConfig):
    """What a refresh does. Model and chunker settings are *not* here: they come from the live
    version's source run (``overrides`` may repeat them; a different value is refused)."""

    CONFIG_LABEL: ClassVar[str] = "refresh settings"

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
    canary: str | None = None  # canary set to check before publishing (engine.quality.canary)
    lease_ttl_s: float = 120.0  # a crashed refresh's lease expires after this long (renewed every ttl/4)
    lease_wait_s: float = 0.0  # wait this long for a held lease before failing (a retried cluster job)
    break_lease: bool = False  # take the lease even if it looks alive (you know its holder is dead)
    executor: Executor = "auto"  # where the chunk/embed stages run (engine.distributed.refresh decides for auto)
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

    def chunk_in_driver(self, executor: str, pending_docs: int) -> bool:
        """Chunk in this process: ``executor: local``, or ``auto`` with at most ``local_max_docs`` pending docs."""
        return executor == "local" or (executor == "auto" and pending_docs <= self.local_max_docs)

    def embed_in_driver(self, executor: str, misses: int) -> bool:
        """Embed in this process: ``executor: local``, or ``auto`` when at most ``local_max_embed`` chunks need
        the model (no actor pool or cluster model load is paid for a small change)."""
        return executor == "local" or (executor == "auto" and misses <= self.local_max_embed)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RefreshConfig:
        """File + flags, one flat key space: refresh keys plus the embed job's keys (``engine.core.config``).

        ``alias: live`` is shorthand for ``from_alias: live`` and ``publish_to: live``; the embed
        job's keys become ``overrides`` (checked against the live run by ``engine.refresh.live``).
        """
        own, overrides = split_refresh_keys(flat)
        missing = [k for k in ("corpus", "store", "index") if not own.get(k)]
        if missing:
            raise ConfigError(f"refresh needs {', '.join(missing)} (as flags or config keys)")
        return from_flat(cls, {**own, "overrides": overrides}, label=cls.CONFIG_LABEL)


def split_refresh_keys(flat: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(refresh keys, embed-job keys) of one flat or nested key space; unknown keys are a ConfigError.

    Nested sections (``refresh:``, and the embed job's ``corpus:``/``chunk:``/``embed:``/``runtime:``)
    are flattened, ``None`` means "not set", and ``alias`` fills ``from_alias`` and ``publish_to``."""
    nested = {"refresh", *sections_of(EmbedJobConfig)}
    keys: dict[str, Any] = {normalize_key(k): v for k, v in flat.items() if v is not None}
    for section in sorted(nested & set(keys)):
        if isinstance(keys[section], Mapping):
            keys.update({normalize_key(k): v for k, v in keys.pop(section).items() if v is not None})
    if "alias" in keys:
        alias = keys.pop("alias")
        keys.setdefault("from_alias", alias)
        keys.setdefault("publish_to", alias)
    own_names = {f.name for f in fields(RefreshConfig)} - {"overrides"}
    own = {k: keys.pop(k) for k in list(keys) if k in own_names}
    embed_keys = set(allowed_keys(EmbedJobConfig)) | set(EMBED_ALIASES)
    unknown = set(keys) - embed_keys
    if unknown:
        raise ConfigError(f"unknown refresh config keys {sorted(unknown)}; allowed: "
                          f"{', '.join(sorted(own_names | embed_keys | {'alias'}))}")
    return own, keys


# Keys that change vectors or chunk ids: a refresh must use the live version's values.
IDENTITY_KEYS = tuple(f.name for f in fields(ChunkConfig)) + (
    "model", "truncate_dim", "query_prompt", "passage_prompt", "output_dtype", "backend", "quantize")
# Keys a refresh may change freely: how the snapshot is read, how the work runs.
# (Device, precision and speed knobs are not inherited from the live run: it may have run on GPUs.)
FREE_KEYS = tuple(f.name for f in fields(CorpusConfig) if f.name not in ("corpus", "endpoint_url")) + (
    "device", "dtype") + tuple(EmbedConfig.SPEED_ONLY) + tuple(f.name for f in fields(RuntimeConfig))
