"""`embedctl generate-queries`: synthetic (query, chunk) pairs from any OpenAI-compatible chat endpoint."""

from __future__ import annotations

import logging
from typing import Any

import click

from engine.cli.app import emit_json

log = logging.getLogger(__name__)


@click.command("generate-queries")
@click.option("--store", default=None, help="The store holding the embed run (path or s3://bucket/prefix).")
@click.option("--run", default=None, help="Embed run whose chunks get queries.")
@click.option("--out", default=None, help="Pairs Parquet (local or s3://) [<store>/runs/<job id>/pairs.parquet].")
@click.option("--sample", type=int, default=None, help="Ask for a seeded random sample of N chunks [all].")
@click.option("--seed", type=int, default=None, help="Seed of --sample [42].")
@click.option("--where", default=None, help="SQL filter over the chunk columns, e.g. \"lang = 'en'\" (duckdb).")
@click.option("--min-chunk-chars", type=int, default=None, help="Skip chunks shorter than this (counted) [40].")
@click.option("--endpoint", default=None, help="Base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1.")
@click.option("--model", default=None, help="Model name the endpoint serves.")
@click.option("--api-key-env", default=None, help="Environment variable holding the API key [OPENAI_API_KEY]; "
              "unset is fine for local servers. The key is never logged or written.")
@click.option("--queries-per-chunk", "-n", type=int, default=None, help="Queries asked per chunk [3].")
@click.option("--prompt", default=None, help="Prompt template with {n} and {passage} [built-in]; @FILE reads a file.")
@click.option("--system-prompt", default=None, help="System message ['' for none; built-in default].")
@click.option("--temperature", type=float, default=None, help="[0.7]")
@click.option("--max-tokens", type=int, default=None, help="Answer length limit per request [256].")
@click.option("--max-passage-chars", type=int, default=None, help="Cut longer chunks in the prompt [4000].")
@click.option("--request-timeout-s", type=float, default=None, help="Seconds per request before a retry [60].")
@click.option("--max-retries", type=int, default=None, help="Retries per chunk after the first attempt [5].")
@click.option("--backoff-s", type=float, default=None, help="First retry delay, doubling, with jitter [1].")
@click.option("--concurrency", type=int, default=None, help="Requests in flight over the whole job [4].")
@click.option("--requests-per-minute", "--rpm", "requests_per_minute", type=float, default=None,
              help="Request rate limit over the whole job [none].")
@click.option("--tasks", type=int, default=None, help="Ray tasks [min(concurrency, chunks/16)].")
@click.option("--max-query-chars", type=int, default=None, help="Drop longer queries (counted) [300].")
@click.option("--max-query-words", type=int, default=None, help="Drop longer queries (counted) [40].")
@click.option("--consistency-k", type=int, default=None,
              help="Keep a pair only if its chunk is in the run model's top-k for the query [off].")
@click.option("--local", is_flag=True, default=None, help="Run in this process (threads), without Ray.")
@click.option("--address", default=None, help="Ray address [RAY_ADDRESS, else a local Ray].")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an --out written by another job.")
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint of the store (not the LLM's).")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="YAML/JSON config with the same keys (flags win).")
@click.option("--dry-run", is_flag=True, help="Select the chunks and count the cached ones; ask nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout.")
def generate_queries(as_json: bool, dry_run: bool, **kwargs: Any) -> None:
    """Ask an LLM for N search queries per chunk of an embed run: (query, chunk) pairs for
    mine-negatives and finetune, from a corpus without labels.

    \b
    Examples:
      embedctl generate-queries --store ./store --run RUN_ID --endpoint http://localhost:8000/v1 \\
          --model Qwen/Qwen2.5-7B-Instruct --out pairs.parquet
      OPENAI_API_KEY=... embedctl generate-queries --store s3://b/store --run RUN_ID --sample 2000 \\
          --endpoint https://api.openai.com/v1 --model gpt-4o-mini --rpm 500 --concurrency 16 --json
      embedctl generate-queries --config gen.yaml --where "lang = 'en'" --consistency-k 20

    Answers are cached in the store by (passage hash, prompt, model, settings): a rerun, or a
    run of a refreshed corpus, asks only for chunks without an answer. 429, 5xx, timeouts and
    malformed or cut-off answers are retried with backoff; a chunk that still fails is counted
    and the command exits 9 after writing the other pairs (rerun to retry the failed ones).
    A wrong key, URL or model (401/403/404) stops the job at once (exit 2).
    """
    from engine.core.config import load_config_file, merge_flags
    from engine.generate import GenerateJobConfig, format_summary

    flat = merge_flags(load_config_file(kwargs.pop("config_file", None)), kwargs)
    prompt = flat.get("prompt")
    if isinstance(prompt, str) and prompt.startswith("@"):
        flat["prompt"] = _read_prompt(prompt[1:])
    cfg = GenerateJobConfig.from_flat(flat)
    if dry_run:
        from engine.generate.job import prepare_generation

        prep = prepare_generation(cfg)
        emit_json({"job_id": prep.job_id, "selected": len(prep.items), "skipped_short": prep.skipped_short,
                   "cached": prep.cached, "to_ask": len(prep.pending), "out": prep.out_uri,
                   "settings_id": cfg.llm.settings_id()})
        return
    from engine.distributed.generate_queries import run_generation
    from engine.generate import GenerationIncomplete

    progress = _Progress(enabled=not as_json)
    try:
        summary = run_generation(cfg, progress)
    except GenerationIncomplete as err:
        if as_json:
            emit_json(err.summary)  # the counts still go to stdout; the exit code (9) says some chunks failed
        raise
    finally:
        progress.close()
    if as_json:
        emit_json(summary)
    else:
        click.echo(format_summary(summary), err=True)
        click.echo(f"pairs: {summary['out']}", err=True)


def _read_prompt(path: str) -> str:
    from engine.core.errors import ConfigError

    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as err:
        raise ConfigError(f"--prompt @{path}: cannot read the file ({err.strerror})") from None


class _Progress:
    """Job events -> the shared progress bar (chunks in local mode, tasks' chunks on Ray)."""

    def __init__(self, enabled: bool):
        from engine.cli.common import ProgressBar

        self.bar = ProgressBar("generate", "chunks", enabled=enabled)

    def __call__(self, event: dict[str, Any]) -> None:
        if event["event"] == "planned":
            self.bar.note("%d chunks selected, %d to ask", event["chunks"], event["pending"])
            self.bar.start(event["pending"])
        elif event["event"] == "chunk":
            self.bar.advance()
        elif event["event"] == "task":
            self.bar.advance(event["chunks"])

    def close(self) -> None:
        self.bar.close()
