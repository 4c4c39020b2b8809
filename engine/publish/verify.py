"""Verifying a version before it goes live: the index builder's checks, behind a light import."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.core.storage import Store

Verifier = Callable[[Store, str, str], dict[str, Any]]


def verify_version(store: Store, index: str, version_id: str) -> dict[str, Any]:
    """The index builder's ``engine.index.build.verify_version`` (imported lazily, so importing this
    module stays light): manifest shape, key safety (no ``..``, absolute paths or other
    buckets), each artifact's existence, size and sha256. Returns the manifest."""
    from engine.index.verify import verify_version as verify

    return verify(store, index, version_id)
