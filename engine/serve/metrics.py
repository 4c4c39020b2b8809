"""Prometheus metrics of a search endpoint: requests, errors, latency, and the alias searcher's state.

Each app gets a registry of its own (several apps in one process, as in tests, do not collide).
Request figures are counted by the app as requests finish; the searcher's figures (serving
version, generation, swaps, queries per version, degraded) are read from
``AliasSearcher.status()`` at scrape time, so they can never drift from what is served.
Under Ray Serve every replica has its own registry: ``/metrics`` answers for the replica the
request reached (its ``replica`` label says which).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Search latency buckets (seconds): sub-millisecond flat searches to multi-second model batches.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _SearcherCollector(Collector):
    """The alias searcher's state as gauges and counters, read when scraped."""

    def __init__(self, status: Callable[[], dict[str, Any]], replica: str):
        self._status = status
        self._replica = replica

    def collect(self) -> Iterator[Metric]:
        st = self._status()
        labels = ["index", "alias", "replica"]
        base = [str(st.get("index")), str(st.get("alias")), self._replica]
        ready = GaugeMetricFamily("embedctl_serving_ready", "1 once a version is loaded and serving", labels=labels)
        ready.add_metric(base, 1.0 if st.get("ready") else 0.0)
        yield ready
        degraded = GaugeMetricFamily("embedctl_serving_degraded",
                                     "1 while the alias names a target this process refused (the old one serves)",
                                     labels=labels)
        degraded.add_metric(base, 1.0 if (st.get("failure") or st.get("poll_error")) else 0.0)
        yield degraded
        swaps = CounterMetricFamily("embedctl_swaps", "Targets switched to since start (the first load counts)",
                                    labels=labels)
        swaps.add_metric(base, float(st.get("swaps") or 0))
        yield swaps
        generation = GaugeMetricFamily("embedctl_alias_generation", "Generation of the alias being served",
                                       labels=labels)
        if st.get("ready"):
            generation.add_metric(base, float(st.get("generation") or 0))
        yield generation
        serving = GaugeMetricFamily("embedctl_serving_version",
                                    "Share of traffic each loaded version gets (1 for a plain alias)",
                                    labels=[*labels, "version"])
        for version, share in _shares(st).items():
            serving.add_metric([*base, version], share)
        yield serving
        queries = CounterMetricFamily("embedctl_queries", "Queries answered, by the version that answered",
                                      labels=[*labels, "version"])
        for version, n in sorted((st.get("queries_by_version") or {}).items()):
            queries.add_metric([*base, version], float(n))
        yield queries


def _shares(st: dict[str, Any]) -> dict[str, float]:
    if not st.get("ready"):
        return {}
    weighted = st.get("weighted")
    if not weighted:
        return {str(st["version"]): 1.0}
    green = float(weighted["green_weight"]) / 100.0
    return {str(weighted["blue"]): 1.0 - green, str(weighted["green"]): green}


class ServeMetrics:
    """The metrics one app exports on ``/metrics``."""

    def __init__(self, status: Callable[[], dict[str, Any]], replica: str = ""):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("embedctl_http_requests", "HTTP requests by route and status code",
                                ["route", "method", "code"], registry=self.registry)
        self.errors = Counter("embedctl_errors", "Failed requests by kind (bad_request, too_large, unsupported, "
                              "unavailable, timeout, internal)", ["kind"], registry=self.registry)
        self.latency = Histogram("embedctl_search_latency_seconds", "Time to answer one /search request",
                                 registry=self.registry, buckets=LATENCY_BUCKETS)
        self.batch = Histogram("embedctl_search_batch_queries", "Queries per search call into the index (after "
                               "batching across requests)", registry=self.registry, buckets=BATCH_BUCKETS)
        self.registry.register(_SearcherCollector(status, replica))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
