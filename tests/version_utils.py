"""Test helpers for publish/serve: tiny index versions that follow the version-manifest
contract (engine/layout.py), and a searcher over them.

``make_version`` writes a few files plus a manifest whose ``artifacts`` list {key, bytes,
sha256}. ``TinySearcher`` loads such a version (verifying it with
``engine.publish.verify_version``) and answers queries with exact inner-product search over
hashed bag-of-words vectors, so every answer is a deterministic function of (version, query)
and a test can recompute it independently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine import layout
from engine.publish import verify_version
from engine.storage import Store, join, json_bytes, sha256_bytes

DIM = 16


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    doc_id: str
    score: float


def embed(texts: list[str]) -> np.ndarray:
    """Hashed bag of words, L2-normalised. [n, DIM] float32"""
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    for i, text in enumerate(texts):
        for tok in text.lower().split():
            h = int.from_bytes(hashlib.sha256(tok.encode()).digest()[:4], "little")
            out[i, h % DIM] += 1.0 if (h >> 8) & 1 else -1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-9)


def make_version(store: Store, index: str, version_id: str, docs: dict[str, str] | None = None,
                 *, manifest_extra: dict[str, Any] | None = None, write_manifest: bool = True) -> dict[str, Any]:
    """Write a complete version: docs.json (ids and texts), vectors.npy, and the manifest."""
    docs = docs or {f"{version_id}-d{i}": f"document {i} of {version_id} about topic{i % 3}" for i in range(6)}
    prefix = layout.version_prefix(index, version_id)
    files = {
        "shards/0/docs.json": json_bytes({"version": version_id, "docs": docs}),
        "shards/0/vectors.npy": embed(list(docs.values())).tobytes(),
    }
    artifacts = []
    for key, data in files.items():
        store.write_bytes(join(prefix, key), data)
        artifacts.append({"key": key, "bytes": len(data), "sha256": sha256_bytes(data)})
    manifest = {"version_id": version_id, "index": index, "created_at": "2026-11-27T00:00:00Z",
                "model": {"name": "test-hash", "dim": DIM}, "dim": DIM, "metric": "ip", "kind": "flat",
                "shards": [{"shard": 0, "rows": len(docs), "files": {"docs": "shards/0/docs.json",
                                                                     "vectors": "shards/0/vectors.npy"}}],
                "artifacts": artifacts, **(manifest_extra or {})}
    if write_manifest:
        store.write_json(layout.version_manifest_key(index, version_id), manifest)
    return manifest


class TinySearcher:
    """Loads a ``make_version`` version after verifying it; exact search over its vectors."""

    loads: list[str] = []  # version ids loaded, in order (for assertions)

    def __init__(self, version_id: str, manifest: dict[str, Any], docs: dict[str, str]):
        self.version_id = version_id
        self.manifest = manifest
        self.ids = list(docs)
        self.vectors = embed(list(docs.values()))
        self.closed = False

    @classmethod
    def load(cls, store: Store, index: str, version_id: str, *, verify: bool = True) -> TinySearcher:
        manifest = verify_version(store, index, version_id) if verify else \
            store.read_json(layout.version_manifest_key(index, version_id))
        docs = json.loads(store.read_bytes(join(layout.version_prefix(index, version_id), "shards/0/docs.json")))
        cls.loads.append(version_id)
        return cls(version_id, manifest, docs["docs"])

    def search(self, queries: list[str], k: int = 10, **_: Any) -> list[list[Hit]]:
        assert not self.closed, f"search on closed version {self.version_id}"
        out = []
        for q in queries:
            # One query at a time, rounded: a batch and a single query rank ties identically.
            row = np.round(embed([q])[0] @ self.vectors.T, 5)  # [n_docs]
            order = sorted(range(len(row)), key=lambda j: (-row[j], self.ids[j]))[:k]
            out.append([Hit(f"{self.ids[j]}#0", self.ids[j], float(row[j])) for j in order])
        return out

    def close(self) -> None:
        self.closed = True


def tiny_loader(store: Store, index: str, version_id: str) -> TinySearcher:
    return TinySearcher.load(store, index, version_id, verify=True)
