"""Serving: a searcher that follows an alias and hot-swaps index versions without downtime.

``AliasSearcher`` polls the alias document. When it names a new target, a background thread
loads and verifies every version of that target (``engine.index.searcher.Searcher.load(...,
verify=True)`` plus the query encoder the version's manifest names), and only then replaces the
serving snapshot in one assignment. A query reads the snapshot once when it starts, so queries
in flight finish on the version they started on; the old version is closed when the last of
them leaves. A version that fails to load or verify is never switched to: the searcher keeps
serving the old one, logs the failure and reports it (``status()["failure"]``, ``/healthz``
says ``degraded``) until the alias moves again.

For a weighted alias both versions stay loaded and each query is routed by a hash of its
key (``engine.publish.aliases.Target.route``): the same key lands on the same version in every
process, so every replica of a service routes a key alike.

The HTTP API lives in ``engine.serve.app`` (FastAPI) and ``engine.serve.server`` (uvicorn);
the Ray Serve deployment in ``engine.serve.ray_app``.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from engine.core import layout
from engine.core.errors import ConfigError, EmbedctlError, NotFoundError
from engine.core.names import check_name
from engine.core.storage import Store, redact
from engine.publish.aliases import AliasState, Target

log = logging.getLogger(__name__)


class SearcherLike(Protocol):
    """What ``engine.index.searcher.Searcher`` offers and the alias searcher needs."""

    @property
    def version_id(self) -> str: ...

    @property
    def manifest(self) -> dict[str, Any]: ...

    def search(self, queries: list[str], k: int = 10) -> list[list[Any]]: ...


Loader = Callable[[Store, str, str], SearcherLike]


# Keyword arguments of ``Searcher.search`` that a request may pass through, when the loaded
# version's searcher accepts them (older searchers do not: the request is refused, not ignored).
PASS_THROUGH = ("mode", "where")


class UnsupportedOption(ConfigError):
    """A request asked for a search option that a loaded version's searcher does not take."""


def make_loader(device: str = "cpu") -> Loader:
    """A loader that verifies every artifact and loads the query encoder the manifest names.

    The encoder is loaded here, before the swap, so a version whose model is missing or differs
    from the recorded fingerprint is refused while the old one keeps serving, and the first
    query after a swap does not pay for the model load. Never downloads: offline is forced.
    """

    def load(store: Store, index: str, version_id: str) -> SearcherLike:
        from engine.index.searcher import Searcher

        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        searcher = Searcher.load(store, index, version_id, verify=True, device=device)
        try:
            searcher.encoder  # noqa: B018 - loads and checks the model the manifest names
        except Exception:
            searcher.close()
            raise
        return searcher

    return load


def default_loader(store: Store, index: str, version_id: str) -> SearcherLike:
    """Load and fully verify a version (and its query encoder, on CPU) with the index's searcher."""
    return make_loader("cpu")(store, index, version_id)


def search_options(searcher: SearcherLike) -> frozenset[str]:
    """Which of ``PASS_THROUGH`` the searcher's ``search`` accepts (by its signature)."""
    return _options_of(type(searcher))


@functools.lru_cache(maxsize=64)
def _options_of(cls: Any) -> frozenset[str]:
    try:
        params = inspect.signature(cls.search).parameters
    except (TypeError, ValueError, AttributeError):
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return frozenset(PASS_THROUGH)
    return frozenset(name for name in PASS_THROUGH if name in params)


def hit_to_dict(hit: Any) -> dict[str, Any]:
    """A Hit (dataclass, named tuple or mapping with chunk_id, doc_id, score) as JSON."""
    if isinstance(hit, dict):
        return {"chunk_id": hit.get("chunk_id"), "doc_id": hit.get("doc_id"), "score": float(hit["score"])}
    return {"chunk_id": hit.chunk_id, "doc_id": hit.doc_id, "score": float(hit.score)}


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
        # An option left unset (None) is not passed: a searcher without that option still serves.
        kwargs = {name: value for name, value in kwargs.items() if not (name in PASS_THROUGH and value is None)}
        if keys is not None and len(keys) != len(queries):
            raise ValueError(f"got {len(keys)} keys for {len(queries)} queries")
        with self._lock:
            snap = self._snapshot
            if snap is None:
                raise NotFoundError(f"no version of {self.index}/{self.alias} is loaded yet")
            for lo in snap.loaded.values():
                lo.acquire()
        try:
            for lo in snap.loaded.values():  # every loaded version: the answer must not depend on the key
                _check_options(lo.searcher, kwargs)
            target = snap.state.target
            routing = [q if keys is None or keys[i] is None else str(keys[i]) for i, q in enumerate(queries)]
            routed = [target.route(self.index, key) for key in routing]
            results: list[list[Any]] = [[] for _ in queries]
            for v in dict.fromkeys(routed):
                idx = [i for i, r in enumerate(routed) if r == v]
                hits = snap.loaded[v].searcher.search([queries[i] for i in idx], k=k, **kwargs)
                for i, h in zip(idx, hits, strict=True):
                    results[i] = h
                with self._lock:
                    self.queries_by_version[v] = self.queries_by_version.get(v, 0) + len(idx)
            return SearchAnswer(results, routed, snap.state.generation)
        finally:
            for lo in snap.loaded.values():
                lo.release()

    def options(self) -> frozenset[str]:
        """The pass-through options (``mode``, ``where``) every loaded version accepts now."""
        snap = self._snapshot
        if snap is None:
            return frozenset()
        return frozenset.intersection(*(search_options(lo.searcher) for lo in snap.loaded.values()))

    @property
    def polling(self) -> bool:
        """True while the background poller runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def degraded(self) -> bool:
        """Serving, but the last target (or alias read) was refused: the old version still answers."""
        return self.failure is not None or self.last_poll_error is not None

    def status(self) -> dict[str, Any]:
        snap = self._snapshot
        out: dict[str, Any] = {
            "index": self.index, "alias": self.alias, "store": self.store.describe(),
            "ready": snap is not None, "swaps": self.swaps, "failure": self.failure,
            "poll_error": self.last_poll_error, "queries_by_version": dict(self.queries_by_version),
        }
        if snap is not None:
            out.update({"version": snap.state.version, "generation": snap.state.generation,
                        "weighted": snap.state.target.to_dict()["weighted"], "loaded": sorted(snap.loaded),
                        "search_options": sorted(self.options())})
        return out


def _check_options(searcher: SearcherLike, kwargs: dict[str, Any]) -> None:
    asked = [name for name in PASS_THROUGH if kwargs.get(name) is not None]
    if not asked:
        return
    missing = [name for name in asked if name not in search_options(searcher)]
    if missing:
        raise UnsupportedOption(f"version {searcher.version_id} cannot search with {', '.join(missing)}= (its "
                                "searcher does not take it); drop the parameter or publish a version built by an "
                                "engine that supports it")
