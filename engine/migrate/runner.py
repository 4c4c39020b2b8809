"""The loop that runs phases: order checks, running/done/failed records, the runner lock, a fresh report after each."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from engine.core.errors import ConfigError, EmbedctlError, GateError
from engine.migrate.baseline import run_baseline
from engine.migrate.build import run_build
from engine.migrate.calibrate import run_calibrate
from engine.migrate.compare import run_compare
from engine.migrate.context import MigrationContext
from engine.migrate.cutover import run_cutover
from engine.migrate.report import refresh_report
from engine.migrate.rollout import run_rollout
from engine.migrate.state import PHASES, now_iso

log = logging.getLogger(__name__)

PHASE_RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "baseline": run_baseline, "build": run_build, "compare": run_compare, "calibrate": run_calibrate,
    "rollout": run_rollout, "cutover": run_cutover,
}
assert tuple(PHASE_RUNNERS) == PHASES


def run_all(ctx: MigrationContext, until: str | None = None) -> dict[str, Any]:
    """Run every phase from where the migration stands through ``until`` (default: cutover).
    The caller holds the runner lock."""
    if until is not None and until not in PHASES:
        raise ConfigError(f"--until must be one of {', '.join(PHASES)}, got {until!r}")
    doc = ctx.read()
    if doc["status"] == "rolled_back":
        rb = doc.get("rollback") or {}
        raise GateError(f"migration {ctx.migration_id} was rolled back ({rb.get('reason')}); look at the "
                        f"report, then retry with `embedctl migrate rollout` or start a new migration")
    if doc["status"] == "cut_over":
        ctx.say(f"migration {ctx.migration_id} is already cut over to {doc['green']['version']}")
        return doc
    if doc["status"] == "abandoned":
        raise ConfigError(f"migration {ctx.migration_id} was abandoned; start a new one (--migration NEW_ID)")
    for phase in PHASES:
        if doc["phases"][phase]["status"] != "done":
            run_phase(ctx, phase)
            doc = ctx.read()
        if phase == until:
            break
    return ctx.read()


def _check_can_run(ctx: MigrationContext, doc: dict[str, Any], name: str) -> None:
    for earlier in PHASES[:PHASES.index(name)]:
        if doc["phases"][earlier]["status"] != "done":
            raise ConfigError(f"phase {name!r} needs {earlier!r} first: run `embedctl migrate {earlier} "
                              f"--index {ctx.index} --migration {ctx.migration_id}` (or `migrate run`)")
    if doc["status"] == "abandoned":
        raise ConfigError(f"migration {ctx.migration_id} was abandoned; start a new one (--migration NEW_ID)")
    if doc["status"] == "cut_over" and name not in ("cutover", "compare"):  # compare never touches the alias
        raise ConfigError(f"migration {ctx.migration_id} is cut over; only `migrate rollback` can change it now")


def run_phase(ctx: MigrationContext, name: str, *, redo: bool = False, **options: Any) -> dict[str, Any]:
    """Run one phase (a done one only again with ``redo`` or options); records ``running``, then
    ``done`` with its result or ``failed`` with the error, and rewrites the report either way.
    The caller holds the runner lock."""
    if name not in PHASES:
        raise ConfigError(f"unknown phase {name!r}; phases: {', '.join(PHASES)}")
    doc = ctx.read()
    ph = doc["phases"][name]
    if ph["status"] == "done" and not redo and not options:
        ctx.say(f"{name}: already done (attempt {ph.get('attempts')}); --redo runs it again")
        return ph.get("result") or {}
    _check_can_run(ctx, doc, name)
    t0 = time.monotonic()
    started = now_iso()

    def begin(d: dict[str, Any]) -> None:
        p = d["phases"][name]
        p.update(status="running", attempts=int(p.get("attempts", 0)) + 1, started_at=started, error=None)
        d["phase"] = name
        if d["status"] == "failed":
            d["status"] = "running"

    ctx.state.update(begin, event={"event": "phase-start", "phase": name})
    ctx.say(f"{name}: started")
    try:
        result = PHASE_RUNNERS[name](ctx, **options)
    except GateError as err:
        _record_failure(ctx, name, err, status_after=None)
        refresh_report(ctx)  # a reviewer sees why it stopped (and the rollback, if any)
        raise
    except EmbedctlError as err:
        _record_failure(ctx, name, err, status_after="failed")
        refresh_report(ctx)
        raise
    seconds = round(time.monotonic() - t0, 3)

    def finish(d: dict[str, Any]) -> None:
        p = d["phases"][name]
        p.update(status="done", finished_at=now_iso(), seconds=seconds, result=result, error=None)
        d["phase"] = next((q for q in PHASES if d["phases"][q]["status"] != "done"), None)

    ctx.state.update(finish, event={"event": "phase-done", "phase": name, "seconds": seconds})
    refresh_report(ctx)  # the page says what the state now says, after every phase
    ctx.say(f"{name}: done in {seconds:.1f} s")
    return result


def _record_failure(ctx: MigrationContext, name: str, err: Exception, status_after: str | None) -> None:
    def fail(d: dict[str, Any]) -> None:
        d["phases"][name].update(status="failed", error=str(err), finished_at=now_iso())
        if status_after is not None:
            d["status"] = status_after

    try:
        ctx.state.update(fail, event={"event": "phase-failed", "phase": name, "error": str(err)})
    except EmbedctlError:
        log.exception("could not record the failure of phase %s", name)
