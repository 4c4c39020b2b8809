"""The command line: one verb per job. This table is the table of contents of the tool.

Each verb lives in ``engine/commands/<module>.py`` as a click command and is imported only
when it runs, so ``embedctl --help`` stays instant (no torch, ray or faiss import).
"""

from __future__ import annotations

import importlib
import json
import logging
import sys

import click

from engine import __version__
from engine.core.errors import EmbedctlError

# verb -> "module:attribute" of a click.Command. Keep sorted by pipeline order.
COMMANDS: dict[str, str] = {
    "demo": "engine.cli.embed:demo",
    "embed": "engine.cli.embed:embed",
    "plan": "engine.cli.embed:plan",
    "build-index": "engine.cli.index:build_index_cmd",
    "search": "engine.cli.index:search_cmd",
    "evaluate": "engine.cli.index:evaluate_cmd",
    "tune-fusion": "engine.cli.index:tune_fusion_cmd",
    "submit": "engine.cli.cluster:submit",
    "jobs": "engine.cli.cluster:jobs_group",
    "refresh": "engine.cli.refresh:refresh",
    "migrate": "engine.cli.migrate:migrate_group",
    "publish": "engine.cli.publish:publish",
    "rollback": "engine.cli.publish:rollback",
    "status": "engine.cli.publish:status",
    "gc": "engine.cli.publish:gc",
    "serve": "engine.cli.publish:serve",
    "doctor": "engine.cli.publish:doctor",
    "benchmark": "engine.cli.quality:benchmark_group",
    "calibrate": "engine.cli.quality:calibrate",
    "canary": "engine.cli.quality:canary",
    "drift": "engine.cli.quality:drift",
    "generate-queries": "engine.cli.generate:generate_queries",
    "mine-negatives": "engine.cli.mining:mine_negatives",
    "finetune": "engine.cli.mining:finetune",
}

# One-line help shown by `embedctl --help` without importing the command modules.
SHORT_HELP: dict[str, str] = {
    "demo": "Run the pipeline on a corpus built from Python's docstrings (no download).",
    "embed": "Chunk and embed a Parquet corpus on Ray into a run in the store.",
    "plan": "Estimate chunks, tokens, wall time and worker-hours for a corpus.",
    "build-index": "Build a sharded FAISS index version from an embed run (IVF-PQ, binary+rerank, flat; recall gate).",
    "search": "Search an index version (by --version or --alias) with the model it was built with.",
    "evaluate": "recall@k, MRR@k, nDCG@k of an index version on judged queries, beside exact search.",
    "tune-fusion": "Tune hybrid (dense + BM25) fusion on judged queries; stored beside the version as its default.",
    "submit": "Submit a job to a running Ray cluster (Jobs API), stream its logs, print its summary.",
    "jobs": "List, follow and stop jobs on a Ray cluster: jobs list|status|logs|stop.",
    "refresh": "Re-embed only what changed in a new corpus snapshot; build, gate and publish a new version.",
    "migrate": "Move an alias to a new embedding model: baseline, build, compare, calibrate, gated rollout, cutover.",
    "publish": "Verify an index version and swap an alias to it (CAS + history; weighted rollouts).",
    "rollback": "Move an alias back to its previous (or a named) version from its history.",
    "status": "Versions, aliases, weights and history of an index.",
    "gc": "Delete index versions no alias or retained history can point to (--dry-run first).",
    "serve": "HTTP /search, /healthz, /version for an alias; hot-swaps versions without downtime.",
    "doctor": "Check a store: access, and that it enforces conditional writes (needed to publish).",
    "benchmark": "Offline benchmarks (queries, graded judgments, corpus fingerprint): build|show|pairs|evaluate.",
    "calibrate": "Fit similarity thresholds for an index version from labelled pairs (PR curve, F-beta, plot).",
    "canary": "Known-good queries against an alias: recall@k, MRR, scores, empty rate vs a baseline; exit 7 on a drop.",
    "drift": "Compare recent queries and their top scores with calibration time; exit 7 past the limits.",
    "generate-queries": "Ask an LLM (OpenAI-compatible endpoint) for synthetic queries per chunk of a run (pairs Parquet).",
    "mine-negatives": "Mine hard negatives for (query, positive) pairs against an index, on Ray (triplets Parquet).",
    "finetune": "Fine-tune an embedding model on mined triplets; benchmark before and after.",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, SHORT_HELP.get(name, "")) for name in COMMANDS]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="embedctl")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """embedctl: Parquet corpus -> chunks -> embeddings on Ray -> FAISS index versions.

    \b
    Quick start:
      embedctl embed --corpus ./corpus --store ./store --json
      embedctl build-index --store ./store --run RUN_ID --index docs
      embedctl publish --store ./store --index docs --version V --alias live
      embedctl search --store ./store --index docs --alias live --query "wing lift"
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from engine.core.storage import install_log_redaction

    install_log_redaction()  # no credential in any log line, even at -vv


def emit_json(obj: object) -> None:
    """Print one JSON object on stdout (the ``--json`` contract: nothing else goes to stdout)."""
    from engine.cli.common import json_stream

    out = json_stream()
    click.echo(json.dumps(obj, indent=None, sort_keys=True, default=str), file=out)
    if out is not None:
        out.flush()


def main(argv: list[str] | None = None) -> None:
    from engine.cli.common import reserve_stdout_for_json, wants_json

    if argv is None and wants_json(sys.argv[1:]):  # the console script (a caller passing argv keeps its stdout)
        reserve_stdout_for_json()  # Ray's own stdout lines (a dead node's) go to stderr, not into the JSON
    try:
        cli.main(args=argv, prog_name="embedctl", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except EmbedctlError as err:
        from engine.core.storage import redact

        click.echo(f"error: {redact(str(err))}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
