"""The search HTTP API as a FastAPI (ASGI) app, shared by ``embedctl serve`` (uvicorn) and Ray Serve.

Routes (the same JSON as the first, stdlib server):

- ``GET /search?q=...&k=10&key=...[&mode=...&where=...]`` and ``POST /search`` with
  ``{"queries": [...], "k": 10, "keys": [...], "mode": ..., "where": ...}`` (``query``/``key``
  for one) answer ``{"generation", "version", "results": [{"query", "version", "hits":
  [{"chunk_id", "doc_id", "score"}]}]}``; the ``X-Embedctl-Version`` header names the version(s)
  that answered and ``X-Embedctl-Generation`` the alias generation.
- ``GET /healthz``: 200 ``ok`` or ``degraded`` (a refused version: the old one still serves),
  503 ``loading`` before the first version is in. ``GET /version``: the searcher's status.
- ``GET /metrics``: Prometheus text (``engine.serve.metrics``). ``GET /openapi.json``, ``/docs``.

Every error is JSON ``{"error": "..."}`` with a 4xx/5xx code: 400 for a malformed or
out-of-limit request, 413 for a body over the limit (answered from the Content-Length before
the body is read; a chunked body is counted as it arrives), 503 while nothing is loaded, 504
past the request timeout. The app never holds the searcher itself: a ``SearchBackend`` does
(``engine.serve.batching``: threads for uvicorn, ``@serve.batch`` under Ray Serve).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.core.errors import ConfigError, NotFoundError
from engine.serve.alias import AliasSearcher, SearchAnswer, UnsupportedOption, hit_to_dict
from engine.serve.limits import ServeLimits
from engine.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ROUTES = ("/search", "/healthz", "/version", "/metrics", "/openapi.json", "/docs")


class BadRequest(Exception):
    """A request the API refuses, with the HTTP code and the message the client gets."""

    def __init__(self, message: str, code: int = 400, kind: str = "bad_request"):
        super().__init__(message)
        self.code = code
        self.kind = kind


# --- request and response models ----------------------------------------------------------------


class SearchRequest(BaseModel):
    """One search request: a batch of queries, each routed by its key during a weighted rollout."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    queries: list[StrictStr] = Field(min_length=1, description="Query texts, at least one, none empty.")
    k: int = Field(10, description="Hits per query.")
    keys: list[StrictStr | int | None] | None = Field(
        None, description="One routing key per query (default: the query text); the same key always reaches "
                          "the same version during a weighted rollout.")
    mode: StrictStr | None = Field(None, description="Search mode, passed to the index searcher when it takes one.")
    where: StrictStr | None = Field(None, description="Metadata filter, passed to the index searcher when it "
                                                      "takes one.")

    @model_validator(mode="before")
    @classmethod
    def _singular(cls, data: Any) -> Any:
        """``{"query": "...", "key": "..."}`` is a batch of one."""
        if isinstance(data, dict):
            data = dict(data)
            if "query" in data and "queries" not in data:
                data["queries"] = [data.pop("query")]
            if "key" in data and "keys" not in data:
                data["keys"] = [data.pop("key")]
        return data

    def routing_keys(self) -> list[str | None] | None:
        return None if self.keys is None else [None if key is None else str(key) for key in self.keys]

    def options(self) -> dict[str, str]:
        """The pass-through options that were given."""
        return {name: value for name, value in (("mode", self.mode), ("where", self.where)) if value is not None}


class HitModel(BaseModel):
    chunk_id: str
    doc_id: str
    score: float


class ResultModel(BaseModel):
    query: str
    version: str = Field(description="The version that answered this query.")
    hits: list[HitModel]


class SearchResponse(BaseModel):
    generation: int
    version: str | None = Field(description="The version that answered, or null when two versions did.")
    results: list[ResultModel]


class ErrorBody(BaseModel):
    error: str


def parse_search(data: Any, limits: ServeLimits) -> SearchRequest:
    """Validate a request body (already parsed JSON) against the model and the limits."""
    try:
        req = SearchRequest.model_validate(data)
    except ValidationError as err:
        raise BadRequest(_describe(err.errors())) from None
    if len(req.queries) > limits.max_batch:
        raise BadRequest(f"at most {limits.max_batch} queries per request, got {len(req.queries)}")
    for i, q in enumerate(req.queries):
        if not q.strip():
            raise BadRequest(f"query {i} is empty: give at least one non-empty query: ?q=... or "
                             '{"queries": [...]}')
        if len(q) > limits.max_query_chars:
            raise BadRequest(f"query {i} is {len(q)} characters long, over the limit of {limits.max_query_chars}")
    if not 1 <= req.k <= limits.max_k:
        raise BadRequest(f"k must be in [1, {limits.max_k}], got {req.k}")
    keys = req.routing_keys()
    if keys is not None:
        if len(keys) != len(req.queries):
            raise BadRequest(f"keys must be a list with one routing key per query: {len(keys)} keys for "
                             f"{len(req.queries)} queries")
        if any(key is not None and len(key) > limits.max_key_chars for key in keys):
            raise BadRequest(f"routing keys are limited to {limits.max_key_chars} characters")
    return req


def _describe(errors: Any) -> str:
    parts = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "invalid request: " + "; ".join(parts)


def answer_json(req: SearchRequest, answer: SearchAnswer) -> tuple[dict[str, Any], dict[str, str]]:
    """The response body and headers for an answered request."""
    results = [{"query": q, "version": v, "hits": [hit_to_dict(h) for h in hits]}
               for q, v, hits in zip(req.queries, answer.versions, answer.results, strict=True)]
    versions = list(dict.fromkeys(answer.versions))
    body = {"generation": answer.generation, "version": versions[0] if len(versions) == 1 else None,
            "results": results}
    return body, {"X-Embedctl-Version": ",".join(versions), "X-Embedctl-Generation": str(answer.generation)}


# --- backends -------------------------------------------------------------------------------------


class SearchBackend(Protocol):
    """Who answers searches for the app: holds the alias searcher."""

    searcher: AliasSearcher

    async def search(self, req: SearchRequest) -> SearchAnswer: ...


# --- the body guard ---------------------------------------------------------------------------------


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` with 413 before the app reads them, and
    report every response's status (``on_response(path, method, code)``) for the metrics.

    A declared Content-Length over the limit is refused at once; a chunked body is counted as
    it arrives. The rest of an oversized body is read and dropped (up to ``drain_bytes`` and
    ``drain_s``) so the client, still sending, reads the 413 instead of a reset connection.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, on_refuse: Callable[[str], None] | None = None,
                 on_response: Callable[[str, str, int], None] | None = None, *,
                 drain_bytes: int = 64 << 20, drain_s: float = 5.0):
        self.app = app
        self.max_bytes = max_bytes
        self.on_refuse = on_refuse
        self.on_response = on_response
        self.drain_bytes = drain_bytes
        self.drain_s = drain_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.on_response is not None:
            send = self._counting(scope, send)
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _send_json(send, 400, {"error": "Content-Length is not a number"}, close=True)
                return
            if size > self.max_bytes:
                await self._refuse(receive, send, f"request body of {size} bytes is over the limit of "
                                                   f"{self.max_bytes} bytes; send fewer queries per request")
                return
        chunks: list[bytes] = []
        total = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            more = bool(message.get("more_body", False))
            if total > self.max_bytes:
                await self._refuse(receive if more else None, send,
                                   f"request body is over the limit of {self.max_bytes} bytes; send fewer "
                                   "queries per request")
                return
            chunks.append(chunk)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _counting(self, scope: Scope, send: Send) -> Send:
        assert self.on_response is not None
        report = self.on_response

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                report(str(scope.get("path", "")), str(scope.get("method", "")), int(message["status"]))
            await send(message)

        return counted

    async def _refuse(self, receive: Receive | None, send: Send, message: str) -> None:
        if self.on_refuse is not None:
            self.on_refuse(message)
        if receive is not None:
            await self._drain(receive)
        await _send_json(send, 413, {"error": message}, close=True)

    async def _drain(self, receive: Receive) -> None:
        dropped = 0
        deadline = time.monotonic() + self.drain_s
        while dropped <= self.drain_bytes and time.monotonic() < deadline:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request":
                return
            dropped += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


async def _send_json(send: Send, code: int, body: dict[str, Any], *, close: bool = False) -> None:
    data = (json.dumps(body) + "\n").encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": code, "headers": headers})
    await send({"type": "http.response.body", "body": data})


# --- the app -----------------------------------------------------------------------------------------


def _error(metrics: ServeMetrics, code: int, kind: str, message: str) -> JSONResponse:
    metrics.errors.labels(kind).inc()
    return JSONResponse({"error": message}, status_code=code)


def _search_error(metrics: ServeMetrics, err: BaseException) -> JSONResponse:
    """The response for a search that raised (never a traceback to the client)."""
    if isinstance(err, UnsupportedOption):
        return _error(metrics, 400, "unsupported", str(err))
    if isinstance(err, NotFoundError):
        return _error(metrics, 503, "unavailable", str(err))
    if isinstance(err, ConfigError):  # e.g. a filter the searcher cannot parse
        return _error(metrics, 400, "bad_request", str(err))
    log.error("search failed", exc_info=err)
    return _error(metrics, 500, "internal", f"search failed: {type(err).__name__}")


def create_app(backend: SearchBackend, limits: ServeLimits | None = None, *, metrics: ServeMetrics | None = None,
               replica: str = "", title: str = "embedctl search") -> FastAPI:
    """The search API over ``backend``; ``limits`` bound every request."""
    limits = limits or ServeLimits()
    searcher = backend.searcher
    metrics = metrics or ServeMetrics(searcher.status, replica=replica)
    app = FastAPI(title=title, version=_engine_version(), redoc_url=None,
                  description=(__doc__ or "").split("\n\n", 1)[-1])
    app.state.metrics = metrics
    app.state.limits = limits

    _add_guards(app, metrics, limits)

    async def run(req: SearchRequest) -> Response:
        t0 = time.perf_counter()
        try:
            answer = await asyncio.wait_for(backend.search(req), timeout=limits.request_timeout_s)
        except asyncio.TimeoutError:
            return _error(metrics, 504, "timeout", f"search took longer than {limits.request_timeout_s:g} s")
        except Exception as err:  # noqa: BLE001 - mapped to a JSON error
            return _search_error(metrics, err)
        metrics.latency.observe(time.perf_counter() - t0)
        body, headers = answer_json(req, answer)
        response = JSONResponse(body)
        # Raw, not through ``headers=``: starlette lowercases names, and clients that read
        # ``X-Embedctl-Version`` from a plain dict of headers must keep finding it.
        response.raw_headers.extend((name.encode("latin-1"), value.encode("latin-1"))
                                    for name, value in headers.items())
        return response

    errors: dict[int | str, dict[str, Any]] = {400: {"model": ErrorBody}, 413: {"model": ErrorBody},
                                                503: {"model": ErrorBody}, 504: {"model": ErrorBody}}

    @app.get("/search", response_model=SearchResponse, responses=errors, summary="Search (one or more q=)")
    async def search_get(q: list[str] = Query([], description="A query; repeat for a batch."),
                         k: int = Query(10, description="Hits per query."),
                         key: list[str] | None = Query(None, description="Routing key per query."),
                         mode: str | None = Query(None), where: str | None = Query(None)) -> Response:
        try:
            req = parse_search({"queries": q, "k": k, "keys": key, "mode": mode, "where": where}, limits)
        except BadRequest as err:
            return _error(metrics, err.code, err.kind, str(err))
        return await run(req)

    @app.post("/search", response_model=SearchResponse, responses=errors, summary="Search a batch",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": SearchRequest.model_json_schema()}}}})
    async def search_post(request: Request) -> Response:
        try:
            data = json.loads(await request.body() or b"{}")
        except ValueError as err:
            return _error(metrics, 400, "bad_request", f"body is not valid JSON: {err}")
        try:
            req = parse_search(data, limits)
        except BadRequest as err:
            return _error(metrics, err.code, err.kind, str(err))
        return await run(req)

    _add_status_routes(app, searcher, metrics)
    return app


def _add_guards(app: FastAPI, metrics: ServeMetrics, limits: ServeLimits) -> None:
    """Body limit, per-response counting, and JSON bodies for FastAPI's own errors (400/404/405)."""

    def count(path: str, method: str, code: int) -> None:
        metrics.requests.labels(path if path in ROUTES else "other", method, str(code)).inc()

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, on_response=count,
                       on_refuse=lambda _msg: metrics.errors.labels("too_large").inc())

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        return _error(metrics, 400, "bad_request", _describe(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 404:
            message = f"no such endpoint {request.url.path!r}; try /search, /healthz, /version, /metrics"
        elif err.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(err.detail)
        return JSONResponse({"error": message}, status_code=err.status_code)


def _add_status_routes(app: FastAPI, searcher: AliasSearcher, metrics: ServeMetrics) -> None:
    """``/healthz``, ``/version`` and ``/metrics``."""

    @app.get("/healthz", summary="ok, degraded (a refused version; the old one serves) or loading (503)")
    async def healthz() -> JSONResponse:
        st = searcher.status()
        if not st["ready"]:
            return JSONResponse({"status": "loading", **st}, status_code=503)
        # Still 200 when degraded: the old version serves correctly, and pulling every replica
        # out of a load balancer over one bad version would be an outage.
        return JSONResponse({"status": "degraded" if searcher.degraded else "ok", **st})

    @app.get("/version", summary="What is served: version, generation, weights, failures")
    async def version() -> JSONResponse:
        return JSONResponse(searcher.status())

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)


def _engine_version() -> str:
    try:
        from importlib.metadata import version

        return version("embedctl")
    except Exception:  # noqa: BLE001 - not installed as a package (a checkout on PYTHONPATH)
        return "0"
