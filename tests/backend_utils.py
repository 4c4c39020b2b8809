"""Shared by the backend tests: a tiny random BERT folder with an export cache of its own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from tests.test_embedding import _tiny_bert


def tiny_bert_with_cache(root: Path, pooling: str = "mean") -> Iterator[Path]:
    """Yield a random 2-layer BERT folder under ``root`` while EMBEDCTL_CACHE_DIR points at ``root/cache``
    (os.environ, so model processes the test starts use it too); restores the variable afterwards."""
    old = os.environ.get("EMBEDCTL_CACHE_DIR")
    os.environ["EMBEDCTL_CACHE_DIR"] = str(root / "cache")
    try:
        yield _tiny_bert(root / "tiny", pooling)
    finally:
        if old is None:
            os.environ.pop("EMBEDCTL_CACHE_DIR", None)
        else:
            os.environ["EMBEDCTL_CACHE_DIR"] = old
