"""Serving: AliasSearcher hot swaps and the HTTP endpoint over real index versions
(engine.index.build builds, engine.index.searcher.Searcher loads), on local disk and on a real S3 endpoint
(moto server on loopback); the zero-downtime load test drives real HTTP queries."""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from engine.core import layout
from engine.core.errors import IntegrityError, NotFoundError
from engine.core.storage import Store, open_store, wait_for
from engine.index.searcher import Searcher
from engine.publish.aliases import publish_version, read_alias, rollback_alias
from engine.serve.alias import AliasSearcher, default_loader
from engine.serve.server import SearchServer
from tests.version_utils import Versions, answers

IDX = "docs"
REPO = Path(__file__).resolve().parent.parent
QUERIES = [f"wing lift {i}" for i in range(10)] + ["boundary layer", "heat transfer", "shock wave", "x"]


@pytest.fixture
def store(any_store_uri) -> Store:
    return open_store(any_store_uri)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A searcher cache of this test's own (S3 versions are downloaded there)."""
    path = tmp_path / "searcher-cache"
    monkeypatch.setenv("EMBEDCTL_CACHE_DIR", str(path))
    return path


@pytest.fixture
def v(store) -> Versions:
    return Versions(store, IDX)


def searcher_for(store: Store, **kw) -> AliasSearcher:
    kw.setdefault("poll_interval", 0.05)
    return AliasSearcher(store, IDX, "live", **kw)


def tag(hits) -> set[str]:
    """The version names (tags) the hits' doc ids come from."""
    return {h.doc_id.split("-")[0] for h in hits}


def test_follows_the_alias_and_swaps(store, v):
    publish_version(store, IDX, v["v1"])
    s = searcher_for(store, poll_interval=3600).start()  # polled by hand below
    try:
        ans = s.search(["wing lift"], k=2)
        assert ans.versions == [v["v1"]] and tag(ans.results[0]) == {"v1"}
        assert not s.poll_once()  # nothing changed
        publish_version(store, IDX, v["v2"])
        assert s.poll_once()
        ans = s.search(["wing lift"], k=2)
        assert ans.versions == [v["v2"]] and ans.generation == 2 and tag(ans.results[0]) == {"v2"}
        assert s.status()["swaps"] == 2 and s.status()["failure"] is None
    finally:
        s.stop()
    # Started without waiting: not ready at first, then the poller loads the version.
    s = searcher_for(store).start(wait=False)
    try:
        assert wait_for(lambda: s.ready, timeout=20)
        assert s.search(["wing lift"]).versions == [v["v2"]]
    finally:
        s.stop()


def test_start_fails_without_an_alias_or_with_a_broken_version(store, v):
    with pytest.raises(NotFoundError):
        searcher_for(store).start()
    publish_version(store, IDX, v["v1"])
    store.delete(v.artifact("v1", ".faiss"))
    with pytest.raises((IntegrityError, NotFoundError)):  # a missing shard: nothing to serve
        searcher_for(store).start()


@pytest.mark.parametrize("damage", ["corrupt", "missing", "../v1/shards/shard-00000.faiss", "/etc/passwd",
                                    "s3://another-bucket/shard.faiss"])
def test_a_version_that_fails_verification_is_never_served(store, v, damage, caplog, cache_dir):
    """The alias moves to v2, which was damaged after it was published: the searcher keeps
    serving v1, logs the refusal and reports it until the alias moves to a good version."""
    for n in ("v1", "v2", "v3"):
        v[n]
    # The build's recall gate loaded each version through the searcher cache; a serving host
    # starts without those copies (a verified cached copy would rightly be served as is).
    shutil.rmtree(cache_dir, ignore_errors=True)
    publish_version(store, IDX, v["v1"])
    s = searcher_for(store, poll_interval=3600).start()
    try:
        publish_version(store, IDX, v["v2"])
        shard = v.artifact("v2", ".faiss")
        if damage == "corrupt":
            data = bytearray(store.read_bytes(shard))
            data[-1] ^= 0x01
            store.write_bytes(shard, bytes(data))
        elif damage == "missing":
            store.delete(shard)
        else:
            mkey = layout.version_manifest_key(IDX, v["v2"])
            manifest = store.read_json(mkey)
            manifest["artifacts"][0]["key"] = damage
            store.write_json(mkey, manifest)
        with caplog.at_level(logging.ERROR, logger="engine.serve.alias"):
            assert not s.poll_once()
        assert s.search(["wing lift"]).versions == [v["v1"]]
        failure = s.status()["failure"]
        assert failure is not None and failure["versions"] == [v["v2"]] and failure["generation"] == 2
        assert any("refusing to switch" in r.getMessage() and v["v2"] in r.getMessage() for r in caplog.records)
        assert not s.poll_once()  # not retried in a loop
        publish_version(store, IDX, v["v3"])
        assert s.poll_once()
        assert s.search(["wing lift"]).versions == [v["v3"]] and s.status()["failure"] is None
    finally:
        s.stop()


class _Gated:
    """Wraps a real Searcher; the query "slow query" waits at a gate (held in flight across a swap)."""

    gate = threading.Event()
    entered = threading.Event()

    def __init__(self, inner: Searcher):
        self.inner = inner
        self.version_id = inner.version_id
        self.manifest = inner.manifest
        self.closed = False

    def search(self, queries, k=10, **kw):
        if queries == ["slow query"]:
            self.entered.set()
            assert self.gate.wait(30)
        assert not self.closed, "search on a closed version"
        return self.inner.search(queries, k=k, **kw)

    def close(self) -> None:
        self.closed = True
        self.inner.close()


def test_queries_in_flight_finish_on_the_old_version(store, v):
    publish_version(store, IDX, v["v1"])
    v["v2"]
    _Gated.gate.clear()
    _Gated.entered.clear()
    loaded: dict[str, _Gated] = {}

    def loader(st, index, version):
        loaded[version] = _Gated(default_loader(st, index, version))
        return loaded[version]

    s = searcher_for(store, loader=loader, poll_interval=3600).start()
    try:
        box: dict[str, object] = {}
        t = threading.Thread(target=lambda: box.setdefault("ans", s.search(["slow query"], k=2)))
        t.start()
        assert _Gated.entered.wait(10)
        publish_version(store, IDX, v["v2"])
        assert s.poll_once()  # switched while the slow query is still running on v1
        assert s.search(["wing lift"]).versions == [v["v2"]]
        assert not loaded[v["v1"]].closed  # still in use
        _Gated.gate.set()
        t.join(10)
        ans = box["ans"]
        assert ans.versions == [v["v1"]] and tag(ans.results[0]) == {"v1"}
        assert loaded[v["v1"]].closed  # closed once its last query left
    finally:
        _Gated.gate.set()
        s.stop()


def test_weighted_alias_serves_both_versions_sticky_per_key(store, v):
    v1, v2 = v["v1"], v["v2"]
    publish_version(store, IDX, v1)
    publish_version(store, IDX, v2, weighted={"green_weight": 30})
    loads: list[str] = []

    def counting_loader(st, index, version):
        loads.append(version)
        return default_loader(st, index, version)

    s = searcher_for(store, poll_interval=3600, loader=counting_loader).start()
    try:
        assert s.status()["loaded"] == sorted([v1, v2])
        keys = [f"user-{i}" for i in range(300)]
        ans = s.search(["wing lift"] * len(keys), k=1, keys=keys)
        target = read_alias(store, IDX).target
        assert ans.versions == [target.route(IDX, key) for key in keys]
        assert 0.2 < Counter(ans.versions)[v2] / len(keys) < 0.4
        assert all(tag(hits) == {v.name_of(ver)} for ver, hits in zip(ans.versions, ans.results, strict=True))
        again = s.search(["shock wave"] * 50, k=1, keys=keys[:50])
        assert again.versions == ans.versions[:50]  # sticky
        # Cut over to v2: blue is retired, v2 (already loaded) is reused, not reloaded.
        loads.clear()
        publish_version(store, IDX, v2)
        assert s.poll_once()
        assert s.status()["loaded"] == [v2] and loads == []
    finally:
        s.stop()


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


def http_json(url: str, method: str = "GET", path: str = "/", body: object | None = None,
              conn: http.client.HTTPConnection | None = None) -> tuple[int, dict, dict]:
    own = conn is None
    if conn is None:
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        payload = json.loads(resp.read() or b"{}")
        return resp.status, payload, dict(resp.getheaders())
    finally:
        if own:
            conn.close()


def test_http_endpoints(store, v):
    v1, v2 = v["v1"], v["v2"]
    publish_version(store, IDX, v1)
    s = searcher_for(store, poll_interval=3600).start()
    server = SearchServer(s, port=0).start()
    try:
        assert server.url.startswith("http://127.0.0.1:")  # loopback by default
        code, body, _ = http_json(server.url, path="/healthz")
        assert code == 200 and body["status"] == "ok" and body["version"] == v1
        code, body, _ = http_json(server.url, path="/version")
        assert code == 200 and body["generation"] == 1 and body["loaded"] == [v1]
        code, body, headers = http_json(server.url, path="/search?q=wing+lift&k=2")
        assert code == 200 and headers["X-Embedctl-Version"] == v1 and body["version"] == v1
        assert body["results"][0]["hits"] == answers(store, IDX, v1, ["wing lift"], k=2)[0]
        code, body, _ = http_json(server.url, "POST", "/search", {"queries": ["a b", "shock wave"], "k": 3,
                                                                  "keys": ["u1", "u2"]})
        assert code == 200 and len(body["results"]) == 2 and len(body["results"][1]["hits"]) == 3
        code, body, _ = http_json(server.url, "POST", "/search", {"query": "shock wave"})
        assert code == 200 and body["results"][0]["query"] == "shock wave"
        for bad in ({"queries": []}, {"queries": ["x"], "k": 0}, {"queries": ["x"], "k": "many"},
                    {"queries": ["x"], "keys": ["a", "b"]}, {"queries": "x"}):
            code, body, _ = http_json(server.url, "POST", "/search", bad)
            assert code == 400 and body["error"]
        assert http_json(server.url, path="/nope")[0] == 404
        # A refused version shows on /healthz as degraded (still 200: the old one serves).
        publish_version(store, IDX, v2)
        store.delete(v.artifact("v2", ".ids.parquet"))
        s.poll_once()
        code, body, _ = http_json(server.url, path="/healthz")
        assert code == 200 and body["status"] == "degraded" and v2 in body["failure"]["versions"]
        assert "ids.parquet" in body["failure"]["error"]
        assert http_json(server.url, path="/search?q=wing")[2]["X-Embedctl-Version"] == v1
    finally:
        server.shutdown()
        s.stop()


def test_zero_downtime_under_load(any_store_uri):
    """A bounded stream of HTTP queries from 4 threads while publish -> rollback -> publish
    happen: zero failures, and every answer is exactly what one complete version answers."""
    store = open_store(any_store_uri)
    v = Versions(store, IDX)
    versions = [v["v1"], v["v2"], v["v3"]]
    publish_version(store, IDX, v["v1"])
    reference = {ver: answers(store, IDX, ver, QUERIES, k=3) for ver in versions}

    s = AliasSearcher(store, IDX, "live", poll_interval=0.05).start()  # the real Searcher.load
    server = SearchServer(s, port=0).start()
    stop = threading.Event()
    served: list[tuple[str, int, list[dict]]] = []
    failures: list[str] = []
    lock = threading.Lock()
    max_queries, deadline = 20_000, time.monotonic() + 90  # bounded by count and by time

    def client(worker: int) -> None:
        host, port = server.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        i = worker
        while not stop.is_set() and time.monotonic() < deadline:
            with lock:
                if len(served) + len(failures) >= max_queries:
                    return
            qi = i % len(QUERIES)
            i += 1
            try:
                code, body, headers = http_json(server.url, "POST", "/search",
                                                {"queries": [QUERIES[qi]], "k": 3}, conn=conn)
                with lock:
                    if code != 200:
                        failures.append(f"HTTP {code}: {body}")
                    else:
                        served.append((headers["X-Embedctl-Version"], qi, body["results"][0]["hits"]))
            except Exception as err:  # noqa: BLE001 - every failure counts
                with lock:
                    failures.append(f"{type(err).__name__}: {err}")
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.close()

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        def now_serving(ver: str) -> bool:
            return s.status().get("version") == ver

        def settle(n: int = 200) -> None:
            start = len(served)
            assert wait_for(lambda: len(served) >= start + n or stop.is_set(), timeout=30)

        settle()
        publish_version(store, IDX, v["v2"], reason="load test")
        assert wait_for(lambda: now_serving(v["v2"]), timeout=30)
        settle()
        rollback_alias(store, IDX, reason="load test")
        assert wait_for(lambda: now_serving(v["v1"]), timeout=30)
        settle()
        publish_version(store, IDX, v["v3"], reason="load test")
        assert wait_for(lambda: now_serving(v["v3"]), timeout=30)
        settle()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        server.shutdown()
        s.stop()

    assert failures == []
    by_version = Counter(ver for ver, _, _ in served)
    assert set(by_version) <= set(versions) and all(by_version[ver] > 0 for ver in versions), by_version
    for ver, qi, hits in served:
        ref = reference[ver][qi]  # consistent with exactly that version (scores up to float rounding)
        assert [(h["chunk_id"], h["doc_id"]) for h in hits] == [(h["chunk_id"], h["doc_id"]) for h in ref]
        assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in ref], abs=1e-5)
        assert {h["doc_id"].split("-")[0] for h in hits} == {v.name_of(ver)}


def test_cli_serve_binds_loopback_and_stops_on_sigterm(tmp_path):
    store = open_store(tmp_path / "store")
    v = Versions(store, IDX)
    publish_version(store, IDX, v["v1"])
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli.app", "serve", "--store", str(tmp_path / "store"),
                             "--index", IDX, "--port", "0", "--poll-interval", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if "serving" in line or not line:
                break
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert m, line
        url = m.group(1)
        code, body, _ = http_json(url, path="/healthz")
        assert code == 200 and body["version"] == v["v1"]
        code, body, headers = http_json(url, path="/search?q=wing+lift&k=1")
        assert code == 200 and headers["X-Embedctl-Version"] == v["v1"]
        assert body["results"][0]["hits"] == answers(store, IDX, v["v1"], ["wing lift"], k=1)[0]
        # It follows the alias too.
        publish_version(store, IDX, v["v2"])
        assert wait_for(lambda: http_json(url, path="/version")[1]["version"] == v["v2"], timeout=20)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == ""  # stdout stays clean
