"""`embedctl migrate run|baseline|build|compare|calibrate|rollout|cutover|rollback|abandon|status|report|list`."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from engine.cli.app import emit_json

log = logging.getLogger(__name__)

PHASE_NAMES = ("baseline", "build", "compare", "calibrate", "rollout", "cutover")


def common_options(f: Any) -> Any:
    for opt in reversed([
        click.option("--store", required=True, envvar="EMBEDCTL_STORE",
                     help="The store: a path, file:// or s3://bucket/prefix [EMBEDCTL_STORE]."),
        click.option("--endpoint-url", default=None, envvar="EMBEDCTL_S3_ENDPOINT_URL",
                     help="S3-compatible endpoint for s3:// stores [EMBEDCTL_S3_ENDPOINT_URL]."),
        click.option("--index", required=True, help="The index whose alias migrates."),
        click.option("--migration", "migration_id", default=None,
                     help="Migration id [the plan's own id when plan flags are given, else the index's only "
                          "unfinished migration]."),
        click.option("--break-lock", is_flag=True, help="Take the migration's runner lock even if it looks alive "
                                                        "(only when you know its runner is dead)."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout."),
    ]):
        f = opt(f)
    return f


def plan_options(f: Any) -> Any:
    """Flags that define a migration (given to `run` or `baseline`, which start it)."""
    for opt in reversed([
        click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
                     help="YAML/JSON with the same keys (flags win); nested `embed:` / `build:` mappings allowed."),
        click.option("--alias", default=None, help="The alias to migrate [live]."),
        click.option("--model", default=None, help="Green's model: a folder, an installed model package, or hash:DIM."),
        click.option("--dim", "truncate_dim", type=int, default=None,
                     help="Matryoshka: keep green's first N dims (same model, smaller vectors)."),
        click.option("--query-prompt", default=None, help="Green's query prefix (e.g. 'query: ')."),
        click.option("--passage-prompt", default=None, help="Green's passage prefix (e.g. 'passage: ')."),
        click.option("--corpus", default=None, help="Corpus to re-embed [blue's embed run's corpus]."),
        click.option("--chunk-tokens", type=int, default=None, help="Green's chunk window [blue's]."),
        click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default=None),
        click.option("--backend", type=click.Choice(["auto", "torch", "onnx", "openvino"]), default=None,
                     help="Green's inference runtime [blue's]; the searchers embed queries with it too."),
        click.option("--quantize", type=click.Choice(["none", "int8"]), default=None,
                     help="Green's quantization on a runtime backend [blue's]."),
        click.option("--batch-tokens", type=int, default=None, help="Padded tokens per forward pass."),
        click.option("--index-kind", type=click.Choice(["ivfpq", "binary-rerank", "flat"]), default=None,
                     help="Green's index kind [blue's]."),
        click.option("--benchmark", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="An `embedctl benchmark` file: queries + graded judgments."),
        click.option("--canaries", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="Canary file (query -> expected docs) [the benchmark's judged queries]."),
        click.option("--queries", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="Dual-run query set for compare [the benchmark's queries]."),
        click.option("--pairs", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="Labelled (query, doc_id, relevant) pairs for calibration [derived from the benchmark]."),
        click.option("--k", type=int, default=None, help="Top-k of every comparison and gate [10]."),
        click.option("--weight", "weights", default=None,
                     help="Rollout steps, percent of query keys to green [5,25,100]."),
        click.option("--min-recall", type=float, default=None, help="Gate: green's canary recall@k floor."),
        click.option("--max-recall-drop", type=float, default=None,
                     help="Gate: allowed drop of canary recall@k below blue's baseline [0.05]."),
        click.option("--max-error-rate", type=float, default=None, help="Gate: failed queries / queries per step [0]."),
        click.option("--soak", default=None, help="Keep probing each rollout step this long (30s, 5m) [0]."),
        click.option("--probe-url", default=None, help="A running `embedctl serve` to probe over HTTP at each step."),
        click.option("--retention", default=None, help="Keep blue restorable this long after cutover [7d]."),
    ]):
        f = opt(f)
    return f


def runtime_options(f: Any) -> Any:
    f = click.option("--in-process", is_flag=True,
                     help="Run the embed job in this process without Ray (small corpora, tests).")(f)
    f = click.option("--address", default=None,
                     help="Ray address for the embed job [RAY_ADDRESS, else a local Ray].")(f)
    return f


PLAN_FLAGS = ("alias", "model", "truncate_dim", "query_prompt", "passage_prompt", "corpus", "chunk_tokens", "device",
              "backend", "quantize", "batch_tokens", "index_kind", "benchmark", "canaries", "queries", "pairs", "k", "weights", "min_recall",
              "max_recall_drop", "max_error_rate", "soak", "probe_url", "retention")


def _say(as_json: bool) -> Any:
    def say(message: str) -> None:
        click.echo(message, err=True)

    return say


def _tools(in_process: bool, address: str | None, as_json: bool) -> Any:
    from collections.abc import Callable

    from engine.migrate.tools import Tools, local_embed_runner

    runner: Callable[[Any], dict[str, Any]]
    if in_process:
        runner = local_embed_runner
    else:
        from engine.distributed.migrate import ray_embed_runner

        runner = ray_embed_runner(address)
    return Tools(embed_runner=runner, progress=_say(as_json))


def _migration(kw: dict[str, Any], *, may_start: bool) -> Any:
    """Start (plan flags or --config given) or open the migration the flags name."""
    from engine.core.config import load_config_file
    from engine.core.storage import open_store
    from engine.migrate.migration import Migration
    from engine.migrate.plan import plan_from_flat

    store = open_store(kw["store"], endpoint_url=kw.get("endpoint_url"))
    tools = _tools(kw.pop("in_process", False), kw.pop("address", None), kw["as_json"])
    config_file = kw.pop("config_file", None)
    given = {k: kw.pop(k) for k in PLAN_FLAGS if kw.get(k) is not None}
    for k in PLAN_FLAGS:
        kw.pop(k, None)
    opts = {"tools": tools, "break_lock": bool(kw.get("break_lock"))}
    if may_start and (given or config_file):
        flat = load_config_file(config_file)
        flat.update(given)
        flat["index"] = kw["index"]
        plan, run = plan_from_flat(flat)
        return Migration.start(store, plan, kw.get("migration_id") or run.get("migration_id"), **opts)
    if given or config_file:
        raise click.UsageError(f"plan flags ({', '.join('--' + k.replace('_', '-') for k in given) or '--config'}) "
                               "only go to `migrate run` or `migrate baseline`, which start a migration")
    return Migration.open(store, kw["index"], kw.get("migration_id"), **opts)


def _finish(m: Any, result: dict[str, Any], as_json: bool, headline: str) -> None:
    st = m.status()
    if as_json:
        emit_json({"migration_id": m.migration_id, "result": result, "status": st})
        return
    click.echo(headline)
    _echo_status(st)


def _echo_status(st: dict[str, Any]) -> None:
    blue, green = st.get("blue") or {}, st.get("green") or {}
    click.echo(f"migration {st['migration_id']} of {st['index']}/{st['alias']}: {st['status']}, "
               f"next phase {st['phase'] or '(none)'}")
    if blue:
        click.echo(f"  blue  {blue.get('version')}  {(blue.get('model') or {}).get('name')}  {blue.get('dim')} dims")
    if green:
        click.echo(f"  green {green.get('version')}  {(green.get('model') or {}).get('name')}  {green.get('dim')} dims")
    for name in PHASE_NAMES:
        ph = st["phases"][name]
        extra = f" ({ph['seconds']:.1f} s, attempt {ph['attempts']})" if ph.get("seconds") is not None else ""
        err = f"  error: {ph['error']}" if ph.get("error") else ""
        click.echo(f"  {name:<10} {ph['status']}{extra}{err}")
    steps = (st.get("rollout") or {}).get("steps") or []
    for s in steps:
        if s.get("status") != "superseded":
            click.echo(f"  step {s['weight']:g}%: {s['status']}" + (f" - {'; '.join(s.get('failures') or [])}"
                                                                     if s.get("failures") else ""))
    if st.get("alias_now"):
        click.echo(f"  alias now: {st['alias_now']['target']} (generation {st['alias_now']['generation']})")
    if st.get("runner"):
        click.echo(f"  runner: {st['runner_state']}")
    if st.get("rollback"):
        click.echo(f"  rolled back: {st['rollback'].get('reason')}")
    if st.get("retain_until"):
        click.echo(f"  blue retained until {st['retain_until']}")
    if st.get("report"):
        click.echo(f"report: {st['report']}")


@click.group("migrate")
def migrate_group() -> None:
    """Move an index alias to a new embedding model without downtime, one resumable phase at a time.

    \b
    Phases (each its own subcommand; `run` does them all, continuing from where it stopped):
      baseline   evaluate the live (blue) version on the benchmark and canaries
      build      re-embed the corpus with the new model and build the green version (alias untouched)
      compare    dual-run queries on blue and green; write the HTML report
      calibrate  recalibrate thresholds for green (refuses to go on without them)
      rollout    weighted alias steps (--weight 5,25,100), gated; a failed gate rolls back by itself
      cutover    green alone; blue retained (--retention) for instant rollback

    \b
    Examples:
      embedctl migrate run --store ./store --index docs --model hash:16 --benchmark bench.json --until calibrate
      embedctl migrate run --store ./store --index docs --dim 128 --benchmark bench.json --in-process
      embedctl migrate rollout --store ./store --index docs --weight 5,25,100
      embedctl migrate status --store ./store --index docs
      embedctl migrate rollback --store ./store --index docs --reason "recall drop"
    """


@migrate_group.command("run")
@common_options
@plan_options
@runtime_options
@click.option("--until", type=click.Choice(PHASE_NAMES), default=None, help="Stop after this phase [cutover].")
def run_cmd(until: str | None, **kw: Any) -> None:
    """Run every phase from where the migration stands (a rerun after a crash continues).

    \b
    Examples:
      embedctl migrate run --store ./store --index docs --model /models/mpnet --benchmark bench.json
      embedctl migrate run --store ./store --index docs --dim 128 --benchmark bench.json --until compare
      embedctl migrate run --store ./store --index docs          # continue the index's migration
    """
    as_json = kw["as_json"]
    m = _migration(kw, may_start=True)
    m.run(until=until)
    _finish(m, {}, as_json, f"migration {m.migration_id}: ran through {until or 'cutover'}")


def _phase_command(name: str, doc: str) -> Any:
    @click.option("--redo", is_flag=True, help="Run the phase again even if it is done.")
    @runtime_options
    @common_options
    def cmd(redo: bool, **kw: Any) -> None:
        as_json = kw["as_json"]
        m = _migration(kw, may_start=(name == "baseline"))
        result = m.phase(name, redo=redo)
        _finish(m, result, as_json, f"{name}: done")

    cmd.__doc__ = doc
    if name == "baseline":
        cmd = plan_options(cmd)
    return migrate_group.command(name)(cmd)


baseline_cmd = _phase_command("baseline", """Evaluate the live (blue) version on the benchmark and canaries.

    Starts the migration when plan flags (--model/--dim, --benchmark, ...) are given.

    \b
    Example:
      embedctl migrate baseline --store ./store --index docs --model hash:16 --benchmark bench.json
    """)
build_cmd = _phase_command("build", """Re-embed the corpus with the new model and build the green version (resumable).

    \b
    Example:
      embedctl migrate build --store ./store --index docs --address ray://head:10001
    """)
compare_cmd = _phase_command("compare", """Dual-run the query set on blue and green; write the HTML report.

    \b
    Example:
      embedctl migrate compare --store ./store --index docs --redo
    """)
calibrate_cmd = _phase_command("calibrate", """Recalibrate green's thresholds; refuses to go on if none come out.

    \b
    Example:
      embedctl migrate calibrate --store ./store --index docs
    """)


@migrate_group.command("rollout")
@common_options
@click.option("--weight", "weights", default=None, help="Steps, percent of query keys to green [the plan's, 5,25,100].")
def rollout_cmd(weights: str | None, **kw: Any) -> None:
    """Move the alias to blue + green step by step; each step checks canaries and gates first.

    A failed gate moves the alias back to blue, records why, and exits 7.

    \b
    Examples:
      embedctl migrate rollout --store ./store --index docs --weight 5,25,100
      embedctl migrate rollout --store ./store --index docs --weight 100     # straight to all keys
    """
    as_json = kw["as_json"]
    m = _migration(kw, may_start=False)
    result = m.rollout(weights)
    _finish(m, result, as_json, f"rollout: at {result.get('weight'):g}% green")


@migrate_group.command("cutover")
@common_options
def cutover_cmd(**kw: Any) -> None:
    """Serve green alone; blue stays restorable for the retention period.

    \b
    Example:
      embedctl migrate cutover --store ./store --index docs
    """
    as_json = kw["as_json"]
    m = _migration(kw, may_start=False)
    result = m.cutover()
    _finish(m, result, as_json, f"cutover: {result['version']} (blue {result['retained']} retained until "
                                f"{result['retain_until']})")


@migrate_group.command("rollback")
@common_options
@click.option("--reason", default=None, help="Why, for the history and the report.")
def rollback_cmd(reason: str | None, **kw: Any) -> None:
    """Put the alias back on blue alone (from a rollout step or after cutover).

    \b
    Example:
      embedctl migrate rollback --store ./store --index docs --reason "support tickets about search"
    """
    as_json = kw["as_json"]
    m = _migration(kw, may_start=False)
    result = m.rollback(reason)
    _finish(m, result, as_json, f"rollback: {result['from']} -> {result['version']}")


@migrate_group.command("abandon")
@common_options
@click.option("--reason", default=None, help="Why, for the record.")
def abandon_cmd(reason: str | None, **kw: Any) -> None:
    """Give a migration up (the alias must serve blue alone); gc may then remove its green version.

    \b
    Example:
      embedctl migrate abandon --store ./store --index docs --migration mig-0123456789 --reason "model too weak"
    """
    as_json = kw["as_json"]
    m = _migration(kw, may_start=False)
    result = m.abandon(reason)
    _finish(m, result, as_json, f"migration {m.migration_id} abandoned")


@migrate_group.command("status")
@common_options
def status_cmd(**kw: Any) -> None:
    """Where a migration stands: phases, versions, rollout steps, alias, runner, report path.

    \b
    Example:
      embedctl migrate status --store ./store --index docs --json
    """
    kw.pop("break_lock")
    m = _migration(kw, may_start=False)
    st = m.status()
    if kw["as_json"]:
        emit_json(st)
    else:
        _echo_status(st)


@migrate_group.command("report")
@common_options
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Also write the page to this file.")
@click.option("--screenshot", "shot", default=None, type=click.Path(dir_okay=False),
              help="Render the page in headless Chromium and save a PNG here.")
def report_cmd(out: str | None, shot: str | None, **kw: Any) -> None:
    """(Re)write the migration's HTML report into the store and print where it is.

    \b
    Example:
      embedctl migrate report --store ./store --index docs --out report.html --screenshot report.png
    """
    import tempfile
    from pathlib import Path

    as_json = kw["as_json"]
    m = _migration(kw, may_start=False)
    where = m.write_report(out)
    png = None
    if shot:
        from engine.migrate.report import screenshot

        src = out
        if src is None:
            src = str(Path(tempfile.mkdtemp(prefix="embedctl-report-")) / "report.html")
            m.write_report(src)
        png = str(screenshot(src, shot))
    if as_json:
        emit_json({"report": where, "out": out, "screenshot": png})
    else:
        click.echo(where)
        if png:
            click.echo(f"screenshot: {png}", err=True)


@migrate_group.command("list")
@click.option("--store", required=True, envvar="EMBEDCTL_STORE")
@click.option("--endpoint-url", default=None, envvar="EMBEDCTL_S3_ENDPOINT_URL")
@click.option("--index", required=True)
@click.option("--json", "as_json", is_flag=True)
def list_cmd(store: str, endpoint_url: str | None, index: str, as_json: bool) -> None:
    """Every migration of an index, oldest first."""
    from engine.core.storage import open_store
    from engine.migrate.state import list_migrations

    rows = [{"migration_id": s["migration_id"], "status": s["status"], "phase": s["phase"],
             "blue": (s.get("blue") or {}).get("version"), "green": (s.get("green") or {}).get("version"),
             "created_at": s["created_at"]}
            for s in list_migrations(open_store(store, endpoint_url=endpoint_url), index)]
    if as_json:
        emit_json({"index": index, "migrations": rows})
        return
    for r in rows:
        click.echo(f"{r['migration_id']}  {r['status']:<12} next {r['phase'] or '-':<10} {r['blue']} -> {r['green']}  "
                   f"{r['created_at']}")
    if not rows:
        click.echo(f"no migrations of {index}", err=True)
        sys.exit(0)
