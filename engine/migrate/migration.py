"""A model migration as one object: start or open it, run its phases under the runner lock, roll back, report."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from engine.core.errors import ConfigError, NotFoundError
from engine.core.storage import Store
from engine.migrate import build, calibrate, rollback, runner
from engine.migrate.context import MigrationContext
from engine.migrate.plan import MigrationPlan, default_migration_id, parse_weights
from engine.migrate.report import refresh_report, report_data, write_report
from engine.migrate.state import MigrationState, list_migrations, lock_state
from engine.migrate.tools import Tools


class Migration:
    """One migration of one index alias. ``start`` creates (or resumes) it from a plan;
    ``open`` finds an existing one. Every phase method takes the runner lock, is idempotent,
    and records itself in the state.

    ```
    baseline  -> evaluate the live (blue) version on the benchmark and canaries; store the figures
    build     -> re-embed the whole corpus with the new model (the embed job, resumable) and build a
                 green index version; the live alias is not touched
    compare   -> dual-run a query set on blue and green: overlap@k, Jaccard, top-1 agreement, rank
                 correlation, score-distribution shift, benchmark metrics, the queries that disagree most
    calibrate -> recalibrate similarity thresholds for green; refuses to go on without them
    rollout   -> weighted alias steps (5, 25, 100 % of query keys to green); each step checks the
                 canaries and gates before the next; a failed gate rolls back to blue by itself
    cutover   -> the alias serves green alone; blue is retained for instant rollback
    ```

    One module per phase (``baseline``, ``build``, ``compare``, ``calibrate``, ``rollout``,
    ``cutover``) over a shared ``MigrationContext``; ``runner`` runs them in order; ``state`` keeps
    the state document (``indexes/<index>/migrations/<id>/state.json``, compare-and-swap only, the
    runner's lease in its ``lock`` field); ``report`` rewrites ``report.html`` after every phase,
    rollback and abandon. Each phase records ``running`` before it works and ``done`` after, and is
    idempotent, so a migration killed anywhere and re-run continues from the phase it was in.
    Dimensions may differ between blue and green: every query is embedded by the model of the
    version that answers it.

    Example::

        plan = MigrationPlan(index="docs", embed={"model": "hash:16"}, benchmark="bench.json")
        m = Migration.start(open_store("./store"), plan)
        m.run(until="calibrate")        # baseline, build, compare (+ report), calibrate
        m.rollout(weights=(5, 25, 100))  # gated steps; a failed gate rolls back by itself
        m.cutover()
    """

    def __init__(self, store: Store, index: str, migration_id: str, *, tools: Tools | None = None,
                 by: str | None = None, lock_ttl_s: float = 120.0, break_lock: bool = False):
        from engine.core.names import whoami

        self.store = store
        self.index = index
        self.migration_id = migration_id
        self.tools = tools or Tools()
        self.by = by or whoami()
        self.break_lock = break_lock
        self.state = MigrationState(store, index, migration_id, lock_ttl_s=lock_ttl_s)
        self.ctx = MigrationContext(store, index, migration_id, self.state, self.tools, self.by)

    # --- finding and creating -----------------------------------------------------------------
    @classmethod
    def start(cls, store: Store, plan: MigrationPlan, migration_id: str | None = None, **kw: Any) -> Migration:
        plan.validate()
        m = cls(store, plan.index, migration_id or default_migration_id(plan), **kw)
        m.state.create(plan, m.by)
        m.ctx.store_inputs(plan)
        return m

    @classmethod
    def open(cls, store: Store, index: str, migration_id: str | None = None, **kw: Any) -> Migration:
        """``migration_id``, or the only unfinished migration of ``index``."""
        if migration_id is None:
            states = list_migrations(store, index)
            active = [s for s in states if s.get("status") not in ("cut_over", "abandoned")]
            if not states:
                raise NotFoundError(f"index {index!r} has no migration in {store.describe()}; start one with "
                                    f"`embedctl migrate run --index {index} --model M --benchmark B`")
            if len(active) > 1:
                raise ConfigError(f"index {index!r} has {len(active)} unfinished migrations "
                                  f"({', '.join(s['migration_id'] for s in active)}): name one with --migration")
            migration_id = (active or states)[-1]["migration_id"]
        m = cls(store, index, migration_id, **kw)
        m.state.read()  # NotFoundError with a hint when it does not exist
        return m

    @property
    def plan(self) -> MigrationPlan:
        return self.ctx.plan

    def read(self) -> dict[str, Any]:
        return self.state.read()

    def key(self, name: str) -> str:
        return self.ctx.key(name)

    def input_path(self, name: str) -> str | None:
        return self.ctx.input_path(name)

    # --- running phases (each under the runner lock) ------------------------------------------
    def run(self, until: str | None = None) -> dict[str, Any]:
        """Run every phase from where the migration stands through ``until`` (default: cutover)."""
        with self.state.locked(by=self.by, break_lock=self.break_lock):
            return runner.run_all(self.ctx, until)

    def phase(self, name: str, *, redo: bool = False, **options: Any) -> dict[str, Any]:
        """Run one phase (the one after the last done phase, or a done one again with ``redo``)."""
        if name not in runner.PHASE_RUNNERS:
            raise ConfigError(f"unknown phase {name!r}; phases: {', '.join(runner.PHASE_RUNNERS)}")
        with self.state.locked(by=self.by, break_lock=self.break_lock):
            return runner.run_phase(self.ctx, name, redo=redo, **options)

    def rollout(self, weights: Sequence[float] | str | None = None) -> dict[str, Any]:
        """Run (or continue) the weighted rollout; ``weights`` overrides the plan's steps."""
        if weights is None:
            return self.phase("rollout")
        return self.phase("rollout", weights=parse_weights(weights))

    def cutover(self) -> dict[str, Any]:
        return self.phase("cutover")

    def rollback(self, reason: str | None = None) -> dict[str, Any]:
        """Put the alias back on blue alone (from a weighted step or after cutover) and mark the
        migration rolled back; ``migrate rollout`` may retry it later."""
        with self.state.locked(by=self.by, break_lock=self.break_lock):
            result = rollback.rollback_to_blue(self.ctx, reason or "manual rollback", automatic=False)
            write_report(self.ctx)
            return result

    def abandon(self, reason: str | None = None) -> dict[str, Any]:
        """Give the migration up: only while the alias serves blue alone (roll back first).
        Its green version stops being protected from gc; the state stays as a record."""
        with self.state.locked(by=self.by, break_lock=self.break_lock):
            result = rollback.abandon(self.ctx, reason)
            refresh_report(self.ctx)
            return result

    # --- what phases are made of, for callers that look inside ---------------------------------
    def green_embed_config(self) -> Any:
        """Blue's embed job with the plan's changes: same corpus and chunking, the new model."""
        return build.green_embed_config(self.ctx)

    def calibration_pairs(self, plan: MigrationPlan, green_searcher: Any | None = None) -> tuple[list[Any], str]:
        return calibrate.calibration_pairs(self.ctx, plan, green_searcher)

    # --- reading: status and report -------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        doc = self.read()
        alias = None
        try:
            a = self.ctx.alias()
            alias = {"target": a.target.describe(), "generation": a.generation, **a.target.to_dict()}
        except NotFoundError:
            pass
        free, why = lock_state(doc.get("lock"))
        report = self.key("report.html")
        return {
            "migration_id": doc["migration_id"], "index": doc["index"], "alias": doc["alias"],
            "status": doc["status"], "phase": doc["phase"], "blue": doc.get("blue"), "green": doc.get("green"),
            "phases": {p: {k: v.get(k) for k in ("status", "attempts", "seconds", "error", "finished_at")}
                       for p, v in doc["phases"].items()},
            "rollout": doc.get("rollout"), "rollback": doc.get("rollback"), "retain_until": doc.get("retain_until"),
            "alias_now": alias, "runner": None if free else doc.get("lock"), "runner_state": why,
            "report": self.store.describe(report) if self.store.exists(report) else None,
            "state": self.store.describe(self.state.key), "created_at": doc["created_at"],
            "updated_at": doc["updated_at"],
        }

    def report_data(self) -> dict[str, Any]:
        return report_data(self.ctx)

    def write_report(self, out: str | os.PathLike[str] | None = None) -> str:
        """Render the HTML report into the store (``report.html`` beside the state) and, with
        ``out``, to a local file too. Returns where it is (a path for a local store)."""
        return write_report(self.ctx, out)
