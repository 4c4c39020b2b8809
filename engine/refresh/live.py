"""The version a refresh starts from: alias -> version -> source run, and the refresh run's embed config."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from engine.core import layout
from engine.core.errors import ConfigError, ConflictError, IntegrityError, NotFoundError
from engine.core.storage import Store
from engine.embed.config import EmbedJobConfig
from engine.refresh.config import FREE_KEYS, IDENTITY_KEYS, RefreshConfig


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
        cfg = EmbedJobConfig.from_flat(flat)
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


def check_not_weighted(store: Store, index: str, alias: str) -> None:
    """Refuse to publish onto an alias in a weighted rollout (the swap would end the rollout)."""
    from engine.publish.aliases import read_alias

    state = read_alias(store, index, alias, missing_ok=True)
    if state is not None and state.weighted is not None:
        w = state.weighted
        raise ConflictError(f"alias {alias!r} is in a weighted rollout ({w.blue} + {w.green} at "
                            f"{w.to_dict()['green_weight']}%); publishing a refresh would end it. Finish the "
                            "rollout (embedctl publish) or roll it back first, or refresh without --publish-to")


def inputs_unchanged(cfg: EmbedJobConfig, live: LiveVersion, inputs: list[tuple[str, str]]) -> bool:
    """Byte-identical input files under the same chunker and model: nothing can have changed."""
    live_inputs = sorted((str(f.get("key")), str(f.get("fingerprint"))) for f in live.run_manifest.get("inputs", []))
    ident = cfg.identity_dict()
    live_ident = live.run_manifest.get("identity") or {}
    same = all(json.dumps(ident.get(k), sort_keys=True, default=str)
               == json.dumps(live_ident.get(k), sort_keys=True, default=str) for k in ("chunk", "embed"))
    return bool(inputs) and inputs == live_inputs and same
