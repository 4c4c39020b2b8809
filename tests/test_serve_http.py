"""The FastAPI search API over real loopback HTTP (uvicorn in a thread): bad requests get a 4xx JSON
error (never a 500 or a hung connection), a 10 MB body a quick 413, /openapi.json and /metrics, the
mode/where pass-through only where the loaded version's searcher takes it, and the request timeout."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time

import httpx
import pytest

from engine.core.storage import Store, open_store
from engine.publish.aliases import publish_version
from engine.serve.alias import AliasSearcher, default_loader
from engine.serve.app import ServeLimits
from engine.serve.server import SearchServer
from tests.version_utils import Versions, answers

IDX = "docs"
TEN_MB = 10 * 1024 * 1024


@pytest.fixture
def store(tmp_path) -> Store:
    return open_store(tmp_path / "store")


@contextlib.contextmanager
def serving(store: Store, wrap=None, limits: ServeLimits | None = None):
    """(client, searcher, versions) for an alias on v1 served over loopback; ``wrap`` wraps each
    loaded version's searcher."""
    v = Versions(store, IDX)
    publish_version(store, IDX, v["v1"])
    loader = (lambda st, i, ver: wrap(default_loader(st, i, ver))) if wrap else None
    s = AliasSearcher(store, IDX, "live", poll_interval=3600, loader=loader).start()
    server = SearchServer(s, port=0, limits=limits).start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            yield client, s, v
    finally:
        server.shutdown()
        s.stop()


@pytest.fixture
def served(store):
    """(client, server url, versions) for an alias on v1, served with small limits."""
    limits = ServeLimits(max_batch=8, max_k=20, max_query_chars=100, max_body_bytes=64 * 1024)
    with serving(store, limits=limits) as (client, _s, v):
        yield client, str(client.base_url).rstrip("/"), v


@pytest.mark.parametrize("body, why", [
    ({"queries": []}, "at least 1 item"),
    ({"queries": [""]}, "query 0 is empty"),
    ({"queries": ["   "]}, "query 0 is empty"),
    ({"query": ""}, "query 0 is empty"),
    ({"queries": ["x"], "k": 21}, "k must be in [1, 20]"),
    ({"queries": ["x"], "k": 0}, "k must be in [1, 20]"),
    ({"queries": ["x"], "k": "many"}, "k: Input should be a valid integer"),
    ({"queries": ["x"], "k": 2.5}, "k: Input should be a valid integer"),
    ({"queries": "x"}, "queries: Input should be a valid list"),
    ({"queries": [1, 2]}, "queries.0: Input should be a valid string"),
    ({"queries": ["x"] * 9}, "at most 8 queries"),
    ({"queries": ["x" * 101]}, "over the limit of 100"),
    ({"queries": ["x"], "keys": ["a", "b"]}, "one routing key per query"),
    ({"queries": ["x"], "keys": [["a"]]}, "keys.0"),
    ({"queries": ["x"], "mode": 3}, "mode: Input should be a valid string"),
    ([1, 2], "valid dictionary"),
])
def test_bad_post_bodies_get_400_with_a_message(served, body, why):
    client, _, _ = served
    r = client.post("/search", json=body)
    assert r.status_code == 400, r.text
    assert why in r.json()["error"]


def test_bad_query_strings_and_bodies(served):
    client, _, _ = served
    for params, why in [({}, "queries"), ({"q": ""}, "query 0 is empty"), ({"q": "x", "k": "lots"}, "k: Input"),
                        ({"q": "x", "k": 999}, "k must be in"), ({"q": ["a", "b"], "key": "only-one"}, "routing key")]:
        r = client.get("/search", params=params)
        assert r.status_code == 400 and why in r.json()["error"], (params, r.text)
    r = client.post("/search", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = client.get("/nope")
    assert r.status_code == 404 and "/search" in r.json()["error"]
    r = client.post("/healthz", json={})
    assert r.status_code == 405 and r.json()["error"]


def test_a_10_mb_body_gets_413_quickly_and_the_server_keeps_serving(served):
    client, url, v = served
    t0 = time.monotonic()
    r = client.post("/search", content=b"x" * TEN_MB, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    # Chunked (no Content-Length): counted as it arrives.
    r = client.post("/search", content=iter([b"y" * (1 << 20)] * 10))
    assert r.status_code == 413
    # A plain stdlib client writing the whole body before it reads: no reset, a clean 413.
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/search", body=b"{" + b" " * TEN_MB + b"}", headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]
    conn.close()
    assert time.monotonic() - t0 < 10
    # A lying Content-Length is refused, and the server still answers.
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
        assert sock.recv(100).split(b" ")[1] in (b"400", b"413")
    r = client.get("/search", params={"q": "wing lift", "k": 2})
    assert r.status_code == 200 and r.headers["X-Embedctl-Version"] == v["v1"]


def test_openapi_and_metrics(served, store):
    client, _, v = served
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/search"]["post"]
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert {"queries", "k", "keys", "mode", "where"} <= set(schema["properties"])
    assert {"get"} <= set(spec["paths"]["/search"]) and "/healthz" in spec["paths"]
    r = client.post("/search", json={"queries": ["wing lift", "shock wave"], "k": 3})
    assert r.json()["results"][0]["hits"] == answers(store, IDX, v["v1"], ["wing lift"], k=3)[0]
    client.post("/search", json={"queries": []})
    client.post("/search", content=b"x" * TEN_MB)
    text = client.get("/metrics").text
    assert f'embedctl_queries_total{{alias="live",index="docs",replica="",version="{v["v1"]}"}} 2.0' in text
    assert f'embedctl_serving_version{{alias="live",index="docs",replica="",version="{v["v1"]}"}} 1.0' in text
    assert 'embedctl_swaps_total{alias="live",index="docs",replica=""} 1.0' in text
    assert 'embedctl_errors_total{kind="bad_request"} 1.0' in text
    assert 'embedctl_errors_total{kind="too_large"} 1.0' in text
    assert "embedctl_search_latency_seconds_bucket" in text and "embedctl_search_latency_seconds_count 1.0" in text
    assert 'embedctl_http_requests_total{code="413",method="POST",route="/search"} 1.0' in text


class _Optioned:
    """A real Searcher whose search takes mode= and where= (as the newer index searcher does)."""

    seen: list[dict] = []

    def __init__(self, inner):
        self.inner = inner
        self.version_id = inner.version_id
        self.manifest = inner.manifest

    def search(self, queries, k=10, *, mode=None, where=None):
        self.seen.append({"mode": mode, "where": where})
        return self.inner.search(queries, k=k)


class _Plain:
    """A searcher whose search takes neither."""

    def __init__(self, inner):
        self.inner = inner
        self.version_id = inner.version_id
        self.manifest = inner.manifest

    def search(self, queries, k=10):
        return self.inner.search(queries, k=k)


@pytest.mark.parametrize("wrapper", [_Optioned, _Plain])
def test_mode_and_where_pass_through_only_when_the_version_takes_them(store, wrapper):
    _Optioned.seen.clear()
    with serving(store, wrap=wrapper) as (c, _s, v):
        assert c.get("/search", params={"q": "wing"}).status_code == 200  # no option: always served
        r1 = c.get("/search", params={"q": "wing", "mode": "hybrid", "where": "lang = 'en'"})
        r2 = c.post("/search", json={"queries": ["wing"], "mode": "dense"})
        st = c.get("/version").json()
    if wrapper is _Optioned:
        assert r1.status_code == r2.status_code == 200
        assert _Optioned.seen[-2:] == [{"mode": "hybrid", "where": "lang = 'en'"}, {"mode": "dense", "where": None}]
        assert st["search_options"] == ["mode", "where"]
    else:
        assert r1.status_code == r2.status_code == 400
        assert "mode" in r1.json()["error"] and v["v1"] in r2.json()["error"]
        assert st["search_options"] == []


def test_a_search_past_the_timeout_gets_504_and_others_still_answer(store):
    release = threading.Event()

    class Slow(_Plain):
        def search(self, queries, k=10):
            if queries == ["slow"]:
                release.wait(10)
            return self.inner.search(queries, k=k)

    try:
        with serving(store, wrap=Slow, limits=ServeLimits(request_timeout_s=0.5)) as (c, _s, _v):
            r = c.get("/search", params={"q": "slow"})
            assert r.status_code == 504 and "longer than 0.5 s" in r.json()["error"]
            assert c.get("/search", params={"q": "wing"}).status_code == 200
    finally:
        release.set()


def test_healthz_is_503_until_a_version_is_loaded(store):
    v = Versions(store, IDX)
    s = AliasSearcher(store, IDX, "live", poll_interval=0.05)  # no alias yet: nothing to serve
    s.start(wait=False)
    server = SearchServer(s, port=0).start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            r = c.get("/healthz")
            assert r.status_code == 503 and r.json()["status"] == "loading"
            r = c.get("/search", params={"q": "wing"})
            assert r.status_code == 503 and "no version" in r.json()["error"]
            publish_version(store, IDX, v["v1"])
            deadline = time.monotonic() + 20
            while c.get("/healthz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.get("/healthz").json()["status"] == "ok"
    finally:
        server.shutdown()
        s.stop()


@pytest.mark.parametrize("model", [{"name": "no-such-model-anywhere", "dim": 16, "fingerprint": "0" * 64},
                                   {"name": "hash:32", "dim": 32}])
def test_a_version_whose_query_encoder_cannot_be_loaded_is_never_served(store, model):
    """The encoder is loaded (offline) before the swap: a model that is not installed, or one that
    differs from what the version was built with, is refused and the old version keeps serving."""
    from engine.core import layout

    with serving(store) as (c, s, v):
        v2 = v["v2"]
        key = layout.version_manifest_key(IDX, v2)
        manifest = store.read_json(key)
        manifest["model"] = {**manifest["model"], **model}
        store.write_json(key, manifest)
        publish_version(store, IDX, v2, verifier=lambda *a, **kw: None)
        t0 = time.monotonic()
        assert not s.poll_once()
        assert time.monotonic() - t0 < 30  # offline: no download attempt, no hub timeout
        health = c.get("/healthz").json()
        assert health["status"] == "degraded" and health["failure"]["versions"] == [v2]
        r = c.get("/search", params={"q": "wing lift"})
        assert r.status_code == 200 and r.headers["X-Embedctl-Version"] == v["v1"]


def test_requests_that_queue_while_the_workers_are_busy_are_answered_as_one_batch(store):
    import asyncio

    from engine.serve.app import SearchRequest
    from engine.serve.batching import BatchingBackend

    v = Versions(store, IDX)
    publish_version(store, IDX, v["v1"])
    calls: list[int] = []

    class Counting(_Plain):
        def search(self, queries, k=10):
            calls.append(len(queries))
            time.sleep(0.05)
            return self.inner.search(queries, k=k)

    s = AliasSearcher(store, IDX, "live", poll_interval=3600,
                      loader=lambda st, i, ver: Counting(default_loader(st, i, ver))).start()
    batches: list[int] = []
    backend = BatchingBackend(s, max_batch_size=4, workers=1, on_batch=batches.append)
    reqs = [SearchRequest(queries=[f"wing lift {i}"], k=2) for i in range(9)]

    async def main():
        return await asyncio.gather(*(backend.search(r) for r in reqs))

    try:
        answers_ = asyncio.run(main())
        assert batches == [4, 4, 1] and calls == [4, 4, 1]  # all nine queued before the worker ran
        for req, got in zip(reqs, answers_, strict=True):
            assert got.results == s.search(req.queries, req.k).results
    finally:
        s.stop()
