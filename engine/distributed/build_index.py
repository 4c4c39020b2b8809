"""Ray driver for index builds: `python jobs/build_index.py --config job.yaml` (also `embedctl build-index`).

Spreads work as: training-sample reads -> Ray tasks (one per embeddings part holding sampled
rows); training -> this driver (all its cores); shard adds -> Ray tasks, one per index shard,
at most ``workers`` in flight (default: the cluster's CPUs / ``cpus_per_task``), each with
``cpus_per_task`` FAISS threads; the recall gate -> this driver. A task that dies is retried
(shard adds are idempotent); a driver that dies is resumed by rerunning the same command.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine.core.config import FlatConfig, from_flat
from engine.core.errors import ConfigError
from engine.distributed.driver import drive, driver_parser
from engine.index.build import BuildResult, build_index
from engine.index.context import Progress
from engine.index.params import BuildConfig, parse_bytes
from engine.index.runs import Mapper, local_mapper

log = logging.getLogger("embedctl.engine.distributed.build_index")
EXECUTORS = ("ray", "local")
CPU_NODE_MARKER = "embedctl_cpu_node"  # cluster/ray-cluster.yaml: CPU worker groups advertise it


@dataclass(frozen=True)
class BuildJobConfig(FlatConfig):
    """One build-index job: where, what, and how it is spread (flags and config files share these keys)."""

    # Other spellings of the same keys (the k8s ConfigMap and older configs use them).
    KEY_ALIASES: ClassVar[dict[str, str]] = {"run_id": "run", "index_kind": "kind", "recall_gate": "gate_recall",
                                             "index_name": "index"}
    # null means "not set" (choose automatically), except for the gate: null = measure only.
    NULLABLE_KEYS: ClassVar[frozenset[str]] = frozenset({"gate_recall"})

    store: str = ""
    run: str = ""
    index: str = ""
    build: BuildConfig = field(default_factory=BuildConfig)
    endpoint_url: str | None = None
    parent_version: str | None = None
    force: bool = False  # a new version even if the same build finished before
    executor: str = "ray"  # ray | local (in this process, no Ray)
    address: str | None = None  # Ray address; None = RAY_ADDRESS or a private local Ray
    shared_filesystem: bool = False  # a local-path store is mounted on every Ray node (else refused on >1 node)
    workers: int | None = None  # shard tasks in flight; None = cluster CPUs / cpus_per_task
    cpus_per_task: float = 1.0

    def validate(self) -> None:
        missing = [name for name in ("store", "run", "index") if not getattr(self, name)]
        if missing:
            raise ConfigError(f"build-index config lacks {', '.join(missing)} "
                              f"({', '.join('--' + m for m in missing)})")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_task <= 0:
            raise ConfigError(f"cpus_per_task must be > 0, got {self.cpus_per_task}")
        self.build.validate()

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> BuildJobConfig:
        """From flat keys (file + flags; a nested ``build:`` section works too). Unknown keys are an error."""
        return from_flat(cls, flat, aliases=cls.KEY_ALIASES, nullable=cls.NULLABLE_KEYS,
                         coerce={"memory_budget": parse_bytes})


# ---------------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------------


def _apply(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


@dataclass(frozen=True)
class RayPool:
    """Ray tasks with back-pressure: at most ``size`` in flight, results as they finish."""

    size: int
    cpus_per_task: float
    resources: dict[str, float]
    reason: str

    def __call__(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]:
        import ray

        task = ray.remote(_apply).options(num_cpus=self.cpus_per_task, resources=self.resources or None,
                                          max_retries=2)
        todo = list(items)
        pending: list[Any] = []
        while todo or pending:
            while todo and len(pending) < self.size:
                pending.append(task.remote(fn, todo.pop(0)))
            done, pending = ray.wait(pending, num_returns=1)
            try:
                yield ray.get(done[0])
            except ray.exceptions.RayTaskError as err:
                cause = getattr(err, "cause", None)
                raise (cause if isinstance(cause, Exception) else err) from None


def plan_ray_pool(resources: Mapping[str, float], workers: int | None, cpus_per_task: float) -> RayPool:
    """Size the shard-task pool from the cluster's resources (never a fixed count)."""
    cpus = float(resources.get("CPU", 0.0))
    size = workers or max(1, int(cpus // cpus_per_task))
    marker = {CPU_NODE_MARKER: 0.001} if resources.get(CPU_NODE_MARKER) else {}
    return RayPool(size, cpus_per_task, marker,
                   f"{size} shard task(s) in flight x {cpus_per_task:g} CPU on {cpus:g} cluster CPUs"
                   + (" (CPU worker nodes)" if marker else ""))


def run_build_job(cfg: BuildJobConfig, progress: Progress | None = None) -> BuildResult:
    """Run (or resume) one build on Ray, or in this process when ``executor`` is local."""
    from engine.core.storage import open_store

    store = open_store(cfg.store, endpoint_url=cfg.endpoint_url)
    mapper: Mapper = local_mapper
    parallelism, threads = 1, None
    if cfg.executor == "ray":
        import ray

        from engine.distributed.placement import connect_for_store

        t0 = time.perf_counter()
        connect_for_store(cfg.address, cfg.store, shared_filesystem=cfg.shared_filesystem)
        pool = plan_ray_pool(ray.cluster_resources(), cfg.workers, cfg.cpus_per_task)
        log.info("ray ready in %.1fs; %s", time.perf_counter() - t0, pool.reason)
        mapper, parallelism, threads = pool, pool.size, max(1, int(cfg.cpus_per_task))
    elif cfg.workers:
        parallelism = cfg.workers
    return build_index(store, cfg.run, cfg.index, cfg.build, mapper=mapper, progress=progress,
                       parallelism=parallelism, task_threads=threads, parent_version=cfg.parent_version,
                       force=cfg.force)


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = driver_parser("build-index", "YAML/JSON job config (same keys as `embedctl build-index` flags)")
    return p


def main(argv: list[str] | None = None) -> int:
    return drive(build_parser().parse_args(argv), BuildJobConfig.from_flat,
                 lambda cfg: run_build_job(cfg, progress=lambda e: log.info("%s", json.dumps(_short(e), default=str)))
                 .summary())


def _short(event: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in ("reasoning", "exact")}


if __name__ == "__main__":
    sys.exit(main())
