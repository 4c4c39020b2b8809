"""`embedctl mine-negatives` and `embedctl finetune`."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from engine.cli.app import emit_json
from engine.cli.common import ProgressBar, shared_filesystem_option

log = logging.getLogger(__name__)


def _flat(kwargs: dict[str, Any]) -> dict[str, Any]:
    from engine.core.config import load_config_file

    flat = load_config_file(kwargs.pop("config_file", None))
    flat.update({k: v for k, v in kwargs.items() if v is not None})
    return flat


@click.command("mine-negatives")
@click.option("--store", default=None, help="The store holding the index (or run): a path or s3://bucket/prefix.")
@click.option("--index", default=None, help="Index name; mining uses its version's source run (vectors + texts).")
@click.option("--version", default=None, help="Index version id.")
@click.option("--alias", default=None, help="Alias naming the version (e.g. live).")
@click.option("--run", default=None, help="Mine against an embed run directly (no index needed).")
@click.option("--pairs", default=None, help="Parquet of (query, positive) pairs: query + positive text and/or "
              "positive_id (a doc_id or chunk_id), optional query_id.")
@click.option("--out", default=None, help="Output: x.parquet (one file + x.summary.json) or a folder of parts.")
@click.option("--strategy", type=click.Choice(["embedding", "bm25", "random", "mixed"]), default=None,
              help="Where candidates come from [embedding].")
@click.option("--mix", default=None, help="strategy=mixed: shares, e.g. embedding=3,bm25=1,random=1 [that].")
@click.option("--range-min", type=int, default=None, help="Skip the N most similar valid candidates [10].")
@click.option("--range-max", type=int, default=None, help="Consider valid candidates up to this rank [100].")
@click.option("--relative-margin", default=None, help="Keep score <= pos - |pos| x M; 'none' to disable [0.05].")
@click.option("--absolute-margin", default=None, help="Keep score <= pos - M [none].")
@click.option("--max-score", default=None, help="Keep score <= X [none].")
@click.option("--min-score", default=None, help="Keep score >= X [none].")
@click.option("--num-negatives", type=int, default=None, help="Negatives per row [5].")
@click.option("--sampling", type=click.Choice(["top", "random"]), default=None, help="[top]")
@click.option("--seed", type=int, default=None, help="Seed of random sampling and random negatives [12345].")
@click.option("--cross-encoder", default=None, help="CrossEncoder folder for false-negative filtering.")
@click.option("--ce-max-score", default=None, help="Drop negatives the cross-encoder scores above X.")
@click.option("--ce-max-checks", type=int, default=None, help="Cross-encoder scorings per query at most [4 x n].")
@click.option("--negative-text", type=click.Choice(["embedded", "chunk"]), default=None,
              help="Negative texts as embedded (title prefix + chunk) or the bare chunk [embedded].")
@click.option("--keep-incomplete", is_flag=True, default=None, help="Write rows with fewer negatives (nulls).")
@click.option("--curriculum-stages", type=int, default=None, help="Easy -> hard stages in curriculum_stage [3].")
@click.option("--search", type=click.Choice(["auto", "exact", "ann"]), default=None,
              help="Exact search over the vectors, or the ANN index [auto: exact up to 2M rows].")
@click.option("--batch-size", type=int, default=None, help="Queries per work item [256].")
@click.option("--query-batch-tokens", type=int, default=None,
              help="Padded tokens per query-encoder forward pass [1024 on CPU, 16384 on GPU].")
@click.option("--workers", type=int, default=None, help="Mining actors [sized from the cluster's resources].")
@click.option("--threads-per-worker", type=int, default=None, help="torch threads per CPU actor.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default=None, help="Encoder device [auto].")
@click.option("--cache-dir", default=None,
              help="Where workers keep memory-mapped shards [<tmp>/embedctl-mining-cache].")
@click.option("--address", default=None, help="Ray address [RAY_ADDRESS, else a local Ray].")
@shared_filesystem_option
@click.option("--local", is_flag=True, default=None, help="Run in this process without Ray (small corpora).")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing output mined with other settings.")
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// URIs.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="YAML/JSON config with the same keys (flags win).")
@click.option("--dry-run", is_flag=True, help="Resolve the source and read the pairs, print the plan, write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout.")
def mine_negatives(as_json: bool, dry_run: bool, **kwargs: Any) -> None:
    """Mine hard negatives for (query, positive) pairs against an index's vectors, on Ray.

    \b
    Examples:
      embedctl mine-negatives --store ./store --index docs --alias live \\
          --pairs pairs.parquet --out triplets.parquet
      embedctl mine-negatives --store s3://b/store --index docs --version v3 --pairs s3://b/pairs.parquet \\
          --out s3://b/mined/ --strategy mixed --sampling random --workers 8 --json
      embedctl mine-negatives --store ./store --run RUN_ID --pairs pairs.parquet --out t.parquet \\
          --cross-encoder ./my-reranker --ce-max-score 0.8

    Candidates that are known positives (every positive of the query, all their chunks) or
    copies of a positive's text are never negatives. Margins follow NV-Retriever: keep a
    candidate only below the query's lowest positive score minus the margin. Ranks count
    valid candidates only, as in sentence-transformers' mine_hard_negatives. Rerunning the
    same command resumes an interrupted job; a finished one is not redone.
    """
    from engine.mining import MiningJobConfig, format_summary

    cfg = MiningJobConfig.from_flat(_flat(kwargs))
    if dry_run:
        from engine.distributed.mine_negatives import dry_run as plan

        emit_json(plan(cfg))
        return
    progress = _Progress(enabled=not as_json and sys.stderr.isatty())
    try:
        if cfg.runtime.local:
            from engine.mining import run_mining_locally

            summary = run_mining_locally(cfg, progress=progress)
        else:
            from engine.distributed.mine_negatives import run_mining_job

            summary = run_mining_job(cfg, progress=progress)
    finally:
        progress.close()
    if as_json:
        emit_json(summary)
    else:
        click.echo(format_summary(summary), err=True)
        click.echo(f"triplets: {cfg.out}", err=True)


class _Progress:
    """The mining job's events on the one progress reporter: a bar over the pending batches."""

    def __init__(self, enabled: bool):
        self.bar = ProgressBar("mine", "batches", enabled=enabled)

    def __call__(self, event: dict[str, Any]) -> None:
        if event["event"] == "planned":
            log.info("mining %d queries (%d pairs) in %d batches, %d pending, against %d corpus rows",
                     event["queries"], event["pairs"], event["batches"], event["pending"], event["corpus_rows"])
            self.bar.start(int(event["pending"]))
        elif event["event"] == "batch":
            if not self.bar.drawing:
                log.info("batch %s: %s queries, %s rows", event["batch"], event["queries"], event["rows"])
            self.bar.advance()

    def close(self) -> None:
        self.bar.close()


@click.command("finetune")
@click.option("--triplets", default=None, help="Mined triplets (a .parquet file or folder from mine-negatives), "
              "or generated pairs.")
@click.option("--objective", type=click.Choice(["supervised", "tsdae", "simcse"]), default=None,
              help="supervised: --triplets; tsdae / simcse: unlabelled chunks of --store/--run [supervised].")
@click.option("--store", default=None, help="tsdae/simcse: the store holding the embed run.")
@click.option("--run", default=None, help="tsdae/simcse: the embed run whose chunks are the training texts.")
@click.option("--noise-ratio", type=float, default=None, help="tsdae: share of words deleted [0.6].")
@click.option("--base-model", default=None, help="Model folder or installed model package [packaged MiniLM].")
@click.option("--out", default=None, help="Folder for the fine-tuned model (loadable by embed --model).")
@click.option("--loss", type=click.Choice(["mnrl", "triplet", "infonce"]), default=None,
              help="mnrl: in-batch + mined negatives; infonce: symmetric, with --temperature; triplet [mnrl].")
@click.option("--epochs", type=float, default=None, help="[1]")
@click.option("--batch-size", type=int, default=None, help="[64]")
@click.option("--learning-rate", type=float, default=None, help="[2e-5]")
@click.option("--warmup-ratio", type=float, default=None, help="[0.1]")
@click.option("--temperature", type=float, default=None, help="Softmax temperature of mnrl/infonce [0.05].")
@click.option("--triplet-margin", type=float, default=None, help="Margin of the triplet loss [0.3].")
@click.option("--num-negatives", type=int, default=None, help="Use the first N negative columns [all].")
@click.option("--curriculum", is_flag=True, default=None, help="Train easy -> hard by curriculum_stage.")
@click.option("--max-rows", type=int, default=None, help="Use at most N triplet rows.")
@click.option("--max-steps", type=int, default=None, help="Stop after N optimiser steps.")
@click.option("--eval", "eval_set", default=None,
              help="Benchmark folder (corpus.jsonl, queries.jsonl, qrels.tsv) scored before and after.")
@click.option("--general-eval", default=None,
              help="A second benchmark to catch forgetting: a folder, or 'stdlib' (Python docstrings, built in).")
@click.option("--eval-gain", type=click.Choice(["binary", "linear", "cranfield"]), default=None,
              help="qrels grades -> gains: binary (grade >= 1), linear (the grade), cranfield (5 - grade) [binary].")
@click.option("--eval-max-queries", type=int, default=None, help="Evaluate on at most N queries (seeded sample).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default=None, help="[auto]")
@click.option("--seed", type=int, default=None, help="[42]")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing --out folder.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="YAML/JSON config with the same keys (flags win).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object on stdout.")
def finetune(as_json: bool, **kwargs: Any) -> None:
    """Fine-tune an embedding model on mined triplets; score a benchmark before and after.

    \b
    Examples:
      embedctl finetune --triplets triplets.parquet --out ./model-ft --eval ./bench --general-eval stdlib
      embedctl finetune --triplets s.parquet --base-model ./base --out ./ft --loss infonce --epochs 2 --device cuda
      embedctl finetune --objective tsdae --store ./store --run RUN_ID --out ./model-da --eval ./bench
      embedctl embed --corpus ./corpus --store ./store --model ./model-ft     # then use it

    The report (also written to <out>/embedctl_finetune.json) says whether the benchmark
    improved and whether the general set got worse (forgetting). Queries of the benchmark
    that also appear in the triplets are left out of its evaluation (they were trained on).
    """
    from engine.finetune.train import FinetuneConfig, format_report, run_finetune

    cfg = FinetuneConfig.from_flat(_flat(kwargs))
    report = run_finetune(cfg)
    if as_json:
        emit_json(report)
    else:
        click.echo(format_report(report), err=True)
