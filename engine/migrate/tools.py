"""What a migration runs on (version loader, embed job, index builder, progress), swappable in tests and on Ray."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.core.storage import Store
from engine.index.searcher import Searcher

log = logging.getLogger(__name__)

# The index package's version loader: every shard verified (checksums) before it answers, and
# queries embedded with the model the version's manifest names (blue and green each their own).
default_loader: Callable[[Store, str, str], Any] = Searcher.load


def local_embed_runner(cfg: Any) -> dict[str, Any]:
    """The embed job in this process, without Ray (``engine.distributed.migrate`` passes the Ray one)."""
    from engine.embed.pipeline import run_locally

    return run_locally(cfg)


def default_index_builder(store: Store, index: str, run_id: str, *, parent_version: str | None,
                          options: Mapping[str, Any]) -> dict[str, Any]:
    """Build a version from an embed run with ``engine.index.build.build_index`` (resumable: a rerun
    continues the build, or returns the version it finished). Returns the version manifest."""
    from engine.index.build import build_index
    from engine.index.params import BuildConfig

    result = build_index(store, run_id, index, BuildConfig.from_dict(dict(options)), parent_version=parent_version)
    return dict(result.manifest)


@dataclass
class Tools:
    """What a migration runs on. Defaults work in-process; ``engine.distributed.migrate`` swaps
    in the Ray embed job, tests swap in whatever they need."""

    loader: Callable[[Store, str, str], Any] = default_loader
    embed_runner: Callable[[Any], dict[str, Any]] = local_embed_runner
    index_builder: Callable[..., dict[str, Any]] = default_index_builder
    progress: Callable[[str], None] | None = None  # one line per notable step (the CLI logs them)

    def say(self, message: str) -> None:
        log.info("%s", message)
        if self.progress is not None:
            self.progress(message)
