"""`embedctl publish | rollback | status | gc | serve | doctor`: index versions on object storage."""

from __future__ import annotations

import logging
import re
import signal
import sys
import threading
from typing import Any

import click

from engine.cli.app import emit_json
from engine.cli.common import index_option, store_options
from engine.cli.common import open_store as _open

log = logging.getLogger(__name__)


def _fmt_target(version: str | None, weighted: dict[str, Any] | None) -> str:
    """``v2`` or ``v2 (90%) + v3 (10%)``."""
    if weighted:
        g = float(weighted["green_weight"])
        return f"{weighted['blue']} ({100 - g:g}%) + {weighted['green']} ({g:g}%)"
    return version or "nothing"


def _echo_swap(res: Any, as_json: bool) -> None:
    if as_json:
        emit_json(res.to_dict())
        return
    target = _fmt_target(res.version, res.weighted)
    if not res.changed:
        click.echo(f"{res.index}/{res.alias} already on {target} (generation {res.generation}); nothing changed")
        return
    prev = _fmt_target(res.previous, res.previous_weighted)
    click.echo(f"{res.action}: {res.index}/{res.alias} {prev} -> {target} (generation {res.generation}; "
               f"verified {', '.join(res.verified)})")


@click.command()
@store_options
@index_option
@click.option("--version", "version", required=True, help="The version to publish (green for a weighted rollout).")
@click.option("--alias", default="live", show_default=True)
@click.option("--expect-current", default=None, help="Refuse unless the alias is on this version now.")
@click.option("--green-weight", type=click.FloatRange(0, 100), default=None,
              help="Weighted rollout: percent of query keys for --version; the rest stay on --blue.")
@click.option("--blue", default=None, help="With --green-weight: the other version [the alias's current one].")
@click.option("--from", "source", default=None,
              help="Copy the version from this store first (e.g. build locally, publish to S3).")
@click.option("--source-endpoint-url", default=None, help="S3 endpoint for --from, if it differs.")
@click.option("--reason", default=None, help="Why, for the history record.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def publish(store: str, endpoint_url: str | None, index: str, version: str, alias: str, expect_current: str | None,
            green_weight: float | None, blue: str | None, source: str | None, source_endpoint_url: str | None,
            reason: str | None, as_json: bool) -> None:
    """Verify a version and point an alias at it (compare-and-swap + history record).

    \b
    Examples:
      embedctl publish --store ./store --index docs --version v2 --alias live
      embedctl publish --store s3://bkt/emb --index docs --version v2 --expect-current v1 --reason "weekly refresh"
      embedctl publish --store s3://bkt/emb --from ./store --index docs --version v2   # upload, verify, swap
      embedctl publish --store ./store --index docs --version v3 --green-weight 10     # 10% of keys to v3

    Every shard checksum is verified before the swap; two publishers racing on one alias
    cannot both win (the loser gets a conflict error and nothing changes).
    """
    from engine.core.errors import ConfigError
    from engine.publish.aliases import publish_version

    if blue is not None and green_weight is None:
        raise ConfigError("--blue only makes sense with --green-weight")
    weighted = None if green_weight is None else {"green_weight": green_weight, **({"blue": blue} if blue else {})}
    dst = _open(store, endpoint_url)
    src = _open(source, source_endpoint_url or endpoint_url) if source else None
    res = publish_version(dst, index, version, alias, expect_current=expect_current, reason=reason,
                          weighted=weighted, source=src)
    _echo_swap(res, as_json)


@click.command()
@store_options
@index_option
@click.option("--alias", default="live", show_default=True)
@click.option("--to", "to", default=None, help="A version from the alias's history [the previous one].")
@click.option("--expect-current", default=None, help="Refuse unless the alias is on this version now.")
@click.option("--reason", default=None, help="Why, for the history record.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def rollback(store: str, endpoint_url: str | None, index: str, alias: str, to: str | None,
             expect_current: str | None, reason: str | None, as_json: bool) -> None:
    """Move an alias back to its previous version (or --to one from its history).

    \b
    Examples:
      embedctl rollback --store ./store --index docs --alias live
      embedctl rollback --store s3://bkt/emb --index docs --to v5 --reason "recall drop in canary"

    Rolling back twice returns to where you started (like `kubectl rollout undo`).
    """
    from engine.publish.aliases import rollback_alias

    res = rollback_alias(_open(store, endpoint_url), index, alias, to=to, expect_current=expect_current,
                         reason=reason)
    _echo_swap(res, as_json)


def _fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


@click.command()
@store_options
@index_option
@click.option("--history", "history_limit", type=int, default=10, show_default=True,
              help="History records shown per alias (0 for all).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def status(store: str, endpoint_url: str | None, index: str, history_limit: int, as_json: bool) -> None:
    """Versions, aliases (with weights) and each alias's history.

    \b
    Examples:
      embedctl status --store ./store --index docs
      embedctl status --store s3://bkt/emb --index docs --json | jq '.aliases.live.version'
    """
    from engine.publish.status import index_status
    from engine.quality.calibration_store import calibration_status

    st = index_status(_open(store, endpoint_url), index, history_limit=history_limit or None,
                      calibration=calibration_status)
    if as_json:
        emit_json(st)
        return
    click.echo(f"index {st['index']} in {st['store']}")
    click.echo("versions:")
    if not st["versions"]:
        click.echo("  (none)")
    for v in st["versions"]:
        flags = "complete" if v["complete"] else "INCOMPLETE"
        served = f"  <- {', '.join(v['aliases'])}" if v["aliases"] else ""
        extra = f"  {v['model']} dim={v['dim']}" if v.get("model") else ""
        click.echo(f"  {v['version']:<28} {flags:<10} {v['objects']:>4} objects {_fmt_bytes(v['bytes']):>10}"
                   f"{extra}{served}")
        if v.get("error"):
            click.echo(f"    ! {v['error']}")
        if v.get("calibration") is not None:
            from engine.quality.calibration_store import calibration_line

            click.echo(f"    calibration: {calibration_line(v['calibration'])}")
    click.echo("aliases:")
    if not st["aliases"]:
        click.echo("  (none)")
    for name, a in st["aliases"].items():
        target = _fmt_target(a["version"], a["weighted"])
        click.echo(f"  {name} -> {target}  generation {a['generation']}, {a['action']} at {a['updated_at']} "
                   f"by {a['updated_by']}")
        for rec in a["history"]:
            why = f"  ({rec['why']})" if rec.get("why") else ""
            swap = f"{_fmt_target(rec.get('from'), rec.get('from_weighted'))} -> " \
                   f"{_fmt_target(rec.get('to'), rec.get('to_weighted'))}"
            click.echo(f"    #{rec['generation']:<4} {rec['action']:<8} {swap}  {rec['when']}  {rec['by']}{why}")
        if a["history_count"] > len(a["history"]):
            click.echo(f"    ... {a['history_count'] - len(a['history'])} older records (--history 0 shows all)")


def _parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise click.BadParameter(f"{text!r} is not a duration (e.g. 0, 90, 30m, 1h, 7d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


@click.command()
@store_options
@index_option
@click.option("--keep", type=click.IntRange(min=0), required=True,
              help="History records kept reachable per alias: their versions survive, so the last N swaps can "
                   "be rolled back.")
@click.option("--grace", default="1h", show_default=True,
              help="Never-published versions younger than this are kept (may be a build in progress); "
                   "0 removes crash leftovers now.")
@click.option("--dry-run", is_flag=True, help="List what would be deleted; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def gc(store: str, endpoint_url: str | None, index: str, keep: int, grace: str, dry_run: bool,
       as_json: bool) -> None:
    """Delete index versions that no alias and no retained history record can point to.

    \b
    Examples:
      embedctl gc --store ./store --index docs --keep 5 --dry-run
      embedctl gc --store s3://bkt/emb --index docs --keep 5 --grace 0

    Only version folders are deleted; aliases and history records are never touched.
    """
    from engine.publish.gc import gc_index

    rep = gc_index(_open(store, endpoint_url), index, keep=keep, dry_run=dry_run, grace_s=_parse_duration(grace))
    if as_json:
        emit_json(rep.to_dict())
        return
    verb = "would delete" if dry_run else "deleted"
    for row in rep.deleted:
        click.echo(f"{verb} {row['version']}: {row['objects']} objects, {_fmt_bytes(row['bytes'])} ({row['why']})")
    for row in rep.kept:
        click.echo(f"kept {row['version']}: {row['why']}")
    if not rep.deleted:
        click.echo(f"nothing to delete in {index} (--keep {keep})")


@click.command()
@store_options
@index_option
@click.option("--alias", default="live", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 exposes the endpoint to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--poll-interval", type=click.FloatRange(min=0.05), default=2.0, show_default=True,
              help="Seconds between alias checks.")
@click.option("--device", default="cpu", show_default=True, help="Where the query encoder runs: cpu, cuda, cuda:N.")
@click.option("--max-batch", type=click.IntRange(min=1), default=256, show_default=True, help="Queries per request.")
@click.option("--max-k", type=click.IntRange(min=1), default=1000, show_default=True, help="Hits per query.")
@click.option("--max-query-chars", type=click.IntRange(min=1), default=2048, show_default=True)
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=1 << 20, show_default=True)
@click.option("--request-timeout", type=click.FloatRange(min=0.001), default=30.0, show_default=True,
              help="Seconds before a search is answered 504.")
@click.option("--max-concurrency", type=click.IntRange(min=1), default=512, show_default=True,
              help="Requests in flight before new ones get 503 (one process; under Ray see --max-ongoing).")
@click.option("--ray", "use_ray", is_flag=True, help="Serve with Ray Serve replicas instead of one process.")
@click.option("--address", default=None, help="--ray: the Ray cluster to join (default: start a local one).")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True, help="--ray: fixed replicas.")
@click.option("--min-replicas", type=click.IntRange(min=0), default=None, help="--ray: autoscale from this many...")
@click.option("--max-replicas", type=click.IntRange(min=1), default=None, help="...up to this many.")
@click.option("--num-cpus", type=click.FloatRange(min=0), default=0.5, show_default=True, help="--ray: CPUs per replica.")
@click.option("--num-gpus", type=click.FloatRange(min=0), default=0.0, show_default=True, help="--ray: GPUs per replica.")
@click.option("--max-ongoing", type=click.IntRange(min=1), default=64, show_default=True,
              help="--ray: requests in flight per replica.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Concurrent requests answered by one encode + search (batched when busy; with --ray, @serve.batch).")
def serve(store: str, endpoint_url: str | None, index: str, alias: str, host: str, port: int, poll_interval: float,
          device: str, max_batch: int, max_k: int, max_query_chars: int, max_body_bytes: int, request_timeout: float,
          max_concurrency: int, use_ray: bool, address: str | None, replicas: int, min_replicas: int | None,
          max_replicas: int | None, num_cpus: float, num_gpus: float, max_ongoing: int, batch_size: int) -> None:
    """Serve /search, /healthz, /version, /metrics for an alias, hot-swapping versions as it moves.

    \b
    Examples:
      embedctl serve --store ./store --index docs --alias live --port 8080
      curl 'http://127.0.0.1:8080/search?q=wing+lift&k=5'
      curl -XPOST http://127.0.0.1:8080/search -d '{"queries": ["wing lift"], "k": 5, "keys": ["user-42"]}'
      embedctl serve --store s3://bkt/emb --index docs --ray --min-replicas 1 --max-replicas 4
      embedctl serve --store s3://bkt/emb --index docs --ray --replicas 2 --device cuda --num-gpus 0.5

    A new version is loaded and verified in the background (its query encoder too); queries in
    flight finish on the old one. A version that fails to load is never served (/healthz says
    "degraded"). The API is described at /openapi.json. With --ray every replica follows the
    alias on its own and batches concurrent queries into one encode; without it, one process.
    """
    from engine.serve.config import ServeConfig

    cfg = ServeConfig.from_flat({
        "store": store, "endpoint_url": endpoint_url, "index": index, "alias": alias, "poll_interval": poll_interval,
        "device": device, "max_batch": max_batch, "max_k": max_k, "max_query_chars": max_query_chars,
        "max_body_bytes": max_body_bytes, "request_timeout_s": request_timeout, "replicas": replicas,
        "min_replicas": min_replicas, "max_replicas": max_replicas, "num_cpus": num_cpus, "num_gpus": num_gpus,
        "max_ongoing_requests": max_ongoing, "max_batch_size": batch_size})
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.warning("signal %d: shutting down", signum)
        stop.set()

    def on_ready(url: str, st: dict[str, Any]) -> None:
        # One line on stderr that scripts can wait for (stdout stays clean).
        how = f" with Ray Serve ({_fmt_replicas(cfg)})" if use_ray else ""
        click.echo(f"serving {index}/{alias} ({st.get('version')}, generation {st.get('generation')}) on {url}{how}",
                   err=True)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if use_ray:
        from engine.serve.ray_app import run_on_ray

        run_on_ray(cfg, host=host, port=port or _free_port(host), address=address, stop=stop, on_ready=on_ready)
    else:
        from engine.serve.server import run_standalone

        run_standalone(cfg, host=host, port=port, stop=stop, on_ready=on_ready, max_concurrency=max_concurrency)


def _fmt_replicas(cfg: Any) -> str:
    r = cfg.ray
    return f"{r.min_replicas}-{r.max_replicas} replicas" if r.min_replicas is not None else f"{r.replicas} replica(s)"


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@click.command()
@store_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def doctor(store: str, endpoint_url: str | None, as_json: bool) -> None:
    """Check a store: reachable, writable, and enforcing conditional writes (needed to publish).

    \b
    Examples:
      embedctl doctor --store ./store
      embedctl doctor --store s3://bkt/emb --endpoint-url http://minio:9000 --json

    Exits non-zero when publishing to this store would not be safe.
    """
    import importlib.util
    import uuid

    from engine.core.errors import EmbedctlError
    from engine.core.storage import SYSTEM_PREFIX, join, probe_conditional_writes

    st = _open(store, endpoint_url)
    checks: list[dict[str, Any]] = []
    ok = True
    key = join(SYSTEM_PREFIX, "doctor", f"{uuid.uuid4().hex}.bin")
    try:
        st.write_bytes(key, b"embedctl doctor")
        if st.read_bytes(key) != b"embedctl doctor":
            raise RuntimeError("read back different bytes")
        st.delete(key)
        checks.append({"check": "read/write/delete", "ok": True})
    except (EmbedctlError, RuntimeError) as err:
        ok = False
        checks.append({"check": "read/write/delete", "ok": False, "detail": str(err)})
    if ok:
        report = probe_conditional_writes(st)
        ok = report.ok
        checks.append({"check": "conditional writes (If-None-Match, If-Match)", "ok": report.ok,
                       "detail": "; ".join(report.problems) or "enforced"})
    for mod in ("faiss", "pyarrow", "boto3"):
        checks.append({"check": f"import {mod}", "ok": importlib.util.find_spec(mod) is not None, "info": True})
    if as_json:
        emit_json({"store": st.describe(), "ok": ok, "checks": checks})
    else:
        for c in checks:
            mark = "ok  " if c["ok"] else ("warn" if c.get("info") else "FAIL")
            detail = f": {c['detail']}" if c.get("detail") else ""
            click.echo(f"[{mark}] {c['check']}{detail}")
        click.echo(f"{st.describe()}: {'ready to publish' if ok else 'NOT safe to publish to'}")
    if not ok:
        sys.exit(8)
