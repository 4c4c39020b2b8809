"""One-process serving: the FastAPI search app on uvicorn, in a background thread (no Ray).

``SearchServer(searcher, host, port).start()`` binds (port 0: any free port; ``url`` says
which), serves ``engine.serve.app`` over ``BatchingBackend`` (searches in threads; requests
that queue while every thread is busy are answered as one batch) and stops with ``shutdown()``.
uvicorn bounds the work in flight (``max_concurrency``: beyond it new requests get 503) and
drops idle keep-alive connections; ``ServeLimits`` bounds each request.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from engine.core.errors import ConfigError
from engine.serve.alias import AliasSearcher
from engine.serve.app import create_app
from engine.serve.batching import BatchingBackend
from engine.serve.limits import ServeLimits
from engine.serve.metrics import ServeMetrics

if TYPE_CHECKING:
    from engine.serve.config import ServeConfig

log = logging.getLogger(__name__)


class SearchServer:
    """``/search``, ``/healthz``, ``/version``, ``/metrics`` over HTTP for an ``AliasSearcher``.

    ``GET /search?q=...&k=10&key=...`` or ``POST /search`` with ``{"queries": [...], "k": 10,
    "keys": [...]}``; the answer is ``{"generation", "version", "results": [{"query", "version",
    "hits": [{"chunk_id", "doc_id", "score"}]}]}`` and the ``X-Embedctl-Version`` header names
    the version(s) that answered.
    """

    def __init__(self, searcher: AliasSearcher, host: str = "127.0.0.1", port: int = 8080, *,
                 max_k: int | None = None, max_batch: int | None = None, limits: ServeLimits | None = None,
                 max_concurrency: int = 512, keep_alive_s: float = 5.0, max_batch_size: int = 64):
        import uvicorn

        limits = limits or ServeLimits()
        overrides = {name: value for name, value in (("max_k", max_k), ("max_batch", max_batch)) if value is not None}
        if overrides:
            from dataclasses import replace

            limits = replace(limits, **overrides)
        self.searcher = searcher
        self.limits = limits
        metrics = ServeMetrics(searcher.status)
        backend = BatchingBackend(searcher, max_batch_size=max_batch_size, on_batch=metrics.batch.observe)
        self.app = create_app(backend, limits, metrics=metrics)
        self._sock = _bind(host, port)
        # h11, not httptools: httptools lowercases response header names, and clients that read
        # `X-Embedctl-Version` from a plain dict of headers (as with the stdlib server) must find it.
        config = uvicorn.Config(self.app, http="h11", log_config=None, access_log=False, lifespan="off",
                                limit_concurrency=max_concurrency, timeout_keep_alive=int(max(1, keep_alive_s)),
                                server_header=False)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def start(self, timeout: float = 30.0) -> SearchServer:
        """Serve in a daemon thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.serve_forever, name="embedctl-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise ConfigError(f"the HTTP server on {self.url} stopped while starting; see the log")
            if time.monotonic() > deadline:
                raise ConfigError(f"the HTTP server on {self.url} did not start within {timeout:g} s")
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until ``shutdown()`` (uvicorn installs no signal handlers off the main thread)."""
        self._server.run(sockets=[self._sock])

    def shutdown(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._sock.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}; pick another --port or "
                          "--host") from None
    sock.set_inheritable(True)
    return sock


def run_standalone(cfg: ServeConfig, *, host: str, port: int, stop: threading.Event, on_ready: Any = None,
                   max_concurrency: int = 512) -> None:
    """``embedctl serve`` without Ray: load the alias's target, serve until ``stop`` is set.
    ``on_ready(url, status)`` once the server accepts connections."""
    from engine.core.storage import open_store
    from engine.serve.alias import make_loader

    store = open_store(cfg.store, endpoint_url=cfg.endpoint_url)
    searcher = AliasSearcher(store, cfg.index, cfg.alias, poll_interval=cfg.poll_interval,
                             loader=make_loader(cfg.device)).start()
    try:
        server = SearchServer(searcher, host=host, port=port, limits=cfg.limits, max_concurrency=max_concurrency,
                              max_batch_size=cfg.ray.max_batch_size)
        server.start()
        try:
            if on_ready is not None:
                on_ready(server.url, searcher.status())
            stop.wait()
        finally:
            server.shutdown()
    finally:
        searcher.stop()
