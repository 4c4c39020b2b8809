"""The one version loader: version ids, listing, reading a version manifest, resolving --version/--alias."""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from typing import Any

from engine.core import layout
from engine.core.errors import ConfigError, IntegrityError, NotFoundError
from engine.core.storage import Store, join


def new_version_id(now: datetime | None = None) -> str:
    """``v<UTC yyyymmddHHMMSS>-<6 hex>``: sorts by creation time as a string, to the microsecond
    (the first 5 hex digits are the microseconds; the last is random)."""
    now = now or datetime.now(timezone.utc)
    return f"v{now:%Y%m%d%H%M%S}-{now.microsecond:05x}{secrets.randbelow(16):x}"


def list_versions(store: Store, index: str) -> list[str]:
    """Complete versions (those with a manifest) of ``index``, oldest first."""
    prefix = join(layout.index_prefix(index), "versions")
    out = []
    for key in store.list(prefix):
        rest = key[len(prefix) + 1:].split("/")
        if len(rest) == 2 and rest[1] == "manifest.json":
            out.append(rest[0])
    return sorted(out)


def read_version_manifest(store: Store, index: str, version_id: str) -> dict[str, Any]:
    key = layout.version_manifest_key(index, version_id)
    try:
        manifest = store.read_json(key)
    except NotFoundError:
        raise NotFoundError(f"version {version_id!r} of index {index!r} not found in {store.describe()} (no "
                            f"manifest: it does not exist or its build never finished)") from None
    if not isinstance(manifest, dict):
        raise IntegrityError(f"{store.describe(key)} is not a JSON object")
    if manifest.get("version_id") != version_id:
        raise IntegrityError(f"{store.describe(key)} describes version {manifest.get('version_id')!r}, "
                             f"not {version_id!r}")
    return manifest



def resolve_version(store: Store, index: str, version: str | None = None, alias: str | None = None) -> str:
    """The version id to load: ``version`` itself (``latest`` = newest complete version) or what ``alias`` names."""
    from engine.core.names import check_name

    check_name("index", index)
    if (version is None) == (alias is None):
        raise ConfigError("give exactly one of --version or --alias")
    if alias is not None:
        check_name("alias", alias)
        key = layout.alias_key(index, alias)
        try:
            doc = store.read_json(key)
        except NotFoundError:
            raise NotFoundError(f"alias {alias!r} of index {index!r} does not exist in {store.describe()}; publish a "
                                f"version first (embedctl publish --index {index} --version V --alias {alias})") from None
        target = doc.get("version") if isinstance(doc, dict) else None
        if not isinstance(target, str) or not target:
            raise IntegrityError(f"alias document {store.describe(key)} names no version")
        return check_name("version", target)
    assert version is not None
    if version == "latest":
        versions = list_versions(store, index)
        if not versions:
            raise NotFoundError(f"index {index!r} has no complete version in {store.describe()}; build one with "
                                "embedctl build-index")
        return versions[-1]
    return check_name("version", version)
