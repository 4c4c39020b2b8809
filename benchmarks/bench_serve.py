"""Serving benchmark and load test: the search API under steady query load while the alias moves.

For each serving mode (one process on uvicorn, then Ray Serve with 1 and 2 replicas), ``--clients``
threads send single-query POST /search requests over loopback (127.0.0.1 only, keep-alive) for
``--seconds`` (or ``--max-queries``, whichever comes first) while the alias is swapped, rolled out
by weight and rolled back several times. Every answer is checked: HTTP 200, its (generation,
version) one the alias named (and, for a weighted generation, the version the query's key routes
to), and its hits exactly those of that version. Prints p50/p99 latency and queries/s per mode.

Versions are synthetic: ``--rows`` clustered vectors of the ``hash:DIM`` encoder built as flat
index versions, every chunk id prefixed with its version's tag (an answer shows which version
produced it).

    .venv/bin/python benchmarks/bench_serve.py                  # standalone, ray x1, ray x2
    .venv/bin/python benchmarks/bench_serve.py --modes ray:2 --seconds 60 --clients 16
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.core.storage import Store, open_store  # noqa: E402
from engine.publish.aliases import Target, publish_version, read_alias, rollback_alias  # noqa: E402

INDEX = "bench"
QUERIES = [f"wing lift {i}" for i in range(40)] + ["boundary layer", "heat transfer", "shock wave", "x"]
KEYS = 97  # distinct routing keys the clients cycle through


def build_versions(store: Store, names: list[str], rows: int, dim: int) -> dict[str, str]:
    """Flat versions whose chunk/doc ids start with their name; name -> version id."""
    import zlib

    from engine.index.build import BuildConfig, build_index
    from tests.index_utils import clustered_vectors, make_run

    out = {}
    for name in names:
        vectors = clustered_vectors(rows, dim, seed=zlib.crc32(name.encode()) % 10_000)
        run_id = f"run-{INDEX}-{name}"
        make_run(store, run_id, vectors, parts=1, chunk_ids=[f"{name}-c{i:06d}" for i in range(rows)],
                 doc_ids=[f"{name}-d{i // 2:06d}" for i in range(rows)])
        out[name] = build_index(store, run_id, INDEX, BuildConfig(kind="flat", rescore="none",
                                                                  gate_queries=8)).version_id
    return out


def reference(store: Store, versions: dict[str, str], k: int) -> dict[str, list[list[tuple[str, str]]]]:
    """version id -> per query, the (chunk_id, doc_id) list a freshly loaded version answers."""
    from engine.index.searcher import Searcher

    out = {}
    for vid in versions.values():
        with Searcher.load(store, INDEX, vid) as s:
            out[vid] = [[(h.chunk_id, h.doc_id) for h in s.search([q], k=k)[0]] for q in QUERIES]
    return out


@dataclass
class Moves:
    """The alias moves of one run and every (generation -> target) the alias held."""

    store: Store
    versions: dict[str, str]
    targets: dict[int, Target] = field(default_factory=dict)
    done: list[str] = field(default_factory=list)

    def record(self) -> None:
        state = read_alias(self.store, INDEX)
        self.targets[state.generation] = state.target

    def plan(self) -> list[tuple[str, Callable[[], Any]]]:
        st, v = self.store, self.versions
        return [
            ("publish v2", lambda: publish_version(st, INDEX, v["v2"], reason="bench")),
            ("v2 + v3 at 30%", lambda: publish_version(st, INDEX, v["v3"], weighted={"green_weight": 30})),
            ("v2 + v3 at 70%", lambda: publish_version(st, INDEX, v["v3"], weighted={"green_weight": 70})),
            ("cut over to v3", lambda: publish_version(st, INDEX, v["v3"])),
            ("rollback", lambda: rollback_alias(st, INDEX, reason="bench")),
            ("rollback", lambda: rollback_alias(st, INDEX, reason="bench")),
            ("publish v1", lambda: publish_version(st, INDEX, v["v1"])),
            ("v1 + v2 at 50%", lambda: publish_version(st, INDEX, v["v2"], weighted={"green_weight": 50})),
            ("rollback", lambda: rollback_alias(st, INDEX, reason="bench")),
        ]

    def run(self, stop: threading.Event, seconds: float) -> None:
        """Apply the plan evenly over ``seconds`` (a quiet start and end included)."""
        plan = self.plan()
        step = seconds / (len(plan) + 1)
        for label, move in plan:
            if stop.wait(step):
                return
            move()
            self.record()
            self.done.append(label)


@dataclass
class Load:
    answers: list[tuple[float, int, str, int, str, list[tuple[str, str]]]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    elapsed: float = 0.0


def drive(url: str, clients: int, seconds: float, max_queries: int, k: int,
          during: Callable[[threading.Event], None] | None = None) -> Load:
    """``clients`` keep-alive connections sending one query per request until time or count runs out."""
    host, port = url.removeprefix("http://").split(":")
    assert host == "127.0.0.1", "loopback only"
    load, lock, stop = Load(), threading.Lock(), threading.Event()
    deadline = time.monotonic() + seconds

    def client(worker: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        i = worker
        while time.monotonic() < deadline and not stop.is_set():
            qi, key = i % len(QUERIES), f"user-{i % KEYS}"
            i += clients
            body = json.dumps({"queries": [QUERIES[qi]], "k": k, "keys": [key]})
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/search", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = json.loads(resp.read() or b"{}")
                ms = (time.perf_counter() - t0) * 1000
                with lock:
                    if resp.status != 200:
                        load.failures.append(f"HTTP {resp.status}: {data}")
                    else:
                        r = data["results"][0]
                        load.answers.append((ms, qi, key, int(data["generation"]), r["version"],
                                             [(h["chunk_id"], h["doc_id"]) for h in r["hits"]]))
                    if len(load.answers) + len(load.failures) >= max_queries:
                        stop.set()
            except Exception as err:  # noqa: BLE001 - every failure counts
                with lock:
                    load.failures.append(f"{type(err).__name__}: {err}")
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.close()

    threads = [threading.Thread(target=client, args=(w,)) for w in range(clients)]
    mover = threading.Thread(target=during, args=(stop,)) if during else None
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    if mover:
        mover.start()
    for t in threads:
        t.join()
    load.elapsed = time.perf_counter() - t0
    stop.set()
    if mover:
        mover.join()
    return load


def check(load: Load, moves: Moves, ref: dict[str, list[list[tuple[str, str]]]]) -> list[str]:
    """Answers that no version the alias named would have given (empty when all are right)."""
    bad = []
    for _ms, qi, key, generation, version, hits in load.answers:
        target = moves.targets.get(generation)
        if target is None:
            bad.append(f"generation {generation} was never the alias's")
        elif target.route(INDEX, key) != version:
            bad.append(f"generation {generation} routes {key} to {target.route(INDEX, key)}, answered by {version}")
        elif hits != ref[version][qi]:
            bad.append(f"{version} answered query {qi} with other hits than it gives alone")
    return bad


def summary(mode: str, load: Load, moves: Moves, bad: list[str]) -> dict[str, Any]:
    ms = sorted(a[0] for a in load.answers)
    q = statistics.quantiles(ms, n=100) if len(ms) >= 100 else [float("nan")] * 99
    return {"mode": mode, "queries": len(load.answers), "failed": len(load.failures), "wrong": len(bad),
            "qps": len(load.answers) / load.elapsed if load.elapsed else 0.0, "p50_ms": q[49], "p99_ms": q[98],
            "moves": len(moves.done), "versions": dict(Counter(a[4] for a in load.answers)),
            "first_failures": load.failures[:3], "first_wrong": bad[:3]}


def wait_ready(url: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if all(httpx.get(f"{url}/healthz", timeout=5).status_code == 200 for _ in range(4)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become healthy in {timeout} s")


def run_mode(mode: str, store_uri: str, versions: dict[str, str], ref: dict[str, Any], args: Any) -> dict[str, Any]:
    """One mode: ``standalone`` or ``ray:N`` (N replicas on the Ray this process is connected to)."""
    from engine.serve.config import ServeConfig

    store = open_store(store_uri)
    publish_version(store, INDEX, versions["v1"], reason="bench start")
    moves = Moves(store, versions)
    moves.record()
    replicas = int(mode.split(":")[1]) if mode.startswith("ray:") else 1
    cfg = ServeConfig.from_flat({"store": store_uri, "index": INDEX, "poll_interval": 0.1, "replicas": replicas,
                                 "num_cpus": args.replica_cpus, "max_batch_size": 32, "batch_wait_s": 0.002})
    if mode == "standalone":
        from engine.serve.alias import AliasSearcher
        from engine.serve.server import SearchServer

        searcher = AliasSearcher(store, INDEX, poll_interval=cfg.poll_interval).start()
        server = SearchServer(searcher, port=0, limits=cfg.limits).start()
        try:
            load = drive(server.url, args.clients, args.seconds, args.max_queries, args.k,
                         lambda stop: moves.run(stop, args.seconds))
        finally:
            server.shutdown()
            searcher.stop()
    else:
        from ray import serve

        from engine.serve.ray_app import APP_NAME, build_application

        serve.run(build_application(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        try:
            wait_ready(args.url)
            load = drive(args.url, args.clients, args.seconds, args.max_queries, args.k,
                         lambda stop: moves.run(stop, args.seconds))
        finally:
            serve.delete(APP_NAME)
    return summary(mode, load, moves, check(load, moves, ref))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="standalone,ray:1,ray:2")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--max-queries", type=int, default=200_000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--replica-cpus", type=float, default=0.5)
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    os.environ.update({"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store_uri = str(Path(tmp) / "store")
        store = open_store(store_uri)
        t0 = time.perf_counter()
        versions = build_versions(store, ["v1", "v2", "v3"], args.rows, args.dim)
        ref = reference(store, versions, args.k)
        print(f"built 3 versions of {args.rows} x {args.dim} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        if any(m.startswith("ray:") for m in modes):
            import ray
            from ray import serve

            from tests.conftest import free_port

            ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
            port = free_port()
            args.url = f"http://127.0.0.1:{port}"
            serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            for mode in modes:
                rows.append(run_mode(mode, store_uri, versions, ref, args))
                print(json.dumps(rows[-1]), file=sys.stderr)
        finally:
            if any(m.startswith("ray:") for m in modes):
                serve.shutdown()
                ray.shutdown()
    load = os.getloadavg()
    if args.json:
        print(json.dumps({"rows": rows, "loadavg": load}))
    else:
        print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.clients} clients, {args.seconds:g} s "
              f"per mode, {args.rows} x {args.dim} flat, k={args.k}")
        print(f"{'mode':<12}{'queries':>9}{'failed':>8}{'wrong':>7}{'q/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'moves':>7}")
        for r in rows:
            print(f"{r['mode']:<12}{r['queries']:>9}{r['failed']:>8}{r['wrong']:>7}{r['qps']:>9.1f}"
                  f"{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['moves']:>7}")
    return 0 if all(r["failed"] == 0 and r["wrong"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
