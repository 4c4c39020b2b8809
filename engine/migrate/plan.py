"""The migration plan and its flat config keys (read through engine.core.config, frozen at start)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from itertools import pairwise
from typing import Any

from engine.core.config import allowed_keys, from_flat, normalize_key
from engine.core.errors import ConfigError


@dataclass(frozen=True)
class GreenEmbedKeys:
    """Embed-job keys a plan may override for green (everything else comes from blue's own run)."""

    corpus: str | None = None
    model: str | None = None
    truncate_dim: int | None = None
    query_prompt: str | None = None
    passage_prompt: str | None = None
    device: str | None = None
    dtype: str | None = None
    output_dtype: str | None = None
    batch_tokens: int | None = None
    chunk_tokens: int | None = None
    chunk_overlap: int | None = None
    chunker: str | None = None
    tokenizer: str | None = None
    normalize: Any = None
    title_prefix: Any = None
    max_doc_chars: int | None = None
    unit_rows: int | None = None
    id_column: str | None = None
    text_column: str | None = None
    title_column: str | None = None
    workers: int | None = None
    threads_per_worker: int | None = None
    address: str | None = None
    backend: str | None = None  # green's runtime (torch|onnx|openvino|auto) [blue's]
    quantize: str | None = None  # green's quantization (none|int8) [blue's]


@dataclass(frozen=True)
class RunKeys:
    """Keys of a migration config that say where and how to run it, not what it does."""

    store: str | None = None
    endpoint_url: str | None = None
    migration_id: str | None = None
    until: str | None = None
    break_lock: bool | None = None


EMBED_KEYS: tuple[str, ...] = tuple(f.name for f in fields(GreenEmbedKeys))
RUNTIME_KEYS = ("device", "workers", "threads_per_worker", "address", "batch_tokens")  # not part of the plan identity
BUILD_KEY_ALIASES = {"index_kind": "kind", "index_factory": "factory"}
RUN_KEYS: tuple[str, ...] = tuple(f.name for f in fields(RunKeys))
INPUT_FIELDS = ("benchmark", "canaries", "queries", "pairs")  # files copied into the store at start
PLAN_KEY_ALIASES = {"dim": "truncate_dim", "weight": "weights", "retention": "retention_s", "soak": "soak_s"}


@dataclass(frozen=True)
class MigrationPlan:
    """What a migration does. Frozen into the state when the migration starts; a rerun with a
    different plan under the same migration id is refused."""

    index: str
    alias: str = "live"
    # green: the embed job of blue's source run with these keys replaced (model, dim, prompts, ...)
    embed: dict[str, Any] = field(default_factory=dict)
    # green: index build options (kind, params, ...) replacing blue's; {} = the same as blue
    build: dict[str, Any] = field(default_factory=dict)
    # evaluation
    benchmark: str | None = None  # an `embedctl benchmark` file (queries + graded judgments)
    canaries: str | None = None  # canary file (query -> expected doc ids); default: the benchmark
    queries: str | None = None  # the dual-run query set; default: the benchmark's queries
    pairs: str | None = None  # labelled (query, doc, relevant) pairs for calibration; default: from the benchmark
    k: int = 10
    disagreements: int = 20  # queries shown in the report
    # rollout and gates
    weights: tuple[float, ...] = (5.0, 25.0, 100.0)
    min_recall: float | None = None  # green's canary recall@k must reach this
    max_recall_drop: float = 0.05  # ... and may not fall more than this below blue's baseline
    max_error_rate: float = 0.0  # failed queries / queries during a step
    soak_s: float = 0.0  # keep probing each step this long before passing it
    probe_url: str | None = None  # a running `embedctl serve` to probe over HTTP during each step
    retention_s: float = 7 * 86400.0  # blue stays restorable this long after cutover

    def validate(self) -> None:
        from engine.core.names import check_name

        check_name("index", self.index)
        check_name("alias", self.alias)
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")
        unknown = set(self.embed) - set(EMBED_KEYS)
        if unknown:
            raise ConfigError(f"unknown embed keys for green {sorted(unknown)}; allowed: {', '.join(EMBED_KEYS)}")
        changes_vectors = ("model", "truncate_dim", "backend", "quantize")
        if not any(self.embed.get(k) for k in changes_vectors) and "model" not in self.embed:
            raise ConfigError("a migration needs a new model: give --model (or --dim for a Matryoshka truncation, "
                              "or --backend/--quantize for another runtime of the same model)")
        if self.embed.get("backend") or self.embed.get("quantize"):
            from engine.embed.backends import check_choice

            check_choice(str(self.embed.get("backend") or "auto"), str(self.embed.get("quantize") or "none"))
        check_weights(self.weights)
        for name in ("max_recall_drop", "max_error_rate"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {v}")
        if self.min_recall is not None and not 0 <= self.min_recall <= 1:
            raise ConfigError(f"min_recall must be in [0, 1], got {self.min_recall}")
        if self.soak_s < 0 or self.retention_s < 0:
            raise ConfigError("soak_s and retention_s must be >= 0")
        if self.benchmark is None and self.queries is None:
            raise ConfigError("a migration needs a query set to compare blue and green: give --benchmark "
                              "(queries + judgments) or --queries")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weights"] = [float(w) for w in self.weights]
        return d

    def identity(self) -> dict[str, Any]:
        """What makes two plans the same migration (runtime knobs excluded)."""
        d = self.to_dict()
        d["embed"] = {k: v for k, v in sorted(self.embed.items()) if k not in RUNTIME_KEYS}
        for k in ("soak_s", "probe_url", "retention_s", "disagreements", "weights", "min_recall",
                  "max_recall_drop", "max_error_rate"):
            d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MigrationPlan:
        """A plan from its own field names (a state document's ``plan``); None means the default."""
        kw = dict(d)
        kw["embed"] = dict(kw.get("embed") or {})
        kw["build"] = dict(kw.get("build") or {})
        return from_flat(cls, kw, coerce={"weights": parse_weights}, label="migration settings")


@dataclass(frozen=True)
class MigrationConfig:
    """Every flat key a migration config (file or flags) takes: the plan's own keys, green's
    embed-job keys (section ``embed``), the run keys, and the index-build shortcuts."""

    plan: MigrationPlan
    embed: GreenEmbedKeys = field(default_factory=GreenEmbedKeys)
    run: RunKeys = field(default_factory=RunKeys)
    index_kind: str | None = None
    index_factory: str | None = None


def parse_weights(spec: str | Sequence[float] | float) -> tuple[float, ...]:
    """``"5,25,100"`` (or a list) -> ``(5.0, 25.0, 100.0)``: increasing percentages ending at 100."""
    if isinstance(spec, (int, float)):
        items: list[Any] = [spec]
    elif isinstance(spec, str):
        items = [s for s in spec.replace(" ", "").split(",") if s]
    else:
        items = list(spec)
    try:
        weights = tuple(float(w) for w in items)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--weight must be comma-separated percentages like 5,25,100, got {spec!r}") from err
    return check_weights(weights)


def check_weights(weights: Sequence[float]) -> tuple[float, ...]:
    w = tuple(float(x) for x in weights)
    if not w:
        raise ConfigError("--weight needs at least one step (e.g. 5,25,100)")
    if any(not 0 < x <= 100 for x in w) or any(b <= a for a, b in pairwise(w)):
        raise ConfigError(f"rollout weights must increase within (0, 100], got {list(w)}")
    if w[-1] != 100:
        raise ConfigError(f"the last rollout step must be 100 (all query keys on green), got {list(w)}")
    return w


def parse_duration(value: str | float | int | None, what: str) -> float | None:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"45s"`` or a number of seconds -> seconds."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip().lower()
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise ConfigError(f"{what} must be a duration like 30s, 15m, 12h, 7d (or seconds), got {value!r}") from None


def plan_from_flat(flat: Mapping[str, Any]) -> tuple[MigrationPlan, dict[str, Any]]:
    """A plan from flat keys (a config file and flags share them; flags win before this call).

    Plan keys (``index``, ``alias``, ``benchmark``, ``weights``/``weight``, ...) are taken as they
    are; embed-job keys (``model``, ``dim``, ``corpus``, ``chunk_tokens``, ...) go to the green
    build's embed job; ``index_kind`` and a nested ``build:`` mapping go to the index builder;
    ``store``, ``endpoint_url``, ``migration_id``, ``until``, ``break_lock`` are returned apart.
    Unknown keys are an error."""
    if not any(str(k).replace("-", "_") == "index" and v is not None for k, v in flat.items()):
        raise ConfigError("a migration needs --index (the index whose alias moves to the new model)")
    allowed = set(allowed_keys(MigrationConfig)) | set(PLAN_KEY_ALIASES)
    unknown = sorted({normalize_key(k) for k in flat} - allowed)
    if unknown:
        raise ConfigError(f"unknown migration config keys {unknown}; allowed: {', '.join(sorted(allowed))}")
    cfg = from_flat(MigrationConfig, flat, aliases=PLAN_KEY_ALIASES, label="migration config",
                    coerce={"weights": parse_weights,
                            "retention_s": lambda v: parse_duration(v, "retention"),
                            "soak_s": lambda v: parse_duration(v, "soak")})
    embed = {**cfg.plan.embed, **{k: v for k, v in asdict(cfg.embed).items() if v is not None}}
    build = dict(cfg.plan.build)
    for key, target in BUILD_KEY_ALIASES.items():
        if getattr(cfg, key) is not None:
            build[target] = getattr(cfg, key)
    plan = replace(cfg.plan, embed=embed, build=build)
    plan.validate()
    return plan, {k: v for k, v in asdict(cfg.run).items() if v is not None}


def default_migration_id(plan: MigrationPlan) -> str:
    """Same plan -> same id, so rerunning the same command resumes the same migration."""
    h = hashlib.sha256(json.dumps(plan.identity(), sort_keys=True, default=str).encode()).hexdigest()
    return f"mig-{h[:10]}"
