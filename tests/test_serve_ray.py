"""Ray Serve search application (engine.serve.ray_app): batching without Ray, then 2 replicas on the
session's local Ray over real loopback HTTP: swap, weighted rollout routed alike by every replica,
a refused version (degraded, old one serves), batching across concurrent requests; and the
``serve run`` config in cluster/serve.yaml builds."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml

from engine.core.errors import ConfigError
from engine.core.storage import Store, open_store, wait_for
from engine.publish.aliases import publish_version, read_alias
from engine.serve.alias import AliasSearcher
from engine.serve.app import SearchRequest
from engine.serve.batching import search_batch
from engine.serve.config import ServeConfig
from tests.conftest import free_port
from tests.version_utils import Versions, answers

IDX = "docs"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path) -> Store:
    return open_store(tmp_path / "store")


def test_search_batch_answers_each_request_as_alone(store):
    v = Versions(store, IDX)
    publish_version(store, IDX, v["v1"])
    publish_version(store, IDX, v["v2"], weighted={"green_weight": 50})
    s = AliasSearcher(store, IDX, "live", poll_interval=3600).start()
    try:
        reqs = [SearchRequest(queries=["wing lift", "shock wave"], k=2, keys=["a", "b"]),
                SearchRequest(queries=["heat transfer"], k=3),
                SearchRequest(queries=["boundary layer"], k=2, keys=["c"]),
                SearchRequest(queries=["x"], k=2, mode="hybrid")]  # this searcher takes no mode=
        out = search_batch(s, reqs)
        for req, got in zip(reqs[:3], out[:3], strict=True):
            alone = s.search(req.queries, req.k, keys=req.routing_keys())
            assert got.versions == alone.versions and got.results == alone.results
        assert isinstance(out[3], ConfigError) and "mode" in str(out[3])  # only its own request fails
    finally:
        s.stop()


def test_serve_config_and_the_serve_run_file():
    with pytest.raises(ConfigError, match="both min_replicas and max_replicas"):
        ServeConfig.from_flat({"store": "s", "index": "docs", "min_replicas": 1})
    with pytest.raises(ConfigError, match="unknown config keys"):
        ServeConfig.from_flat({"store": "s", "index": "docs", "replica": 2})
    cfg = ServeConfig.from_flat({"store": "s", "index": "docs", "min_replicas": 1, "max_replicas": 4, "max_k": 50})
    assert cfg.deployment_options()["autoscaling_config"]["max_replicas"] == 4 and cfg.limits.max_k == 50
    # cluster/serve.yaml: a valid Serve config whose application builds from its args.
    from ray.serve.schema import ServeDeploySchema

    from engine.serve.ray_app import build_app

    doc = yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") else \
        ServeDeploySchema.parse_obj(doc)
    (app,) = schema.applications
    assert app.import_path == "engine.serve.ray_app:build_app"
    build_app(dict(app.args))  # validates the args (no Ray needed to build the application)


def _metric(text: str, name: str) -> dict[str, float]:
    """Per replica: the value of ``name`` (summed over its label sets) in one /metrics answer."""
    replica = re.search(r'embedctl_serving_ready\{[^}]*replica="([^"]*)"', text).group(1)
    total = sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))
    return {replica: total}


@pytest.mark.ray
@pytest.mark.slow
def test_two_replicas_on_ray_serve(ray_session, store, tmp_path):
    from ray import serve

    from engine.serve.ray_app import APP_NAME, build_application

    v = Versions(store, IDX)
    v1, v2 = v["v1"], v["v2"]
    publish_version(store, IDX, v1)
    port = free_port()
    cfg = ServeConfig.from_flat({"store": str(tmp_path / "store"), "index": IDX, "poll_interval": 0.2,
                                 "replicas": 2, "num_cpus": 0.25, "max_batch_size": 16, "batch_wait_s": 0.05})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_application(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=30) as c:
            assert wait_for(lambda: c.get("/healthz").status_code == 200, timeout=60)
            r = c.get("/search", params={"q": "wing lift", "k": 2})
            assert r.status_code == 200 and r.headers["x-embedctl-version"] == v1
            assert r.json()["results"][0]["hits"] == answers(store, IDX, v1, ["wing lift"], k=2)[0]
            assert c.post("/search", json={"queries": [], "k": 2}).status_code == 400
            assert c.post("/search", content=b"x" * (2 << 20)).status_code == 413

            # Serving state goes to Ray's metrics too (what a cluster-wide Prometheus scrapes).
            handle = serve.get_app_handle(APP_NAME)
            assert all(handle.export_state.remote().result(timeout_s=30) for _ in range(4))

            # Every replica follows the alias: after a swap, all answers come from v2.
            publish_version(store, IDX, v2)
            assert wait_for(lambda: all(c.get("/version").json()["version"] == v2 for _ in range(8)), timeout=30)

            # Weighted rollout: whichever replica answers, a key always reaches the same version.
            publish_version(store, IDX, v1, weighted={"green_weight": 40})
            assert wait_for(lambda: all(c.get("/version").json()["weighted"] for _ in range(8)), timeout=30)
            target = read_alias(store, IDX).target
            keys = [f"user-{i}" for i in range(40)]
            for _ in range(3):
                body = c.post("/search", json={"queries": ["wing lift"] * len(keys), "k": 1, "keys": keys}).json()
                assert [r["version"] for r in body["results"]] == [target.route(IDX, key) for key in keys]
            assert 0 < Counter(target.route(IDX, key) for key in keys)[v1] < len(keys)

            # Concurrent requests are batched inside a replica.
            def hit(i: int) -> None:
                c.get("/search", params={"q": f"wing lift {i}", "k": 1, "key": "k"}).raise_for_status()

            threads = [threading.Thread(target=hit, args=(i,)) for i in range(24)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            count, total = {}, {}
            for _ in range(12):
                text = c.get("/metrics").text
                count.update(_metric(text, "embedctl_search_batch_queries_count"))
                total.update(_metric(text, "embedctl_search_batch_queries_sum"))
            assert any(total[rep] > count[rep] for rep in count), (count, total)  # some batch held > 1 query

            # A version that fails to load: every replica keeps serving and says degraded.
            v3 = v["v3"]
            store.delete(v.artifact("v3", ".faiss"))
            publish_version(store, IDX, v3, verifier=lambda *a, **kw: None)
            assert wait_for(lambda: all(c.get("/healthz").json()["status"] == "degraded" for _ in range(8)),
                            timeout=30)
            r = c.get("/healthz")
            assert r.status_code == 200 and r.json()["failure"]["versions"] == [v3]
            r = c.get("/search", params={"q": "wing lift", "key": "user-1"})
            assert r.status_code == 200 and r.headers["x-embedctl-version"] in (v1, v2)
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()
        time.sleep(0.5)


@pytest.mark.ray
@pytest.mark.slow
def test_load_while_the_alias_swaps_rolls_out_and_rolls_back(ray_session, tmp_path):
    """benchmarks/bench_serve.py's load test, bounded: 2 replicas, 4 loopback clients, 9 alias moves
    (swap, weighted 30% and 70%, cutover, rollbacks) in ~20 s: zero failed queries, and every answer
    is what the version the alias named for its generation (and its key) gives alone."""
    from ray import serve

    from benchmarks import bench_serve as bench
    from engine.serve.ray_app import APP_NAME, build_application

    store_uri = str(tmp_path / "store")
    store = open_store(store_uri)
    versions = bench.build_versions(store, ["v1", "v2", "v3"], rows=600, dim=16)
    ref = bench.reference(store, versions, k=3)
    publish_version(store, bench.INDEX, versions["v1"])
    moves = bench.Moves(store, versions)
    moves.record()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = ServeConfig.from_flat({"store": store_uri, "index": bench.INDEX, "poll_interval": 0.1, "replicas": 2,
                                 "num_cpus": 0.25, "max_batch_size": 16, "batch_wait_s": 0.002})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_application(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        bench.wait_ready(url, timeout=60)
        load = bench.drive(url, clients=4, seconds=20, max_queries=20_000, k=3,
                           during=lambda stop: moves.run(stop, 18))
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()
    assert load.failures == []
    assert len(moves.done) == 9 and len(load.answers) > 100
    assert bench.check(load, moves, ref) == []
    served = Counter(a[4] for a in load.answers)
    assert set(served) == set(versions.values()), served  # all three versions answered at some point


@pytest.mark.ray
@pytest.mark.slow
def test_cli_serve_ray_answers_and_stops_on_sigterm(tmp_path):
    """`embedctl serve --ray` in its own process (its own local Ray): the ready line, answers over
    loopback from both replicas, a clean exit 0 on SIGTERM."""
    import os
    import signal
    import subprocess
    import sys

    store = open_store(tmp_path / "store")
    v = Versions(store, IDX)
    publish_version(store, IDX, v["v1"])
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli.app", "serve", "--store", str(tmp_path / "store"),
                             "--index", IDX, "--port", "0", "--ray", "--replicas", "2", "--num-cpus", "0.25"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line, deadline = "", time.monotonic() + 150
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if "serving" in line or not line:
                break
        m = re.search(r"on (http://127\.0\.0\.1:\d+) with Ray Serve \(2 replica", line)
        assert m, line
        r = httpx.get(f"{m.group(1)}/search", params={"q": "wing lift", "k": 1}, timeout=30)
        assert r.status_code == 200 and r.headers["x-embedctl-version"] == v["v1"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
