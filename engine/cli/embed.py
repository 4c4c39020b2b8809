"""`embedctl embed` and `embedctl plan`."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from engine.cli.app import emit_json
from engine.cli.common import ProgressBar, shared_filesystem_option

log = logging.getLogger(__name__)


def corpus_options(f: Any) -> Any:
    for opt in reversed([
        click.option("--corpus", required=False, help="Parquet file, folder or s3:// prefix."),
        click.option("--model", default=None, help="Model folder, installed model package, or hash:DIM (test encoder). "
                     "Default: the packaged all-MiniLM-L6-v2."),
        click.option("--id-column", default=None, help="Document id column [doc_id]."),
        click.option("--text-column", default=None, help="Text column [text]."),
        click.option("--title-column", default=None, help="Title column, embedded as a prefix [title, if present]."),
        click.option("--chunk-tokens", type=int, default=None, help="Tokens per chunk window [256, capped by the model]."),
        click.option("--chunk-overlap", type=int, default=None, help="Tokens shared by consecutive windows [32]."),
        click.option("--chunker", type=click.Choice(["tokens", "recursive"]), default=None,
                     help="Fixed token windows, or paragraph -> sentence -> tokens [tokens]."),
        click.option("--tokenizer", default=None, help="Count chunk tokens with 'model' or 'cl100k_base' [model]."),
        click.option("--no-normalize", "normalize", flag_value=False, default=None,
                     help="Skip NFKC + whitespace normalisation."),
        click.option("--no-title-prefix", "title_prefix", flag_value=False, default=None,
                     help="Do not prefix chunks with their document title."),
        click.option("--max-doc-chars", type=int, default=None, help="Reject longer documents [1000000]."),
        click.option("--unit-rows", type=int, default=None, help="Rows per work unit, the resume grain [by device: 256 on CPU, 8192 on GPU]."),
        click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default=None, help="[auto]"),
        click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default=None,
                     help="Compute precision [auto: fp16 on CUDA, fp32 on CPU]."),
        click.option("--output-dtype", type=click.Choice(["float32", "float16"]), default=None,
                     help="Stored vector type [float32]."),
        click.option("--batch-tokens", type=int, default=None, help="Padded tokens per forward pass [by device: 2048 CPU, 262144 GPU]."),
        click.option("--backend", type=click.Choice(["auto", "torch", "onnx", "openvino"]), default=None,
                     help="Inference runtime [by device: torch on CUDA, onnx on CPU; the run records which]; onnx, openvino = "
                          "CPU runtimes (exported once, cached); auto: the same choice, recorded as auto. Runs started "
                          "before the default followed the device were torch: rerunning their command resumes them."),
        click.option("--quantize", type=click.Choice(["none", "int8"]), default=None,
                     help="int8: onnx dynamic (recipe 2), openvino static weights+activations (recipe 4; what auto picks); "
                          "the manifest records the cosine to fp32 [none]."),
        click.option("--dim", "truncate_dim", type=int, default=None, help="Matryoshka truncation to N dims."),
        click.option("--query-prompt", default=None, help="Prefix for queries, e.g. 'query: '."),
        click.option("--passage-prompt", default=None, help="Prefix for passages, e.g. 'passage: '."),
        click.option("--compile", "compile", flag_value=True, default=None,
                     help="torch.compile the model once per actor (GPU; bucketed shapes)."),
        click.option("--no-pretokenize", "pretokenize", flag_value=False, default=None,
                     help="Tokenize inside the embedding actors instead of the CPU chunk tasks."),
        click.option("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// URIs."),
        click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
                     help="YAML/JSON config with the same keys (flags win)."),
    ]):
        f = opt(f)
    return f


def _flat(kwargs: dict[str, Any]) -> dict[str, Any]:
    from engine.core.config import load_config_file

    flat = load_config_file(kwargs.pop("config_file", None))
    flat.update({k: v for k, v in kwargs.items() if v is not None})
    return flat


@click.command()
@corpus_options
@click.option("--store", default=None, help="Where runs go: a path or s3://bucket/prefix.")
@click.option("--run-id", default=None, help="Run id [derived from config + inputs, so a rerun resumes].")
@click.option("--workers", type=int, default=None, help="Embedding actors [sized from the cluster's resources].")
@click.option("--threads-per-worker", type=int, default=None, help="torch threads per CPU actor.")
@click.option("--address", default=None, help="Ray address [RAY_ADDRESS, else a local Ray].")
@shared_filesystem_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
def embed(as_json: bool, **kwargs: Any) -> None:
    """Chunk and embed a Parquet corpus on Ray into runs/<run_id>/ in the store.

    \b
    Examples:
      embedctl embed --corpus ./corpus --store ./store
      embedctl embed --corpus s3://bucket/corpus/ --store s3://bucket/store --device cuda --json
      embedctl embed --corpus docs.parquet --store ./store --chunker recursive --chunk-tokens 200

    Rerunning the same command after a crash resumes the run: only missing units are redone.
    """
    from engine.core.errors import ConfigError
    from engine.distributed.embed import run_embed_job
    from engine.embed.config import EmbedJobConfig

    flat = _flat(kwargs)
    if not flat.get("corpus") or not flat.get("store"):
        raise ConfigError("--corpus and --store are required (as flags or in --config)")
    cfg = EmbedJobConfig.from_flat(flat)
    reporter = _Reporter(enabled=not as_json and sys.stderr.isatty())
    try:
        manifest = run_embed_job(cfg, progress=reporter)
    finally:
        reporter.close()
    from engine.embed.pipeline import run_summary

    summary = run_summary(manifest, cfg.store)
    if as_json:
        emit_json(summary)
    else:
        c = summary["counts"]
        click.echo(
            f"run {summary['run_id']}: {summary['status']} - {c['input_rows']} rows = {c['accepted']} accepted + "
            f"{c['rejected']} rejected; {c['chunks']} chunks, {c['tokens']} tokens, dim {summary['dim']}; "
            f"{summary['timings']['wall_seconds']:.1f} s", err=True)
        if line := start_up_line(summary.get("timings") or {}):
            click.echo(line, err=True)
    if manifest["status"] != "succeeded":
        sys.exit(1)


def start_up_line(timings: dict[str, Any]) -> str:
    """The job's fixed start in one line (seconds after the command's job began), from manifest timings."""
    up = timings.get("start_up") or {}
    parts = [(label, up[key]) for key, label in (("ray_init_s", "Ray"), ("plan_s", "plan (alongside Ray) done at"),
                                                  ("first_worker_created_s", "actor up at"),
                                                  ("model_load_s", "model load"),
                                                  ("first_unit_start_s", "first unit started at"),
                                                  ("first_unit_embedded_s", "embedded at"),
                                                  ("first_unit_committed_s", "committed at"),
                                                  ("first_unit_done_s", "reported at")) if key in up]
    line = "start-up: " + ", ".join(f"{label} {value:.1f} s" for label, value in parts) if parts else ""
    if line and "process_s" in up and "first_unit_start_s" in up:
        line += f" (first unit {up['process_s'] + up['first_unit_start_s']:.1f} s after the command started)"
    return line


class _Reporter:
    """The embed job's events on the one progress reporter: a bar over the pending units."""

    def __init__(self, enabled: bool):
        self.bar = ProgressBar("embed", "units", enabled=enabled, rate_unit="chunks")
        self.totals = {"docs": 0, "chunks": 0, "tokens": 0}

    def __call__(self, event: dict[str, Any]) -> None:
        if event["event"] == "planned":
            log.info("run %s: %d units, %d pending, %d documents", event["run_id"], event["units"], event["pending"],
                     event["docs"])
            self.bar.start(int(event["pending"]))
            return
        for k, src in (("docs", "accepted"), ("chunks", "chunks"), ("tokens", "tokens")):
            self.totals[k] += int(event.get(src, 0))
        if not self.bar.drawing:
            log.info("unit %s done: %d docs, %d chunks (totals: %s)", event.get("unit_id"), event.get("accepted", 0),
                     event.get("chunks", 0), self.totals)
        self.bar.advance(done=self.totals["chunks"])

    def close(self) -> None:
        self.bar.close()


@click.command()
@corpus_options
@click.option("--sample-docs", type=int, default=256, show_default=True, help="Documents to chunk and time.")
@click.option("--workers", type=int, default=1, show_default=True, help="Workers to estimate for.")
@click.option("--throughput", type=float, default=None,
              help="Chunks/s of one worker on the target hardware (skip measuring here), e.g. a GPU figure.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
def plan(as_json: bool, sample_docs: int, workers: int, throughput: float | None, **kwargs: Any) -> None:
    """Count documents, chunk a sample, time the model here, and estimate the whole job.

    \b
    Examples:
      embedctl plan --corpus ./corpus
      embedctl plan --corpus s3://bucket/corpus/ --workers 8 --throughput 15000 --json
    """
    from engine.core.errors import ConfigError
    from engine.embed.config import EmbedJobConfig
    from engine.embed.plan import plan_job

    flat = _flat(kwargs)
    if not flat.get("corpus"):
        raise ConfigError("--corpus is required")
    flat.setdefault("store", "unused")
    cfg = EmbedJobConfig.from_flat(flat)
    est = plan_job(cfg, sample_docs=sample_docs, workers=workers, throughput=throughput)
    if as_json:
        emit_json(est.to_dict())
        return
    click.echo(
        f"{est.docs} documents; sample of {est.sample_docs}: {est.chunks_per_doc} chunks/doc, "
        f"{est.tokens_per_chunk} tokens/chunk, {est.reject_rate:.1%} rejected\n"
        f"estimated {est.est_chunks} chunks, {est.est_tokens} tokens\n"
        f"throughput {est.chunks_per_second_per_worker} chunks/s per worker ({est.throughput_source})\n"
        f"on {est.workers} worker(s): {est.est_wall_hours * 60:.1f} min wall, {est.est_worker_hours:.3f} worker-hours"
    )


@click.command()
@click.option("--store", default="./demo-store", show_default=True, help="Where the demo's corpus, runs and index go.")
@click.option("--docs", type=int, default=200, show_default=True, help="How many stdlib docstrings to use.")
@click.option("--model", default=None, help="Model (default: the packaged all-MiniLM-L6-v2).")
@click.option("--query", default="read and write compressed archive files", show_default=True,
              help="The query searched at the end.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
def demo(store: str, docs: int, model: str | None, query: str, as_json: bool) -> None:
    """Run the whole pipeline on a corpus built from Python's own docstrings (no download).

    embed (Ray) -> build-index -> publish to alias 'live' -> search the alias.

    \b
    Example:
      embedctl demo --store ./demo-store
    """
    import os

    from engine.core.storage import open_store
    from engine.distributed.embed import run_embed_job
    from engine.embed.config import EmbedJobConfig
    from engine.embed.stdlib_corpus import write_demo_corpus
    from engine.index.build import build_index
    from engine.index.params import BuildConfig
    from engine.index.searcher import Searcher
    from engine.index.version import resolve_version
    from engine.publish.aliases import publish_version

    corpus = write_demo_corpus(os.path.join(store, "demo-corpus"), limit=docs)
    cfg = EmbedJobConfig.from_flat({"corpus": str(corpus), "store": store, "model": model, "unit_rows": 64})
    reporter = _Reporter(enabled=not as_json and sys.stderr.isatty())
    try:
        manifest = run_embed_job(cfg, progress=reporter)
    finally:
        reporter.close()
    from engine.embed.pipeline import run_summary

    summary = run_summary(manifest, store)
    st = open_store(store)
    built = build_index(st, manifest["run_id"], "demo", BuildConfig(kind="flat"))
    swap = publish_version(st, "demo", built.version_id, "live", reason="embedctl demo")
    searcher = Searcher.load(st, "demo", resolve_version(st, "demo", alias="live"))
    hits = searcher.search([query], k=5, collapse_docs=True)[0]
    summary.update(steps=["embed", "build-index", "publish", "search"], index="demo", version=built.version_id,
                   alias="live", alias_generation=getattr(swap, "generation", None), query=query,
                   hits=[{"doc_id": h.doc_id, "chunk_id": h.chunk_id, "score": round(float(h.score), 4)} for h in hits])
    if as_json:
        emit_json(summary)
        return
    c = summary["counts"]
    click.echo(f"embed: run {summary['run_id']}: {c['accepted']} docs -> {c['chunks']} chunks "
               f"({c['tokens']} tokens), dim {summary['dim']}, {summary['timings']['wall_seconds']:.1f} s\n"
               f"build-index: demo/{built.version_id} ({built.manifest['kind']}, {built.manifest['counts']['vectors']} vectors)\n"
               f"publish: alias demo/live -> {built.version_id}\n"
               f"search {query!r}:")
    for h in hits:
        click.echo(f"  {h.score:.3f}  {h.doc_id}")
