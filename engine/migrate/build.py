"""Phase 2, build: re-embed the corpus with green's model (the embed job, resumable) and build the green version."""

from __future__ import annotations

from typing import Any

from engine.core import layout
from engine.core.errors import ConfigError, IntegrityError, NotFoundError
from engine.migrate.context import MigrationContext
from engine.migrate.evaluation import same_model, version_facts

MODEL_SPECIFIC_KEYS = ("truncate_dim", "query_prompt", "passage_prompt")  # blue's do not carry over to another model


def _blue_run_keys(ctx: MigrationContext, run_id: str | None) -> dict[str, Any]:
    """Flat embed-job keys of blue's own run (corpus, chunking, embedding), {} when unknown."""
    if not run_id:
        return {}
    try:
        run = ctx.store.read_json(layout.run_manifest_key(run_id))
    except NotFoundError:
        return {}
    cfg = run.get("config") or {}
    flat: dict[str, Any] = {}
    for section in ("corpus", "chunk", "embed"):
        flat.update({k: v for k, v in (cfg.get(section) or {}).items() if v is not None})
    if cfg.get("endpoint_url"):
        flat["endpoint_url"] = cfg["endpoint_url"]
    return flat


def green_embed_config(ctx: MigrationContext) -> Any:
    """Blue's embed job with the plan's changes: same corpus and chunking, the new model."""
    from engine.embed.config import ALIASES, EmbedJobConfig

    doc = ctx.read()
    blue = doc["blue"] or {}
    flat = _blue_run_keys(ctx, blue.get("source_run"))
    overrides = {ALIASES.get(k, k): v for k, v in ctx.plan.embed.items()}
    if "model" in overrides and overrides.get("model") != flat.get("model"):
        for k in MODEL_SPECIFIC_KEYS:
            flat.pop(k, None)
    flat.update(overrides)
    _green_runtime(flat, overrides)
    if not flat.get("corpus"):
        raise ConfigError(f"blue ({blue.get('version')}) names no embed run this store holds, so the corpus to "
                          "re-embed is unknown: give --corpus")
    flat["store"] = ctx.store.uri
    endpoint = getattr(ctx.store, "endpoint_url", None)
    if endpoint:
        flat.setdefault("endpoint_url", endpoint)
    flat["run_id"] = f"{ctx.migration_id}-green"
    flat.setdefault("progress", False)
    return EmbedJobConfig.from_flat(flat)


def _green_runtime(flat: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Green runs on blue's backend and quantization unless the plan names others; a plan naming only
    one of the two gets a partner that fits it (int8 on a torch blue: ``auto``, the int8 runtime;
    ``--backend torch`` on an int8 blue: fp32)."""
    if "quantize" in overrides and "backend" not in overrides and overrides["quantize"] != "none" \
            and flat.get("backend", "torch") == "torch":
        flat["backend"] = "auto"
    if overrides.get("backend") == "torch" and "quantize" not in overrides:
        flat["quantize"] = "none"


def green_build_options(build: dict[str, Any], blue: dict[str, Any]) -> dict[str, Any]:
    """The plan's index-build options; without a kind, blue's (what was asked for: a small corpus
    may have been built flat) and blue's sparse shards; nlist, pq_m, ... are chosen again for green's dimension."""
    options = dict(build)
    if "kind" not in options and blue.get("kind"):
        options["kind"] = (blue.get("params") or {}).get("requested_kind") or blue["kind"]
        if (blue.get("params") or {}).get("rescore"):
            options.setdefault("rescore", blue["params"]["rescore"])
    if "sparse" not in options and blue.get("sparse"):
        options["sparse"] = blue["sparse"]  # green keeps blue's BM25 shards (hybrid search keeps working)
        if blue.get("sparse_granularity") and "sparse_granularity" not in options:
            options["sparse_granularity"] = blue["sparse_granularity"]  # and their granularity (chunk or doc)
    return options


def run_build(ctx: MigrationContext) -> dict[str, Any]:
    from engine.publish.verify import verify_version

    blue = ctx.read()["blue"]
    cfg = green_embed_config(ctx)
    ctx.say(f"build: embedding the corpus with {cfg.embed.model or 'the packaged MiniLM'}"
            f"{f' truncated to {cfg.embed.truncate_dim} dims' if cfg.embed.truncate_dim else ''} "
            f"into run {cfg.run_id} (resumable)")
    ctx.pause("build.before-embed")
    run = ctx.tools.embed_runner(cfg)  # resumes the run: only uncommitted units are redone
    if run.get("status") != "succeeded":
        raise IntegrityError(f"the green embed run {cfg.run_id} ended {run.get('status')} (missing units "
                             f"{run.get('missing_units')}); rerun `embedctl migrate build` to resume it")
    if same_model(run.get("model") or {}, blue.get("model") or {}):
        raise ConfigError(f"green's model is blue's ({(run.get('model') or {}).get('name')}: same fingerprint, "
                          "dim, prompts and backend); there is nothing to migrate")
    ctx.pause("build.after-embed")
    options = green_build_options(ctx.plan.build, blue)
    ctx.say(f"build: building the green index version from run {cfg.run_id} ({options or 'defaults'})")
    manifest = ctx.tools.index_builder(ctx.store, ctx.index, cfg.run_id, parent_version=blue["version"],
                                       options=options)
    version = str(manifest["version_id"])
    manifest = verify_version(ctx.store, ctx.index, version)
    if manifest.get("source_run") != cfg.run_id:
        raise IntegrityError(f"the builder returned version {version} of run {manifest.get('source_run')}, "
                             f"not of {cfg.run_id}")
    facts = version_facts(manifest)
    facts["run_id"] = cfg.run_id
    ctx.state.update(lambda d: d.update(green=facts))
    return {"version": version, "run_id": cfg.run_id, "model": facts["model"].get("name"), "dim": facts["dim"],
            "kind": facts["kind"], "rows": facts["rows"]}
