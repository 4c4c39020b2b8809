"""Copying a version between stores (build locally, publish to S3): upload, then verify every artifact."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from engine.core import layout
from engine.core.errors import IntegrityError
from engine.core.failpoints import crash_point
from engine.core.storage import (
    LocalStore,
    Store,
    check_key,
    join,
    temp_dir,
)
from engine.publish.verify import Verifier, verify_version

log = logging.getLogger(__name__)


def copy_version(src: Store, dst: Store, index: str, version: str, *, verifier: Verifier | None = None,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Copy a verified version from ``src`` to ``dst``: every artifact (multipart for large
    ones, each checked after upload), then the manifest last, byte for byte. Idempotent: a
    complete identical copy is left alone; a different manifest under the same id is refused
    (versions are immutable)."""
    verify = verifier or verify_version
    manifest = verify(src, index, version)
    mkey = layout.version_manifest_key(index, version)
    manifest_bytes = src.read_bytes(mkey)
    existing = dst.get_versioned(mkey)
    if existing is not None:
        if existing.data != manifest_bytes:
            raise IntegrityError(f"{dst.describe(mkey)} already exists with a different manifest; version ids are "
                                 "immutable, build a new version instead")
        return manifest
    prefix = layout.version_prefix(index, version)
    artifacts = manifest["artifacts"]
    tmp = temp_dir("embedctl-copy-")
    try:
        for i, art in enumerate(artifacts):
            key = join(prefix, check_key(str(art["key"])))
            path: str | os.PathLike[str]
            if isinstance(src, LocalStore):
                path = src.local_path(key)
            else:
                path = os.path.join(tmp, "artifact")
                src.download_file(key, path)
            dst.upload_file(key, path, sha256=str(art["sha256"]))
            if progress is not None:
                progress(i + 1, len(artifacts))
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    crash_point("publish.after-artifacts")
    dst.write_bytes(mkey, manifest_bytes)  # last: the version becomes complete here
    return manifest



