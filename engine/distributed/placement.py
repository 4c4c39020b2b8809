"""Where work runs on a cluster: the nodes, and whether every node can reach the store.

A store given as a local path is a folder on the driver's disk. On a one-node Ray that is where
every worker runs; on several nodes each worker would write to its own disk and the run would
be scattered or lost. So a job that spreads work refuses a local path on a multi-node cluster
before any work, unless the user says the path is a shared filesystem mounted on every node.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from engine.core.errors import ConfigError

log = logging.getLogger(__name__)

SHARED_FS_ENV = "EMBEDCTL_SHARED_FILESYSTEM"  # "1": local paths are on a filesystem every node mounts


def is_local_path(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def alive_nodes() -> list[dict[str, Any]]:
    """The connected cluster's live nodes (``ray.nodes()`` entries); Ray must be initialised."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def worker_nodes() -> list[dict[str, Any]]:
    """Live nodes that offer CPUs or GPUs (a head started with no CPUs runs no work)."""
    return [n for n in alive_nodes() if (n.get("Resources") or {}).get("CPU", 0) or (n.get("Resources") or {}).get("GPU", 0)]


def check_store_reachable(store: str, *, shared_filesystem: bool = False, what: str = "store") -> None:
    """Refuse a local-path ``store`` when work may land on more than one node (Ray connected)."""
    if not is_local_path(store) or shared_filesystem or os.environ.get(SHARED_FS_ENV) == "1":
        return
    nodes = worker_nodes()
    if len(nodes) > 1:
        raise ConfigError(
            f"the {what} {store!r} is a local path, but this Ray cluster has {len(nodes)} nodes that run work, "
            "and each would write to its own disk; use s3://... (with --endpoint-url for S3-compatible stores) "
            f"or a path every node mounts, and pass --shared-filesystem (or {SHARED_FS_ENV}=1) if it is one")


def connect_for_store(address: str | None, store: str, *, shared_filesystem: bool = False,
                      what: str = "store", corpus: str | None = None) -> Any:
    """Connect (or start) Ray, then refuse a local-path store (or corpus, which workers read) on a
    multi-node cluster before any work."""
    from engine.distributed.runtime import init_ray

    ray = init_ray(address)
    check_store_reachable(store, shared_filesystem=shared_filesystem, what=what)
    if corpus:
        check_store_reachable(corpus, shared_filesystem=shared_filesystem, what="corpus")
    return ray


def current_node() -> dict[str, str]:
    """This worker's node id and IP, for per-unit records (empty outside Ray)."""
    try:
        import ray

        if not ray.is_initialized():
            return {}
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address()}
    except Exception:  # noqa: BLE001 - a record, never a failure
        return {}
