"""Test helpers for publish/serve: real index versions, tiny and fast.

``build_version`` writes a small embed run (seeded clustered vectors, model ``hash:16``) and
builds a flat index version from it with ``engine.index.build.build_index``; every chunk and doc id
starts with the given tag, so a search answer shows which version produced it. ``Versions``
builds them on demand by short name (``v["v1"]``) and remembers the real version ids.
"""

from __future__ import annotations

import zlib
from typing import Any

from engine.core import layout
from engine.core.storage import Store, join
from engine.index.build import build_index
from engine.index.params import BuildConfig
from engine.index.searcher import Searcher
from tests.index_utils import clustered_vectors, make_run

DIM = 16
ROWS = 60
TINY = BuildConfig(kind="flat", rescore="none", gate_queries=8)


def build_version(store: Store, index: str, tag: str, *, rows: int = ROWS) -> str:
    """A complete, verified flat version whose ids all start with ``tag-``; returns its id."""
    vectors = clustered_vectors(rows, DIM, seed=zlib.crc32(tag.encode()) % 10_000)
    run_id = f"run-{index}-{tag}"
    make_run(store, run_id, vectors, parts=1, chunk_ids=[f"{tag}-c{i:03d}" for i in range(rows)],
             doc_ids=[f"{tag}-d{i // 2:03d}" for i in range(rows)])
    return build_index(store, run_id, index, TINY).version_id


class Versions(dict):
    """name -> real version id, building each version the first time its name is used."""

    def __init__(self, store: Store, index: str):
        super().__init__()
        self.store, self.index = store, index

    def __missing__(self, name: str) -> str:
        self[name] = build_version(self.store, self.index, name)
        return self[name]

    def name_of(self, version_id: str) -> str:
        return next(n for n, vid in self.items() if vid == version_id)

    def prefix(self, name: str) -> str:
        return layout.version_prefix(self.index, self[name])

    def artifact(self, name: str, suffix: str) -> str:
        """The store key of the version's first artifact whose key ends with ``suffix``."""
        manifest = self.store.read_json(layout.version_manifest_key(self.index, self[name]))
        key = next(a["key"] for a in manifest["artifacts"] if a["key"].endswith(suffix))
        return join(self.prefix(name), key)


def versions_in(store: Store, index: str) -> set[str]:
    """Version ids with any object under the index's versions/ folder."""
    prefix = join(layout.index_prefix(index), "versions")
    return {k[len(prefix) + 1:].split("/")[0] for k in store.list(prefix)}


def answers(store: Store, index: str, version_id: str, queries: list[str], k: int = 3) -> list[list[dict[str, Any]]]:
    """What a freshly loaded version answers, one query at a time: the reference for served answers."""
    from engine.serve.alias import hit_to_dict

    with Searcher.load(store, index, version_id) as s:
        return [[hit_to_dict(h) for h in s.search([q], k=k)[0]] for q in queries]
