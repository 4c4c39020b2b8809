"""Serving: a searcher that follows an alias and hot-swaps versions, and a small HTTP endpoint.

``AliasSearcher`` polls the alias document. When it names a new target, a background thread
loads and verifies every version of that target (``engine.index.searcher.Searcher.load(...,
verify=True)``), and only then replaces the serving snapshot in one assignment. A query reads
the snapshot once when it starts, so queries in flight finish on the version they started
on; the old version is closed when the last of them leaves. A version that fails to load or
verify is never switched to: the searcher keeps serving the old one, logs the failure and
reports it on ``/healthz`` (status ``degraded``) until the alias moves again.

For a weighted alias both versions stay loaded and each query is routed by a hash of its
key (``engine.publish.aliases.Target.route``): the same key always lands on the same version.

``SearchServer`` exposes ``GET/POST /search``, ``GET /healthz``, ``GET /version`` on
127.0.0.1 by default (stdlib ``ThreadingHTTPServer``, one thread per connection).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlparse

from engine.core import layout
from engine.core.errors import EmbedctlError, NotFoundError
from engine.publish.aliases import AliasState, Target
from engine.core.names import check_name
from engine.core.storage import Store, redact

log = logging.getLogger(__name__)


class SearcherLike(Protocol):
    """What ``engine.index.searcher.Searcher`` offers and the alias searcher needs."""

    version_id: str
    manifest: dict[str, Any]

    def search(self, queries: list[str], k: int = 10) -> list[list[Any]]: ...


Loader = Callable[[Store, str, str], SearcherLike]


def default_loader(store: Store, index: str, version_id: str) -> SearcherLike:
    """Load and fully verify a version with the index builder's searcher."""
    from engine.index.searcher import Searcher

    return Searcher.load(store, index, version_id, verify=True)


def hit_to_dict(hit: Any) -> dict[str, Any]:
    """A Hit (dataclass, named tuple or mapping with chunk_id, doc_id, score) as JSON."""
    if isinstance(hit, dict):
        get = hit.get
    else:
        def get(name: str) -> Any:
            return getattr(hit, name)
    return {"chunk_id": get("chunk_id"), "doc_id": get("doc_id"), "score": float(get("score"))}


class _Loaded:
    """A loaded version with a count of the queries using it; closed once retired and idle."""

    def __init__(self, searcher: SearcherLike):
        self.searcher = searcher
        self.version_id = searcher.version_id
        self._users = 0
        self._retired = False
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            close = self._retired and self._users == 0
        if close:
            self._close()

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            close = self._users == 0
        if close:
            self._close()

    def _close(self) -> None:
        close = getattr(self.searcher, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # noqa: BLE001 - closing an old version must not hurt serving
                log.exception("closing version %s failed", self.version_id)


@dataclass(frozen=True)
class _Snapshot:
    """What is being served: the alias state and one loaded searcher per version it routes to."""

    state: AliasState
    loaded: dict[str, _Loaded]


@dataclass(frozen=True)
class SearchAnswer:
    """Results of one batch: per query, its hits and the version that answered it."""

    results: list[list[Any]]
    versions: list[str]
    generation: int


class AliasSearcher:
    """Serve an alias and follow it: load new versions in the background, swap atomically.

    Example::

        with AliasSearcher(open_store("./store"), "docs", "live", poll_interval=2) as s:
            answer = s.search(["wing lift"], k=5)
    """

    def __init__(self, store: Store, index: str, alias: str = "live", *, poll_interval: float = 2.0,
                 loader: Loader | None = None, retry_failed_s: float = 60.0):
        self.store = store
        self.index = check_name("index", index)
        self.alias = check_name("alias", alias)
        self.poll_interval = float(poll_interval)
        self.retry_failed_s = float(retry_failed_s)
        self._loader = loader or default_loader
        self._snapshot: _Snapshot | None = None
        self._etag: str | None = None
        self._lock = threading.Lock()  # guards the snapshot swap against query acquisition
        self._poll_lock = threading.Lock()  # one poll (and load) at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: dict[str, Any] | None = None  # the last refused target, until the alias moves on
        self._failed_at: dict[tuple[str, ...], float] = {}
        self.last_poll_error: str | None = None
        self.swaps = 0
        self.queries_by_version: dict[str, int] = {}

    # --- lifecycle --------------------------------------------------------------------------
    def start(self, *, wait: bool = True) -> AliasSearcher:
        """Load the alias's current target (synchronously when ``wait``; a failure there raises,
        since there is nothing else to serve), then poll in a background thread."""
        if wait:
            self.poll_once(raise_errors=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"alias-poller-{self.index}-{self.alias}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.poll_interval))
            self._thread = None
        with self._lock:
            snap, self._snapshot = self._snapshot, None
        if snap is not None:
            for loaded in snap.loaded.values():
                loaded.retire()

    def __enter__(self) -> AliasSearcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        if self._snapshot is None and not self._stop.is_set():
            self._poll_logged()  # started without waiting: load the first version right away
        while not self._stop.wait(self.poll_interval):
            self._poll_logged()

    def _poll_logged(self) -> None:
        try:
            self.poll_once()
        except Exception as err:  # noqa: BLE001 - the poller must survive anything
            log.exception("polling %s/%s failed", self.index, self.alias)
            self.last_poll_error = redact(f"{type(err).__name__}: {err}")

    # --- following the alias ----------------------------------------------------------------
    def poll_once(self, *, raise_errors: bool = False) -> bool:
        """Read the alias; if it names a new target, load + verify it and switch. Returns True
        when the served target changed. Errors are recorded (and raised if ``raise_errors``)."""
        with self._poll_lock:
            try:
                current = self.store.get_versioned(layout.alias_key(self.index, self.alias))
                if current is None:
                    raise NotFoundError(f"alias {self.alias!r} of index {self.index!r} does not exist in "
                                        f"{self.store.describe()}")
                self.last_poll_error = None
            except EmbedctlError as err:
                self.last_poll_error = redact(str(err))
                log.warning("cannot read alias %s/%s (still serving what is loaded): %s", self.index, self.alias,
                            self.last_poll_error)
                if raise_errors:
                    raise
                return False
            if current.etag == self._etag:
                return False
            try:
                state = AliasState.from_doc(json.loads(current.data), current.etag)
            except (ValueError, EmbedctlError) as err:
                self.last_poll_error = redact(f"alias document unreadable: {err}")
                log.error("alias %s/%s is unreadable (still serving what is loaded): %s", self.index, self.alias,
                          self.last_poll_error)
                if raise_errors:
                    raise
                return False
            snap = self._snapshot
            if snap is not None and snap.state.target == state.target:
                # Same versions (e.g. a no-op rewrite): follow the generation, keep the searchers.
                self._install(_Snapshot(state, snap.loaded), retire=[])
                self._etag = current.etag
                return False
            return self._load_and_switch(state, current.etag, snap, raise_errors)

    def _load_and_switch(self, state: AliasState, etag: str, snap: _Snapshot | None, raise_errors: bool) -> bool:
        target = state.target
        key = tuple(target.versions)
        failed_at = self._failed_at.get(key)
        if failed_at is not None and time.monotonic() - failed_at < self.retry_failed_s and not raise_errors:
            return False  # refused recently; retried after retry_failed_s or when the alias moves
        reuse = snap.loaded if snap is not None else {}
        loaded: dict[str, _Loaded] = {}
        t0 = time.monotonic()
        try:
            for v in target.versions:
                if v in reuse:
                    loaded[v] = reuse[v]
                    continue
                searcher = self._loader(self.store, self.index, v)
                if searcher.version_id != v:
                    raise EmbedctlError(f"loader returned version {searcher.version_id!r} for {v!r}")
                loaded[v] = _Loaded(searcher)
        except Exception as err:  # noqa: BLE001 - any failure means: do not switch
            for v, lo in loaded.items():
                if v not in reuse:
                    lo.retire()
            message = redact(f"{type(err).__name__}: {err}")
            self._failed_at[key] = time.monotonic()
            self.failure = {"target": target.describe(), "versions": list(key), "generation": state.generation,
                            "error": message, "at": time.time()}
            log.error("refusing to switch %s/%s to %s (generation %d), still serving %s: %s", self.index,
                      self.alias, target.describe(), state.generation,
                      snap.state.target.describe() if snap else "nothing", message)
            if raise_errors:
                raise
            return False
        retire = [lo for v, lo in reuse.items() if v not in loaded]
        self._install(_Snapshot(state, loaded), retire=retire)
        self._etag = etag
        self.failure = None
        self._failed_at.clear()
        self.swaps += 1
        log.info("now serving %s/%s -> %s (generation %d), loaded in %.2fs", self.index, self.alias,
                 target.describe(), state.generation, time.monotonic() - t0)
        return True

    def _install(self, snap: _Snapshot, retire: list[_Loaded]) -> None:
        with self._lock:
            self._snapshot = snap
        for lo in retire:
            lo.retire()  # closes now, or when its last in-flight query finishes

    # --- querying -----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._snapshot is not None

    @property
    def target(self) -> Target | None:
        snap = self._snapshot
        return snap.state.target if snap else None

    def search(self, queries: Sequence[str], k: int = 10, *, keys: Sequence[str | None] | None = None,
               **kwargs: Any) -> SearchAnswer:
        """Search a batch. Each query is routed by its key (default: the query text) when the
        alias is weighted; every query is answered by exactly one complete version."""
        queries = list(queries)
        if keys is not None and len(keys) != len(queries):
            raise ValueError(f"got {len(keys)} keys for {len(queries)} queries")
        with self._lock:
            snap = self._snapshot
            if snap is None:
                raise NotFoundError(f"no version of {self.index}/{self.alias} is loaded yet")
            for lo in snap.loaded.values():
                lo.acquire()
        try:
            target = snap.state.target
            routed = [target.route(self.index, (keys[i] if keys is not None and keys[i] is not None else q))
                      for i, q in enumerate(queries)]
            results: list[list[Any]] = [[] for _ in queries]
            for v in dict.fromkeys(routed):
                idx = [i for i, r in enumerate(routed) if r == v]
                hits = snap.loaded[v].searcher.search([queries[i] for i in idx], k=k, **kwargs)
                for i, h in zip(idx, hits):
                    results[i] = h
                with self._lock:
                    self.queries_by_version[v] = self.queries_by_version.get(v, 0) + len(idx)
            return SearchAnswer(results, routed, snap.state.generation)
        finally:
            for lo in snap.loaded.values():
                lo.release()

    def status(self) -> dict[str, Any]:
        snap = self._snapshot
        out: dict[str, Any] = {
            "index": self.index, "alias": self.alias, "store": self.store.describe(),
            "ready": snap is not None, "swaps": self.swaps, "failure": self.failure,
            "poll_error": self.last_poll_error, "queries_by_version": dict(self.queries_by_version),
        }
        if snap is not None:
            out.update({"version": snap.state.version, "generation": snap.state.generation,
                        "weighted": snap.state.target.to_dict()["weighted"], "loaded": sorted(snap.loaded)})
        return out


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------

MAX_BODY = 1 << 20


class _BadRequest(Exception):
    pass


class SearchServer:
    """``/search``, ``/healthz`` and ``/version`` over HTTP for an ``AliasSearcher``.

    ``GET /search?q=...&k=10&key=...`` or ``POST /search`` with ``{"queries": [...], "k": 10,
    "keys": [...]}``; the answer is ``{"generation", "version", "results": [{"query", "version",
    "hits": [{"chunk_id", "doc_id", "score"}]}]}`` and the ``X-Embedctl-Version`` header names
    the version(s) that answered.
    """

    def __init__(self, searcher: AliasSearcher, host: str = "127.0.0.1", port: int = 8080, *,
                 max_k: int = 1000, max_batch: int = 256):
        self.searcher = searcher
        self.max_k = max_k
        self.max_batch = max_batch
        self._httpd = ThreadingHTTPServer((host, port), self._handler())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> SearchServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="embedctl-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "embedctl"
            # Headers and body go out in two writes; without TCP_NODELAY, Nagle + delayed ACK
            # stall every keep-alive response by ~40 ms.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s %s", self.address_string(), format % args)

            def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = (json.dumps(body, sort_keys=True, default=str) + "\n").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                if url.path == "/healthz":
                    self._healthz()
                elif url.path == "/version":
                    self._send(200, server.searcher.status())
                elif url.path == "/search":
                    q = parse_qs(url.query)
                    self._search({"queries": q.get("q", []), "k": (q.get("k") or ["10"])[0],
                                  "keys": q.get("key") or None})
                else:
                    self._send(404, {"error": f"no such endpoint {url.path!r}; try /search, /healthz, /version"})

            def do_POST(self) -> None:
                if urlparse(self.path).path != "/search":
                    self._send(404, {"error": "POST is only for /search"})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    self._send(413, {"error": f"request body over {MAX_BODY} bytes"})
                    self.close_connection = True
                    return
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                    if not isinstance(body, dict):
                        raise ValueError("expected a JSON object")
                except ValueError as err:
                    self._send(400, {"error": f"body is not valid JSON: {err}"})
                    return
                if "query" in body and "queries" not in body:
                    body["queries"] = [body.pop("query")]
                if "key" in body and "keys" not in body:
                    body["keys"] = [body.pop("key")]
                self._search(body)

            def _healthz(self) -> None:
                st = server.searcher.status()
                if not st["ready"]:
                    self._send(503, {"status": "loading", **st})
                    return
                degraded = st["failure"] is not None or st["poll_error"] is not None
                # Still 200 when degraded: the old version serves correctly, and pulling every
                # replica out of a load balancer over one bad version would be an outage.
                self._send(200, {"status": "degraded" if degraded else "ok", **st})

            def _search(self, body: dict[str, Any]) -> None:
                try:
                    queries, k, keys = server._validate(body)
                except _BadRequest as err:
                    self._send(400, {"error": str(err)})
                    return
                try:
                    answer = server.searcher.search(queries, k=k, keys=keys)
                except NotFoundError as err:
                    self._send(503, {"error": str(err)})
                    return
                except Exception as err:  # noqa: BLE001 - never a traceback to the client
                    log.exception("search failed")
                    self._send(500, {"error": f"search failed: {type(err).__name__}"})
                    return
                results = [{"query": q, "version": v, "hits": [hit_to_dict(h) for h in hits]}
                           for q, v, hits in zip(queries, answer.versions, answer.results)]
                versions = list(dict.fromkeys(answer.versions))
                self._send(200, {"generation": answer.generation,
                                 "version": versions[0] if len(versions) == 1 else None, "results": results},
                           {"X-Embedctl-Version": ",".join(versions),
                            "X-Embedctl-Generation": str(answer.generation)})

        return Handler

    def _validate(self, body: dict[str, Any]) -> tuple[list[str], int, list[str | None] | None]:
        queries = body.get("queries")
        if not isinstance(queries, list) or not queries or not all(isinstance(q, str) and q for q in queries):
            raise _BadRequest("give at least one non-empty query: ?q=... or {\"queries\": [...]}")
        if len(queries) > self.max_batch:
            raise _BadRequest(f"at most {self.max_batch} queries per request, got {len(queries)}")
        try:
            k = int(body.get("k", 10))
        except (TypeError, ValueError):
            raise _BadRequest(f"k must be an integer, got {body.get('k')!r}") from None
        if not 1 <= k <= self.max_k:
            raise _BadRequest(f"k must be in [1, {self.max_k}], got {k}")
        keys = body.get("keys")
        if keys is not None:
            if not isinstance(keys, list) or len(keys) != len(queries):
                raise _BadRequest("keys must be a list with one routing key per query")
            keys = [None if key is None else str(key) for key in keys]
        return queries, k, keys
