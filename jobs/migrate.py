"""Ray driver for a model migration: `python jobs/migrate.py --config migrate.yaml` (also `embedctl migrate run`).

Runs the migration's phases from where it stands (a rerun after a crash continues); the
green build's embed job runs on Ray (the same job as `embedctl embed`), everything else (index
build, comparison, calibration, rollout) in the driver.

Config keys: ``store``, ``endpoint_url``, ``index``, ``migration_id``, ``until`` and the plan
(``alias``, ``model``, ``dim``, ``corpus``, ``benchmark``, ``canaries``, ``queries``, ``pairs``,
``k``, ``weights``, ``min_recall``, ``max_recall_drop``, ``max_error_rate``, ``soak``,
``probe_url``, ``retention``, ``index_kind``, nested ``embed:`` / ``build:``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any, Callable

from jobs.jobutil import SUMMARY_MARKER, driver_parser

log = logging.getLogger("embedctl.jobs.migrate")


def ray_embed_runner(address: str | None = None) -> Callable[[Any], dict[str, Any]]:
    """The green build's embed job on Ray (``address`` overrides the config's)."""

    def run(cfg: Any) -> dict[str, Any]:
        from jobs.embed import run_embed_job

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
    from engine.config import load_config_file
    from engine.errors import EmbedctlError
    from engine.migrate import Migration, Tools, default_migration_id, plan_from_flat

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        flat = load_config_file(args.config)
        plan, run = plan_from_flat(flat)
        if not run.get("store"):
            raise EmbedctlError("the config needs `store`")
        mid = run.get("migration_id") or default_migration_id(plan)
        if args.dry_run:
            print(json.dumps({"migration_id": mid, "store": run["store"], "until": run.get("until"),
                              "plan": plan.to_dict()}, sort_keys=True, default=str))
            return 0
        from engine.storage import open_store

        store = open_store(run["store"], endpoint_url=run.get("endpoint_url"))
        tools = Tools(embed_runner=ray_embed_runner(args.address), progress=lambda m: log.info("%s", m))
        m = Migration.start(store, plan, mid, tools=tools, break_lock=bool(run.get("break_lock")))
        m.run(until=run.get("until"))
        status = m.status()
    except EmbedctlError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"{SUMMARY_MARKER} {json.dumps(status, sort_keys=True, default=str)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
