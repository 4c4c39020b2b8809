"""Evaluate job: `python jobs/evaluate.py --config evaluate.yaml` (also `embedctl evaluate`).

recall@k, MRR@k and graded nDCG@k of an index version (or what an alias serves) on a
benchmark file or on queries + qrels, beside exact search over the same vectors.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

from engine.distributed.driver import run_driver

KEYS: dict[str, Any] = {
    "store": None, "index": None, "version": None, "alias": None, "benchmark": None, "queries": None, "qrels": None,
    "k": 10, "gain": "cranfield", "per_query": None, "endpoint_url": None,
}


def _check(cfg: dict[str, Any]) -> None:
    from engine.core.errors import ConfigError

    if (cfg["version"] is None) == (cfg["alias"] is None):
        raise ConfigError("give exactly one of version or alias")
    if not cfg["benchmark"] and not (cfg["queries"] and cfg["qrels"]):
        raise ConfigError("give a benchmark file, or queries and qrels")
    if not isinstance(cfg["k"], int) or cfg["k"] < 1:
        raise ConfigError(f"k must be a positive integer, got {cfg['k']!r}")


def _local(uri: str, endpoint_url: str | None, tmp: str) -> str:
    """A local path for a file that may live in object storage."""
    if not uri.startswith("s3://"):
        return uri
    from engine.core.storage import open_store

    parent, name = uri.rsplit("/", 1)
    path = os.path.join(tmp, name)
    open_store(parent, endpoint_url=endpoint_url).download_file(name, path)
    return path


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    from engine.core.storage import open_store
    from engine.index.searcher import Searcher
    from engine.index.version import resolve_version

    store = open_store(cfg["store"], endpoint_url=cfg["endpoint_url"])
    vid = resolve_version(store, cfg["index"], version=cfg["version"], alias=cfg["alias"])
    with tempfile.TemporaryDirectory(prefix="embedctl-eval-") as tmp:
        if cfg["benchmark"]:
            from engine.quality.benchmark import evaluate_benchmark, load_benchmark

            bench = load_benchmark(_local(cfg["benchmark"], cfg["endpoint_url"], tmp))
            searcher = Searcher.load(store, cfg["index"], vid)
            result = evaluate_benchmark(searcher, bench, ks=(cfg["k"],), store=store)
        else:
            from engine.quality.evaluate import EvalConfig, evaluate_version

            result = evaluate_version(store, cfg["index"], vid, _local(cfg["queries"], cfg["endpoint_url"], tmp),
                                      _local(cfg["qrels"], cfg["endpoint_url"], tmp),
                                      EvalConfig(k=cfg["k"], gain=cfg["gain"]), per_query_path=cfg["per_query"])
    return {"index": cfg["index"], "version": vid, **result}


def main(argv: list[str] | None = None) -> int:
    return run_driver("embedctl evaluate job", KEYS, ("store", "index"), run, argv, _check)


if __name__ == "__main__":
    sys.exit(main())
