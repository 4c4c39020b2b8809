"""ServeConfig: what a search service serves and how (one process or Ray Serve replicas), from flat keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine.core.config import FlatConfig
from engine.core.errors import ConfigError
from engine.core.names import check_name
from engine.serve.limits import ServeLimits


@dataclass(frozen=True)
class ReplicaConfig:
    """Ray Serve: how many replicas, what each reserves, and how queries are batched."""

    replicas: int = 1  # fixed replica count (when no autoscaling bounds are given)
    min_replicas: int | None = None  # autoscaling bounds: both or neither
    max_replicas: int | None = None
    target_ongoing_requests: float = 4.0  # autoscaling: requests in flight per replica to aim for
    max_ongoing_requests: int = 64  # per replica; beyond it the proxy queues (then answers 503)
    num_cpus: float = 0.5  # per replica; fractional so several fit on a small node
    num_gpus: float = 0.0  # per replica; > 0 with device "cuda" puts the query encoder on a GPU
    max_batch_size: int = 64  # requests encoded and searched together (@serve.batch)
    batch_wait_s: float = 0.005  # how long a batch waits to fill


@dataclass(frozen=True)
class ServeConfig(FlatConfig):
    """``embedctl serve`` / ``cluster/serve.yaml`` args: flat keys, e.g. ``{"store": ..., "index": ...,
    "replicas": 2, "max_batch": 128}`` (``limits`` and ``ray`` are sections)."""

    CONFIG_LABEL: ClassVar[str] = "serve config"

    store: str
    index: str
    alias: str = "live"
    endpoint_url: str | None = None
    poll_interval: float = 2.0  # seconds between alias checks
    device: str = "cpu"  # where the query encoder runs: cpu, cuda, cuda:1
    limits: ServeLimits = field(default_factory=ServeLimits)
    ray: ReplicaConfig = field(default_factory=ReplicaConfig)

    def validate(self) -> None:
        check_name("index", self.index)
        check_name("alias", self.alias)
        if self.poll_interval < 0.05:
            raise ConfigError(f"poll_interval must be >= 0.05 s, got {self.poll_interval}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be cpu or cuda[:N], got {self.device!r}")
        r = self.ray
        if (r.min_replicas is None) != (r.max_replicas is None):
            raise ConfigError("give both min_replicas and max_replicas (autoscaling), or neither (replicas)")
        if r.min_replicas is not None and r.max_replicas is not None:
            if not 0 <= r.min_replicas <= r.max_replicas or r.max_replicas < 1:
                raise ConfigError(f"need 0 <= min_replicas <= max_replicas >= 1, got {r.min_replicas}.."
                                  f"{r.max_replicas}")
        elif r.replicas < 1:
            raise ConfigError(f"replicas must be >= 1, got {r.replicas}")
        if r.num_cpus < 0 or r.num_gpus < 0 or r.max_batch_size < 1 or r.max_ongoing_requests < 1:
            raise ConfigError("num_cpus/num_gpus must be >= 0, max_batch_size and max_ongoing_requests >= 1")
        if r.num_gpus > 0 and not self.device.startswith("cuda"):
            raise ConfigError(f"num_gpus={r.num_gpus} reserves a GPU per replica, but device is {self.device!r}: "
                              "set device cuda")

    def deployment_options(self) -> dict[str, Any]:
        """Ray Serve ``@serve.deployment`` options for the search deployment."""
        r = self.ray
        options: dict[str, Any] = {
            "max_ongoing_requests": r.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
            # A replica's first load can take minutes (download from S3, verify, model load).
            "health_check_period_s": 10.0,
            "health_check_timeout_s": 30.0,
            "graceful_shutdown_timeout_s": 20.0,
        }
        if r.min_replicas is not None:
            options["autoscaling_config"] = {"min_replicas": r.min_replicas, "max_replicas": r.max_replicas,
                                             "target_ongoing_requests": r.target_ongoing_requests}
        else:
            options["num_replicas"] = r.replicas
        return options
