"""Batching searches across concurrent requests: one encode + search per group of requests.

``search_batch`` answers several requests with one ``AliasSearcher.search`` call per (k,
options) group (one snapshot, one encoder pass per version). Ray Serve replicas feed it from
``@serve.batch``; one-process serving from ``BatchingBackend``, which batches opportunistically:
a request that finds a worker free runs at once (no added latency when idle), and requests that
arrive while every worker is busy are answered together by the next free one.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence

from engine.core.errors import ConfigError
from engine.serve.alias import AliasSearcher, SearchAnswer
from engine.serve.app import SearchRequest

log = logging.getLogger(__name__)


def search_batch(searcher: AliasSearcher, reqs: Sequence[SearchRequest]) -> list[SearchAnswer | Exception]:
    """Answer several requests with one ``searcher.search`` call per (k, options) group.

    Each group is one snapshot (one version set) and one encoder pass per version. A group that
    fails fails only its own requests: the exception is returned in their places.
    """
    groups: dict[tuple[int, tuple[tuple[str, str], ...]], list[int]] = {}
    for i, req in enumerate(reqs):
        groups.setdefault((req.k, tuple(sorted(req.options().items()))), []).append(i)
    out: list[SearchAnswer | Exception] = [ConfigError("not answered")] * len(reqs)
    for (k, options), members in groups.items():
        queries: list[str] = []
        keys: list[str | None] = []
        for i in members:
            queries.extend(reqs[i].queries)
            keys.extend(reqs[i].routing_keys() or [None] * len(reqs[i].queries))
        try:
            answer = searcher.search(queries, k, keys=keys, **dict(options))
        except Exception as err:  # noqa: BLE001 - handed back to each request of the group
            for i in members:
                out[i] = err
            continue
        at = 0
        for i in members:
            n = len(reqs[i].queries)
            out[i] = SearchAnswer(answer.results[at:at + n], answer.versions[at:at + n], answer.generation)
            at += n
    return out


class BatchingBackend:
    """One-process backend: up to ``workers`` batches in flight (threads: FAISS and torch release
    the GIL), each of up to ``max_batch_size`` requests that queued while all workers were busy."""

    def __init__(self, searcher: AliasSearcher, *, max_batch_size: int = 64, workers: int | None = None,
                 on_batch: Callable[[int], None] | None = None):
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.searcher = searcher
        self.max_batch_size = max_batch_size
        self.workers = workers or max(2, os.cpu_count() or 1)
        self.on_batch = on_batch
        self._queue: list[tuple[SearchRequest, asyncio.Future[SearchAnswer]]] = []
        self._running = 0

    async def search(self, req: SearchRequest) -> SearchAnswer:
        future: asyncio.Future[SearchAnswer] = asyncio.get_running_loop().create_future()
        self._queue.append((req, future))
        if self._running < self.workers:
            self._running += 1
            asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch = self._queue[:self.max_batch_size]
                del self._queue[:self.max_batch_size]
                batch = [(req, fut) for req, fut in batch if not fut.done()]  # timed out while queued
                if not batch:
                    continue
                if self.on_batch is not None:
                    self.on_batch(sum(len(req.queries) for req, _ in batch))
                try:
                    results = await loop.run_in_executor(None, search_batch, self.searcher, [r for r, _ in batch])
                except Exception as err:  # noqa: BLE001 - handed to every request of the batch
                    results = [err] * len(batch)
                for (_, fut), result in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(result, Exception):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)
        finally:
            self._running -= 1
