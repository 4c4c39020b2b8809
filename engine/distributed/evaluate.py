"""Evaluate job: `python jobs/evaluate.py --config evaluate.yaml` (also `embedctl evaluate`).

recall@k, MRR@k and graded nDCG@k of an index version (or what an alias serves) on a
benchmark file or on queries + qrels, beside exact search over the same vectors.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from engine.core.config import FlatConfig


@dataclass(frozen=True)
class EvaluateJobConfig(FlatConfig):
    """The evaluate job's flat keys (one config file, the same keys as ever; None = not set)."""

    NULLABLE_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"store", "index", "version", "alias", "benchmark", "queries", "qrels", "k", "gain", "per_query",
         "endpoint_url"})
    REQUIRED: ClassVar[tuple[str, ...]] = ("store", "index")

    store: str | None = None
    index: str | None = None
    version: str | None = None
    alias: str | None = None
    benchmark: str | None = None  # a benchmark file (`embedctl benchmark build`), or
    queries: str | None = None  # queries + qrels (engine.quality.judgments formats)
    qrels: str | None = None
    k: Any = 10
    gain: str = "cranfield"  # engine.quality.judgments.GAINS
    per_query: str | None = None  # per-query JSON lines written here
    endpoint_url: str | None = None

    def validate(self) -> None:
        from engine.core.errors import ConfigError

        missing = [k for k in self.REQUIRED if not getattr(self, k)]
        if missing:
            raise ConfigError(f"the config needs {', '.join(missing)}")
        if (self.version is None) == (self.alias is None):
            raise ConfigError("give exactly one of version or alias")
        if not self.benchmark and not (self.queries and self.qrels):
            raise ConfigError("give a benchmark file, or queries and qrels")
        if not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"k must be a positive integer, got {self.k!r}")


def load_config(flat: Mapping[str, Any]) -> EvaluateJobConfig:
    """The job config from a config file's keys (an ``address`` key is the driver's, not the job's)."""
    return EvaluateJobConfig.from_flat({k: v for k, v in flat.items() if k != "address"})


def _local(uri: str, endpoint_url: str | None, tmp: str) -> str:
    """A local path for a file that may live in object storage."""
    if not uri.startswith("s3://"):
        return uri
    from engine.core.storage import open_store

    parent, name = uri.rsplit("/", 1)
    path = os.path.join(tmp, name)
    open_store(parent, endpoint_url=endpoint_url).download_file(name, path)
    return path


def run(cfg: EvaluateJobConfig | Mapping[str, Any]) -> dict[str, Any]:
    from engine.core.storage import open_store
    from engine.index.searcher import Searcher
    from engine.index.version import resolve_version

    if not isinstance(cfg, EvaluateJobConfig):
        cfg = load_config(cfg)
    assert cfg.store is not None and cfg.index is not None  # validate() checked
    store = open_store(cfg.store, endpoint_url=cfg.endpoint_url)
    vid = resolve_version(store, cfg.index, version=cfg.version, alias=cfg.alias)
    with tempfile.TemporaryDirectory(prefix="embedctl-eval-") as tmp:
        if cfg.benchmark:
            from engine.quality.benchmark import evaluate_benchmark, load_benchmark

            bench = load_benchmark(_local(cfg.benchmark, cfg.endpoint_url, tmp))
            with Searcher.load(store, cfg.index, vid) as searcher:
                result = evaluate_benchmark(searcher, bench, ks=(cfg.k,), store=store)
        else:
            from engine.quality.evaluate import EvalConfig, evaluate_version

            assert cfg.queries is not None and cfg.qrels is not None  # validate() checked
            result = evaluate_version(store, cfg.index, vid, _local(cfg.queries, cfg.endpoint_url, tmp),
                                      _local(cfg.qrels, cfg.endpoint_url, tmp),
                                      EvalConfig(k=cfg.k, gain=cfg.gain), per_query_path=cfg.per_query)
    return {"index": cfg.index, "version": vid, **result}


def main(argv: list[str] | None = None) -> int:
    from engine.distributed.driver import drive

    p = argparse.ArgumentParser(description="embedctl evaluate job")
    p.add_argument("--config", required=True, help="YAML/JSON job config")
    p.add_argument("--address", default=None, help="Ray address (unused by I/O-only jobs; accepted for symmetry)")
    p.add_argument("--dry-run", action="store_true", help="validate the config, print it resolved as JSON, exit")
    return drive(p.parse_args(argv), load_config, run, address_in_config=False)


if __name__ == "__main__":
    sys.exit(main())
