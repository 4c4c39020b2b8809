"""Ray driver body for a model migration (`jobs/migrate.py --config FILE`; `embedctl migrate` uses its embed runner)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from engine.distributed.driver import drive, driver_parser

log = logging.getLogger("embedctl.engine.distributed.migrate")


def ray_embed_runner(address: str | None = None) -> Callable[[Any], dict[str, Any]]:
    """The green build's embed job on Ray (``address`` overrides the config's)."""

    def run(cfg: Any) -> dict[str, Any]:
        from engine.distributed.embed import run_embed_job

        if address:
            cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, address=address))
        return run_embed_job(cfg, progress=lambda e: log.info("embed: %s", json.dumps(
            {k: e.get(k) for k in ("event", "unit_id", "units", "pending", "accepted", "chunks") if k in e})))

    return run


def build_parser() -> argparse.ArgumentParser:
    p = driver_parser("migrate", "YAML/JSON migration config (same keys as `embedctl migrate run`)",
                      "validate the config, print the plan as JSON, exit")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the migration's phases from where it stands (a rerun after a crash continues); the
    green build's embed job runs on Ray (the same job as `embedctl embed`), everything else
    (index build, comparison, calibration, rollout) in the driver. Config keys: ``store``,
    ``endpoint_url``, ``index``, ``migration_id``, ``until``, ``break_lock`` and the plan
    (``alias``, ``model``, ``dim``, ``corpus``, ``benchmark``, ``canaries``, ``queries``,
    ``pairs``, ``k``, ``weights``, ``min_recall``, ``max_recall_drop``, ``max_error_rate``,
    ``soak``, ``probe_url``, ``retention``, ``index_kind``, nested ``embed:`` / ``build:``)."""
    from engine.core.errors import EmbedctlError
    from engine.migrate.migration import Migration
    from engine.migrate.plan import default_migration_id, plan_from_flat
    from engine.migrate.tools import Tools

    args = build_parser().parse_args(argv)

    def load(flat: dict[str, Any]) -> tuple[Any, dict[str, Any], str]:
        plan, run = plan_from_flat(flat)
        if not run.get("store"):
            raise EmbedctlError("the config needs `store`")
        return plan, run, run.get("migration_id") or default_migration_id(plan)

    def dry(loaded: tuple[Any, dict[str, Any], str]) -> dict[str, Any]:
        plan, run, mid = loaded
        return {"migration_id": mid, "store": run["store"], "until": run.get("until"), "plan": plan.to_dict()}

    def migrate(loaded: tuple[Any, dict[str, Any], str]) -> dict[str, Any]:
        from engine.core.storage import open_store

        plan, run, mid = loaded
        store = open_store(run["store"], endpoint_url=run.get("endpoint_url"))
        tools = Tools(embed_runner=ray_embed_runner(args.address), progress=lambda m: log.info("%s", m))
        m = Migration.start(store, plan, mid, tools=tools, break_lock=bool(run.get("break_lock")))
        m.run(until=run.get("until"))
        return m.status()

    return drive(args, load, migrate, dry=dry, address_in_config=False)


if __name__ == "__main__":
    sys.exit(main())
