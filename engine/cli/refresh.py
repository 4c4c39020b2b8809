"""`embedctl refresh`: re-embed only what changed in a new corpus snapshot, build and publish a new version."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from engine.cli.app import emit_json
from engine.cli.common import ProgressBar, shared_filesystem_option
from engine.cli.embed import _flat, corpus_options

log = logging.getLogger(__name__)


@click.command()
@corpus_options
@click.option("--store", default=None, help="The store holding the index and its runs (path or s3://).")
@click.option("--index", default=None, help="Index name.")
@click.option("--from-alias", default=None, help="Refresh the version this alias names [live].")
@click.option("--publish-to", default=None, help="Swap this alias to the new version if the gates pass "
              "[none: build only].")
@click.option("--strategy", type=click.Choice(["auto", "incremental", "rebuild"]), default=None,
              help="Update a copy of the live shards, rebuild, or decide from the change and drift [auto].")
@click.option("--rebuild-fraction", type=float, default=None,
              help="auto: rebuild when more than this fraction of the live chunks changes [0.2].")
@click.option("--recall-gate", type=float, default=None, help="Minimum recall@10 against exact search.")
@click.option("--canary", default=None, help="Canary set (JSONL/CSV of query + expected doc) checked before publishing.")
@click.option("--run-id", default=None, help="Refresh run id [derived from the live run, config and snapshot].")
@click.option("--version-id", default=None, help="New version id [the refresh run id].")
@click.option("--lease-ttl", "lease_ttl_s", type=float, default=None,
              help="Seconds until a crashed refresh's lease expires [120].")
@click.option("--break-lease", is_flag=True, default=None, help="Take the refresh lease even if it looks held "
              "(only when you know its holder is dead).")
@click.option("--executor", type=click.Choice(["auto", "local", "ray"]), default=None,
              help="Where chunking and embedding run [auto: in this process when the change is small].")
@click.option("--workers", type=int, default=None, help="Embedding actors [sized from the cluster].")
@click.option("--address", default=None, help="Ray address [RAY_ADDRESS, else a local Ray when needed].")
@shared_filesystem_option
@click.option("--dry-run", is_flag=True, help="Resolve the live version, check compatibility and the lease, "
              "print the plan; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
def refresh(as_json: bool, dry_run: bool, **kwargs: Any) -> None:
    """Refresh an index from a new corpus snapshot, re-embedding only new and changed chunks.

    \b
    Examples:
      embedctl refresh --corpus ./snapshots/2026-11-28 --store ./store --index docs --from-alias live
      embedctl refresh --corpus s3://bkt/corpus/latest/ --store s3://bkt/store --index docs \\
          --from-alias live --publish-to live --canary canaries.jsonl --json
      embedctl refresh --config refresh.yaml --dry-run

    The new snapshot is diffed against the chunks of the version the alias
    names, by content hash under the same chunker and model; unchanged chunks
    keep their stored vectors. The new version is an incremental update of the
    live shards or a rebuild (the choice and why are in its manifest), published
    by compare-and-swap only when the recall gate and the canary set pass. One
    refresh per index at a time (a lease in the store). Rerun the same command
    after a crash: it resumes. The model and chunker are the live version's:
    model/chunk flags may only repeat them (anything else is refused: use
    `embedctl migrate`). Exit codes: 0 published, built or up to date; 7 a gate
    failed (the alias is untouched); 5 another refresh holds the lease, or the
    alias moved meanwhile; 2 a refused config.
    """
    from engine.distributed.refresh import run_refresh_job
    from engine.refresh.config import RefreshConfig
    from engine.refresh.session import RefreshSession
    from engine.refresh.summary import exit_code

    flat = _flat(kwargs)
    rcfg = RefreshConfig.from_flat(flat)
    if dry_run:
        plan = RefreshSession(rcfg).describe_plan()
        if as_json:
            emit_json(plan)
        else:
            click.echo(f"would refresh {plan['index']} from {plan['from_alias']}={plan['from_version']} (run "
                       f"{plan['live_run']}) into run {plan['run_id']}"
                       f"{' (resuming)' if plan['resumes_existing_run'] else ''}, a new version"
                       f"{', then publish to ' + plan['publish_to'] if plan['publish_to'] else ''}; model "
                       f"{plan['model']} ({plan['dim']} dims)", err=True)
            if plan["lease"]:
                click.echo(f"lease: held by {plan['lease']['held_by']} ({plan['lease']['state']})", err=True)
        return
    reporter = _Reporter(ProgressBar("refresh", "units", enabled=not as_json, rate_unit="chunks"))
    try:
        summary = run_refresh_job(rcfg, progress=reporter)
    finally:
        reporter.bar.close()
    if as_json:
        emit_json(summary)
    else:
        click.echo(describe(summary), err=True)
    code = exit_code(summary)
    if code:
        sys.exit(code)


def describe(s: dict[str, Any]) -> str:
    """The human summary: counts per category, embedding calls vs a full re-embed, the outcome."""
    d, c, full = s["docs"], s["chunks"], s.get("full_embed") or {}
    est = f", ~{full['estimated_seconds']:.0f} s" if full.get("estimated_seconds") else ""
    lines = [
        f"refresh of {s['index']} from {s['from_alias']}={s['from_version']}: docs {d['unchanged']} unchanged, "
        f"{d['changed']} changed, {d['new']} new, {d['deleted']} deleted",
        f"chunks {c['unchanged']} unchanged, {c['changed']} changed, {c['new']} new, {c['deleted']} deleted; "
        f"embedding calls {s['embedding_calls']} (a full re-embed: {full.get('embedding_calls')}{est}); "
        f"{s['timings'].get('wall_seconds', 0):.1f} s",
    ]
    if s.get("version_id"):
        lines.append(f"version {s['version_id']}: {s.get('strategy')} ({s.get('strategy_reason')})")
    for name, g in (s.get("gates") or {}).items():
        if g:
            lines.append(f"gate {name}: {'pass' if g.get('passed') else 'FAIL'} ({g.get('detail', '')})")
    if s.get("published"):
        p = s.get("publish") or {}
        lines.append(f"published: {p.get('alias')} -> {p.get('version')} (generation {p.get('generation')})")
    else:
        lines.append(f"not published: {s.get('reason')}")
    return "\n".join(lines)


class _Reporter:
    """The refresh job's events on the one progress reporter: a bar over the pending units."""

    def __init__(self, bar: ProgressBar):
        self.bar = bar
        self.chunks = 0

    def __call__(self, event: dict[str, Any]) -> None:
        if event["event"] == "planned":
            self.bar.note("refresh run %s: %d units, %d pending, %d documents", event["run_id"], event["units"],
                          event["pending"], event["docs"])
            self.bar.start(int(event["pending"]))
            return
        self.chunks += int(event.get("chunks", 0))
        stats = event.get("refresh") or {}
        if not self.bar.drawing:
            self.bar.note("unit %s done: %d chunks, %d vectors reused, %d embedded", event.get("unit_id"),
                          event.get("chunks", 0), stats.get("reused", 0), stats.get("embedded", 0))
        self.bar.advance(done=self.chunks)
