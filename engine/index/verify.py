"""Version verification: the manifest's shape, and every artifact's size and sha256 against the store."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from engine.core import layout
from engine.core.errors import IntegrityError, NotFoundError
from engine.core.storage import LocalStore, Store, check_key, join, sha256_file
from engine.index.version import read_version_manifest


def check_manifest_shape(manifest: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    for name in ("version_id", "dim", "kind", "shards", "artifacts", "model"):
        if name not in manifest:
            raise IntegrityError(f"{where} lacks {name!r}; it is not an index version manifest")
    artifacts = manifest["artifacts"]
    if not isinstance(artifacts, list) or not all(isinstance(a, Mapping) and {"key", "bytes", "sha256"} <= set(a)
                                                  for a in artifacts):
        raise IntegrityError(f"{where}: 'artifacts' must be a list of {{key, bytes, sha256}}")
    listed = set()
    for art in artifacts:
        key = check_key(str(art["key"]))
        if key == "manifest.json" or key != art["key"]:
            raise IntegrityError(f"{where}: artifact key {art['key']!r} is not a plain relative key of the version")
        listed.add(key)
    for shard in manifest["shards"]:
        for role, key in (shard.get("files") or {}).items():
            if key not in listed:
                raise IntegrityError(f"{where}: shard {shard.get('shard')} file {role}={key!r} is not in artifacts")
    for role, key in (manifest.get("files") or {}).items():
        if key not in listed:
            raise IntegrityError(f"{where}: file {role}={key!r} is not in artifacts")
    for section in ("sparse", "metadata"):  # BM25 shards and filter columns, when the build made them
        for shard in (manifest.get(section) or {}).get("shards") or []:
            for role, key in (shard.get("files") or {}).items():
                if key not in listed:
                    raise IntegrityError(f"{where}: {section} shard {shard.get('shard')} file {role}={key!r} is not "
                                         "in artifacts (a version copied without its files?)")
    return list(artifacts)


def verify_version(store: Store, index: str, version_id: str, *,
                   files: Mapping[str, str | os.PathLike[str]] | None = None) -> dict[str, Any]:
    """Check that a version is complete and intact; return its manifest.

    Every artifact key must be a safe relative key (``storage.check_key``), exist in the store
    with the size the manifest records, and hash to its sha256 — hashed from ``files`` (artifact
    key -> local copy, e.g. a searcher's download cache) when given, else streamed from the
    store. Raises IntegrityError naming the first bad file, NotFoundError for a missing version.
    """
    manifest = read_version_manifest(store, index, version_id)
    verify_artifacts(store, index, manifest, files=files)
    return manifest


def verify_artifacts(store: Store, index: str, manifest: Mapping[str, Any], *,
                     files: Mapping[str, str | os.PathLike[str]] | None = None) -> None:
    """``verify_version`` for a manifest in hand (the build's gate checks a version before it commits)."""
    from concurrent.futures import ThreadPoolExecutor

    version_id = str(manifest.get("version_id"))
    where = store.describe(layout.version_manifest_key(index, version_id))
    if manifest.get("index", index) != index:
        raise IntegrityError(f"{where} describes index {manifest.get('index')!r}, not {index!r}")
    artifacts = check_manifest_shape(manifest, where)
    prefix = layout.version_prefix(index, version_id)
    local = {k: os.fspath(v) for k, v in (files or {}).items()}

    def check(art: Mapping[str, Any]) -> None:
        key = str(art["key"])
        full = join(prefix, key)
        try:
            size = store.size(full)
        except NotFoundError:
            raise IntegrityError(f"{store.describe(full)} is missing (listed in {where})") from None
        if size != int(art["bytes"]):
            raise IntegrityError(f"{store.describe(full)} is {size} bytes; the manifest says {art['bytes']}")
        if key in local:
            if os.path.getsize(local[key]) != size:
                raise IntegrityError(f"local copy {local[key]} of {store.describe(full)} has the wrong size")
            got = sha256_file(local[key])
        elif isinstance(store, LocalStore):
            got = sha256_file(store.local_path(full))
        else:
            got = store.sha256(full)
        if got != art["sha256"]:
            raise IntegrityError(f"{store.describe(full)} is corrupt: sha256 {got[:12]}..., the manifest says "
                                 f"{str(art['sha256'])[:12]}...; rebuild or re-upload this version")

    if artifacts:
        with ThreadPoolExecutor(max_workers=min(8, len(artifacts))) as pool:
            list(pool.map(check, artifacts))

