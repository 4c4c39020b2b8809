"""One config mechanism for every job and verb: frozen dataclasses filled from one flat key space.

A config file (YAML or JSON) and CLI flags share flat keys (``chunk_tokens``, ``model``, ...);
flags win. A job config is a frozen dataclass whose fields are either values or *sections*
(fields whose type is itself a dataclass, e.g. ``chunk: ChunkConfig``). ``from_flat`` routes
each flat key to the top level or to the section that has a field of that name, accepts the
nested form too (``{"chunk": {"chunk_tokens": 200}}``), maps other spellings through
``aliases``, treats ``None`` as "not set" (except the keys in ``nullable``), and refuses
unknown keys with the list of allowed ones. The result is validated (``validate()``) before
it is returned, and ``to_dict()`` gives what manifests record.

Usage::

    @dataclass(frozen=True)
    class BuildJobConfig(FlatConfig):
        KEY_ALIASES: ClassVar[dict[str, str]] = {"run_id": "run"}
        store: str
        build: BuildConfig = field(default_factory=BuildConfig)

    cfg = BuildJobConfig.from_flat({**load_config_file(path), **flags})
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from engine.core.errors import ConfigError

T = TypeVar("T")


def normalize_key(key: str) -> str:
    """``chunk-tokens`` and ``chunk_tokens`` are one key."""
    return str(key).replace("-", "_")


def sections_of(cls: type) -> dict[str, type]:
    """Field name -> dataclass type, for the fields of ``cls`` that are sections."""
    hints = typing.get_type_hints(cls)
    out: dict[str, type] = {}
    for f in dataclasses.fields(cls):
        t = hints.get(f.name)
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            out[f.name] = t
    return out


def allowed_keys(cls: type) -> list[str]:
    """Every flat key ``cls`` accepts (top-level values and every section's fields)."""
    secs = sections_of(cls)
    keys = {f.name for f in dataclasses.fields(cls) if f.name not in secs}
    for sub in secs.values():
        keys |= {f.name for f in dataclasses.fields(sub)}
    return sorted(keys)


def from_flat(cls: type[T], flat: Mapping[str, Any], *, aliases: Mapping[str, str] | None = None,
              nullable: frozenset[str] | set[str] = frozenset(), label: str = "config",
              coerce: Mapping[str, Callable[[Any], Any]] | None = None,
              build_section: Mapping[str, Callable[[dict[str, Any]], Any]] | None = None) -> T:
    """Build ``cls`` from flat (or nested) keys; see the module docstring.

    ``coerce`` maps a key to a function applied to its value first (e.g. "none" -> None);
    ``build_section`` maps a section name to a constructor taking its keys (default: the
    section's dataclass called with them).
    """
    aliases = dict(aliases or {})
    secs = sections_of(cls)
    norm: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        key = normalize_key(key)
        key = aliases.get(key, key)
        if value is None and key not in nullable:
            return
        norm[key] = value

    for key, value in flat.items():
        if normalize_key(key) in secs and isinstance(value, Mapping):
            for k, v in value.items():  # the nested form of a section
                put(k, v)
        else:
            put(key, value)
    for key, fn in (coerce or {}).items():
        if key in norm:
            norm[key] = fn(norm[key])
    top_names = {f.name for f in dataclasses.fields(cls)} - set(secs)  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {k: v for k, v in norm.items() if k in top_names}
    used = set(kwargs)
    for name, sub in secs.items():
        sub_kwargs = {f.name: norm[f.name] for f in dataclasses.fields(sub) if f.name in norm and f.name not in top_names}
        used |= set(sub_kwargs)
        if not sub_kwargs and name not in norm:
            continue  # the section's defaults (its field's default_factory)
        maker = (build_section or {}).get(name, sub)
        try:
            kwargs[name] = maker(sub_kwargs) if maker is not sub else sub(**sub_kwargs)
        except TypeError as err:
            raise ConfigError(f"{label}: {name} settings: {err}") from err
    unknown = set(norm) - used
    if unknown:
        raise ConfigError(f"unknown config keys {sorted(unknown)}; allowed: {', '.join(allowed_keys(cls))}")
    try:
        cfg = cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"incomplete {label}: {err}") from err
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


class FlatConfig:
    """Mixin for a frozen-dataclass job config: ``from_flat``, ``to_dict``, ``validate``.

    Subclasses set ``KEY_ALIASES`` (other spellings of keys), ``NULLABLE_KEYS`` (keys where
    ``None`` is a value, not "unset") and ``CONFIG_LABEL`` (how errors name the config).
    """

    KEY_ALIASES: ClassVar[dict[str, str]] = {}
    NULLABLE_KEYS: ClassVar[frozenset[str]] = frozenset()
    CONFIG_LABEL: ClassVar[str] = "config"

    @classmethod
    def from_flat(cls: type[T], flat: Mapping[str, Any]) -> T:
        c: Any = cls
        return from_flat(cls, flat, aliases=c.KEY_ALIASES, nullable=c.NULLABLE_KEYS, label=c.CONFIG_LABEL)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def validate(self) -> None:
        """Check values beyond their types; raise ConfigError naming the key and what to do."""


def load_config_file(path: str | None) -> dict[str, Any]:
    """Read a YAML or JSON config file into a flat-or-nested dict ({} when no file)."""
    if not path:
        return {}
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
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


def merge_flags(file_cfg: Mapping[str, Any], flags: Mapping[str, Any]) -> dict[str, Any]:
    """File keys, then every flag the user set (``None`` = not given) on top: flags win."""
    out = dict(file_cfg)
    out.update({k: v for k, v in flags.items() if v is not None})
    return out
