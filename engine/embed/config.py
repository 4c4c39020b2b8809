"""Job configuration: one frozen config per stage, composed into a job config.

A config file (YAML or JSON) and CLI flags share one flat key space (``chunk_tokens``,
``model``, ...); flags win. The resolved config is written into every manifest.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from engine.embed.chunking import ChunkConfig
from engine.embed.corpus import CorpusConfig
from engine.core.errors import ConfigError


@dataclass(frozen=True)
class EmbedConfig:
    """The embedding stage."""

    model: str | None = None  # folder, installed package, or hash:DIM; None = packaged MiniLM
    device: Literal["cpu", "cuda", "auto"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # compute precision
    output_dtype: Literal["float32", "float16"] = "float32"  # stored vectors
    batch_tokens: int = 0  # padded tokens per forward pass; 0 = by device (engine.embed.encoders.default_batch_tokens)
    truncate_dim: int | None = None  # Matryoshka: keep the first N dims, renormalise
    query_prompt: str | None = None  # E5-style "query: "
    passage_prompt: str | None = None  # E5-style "passage: "
    pretokenize: bool = True  # tokenize in the CPU chunk tasks; actors only pad + forward
    compile: bool = False  # torch.compile(dynamic=True) the model once per actor (GPU)

    SPEED_ONLY = ("batch_tokens", "pretokenize", "compile")  # never change the vectors beyond fp noise

    def validate(self) -> None:
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"device must be cpu, cuda or auto, got {self.device!r}")
        if self.output_dtype not in ("float32", "float16"):
            raise ConfigError(f"output_dtype must be float32 or float16, got {self.output_dtype!r}")
        if self.batch_tokens < 0 or 0 < self.batch_tokens < 64:
            raise ConfigError(f"batch_tokens must be at least 64 (or 0: chosen by device), got {self.batch_tokens}")
        if self.truncate_dim is not None and self.truncate_dim < 1:
            raise ConfigError(f"dim must be positive, got {self.truncate_dim}")


@dataclass(frozen=True)
class RuntimeConfig:
    """How work is spread; never part of the run's identity."""

    address: str | None = None  # Ray address; None = start a local Ray (or RAY_ADDRESS)
    workers: int | None = None  # embedding actors; None = sized from the cluster's resources
    threads_per_worker: int | None = None  # torch threads per CPU actor; None = CPUs / workers
    progress: bool = True


@dataclass(frozen=True)
class EmbedJobConfig:
    corpus: CorpusConfig
    store: str
    run_id: str | None = None
    endpoint_url: str | None = None
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> None:
        self.chunk.validate()
        self.embed.validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity_dict(self) -> dict[str, Any]:
        """What makes two runs the same run (runtime knobs excluded)."""
        d = self.to_dict()
        d.pop("runtime")
        d.pop("run_id")
        d.pop("store")  # the run lives in the store; moving a store keeps its runs' ids
        d["corpus"].pop("endpoint_url", None)
        d.pop("endpoint_url", None)
        for k in EmbedConfig.SPEED_ONLY:  # a resume may change these (e.g. a smaller budget after OOM)
            d["embed"].pop(k, None)
        return d

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> EmbedJobConfig:
        return from_flat(cls, flat)


SECTIONS: dict[str, type] = {"corpus": CorpusConfig, "chunk": ChunkConfig, "embed": EmbedConfig, "runtime": RuntimeConfig}
ALIASES = {"dim": "truncate_dim", "workers": "workers"}


def from_flat(cls: type, flat: dict[str, Any]) -> Any:
    """Build a job config from flat keys (file + flags). Unknown keys are an error, not ignored."""
    flat = {ALIASES.get(k.replace("-", "_"), k.replace("-", "_")): v for k, v in flat.items() if v is not None}
    # nested form ({"chunk": {...}}) is accepted too
    for section in list(flat):
        if section in SECTIONS and isinstance(flat[section], dict):
            flat.update(flat.pop(section))
    top_fields = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    used: set[str] = set()
    for name, f in top_fields.items():
        sub = SECTIONS.get(name)
        if sub is not None and dataclasses.is_dataclass(sub):
            sub_kwargs = {sf.name: flat[sf.name] for sf in fields(sub) if sf.name in flat}
            used.update(sub_kwargs)
            try:
                kwargs[name] = sub(**sub_kwargs)
            except TypeError as err:
                raise ConfigError(f"{name} settings: {err}") from err
        elif name in flat:
            kwargs[name] = flat[name]
            used.add(name)
    unknown = set(flat) - used
    if unknown:
        allowed = sorted({f.name for s in SECTIONS.values() for f in fields(s)} | set(top_fields) - set(SECTIONS))
        raise ConfigError(f"unknown config keys {sorted(unknown)}; allowed: {', '.join(allowed)}")
    try:
        cfg = cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"incomplete config: {err}") from err
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def load_config_file(path: str | None) -> dict[str, Any]:
    """Read a YAML or JSON config file into a flat-or-nested dict ({} when no file)."""
    if not path:
        return {}
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    text = open(path, encoding="utf-8").read()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - yaml/json parse errors alike
        raise ConfigError(f"config file {path!r} does not parse: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of keys to values")
    return data
