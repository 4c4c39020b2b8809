"""What every thin job driver shares: flags, config loading, the summary line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

SUMMARY_MARKER = "EMBEDCTL_SUMMARY"  # `embedctl submit` parses the driver's last stdout line after it


def driver_parser(job: str, config_help: str,
                  dry_run_help: str = "validate the config, print it resolved as JSON, exit") -> argparse.ArgumentParser:
    """The flags every Ray job driver takes: --config, --address, --dry-run."""
    p = argparse.ArgumentParser(description=f"embedctl {job} job (Ray driver)")
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--dry-run", action="store_true", help=dry_run_help)
    return p


def drive(args: argparse.Namespace, load: Callable[[dict[str, Any]], Any], run: Callable[[Any], dict[str, Any]],
          *, dry: Callable[[Any], Any] | None = None, exit_code: Callable[[dict[str, Any]], int] | None = None,
          address_in_config: bool = True) -> int:
    """The body of a config-driven driver: read ``--config`` (``--address`` wins over its address,
    unless the job takes the address apart: ``address_in_config=False``), build the config with
    ``load``; ``--dry-run`` prints ``dry(cfg)`` (default ``cfg.to_dict()``), else ``run(cfg)`` and
    print the summary line. An error is one line on stderr, credentials redacted, and its exit code."""
    from engine.core.config import load_config_file
    from engine.core.errors import EmbedctlError
    from engine.core.storage import redact

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        flat = load_config_file(args.config)
        if address_in_config and getattr(args, "address", None):
            flat["address"] = args.address
        cfg = load(flat)
        if args.dry_run:
            print(json.dumps(dry(cfg) if dry else cfg.to_dict(), sort_keys=True, default=str))
            return 0
        summary = run(cfg)
    except EmbedctlError as err:
        print(f"error: {redact(str(err))}", file=sys.stderr)
        return err.exit_code
    print(f"{SUMMARY_MARKER} {json.dumps(summary, sort_keys=True, default=str)}")
    return exit_code(summary) if exit_code else 0


def run_driver(description: str, keys: Mapping[str, Any], required: tuple[str, ...],
               run: Callable[[dict[str, Any]], dict[str, Any]], argv: list[str] | None = None,
               check: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Parse ``--config/--dry-run``, validate keys (unknown = error), run, print the summary line.

    ``keys`` maps every allowed key to its default; ``required`` must be set; ``check``
    validates values offline (a dry run never touches the store).
    """
    from engine.core.errors import ConfigError

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML/JSON job config")
    p.add_argument("--address", default=None, help="Ray address (unused by I/O-only jobs; accepted for symmetry)")
    p.add_argument("--dry-run", action="store_true", help="validate the config, print it resolved as JSON, exit")

    def load(flat: dict[str, Any]) -> dict[str, Any]:
        raw = {k.replace("-", "_"): v for k, v in flat.items() if k != "address" or "address" in keys}
        unknown = set(raw) - set(keys)
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}; allowed: {', '.join(sorted(keys))}")
        cfg = {**keys, **raw}
        missing = [k for k in required if not cfg.get(k)]
        if missing:
            raise ConfigError(f"the config needs {', '.join(missing)}")
        if check:
            check(cfg)
        return cfg

    return drive(p.parse_args(argv), load, run, dry=lambda cfg: cfg)
