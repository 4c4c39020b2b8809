"""The search API as a Ray Serve application: N replicas, each an alias searcher with batched queries.

Every replica runs its own ``AliasSearcher`` (polls the alias, loads and verifies a new target
fully, query encoder included, then swaps; a target it cannot load is refused while the old one
keeps serving and its ``/healthz`` says ``degraded``) behind the same FastAPI app as
``embedctl serve`` (``engine.serve.app``). Concurrent requests that reach one replica are
grouped by ``@serve.batch`` and answered by one ``AliasSearcher.search`` call per (k, options):
one encoder forward pass per version for the whole batch, all from one snapshot. Routing during
a weighted rollout hashes the query key (``engine.publish.aliases.route_bucket``), so every
replica sends a key to the same version.

Run it with ``embedctl serve --ray`` or ``serve run cluster/serve.yaml``
(``import_path: engine.serve.ray_app:build_app``; its ``args`` are ``ServeConfig`` keys).
Ray is imported only inside functions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

from engine import OFFLINE_ENV
from engine.serve.alias import AliasSearcher, SearchAnswer, make_loader
from engine.serve.app import SearchRequest, create_app
from engine.serve.batching import search_batch
from engine.serve.config import ServeConfig
from engine.serve.metrics import ServeMetrics

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve import Application

log = logging.getLogger(__name__)

APP_NAME = "embedctl-search"
DEPLOYMENT_NAME = "AliasSearchReplica"


class AliasSearchReplica:
    """One Ray Serve replica: an alias searcher, a batching queue and the FastAPI app over them."""

    def __init__(self, cfg: ServeConfig):
        from ray import serve

        from engine.core.storage import open_store

        os.environ.update(OFFLINE_ENV)
        self.cfg = cfg
        store = open_store(cfg.store, endpoint_url=cfg.endpoint_url)
        # Loads and verifies the current target before the replica takes traffic; a replica with
        # nothing to serve fails its start (Ray Serve retries it) rather than answering 503s.
        self.searcher = AliasSearcher(store, cfg.index, cfg.alias, poll_interval=cfg.poll_interval,
                                      loader=make_loader(cfg.device)).start()
        try:
            context = serve.get_replica_context()
            self.replica = str(getattr(context.replica_id, "unique_id", context.replica_id))
        except Exception:  # noqa: BLE001 - outside a replica (tests call the class directly)
            self.replica = f"pid-{os.getpid()}"
        self.metrics = ServeMetrics(self.searcher.status, replica=self.replica)
        self._gauges: dict[str, Any] | None = None
        self._batched = serve.batch(max_batch_size=cfg.ray.max_batch_size,
                                    batch_wait_timeout_s=cfg.ray.batch_wait_s)(self._run_batch)
        log.info("replica %s serving %s/%s: %s", self.replica, cfg.index, cfg.alias, self.searcher.status())

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self, self.cfg.limits, metrics=self.metrics, title="embedctl search (Ray Serve)")

    async def search(self, req: SearchRequest) -> SearchAnswer:
        """One request, answered in a batch with the requests that arrive with it."""
        result = await self._batched(req)
        if isinstance(result, Exception):
            raise result
        return result

    async def _run_batch(self, reqs: list[SearchRequest]) -> list[SearchAnswer | Exception]:
        self.metrics.batch.observe(sum(len(r.queries) for r in reqs))
        # The search runs in a thread: the replica's event loop keeps accepting (and batching).
        return await asyncio.get_running_loop().run_in_executor(None, search_batch, self.searcher, reqs)

    def status(self) -> dict[str, Any]:
        return {"replica": self.replica, **self.searcher.status()}

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose check raises: only when its alias poller died. A
        degraded replica (a refused version) is healthy: it serves the old version. Each check
        also exports the replica's serving state to Ray's own metrics (cluster-wide, per replica)."""
        self.export_state()
        if not self.searcher.polling:
            raise RuntimeError(f"replica {self.replica}: the alias poller is not running")

    def export_state(self) -> bool:
        """``embedctl_serving_degraded`` / ``_generation`` / ``_swaps`` gauges in Ray's metrics
        (Serve adds the deployment and replica tags): ``/metrics`` answers for one replica only."""
        try:
            if self._gauges is None:
                from ray.serve.metrics import Gauge

                # tag_keys: Ray annotates it as a 1-tuple, but takes any number of keys.
                self._gauges = {name: Gauge(f"embedctl_serving_{name}", description,
                                            tag_keys=("index", "alias"))  # type: ignore[arg-type]
                                for name, description in (
                                    ("degraded", "1 while this replica refuses the alias's target"),
                                    ("generation", "Alias generation this replica serves"),
                                    ("swaps", "Targets this replica switched to since it started"))}
            st = self.searcher.status()
            tags = {"index": self.cfg.index, "alias": self.cfg.alias}
            self._gauges["degraded"].set(1.0 if self.searcher.degraded else 0.0, tags=tags)
            self._gauges["generation"].set(float(st.get("generation") or 0), tags=tags)
            self._gauges["swaps"].set(float(st.get("swaps") or 0), tags=tags)
            return True
        except Exception:  # noqa: BLE001 - metrics must never fail a health check
            log.exception("exporting serving state to Ray metrics failed")
            return False

    def __del__(self) -> None:
        searcher = getattr(self, "searcher", None)
        if searcher is not None:
            threading.Thread(target=searcher.stop, daemon=True).start()


def build_application(cfg: ServeConfig) -> Application:
    """The Ray Serve application for ``cfg`` (bind it with ``serve.run``)."""
    from ray import serve

    ingress = serve.ingress()(AliasSearchReplica)
    options = cfg.deployment_options()
    options["ray_actor_options"]["runtime_env"] = {"env_vars": dict(OFFLINE_ENV)}
    deployment = serve.deployment(name=DEPLOYMENT_NAME, **options)(ingress)
    return deployment.bind(cfg)


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for ``serve run`` / a RayService: ``args`` are ``ServeConfig`` keys."""
    return build_application(ServeConfig.from_flat(args))


def run_on_ray(cfg: ServeConfig, *, host: str, port: int, address: str | None, stop: threading.Event,
               on_ready: Any = None) -> None:
    """``embedctl serve --ray``: start (or join) Ray, run the application on Serve's HTTP proxy at
    ``host:port`` until ``stop`` is set, then delete it. ``on_ready(url, status)`` once it answers."""
    import ray
    from ray import serve

    os.environ.update(OFFLINE_ENV)
    started = not ray.is_initialized()
    if started:
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": dict(OFFLINE_ENV)})
        for sig, handler in handlers.items():  # ray.init replaces them; the caller's stop cleanly
            if callable(handler):
                signal.signal(sig, handler)
    try:
        serve.start(http_options={"host": host, "port": port})
        handle = serve.run(build_application(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        status = handle.status.remote().result(timeout_s=600)
        if on_ready is not None:
            on_ready(f"http://{host}:{port}", status)
        stop.wait()
    finally:
        try:
            serve.delete(APP_NAME)
        except Exception:  # noqa: BLE001 - shutting down anyway
            log.exception("deleting the Serve application %s failed", APP_NAME)
        if started:
            ray.shutdown()  # a local Ray of our own goes with Serve; a cluster keeps its other apps
