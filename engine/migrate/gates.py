"""Rollout gates: probe the weighted alias (in process and, optionally, over HTTP) and judge the figures."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.migrate.context import MigrationContext
from engine.migrate.evaluation import canary_figures, close_searcher, doc_rankings, search_hits
from engine.migrate.plan import MigrationPlan

log = logging.getLogger(__name__)
PROBE_BATCH = 64


def fmt_num(x: Any) -> str:
    return "n/a" if x is None else f"{float(x):.4f}"


@dataclass
class Probe:
    """What probing the weighted alias saw: queries, errors, answers by version, canary rankings."""

    queries: int = 0
    errors: int = 0
    by_version: dict[str, int] = field(default_factory=dict)
    served: list[list[tuple[str, float]]] = field(default_factory=list)


def probe_alias(searcher: Any, probe: Sequence[str], k: int, soak_s: float, keep_rankings: bool) -> Probe:
    """Send the probe queries through the alias searcher for ``soak_s`` (at least once); the
    first round's doc rankings are kept for the served canary recall."""
    seen = Probe()
    deadline = time.monotonic() + soak_s
    first = True
    while first or time.monotonic() < deadline:
        for i in range(0, len(probe), PROBE_BATCH):
            batch = list(probe[i:i + PROBE_BATCH])
            seen.queries += len(batch)
            try:
                ans = searcher.search(batch, k=max(3 * k, k + 10), keys=batch)
            except Exception as err:  # noqa: BLE001 - counted, never raised
                seen.errors += len(batch)
                log.warning("rollout probe failed: %s", err)
                continue
            for v in ans.versions:
                seen.by_version[v] = seen.by_version.get(v, 0) + 1
            if first and keep_rankings:
                seen.served.extend(doc_rankings(ans.results, k))
        first = False
        if time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    return seen


def check_step(ctx: MigrationContext, plan: MigrationPlan, doc: Mapping[str, Any], baseline: Mapping[str, Any],
               weight: float, generation: int) -> tuple[dict[str, Any], list[str]]:
    """Serve the weighted alias the way a searcher does (load + verify both versions, route by
    key), run the canaries through it for ``soak_s`` (at least once), run them on green alone,
    and optionally probe a live HTTP endpoint. Returns (figures, gate failures)."""
    from engine.serve.alias import AliasSearcher

    bench = ctx.benchmark()
    canaries = ctx.canaries(bench)
    probe = [c.query for c in canaries] or [q["text"] for q in ctx.queries(bench)][:100]
    blue, green = doc["blue"]["version"], doc["green"]["version"]
    failures: list[str] = []
    gates: dict[str, Any] = {"weight": weight, "generation": generation}
    searcher = AliasSearcher(ctx.store, ctx.index, plan.alias, poll_interval=3600, loader=ctx.tools.loader)
    try:
        searcher.start()
    except Exception as err:  # noqa: BLE001 - a version that does not load is a failed gate, not a crash
        failures.append(f"the weighted alias does not load: {type(err).__name__}: {err}")
        return gates, failures
    try:
        now_gen = (searcher.status() or {}).get("generation")
        if now_gen != generation:
            failures.append(f"the alias moved to generation {now_gen} during the step (expected {generation})")
        seen = probe_alias(searcher, probe, plan.k, plan.soak_s, bool(canaries))
    finally:
        searcher.stop()
    unknown = set(seen.by_version) - {blue, green}
    if unknown:
        failures.append(f"answers came from versions outside the rollout: {sorted(unknown)}")
    if weight >= 100 and seen.by_version.get(blue):
        failures.append(f"at 100% {seen.by_version[blue]} probe queries were still answered by blue")
    if plan.probe_url:
        http = probe_http(plan.probe_url, probe, plan.k, generation, {blue, green})
        gates["http"] = http
        seen.queries += http["queries"]
        seen.errors += http["errors"]
        failures += http["failures"]
    gates.update(queries=seen.queries, errors=seen.errors,
                 error_rate=(seen.errors / seen.queries) if seen.queries else 0.0, by_version=seen.by_version)
    if gates["error_rate"] > plan.max_error_rate + 1e-12:
        failures.append(f"error rate {gates['error_rate']:.4f} over {seen.queries} queries is above "
                        f"{plan.max_error_rate:.4f}")
    if canaries:
        failures += canary_gates(ctx, plan, canaries, green, baseline, seen.served, gates)
    return gates, failures


def canary_gates(ctx: MigrationContext, plan: MigrationPlan, canaries: Sequence[Any], green: str,
                 baseline: Mapping[str, Any], served: Sequence[Sequence[tuple[str, float]]],
                 gates: dict[str, Any]) -> list[str]:
    """Green alone and the alias as served against blue's baseline canary recall (figures into ``gates``)."""
    k = plan.k
    # A version is immutable, so the compare phase's green figures still hold (recomputed only
    # when compare ran without canaries).
    green_fig = (ctx.read_optional("compare.json") or {}).get("canary")
    if not green_fig or green_fig.get("canaries") != len(canaries):
        g = ctx.tools.loader(ctx.store, ctx.index, green)
        try:
            green_fig = canary_figures(canaries, doc_rankings(search_hits(g, [c.query for c in canaries], k), k), k)
        finally:
            close_searcher(g)
    blue_recall = (baseline.get("canary") or {}).get("canary_recall")
    served_fig = canary_figures(canaries, served, k) if len(served) == len(canaries) else {}
    gates.update(green_recall=green_fig["canary_recall"], blue_recall=blue_recall,
                 served_recall=served_fig.get("canary_recall"), canaries=len(canaries))
    failures = []
    gr = green_fig["canary_recall"]
    if plan.min_recall is not None and (gr or 0.0) < plan.min_recall:
        failures.append(f"green canary recall@{k} {gr:.4f} is below the minimum {plan.min_recall:.4f}")
    if blue_recall is not None and gr is not None and blue_recall - gr > plan.max_recall_drop + 1e-12:
        failures.append(f"green canary recall@{k} {gr:.4f} is {blue_recall - gr:.4f} below blue's baseline "
                        f"{blue_recall:.4f} (allowed drop {plan.max_recall_drop:.4f})")
    sr = served_fig.get("canary_recall")
    if blue_recall is not None and sr is not None and blue_recall - sr > plan.max_recall_drop + 1e-12:
        failures.append(f"served canary recall@{k} {sr:.4f} through the alias is {blue_recall - sr:.4f} below "
                        f"blue's baseline {blue_recall:.4f}")
    return failures


def _wait_for_generation(base: str, generation: int, wait_s: float, timeout_s: float) -> str | None:
    """None once ``base`` serves ``generation`` (or newer), else why not."""
    import urllib.request

    deadline = time.monotonic() + wait_s
    seen = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/version", timeout=timeout_s) as resp:
                seen = json.loads(resp.read()).get("generation")
            if seen is not None and int(seen) >= generation:
                return None
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    return f"{base} did not serve generation {generation} within {wait_s:.0f} s (it serves {seen})"


def probe_http(url: str, texts: Sequence[str], k: int, generation: int, allowed: set[str], *,
               wait_s: float = 60.0, timeout_s: float = 30.0) -> dict[str, Any]:
    """Probe a running ``embedctl serve``: wait until it serves ``generation`` (or a newer one),
    then send each text as one query. Every non-200 answer or transport error counts as an
    error; an answer must name exactly one version, one of ``allowed``."""
    import urllib.error
    import urllib.request

    base = url.rstrip("/")
    failures: list[str] = []
    late = _wait_for_generation(base, generation, wait_s, timeout_s)
    if late:
        failures.append(late)
    errors = 0
    by_version: dict[str, int] = {}
    for text in texts:
        # No explicit key: the server routes by the query text itself, and explicit routing keys
        # are limited to 256 characters while queries may be longer.
        body = json.dumps({"queries": [text], "k": k}).encode()
        req = urllib.request.Request(f"{base}/search", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                answer = json.loads(resp.read())
                header = resp.headers.get("X-Embedctl-Version", "")
        except (urllib.error.URLError, OSError, ValueError) as err:
            errors += 1
            log.warning("HTTP probe of %s failed: %s", base, err)
            continue
        versions = [r.get("version") for r in answer.get("results", [])]
        if len(versions) != 1 or versions[0] not in allowed or header != versions[0]:
            errors += 1
            failures.append(f"an answer named versions {versions} (header {header!r}), expected one of "
                            f"{sorted(allowed)}")
            continue
        by_version[versions[0]] = by_version.get(versions[0], 0) + 1
    return {"url": base, "queries": len(texts), "errors": errors, "by_version": by_version,
            "failures": failures[:5]}
