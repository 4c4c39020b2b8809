"""Publish job: `python jobs/publish.py --config publish.yaml` (also `embedctl publish`).

Verifies every artifact of the version, then swaps the alias by compare-and-swap and records
the swap. Pure object-store I/O: it runs on the Ray head, no workers needed.
"""

from __future__ import annotations

import sys
from typing import Any

from engine.distributed.driver import run_driver

KEYS: dict[str, Any] = {
    "store": None, "index": None, "version": None, "alias": "live", "expect_current": None, "reason": None,
    "green_weight": None, "source": None, "endpoint_url": None,
}


def _check(cfg: dict[str, Any]) -> None:
    from engine.core.errors import ConfigError
    from engine.core.names import check_name

    check_name("index", cfg["index"])
    check_name("alias", cfg["alias"])
    if cfg["version"] != "latest":
        check_name("version", cfg["version"])
    w = cfg["green_weight"]
    if w is not None and not (isinstance(w, (int, float)) and 0 < float(w) < 100):
        raise ConfigError(f"green_weight must be a percentage between 0 and 100, got {w!r}")


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    from engine.core.storage import open_store
    from engine.index.version import resolve_version
    from engine.publish.aliases import publish_version

    store = open_store(cfg["store"], endpoint_url=cfg["endpoint_url"])
    source = open_store(cfg["source"], endpoint_url=cfg["endpoint_url"]) if cfg["source"] else None
    version = resolve_version(source or store, cfg["index"], version=cfg["version"])
    res = publish_version(store, cfg["index"], version, cfg["alias"], expect_current=cfg["expect_current"],
                          reason=cfg["reason"] or "jobs/publish.py", source=source,
                          weighted=None if cfg["green_weight"] is None else {"green_weight": cfg["green_weight"]})
    out = res.to_dict() if hasattr(res, "to_dict") else dict(vars(res))
    out.update(index=cfg["index"], alias=cfg["alias"], version=version)
    return out


def main(argv: list[str] | None = None) -> int:
    return run_driver("embedctl publish job", KEYS, ("store", "index", "version"), run, argv, _check)


if __name__ == "__main__":
    sys.exit(main())
