"""One build's shared context: the run, the config, the build-state keys, timings, progress events, small file I/O."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import numpy as np

from engine.core import layout
from engine.core.errors import NotFoundError
from engine.core.storage import Store, join
from engine.index.params import BuildConfig
from engine.index.runs import Mapper, RunInfo, run_columns

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
Progress = Callable[[dict[str, Any]], None]


def build_key_for(run: RunInfo, cfg: BuildConfig) -> str:
    """The build-state key: the run's embedding files and the build config, hashed."""
    ident = {"run_id": run.run_id, "inputs": run.fingerprint(), "config": cfg.to_dict(), "format": MANIFEST_FORMAT}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def upload_bytes(store: Store, key: str, data: bytes) -> dict[str, Any]:
    """Upload ``data`` under ``key``; ``{"bytes", "sha256"}`` of what was stored."""
    with tempfile.NamedTemporaryFile(prefix="embedctl-", delete=False) as f:
        f.write(data)
        path = f.name
    try:
        digest = store.upload_file(key, path)
    finally:
        os.unlink(path)
    return {"bytes": len(data), "sha256": digest}


class BuildContext:
    """One build: the run, the config, the state keys and timings every step reads and writes."""

    def __init__(self, store: Store, run: RunInfo, index: str, cfg: BuildConfig, *, mapper: Mapper,
                 progress: Progress | None, parallelism: int, task_threads: int | None):
        self.store, self.run, self.index, self.cfg = store, run, index, cfg
        self.mapper, self.progress = mapper, progress
        self.parallelism, self.task_threads = parallelism, task_threads
        self.key = build_key_for(run, cfg)
        self.state_prefix = join(layout.index_prefix(index), "builds", self.key[:24])
        self.state_key = join(self.state_prefix, "state.json")
        self.timings: dict[str, float] = {}
        self._columns: dict[str, str] | None = None

    def run_columns(self) -> dict[str, str]:
        """Column -> Arrow type of the run's embeddings parts (read once)."""
        if self._columns is None:
            self._columns = run_columns(self.store, self.run)
        return self._columns

    def emit(self, event: str, **info: Any) -> None:
        log.info("build %s: %s %s", self.index, event, {k: v for k, v in info.items() if k != "exact"})
        if self.progress:
            self.progress({"event": event, "index": self.index, **info})

    def read_state(self) -> dict[str, Any] | None:
        try:
            return self.store.read_json(self.state_key)
        except NotFoundError:
            return None

    def write_state(self, state: dict[str, Any]) -> None:
        self.store.write_json(self.state_key, state)
