"""A Ray cluster of a head and worker nodes on this machine, and the CLI run against it as subprocesses.

The test process never joins that cluster (the session's own local Ray may live in it): every
job is an `embedctl` subprocess given ``--address``. Nodes bind to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EMBEDCTL = str(Path(sys.executable).with_name("embedctl"))
CPUS_PER_NODE = 3  # two 2-CPU embedding actors cannot share a node: they land on both


def start_cluster(workers: int = 2) -> tuple[Any, list[Any]]:
    """Head (no CPUs: it runs no work) + ``workers`` nodes, each with a custom resource ``node_<i>``."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    nodes = [add_worker(cluster, f"node_{i}") for i in range(workers)]
    cluster.wait_for_nodes()
    return cluster, nodes


def loopback_address(cluster: Any) -> str:
    """The head's GCS on 127.0.0.1 (``cluster.address`` may name the host's other interface, unreachable here)."""
    return "127.0.0.1:" + cluster.address.rsplit(":", 1)[1]


def add_worker(cluster: Any, name: str) -> Any:
    return cluster.add_node(num_cpus=CPUS_PER_NODE, resources={name: 1}, node_ip_address="127.0.0.1")


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("EMBEDCTL_SHARED_FILESYSTEM", None)
    # Ray turns a 127.0.0.1 address into the host's outward IP (where these loopback nodes are not);
    # this switch (its only use in a driver) makes the driver keep 127.0.0.1 as its own node IP too.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def embedctl(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EMBEDCTL, *args], capture_output=True, text=True, env=cli_env(), timeout=timeout)


def embedctl_json(args: list[str], timeout: float = 240) -> dict[str, Any]:
    p = embedctl([*args, "--json"], timeout=timeout)
    assert p.returncode == 0, f"embedctl {' '.join(args)} -> {p.returncode}\n{p.stderr[-4000:]}"
    return json.loads(p.stdout)


def upload_dir(store: Any, prefix: str, folder: Path) -> None:
    for f in sorted(folder.iterdir()):
        store.upload_file(f"{prefix}/{f.name}", str(f))


def wait_for(predicate: Any, timeout: float, every: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every)
    return False
