"""Publishing: alias documents, compare-and-swap publish and rollback with a history, status, gc.

An alias (``indexes/<index>/aliases/<alias>.json``) names the version searchers serve. It is
only ever changed by one compare-and-swap of that single object, the linearisation point of
every publish and rollback:

```
{"format": 1, "index": "docs", "alias": "live",
 "version": "v2",                 # what a reader that ignores weights serves (blue while weighted)
 "generation": 3,                 # +1 per swap; names the history record of this swap
 "weighted": null | {"blue": "v2", "green": "v3", "green_weight": 10},   # percent of keys to green
 "previous": null | {"version": "v1", "weighted": null, "generation": 2},
 "action": "publish" | "rollback", "updated_at": "...Z", "updated_by": "user@host",
 "reason": "..." | null, "swap_id": "<nonce>"}
```

Order of operations (each step is safe to crash after):

1. (``--from``) copy the version's artifacts, then its manifest last: a version without a
   manifest is incomplete and nothing will ever serve it; gc removes it later;
2. verify every artifact of every version the new alias routes to (key safety, size, sha256);
3. compare-and-swap the alias (``If-Match`` the ETag read before step 2, ``If-None-Match: *``
   for the first publish). A racing publisher loses here and changes nothing;
4. write the history record ``aliases/<alias>/history/<generation>.json``. It is derived
   byte-for-byte from the alias document, so when a crash skips this step, the next reader
   (publish, rollback, status) writes the very same record (create-if-absent, idempotent).

History records are ``{"generation", "action", "from", "to", "from_weighted", "to_weighted",
"when", "by", "why", "swap_id"}``. Rollback moves the alias to the ``previous`` state of the
current document (or to a version named in the history) by the same compare-and-swap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from engine.core import layout
from engine.core.errors import ConfigError, ConflictError, IntegrityError, NotFoundError
from engine.core.failpoints import crash_point
from engine.core.names import check_name, whoami
from engine.core.storage import (
    Store,
    join,
    json_bytes,
    require_conditional_writes,
)
from engine.publish.copy import copy_version
from engine.publish.verify import Verifier, verify_version

log = logging.getLogger(__name__)

ALIAS_FORMAT = 1
DEFAULT_ALIAS = "live"
DEFAULT_GRACE_S = 3600.0

def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---------------------------------------------------------------------------------------------
# alias documents
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Weighted:
    """Two versions on one alias: ``green_weight`` percent of query keys go to green."""

    blue: str
    green: str
    green_weight: float

    def __post_init__(self) -> None:
        check_name("version", self.blue)
        check_name("version", self.green)
        if self.blue == self.green:
            raise ConfigError(f"a weighted alias needs two different versions, got {self.blue!r} twice")
        if not 0 <= float(self.green_weight) <= 100:
            raise ConfigError(f"green_weight must be a percentage in [0, 100], got {self.green_weight!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Weighted | None:
        if d is None:
            return None
        return cls(str(d["blue"]), str(d["green"]), float(d["green_weight"]))

    def to_dict(self) -> dict[str, Any]:
        w = float(self.green_weight)
        return {"blue": self.blue, "green": self.green, "green_weight": int(w) if w.is_integer() else w}


def route_bucket(index: str, key: str) -> float:
    """A query key's fixed place in [0, 100): sticky (same key, same place, whatever the
    weight), and monotone: raising the weight only moves keys from blue to green."""
    digest = hashlib.sha256(f"{index}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 1_000_000 / 10_000


@dataclass(frozen=True)
class Target:
    """Where an alias sends queries: one version, or blue/green with a weight."""

    version: str
    weighted: Weighted | None = None

    @property
    def versions(self) -> list[str]:
        if self.weighted is None:
            return [self.version]
        return [self.weighted.blue, self.weighted.green]

    def route(self, index: str, key: str) -> str:
        """The version that serves query ``key`` (sticky per key)."""
        w = self.weighted
        if w is None:
            return self.version
        return w.green if route_bucket(index, key) < float(w.green_weight) else w.blue

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "weighted": self.weighted.to_dict() if self.weighted else None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Target | None:
        if d is None:
            return None
        return cls(str(d["version"]), Weighted.from_dict(d.get("weighted")))

    def describe(self) -> str:
        w = self.weighted
        if w is None:
            return self.version
        return f"{w.blue} + {w.green} at {w.to_dict()['green_weight']}%"


@dataclass(frozen=True)
class AliasState:
    """A parsed alias document plus the ETag it was read with."""

    index: str
    alias: str
    target: Target
    generation: int
    updated_at: str
    updated_by: str
    action: str
    reason: str | None
    previous: Target | None
    previous_generation: int | None
    swap_id: str
    etag: str | None = None

    @property
    def version(self) -> str:
        return self.target.version

    @property
    def weighted(self) -> Weighted | None:
        return self.target.weighted

    def to_doc(self) -> dict[str, Any]:
        prev = None
        if self.previous is not None:
            prev = {**self.previous.to_dict(), "generation": self.previous_generation}
        return {
            "format": ALIAS_FORMAT, "index": self.index, "alias": self.alias,
            "version": self.target.version, "weighted": self.target.to_dict()["weighted"],
            "generation": self.generation, "previous": prev, "action": self.action,
            "updated_at": self.updated_at, "updated_by": self.updated_by, "reason": self.reason,
            "swap_id": self.swap_id,
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any], etag: str | None = None) -> AliasState:
        try:
            prev = doc.get("previous")
            return cls(
                index=str(doc["index"]), alias=str(doc["alias"]),
                target=Target(check_name("version", str(doc["version"])), Weighted.from_dict(doc.get("weighted"))),
                generation=int(doc["generation"]), updated_at=str(doc.get("updated_at", "")),
                updated_by=str(doc.get("updated_by", "")), action=str(doc.get("action", "publish")),
                reason=doc.get("reason"), previous=Target.from_dict(prev),
                previous_generation=(int(prev["generation"]) if prev and prev.get("generation") is not None else None),
                swap_id=str(doc.get("swap_id", "")), etag=etag,
            )
        except (KeyError, TypeError, ValueError, ConfigError) as err:
            raise IntegrityError(f"alias document is malformed ({type(err).__name__}: {err}); "
                                 "it was not written by embedctl") from err

    def history_record(self) -> dict[str, Any]:
        """The rollback record of the swap that produced this document (derived, so any
        process can rewrite it byte-for-byte after a crash)."""
        return {
            "format": ALIAS_FORMAT, "index": self.index, "alias": self.alias, "generation": self.generation,
            "action": self.action,
            "from": self.previous.version if self.previous else None,
            "from_weighted": self.previous.to_dict()["weighted"] if self.previous else None,
            "to": self.target.version, "to_weighted": self.target.to_dict()["weighted"],
            "when": self.updated_at, "by": self.updated_by, "why": self.reason, "swap_id": self.swap_id,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.to_doc(), "versions": self.target.versions}


def read_alias(store: Store, index: str, alias: str = DEFAULT_ALIAS, *, missing_ok: bool = False) -> AliasState | None:
    """The alias's current state (with its ETag). NotFoundError when it does not exist, unless
    ``missing_ok`` (then None)."""
    check_name("index", index)
    check_name("alias", alias)
    current = store.get_versioned(layout.alias_key(index, alias))
    if current is None:
        if missing_ok:
            return None
        raise NotFoundError(f"alias {alias!r} of index {index!r} does not exist in {store.describe()}; "
                            f"publish a version first (embedctl publish --index {index} --version V --alias {alias})")
    return AliasState.from_doc(_loads(current.data, store, layout.alias_key(index, alias)), current.etag)


def _loads(data: bytes, store: Store, key: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as err:
        raise IntegrityError(f"{store.describe(key)} is not valid JSON: {err}") from err
    if not isinstance(doc, dict):
        raise IntegrityError(f"{store.describe(key)} is not a JSON object")
    return doc


def list_aliases(store: Store, index: str) -> list[str]:
    prefix = join(layout.index_prefix(check_name("index", index)), "aliases")
    out = []
    for key in store.list(prefix):
        rest = key[len(prefix) + 1:]
        if "/" not in rest and rest.endswith(".json"):
            out.append(rest[: -len(".json")])
    return sorted(out)


def alias_history(store: Store, index: str, alias: str = DEFAULT_ALIAS) -> list[dict[str, Any]]:
    """The alias's history records, oldest first."""
    prefix = layout.alias_history_prefix(check_name("index", index), check_name("alias", alias))
    records = []
    for key in store.list(prefix):
        if key.endswith(".json"):
            records.append(_loads(store.read_bytes(key), store, key))
    return sorted(records, key=lambda r: int(r.get("generation", 0)))


def _ensure_history(store: Store, state: AliasState) -> str:
    """Write the history record of ``state`` if it is missing (idempotent; the bytes are a
    function of the alias document, so racing writers write the same record)."""
    key = layout.alias_history_key(state.index, state.alias, state.generation)
    data = json_bytes(state.history_record())
    existing = store.get_versioned(key)
    if existing is None:
        try:
            store.put_if_absent(key, data)
        except ConflictError:
            existing = store.get_versioned(key)
    if existing is not None and existing.data != data:
        # A record from an earlier life of this alias (deleted and recreated by hand): keep
        # it, and say so, rather than overwrite an audit trail.
        log.warning("history record %s does not match the alias document; leaving it as it is",
                    store.describe(key))
    return key


# ---------------------------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# publish / rollback
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SwapResult:
    """What a publish or rollback did."""

    index: str
    alias: str
    action: str
    changed: bool
    generation: int
    version: str
    weighted: dict[str, Any] | None
    previous: str | None
    previous_weighted: dict[str, Any] | None
    verified: list[str]
    history_key: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse_weighted(weighted: Weighted | Mapping[str, Any] | float | None, version: str,
                    current: AliasState | None) -> Weighted | None:
    """``weighted`` for ``publish_version(..., version=GREEN)``: a Weighted, a percentage, or a
    mapping with ``green_weight`` and optionally ``blue`` (default: the alias's current version)."""
    if weighted is None:
        return None
    if isinstance(weighted, Weighted):
        spec: dict[str, Any] = weighted.to_dict()
    elif isinstance(weighted, Mapping):
        spec = dict(weighted)
    else:
        spec = {"green_weight": weighted}
    green = spec.get("green", version)
    if green != version and spec.get("blue") != version:
        raise ConfigError(f"weighted publish of {version!r}: it must be the green (or blue) version, got {spec}")
    if "green_weight" not in spec:
        raise ConfigError("a weighted publish needs green_weight (a percentage of query keys for green)")
    blue = spec.get("blue")
    if blue is None:
        if current is None:
            raise ConfigError(f"a weighted publish of {version!r} needs a blue version: the alias does not exist "
                              "yet, so name one (--blue V)")
        # The alias's current serving version (blue of a running rollout) stays blue.
        blue = current.version
    return Weighted(str(blue), str(green), float(spec["green_weight"]))


def publish_version(store: Store, index: str, version: str, alias: str = DEFAULT_ALIAS, *,
                    expect_current: str | None = None, reason: str | None = None,
                    weighted: Weighted | Mapping[str, Any] | float | None = None, by: str | None = None,
                    source: Store | None = None, verifier: Verifier | None = None,
                    check_conditional_writes: bool = True) -> SwapResult:
    """Point ``alias`` at ``version`` (verified first) by compare-and-swap, and record the swap.

    ``expect_current``: refuse (ConflictError) unless the alias is on that version now.
    ``weighted``: a blue/green rollout: ``{"green_weight": 10}`` (or ``10``) sends 10% of query
    keys to ``version`` and the rest to the alias's current version (or ``{"blue": V0, ...}``);
    the document's ``version`` stays blue until a plain publish of ``version`` cuts over.
    ``source``: copy the version from another store first (artifacts, then the manifest).
    Raises ConflictError when another publisher moved the alias meanwhile (nothing changed),
    IntegrityError/NotFoundError when a version is incomplete or corrupt (nothing changed).

    Example::

        publish_version(open_store("s3://bkt/emb"), "docs", "v7", "live", expect_current="v6")
    """
    check_name("index", index)
    check_name("alias", alias)
    check_name("version", version)
    if check_conditional_writes:
        require_conditional_writes(store, prefix=layout.index_prefix(index))
    if source is not None:
        copy_version(source, store, index, version, verifier=verifier)
    current = read_alias(store, index, alias, missing_ok=True)
    target = Target(version, None)
    parsed = _parse_weighted(weighted, version, current)
    if parsed is not None:
        target = Target(parsed.blue, parsed)
    return _swap(store, index, alias, target, current, action="publish", expect_current=expect_current,
                 reason=reason, by=by, verifier=verifier)


def rollback_alias(store: Store, index: str, alias: str = DEFAULT_ALIAS, *, to: str | None = None,
                   expect_current: str | None = None, reason: str | None = None, by: str | None = None,
                   verifier: Verifier | None = None, check_conditional_writes: bool = True) -> SwapResult:
    """Move ``alias`` back to its previous state (the ``from`` of the current swap; rolling
    back twice therefore returns to where you started, like ``kubectl rollout undo``) or to
    ``to``, a version named in the alias's history. Same verification and compare-and-swap
    as a publish; the rollback is itself recorded in the history."""
    check_name("index", index)
    check_name("alias", alias)
    if check_conditional_writes:
        require_conditional_writes(store, prefix=layout.index_prefix(index))
    current = read_alias(store, index, alias)
    assert current is not None
    _ensure_history(store, current)
    if to is None:
        if current.previous is None:
            raise NotFoundError(f"alias {alias!r} of index {index!r} is at its first generation "
                                f"({current.version}): there is no previous version to roll back to")
        target = current.previous
    else:
        check_name("version", to)
        known: set[str] = set()
        for rec in alias_history(store, index, alias):
            for k in ("from", "to"):
                if rec.get(k):
                    known.add(str(rec[k]))
            for k in ("from_weighted", "to_weighted"):
                if rec.get(k):
                    known.update((str(rec[k]["blue"]), str(rec[k]["green"])))
        if to not in known:
            raise NotFoundError(f"version {to!r} never appears in the history of {index}/{alias} "
                                f"(known: {', '.join(sorted(known)) or 'none'}); use publish for a new version")
        target = Target(to, None)
    return _swap(store, index, alias, target, current, action="rollback", expect_current=expect_current,
                 reason=reason, by=by, verifier=verifier)


def _swap(store: Store, index: str, alias: str, target: Target, current: AliasState | None, *, action: str,
          expect_current: str | None, reason: str | None, by: str | None,
          verifier: Verifier | None) -> SwapResult:
    if current is not None:
        _ensure_history(store, current)  # repair a crash between an earlier swap and its record
    if expect_current is not None:
        now = current.version if current else None
        if now != expect_current:
            raise ConflictError(f"alias {alias!r} of index {index!r} is on {now or 'nothing'}, not the expected "
                                f"{expect_current}; nothing was changed")
    if current is not None and current.target == target:
        log.info("%s/%s is already on %s; nothing to do", index, alias, target.describe())
        return _result(current, action, changed=False, verified=[], history_key=None)

    verify = verifier or verify_version
    for v in target.versions:
        verify(store, index, v)  # raises: a broken version is never published
    log.info("verified %s of %s", ", ".join(target.versions), index)
    crash_point("publish.before-swap")

    generation = current.generation + 1 if current else _next_generation(store, index, alias)
    state = AliasState(
        index=index, alias=alias, target=target, generation=generation, updated_at=_now(),
        updated_by=by or whoami(), action=action, reason=reason,
        previous=current.target if current else None,
        previous_generation=current.generation if current else None,
        swap_id=uuid.uuid4().hex,
    )
    key = layout.alias_key(index, alias)
    data = json_bytes(state.to_doc())
    try:
        if current is None:
            store.put_if_absent(key, data)
        else:
            assert current.etag is not None
            store.put_if_match(key, data, current.etag)
    except ConflictError:
        winner = read_alias(store, index, alias, missing_ok=True)
        won = winner.target.describe() if winner else "nothing (it was deleted)"
        raise ConflictError(
            f"{action} of {target.describe()} to {index}/{alias} lost a race: the alias moved from "
            f"{current.target.describe() if current else 'nothing'} to {won}"
            f"{f' (generation {winner.generation})' if winner else ''} meanwhile; nothing was changed. "
            f"Check `embedctl status --index {index}` and retry with --expect-current if "
            f"{target.version} should still replace it."
        ) from None
    crash_point("publish.after-swap")
    history_key = _ensure_history(store, state)
    log.info("%s %s/%s: %s -> %s (generation %d)", action, index, alias,
             current.target.describe() if current else "nothing", target.describe(), generation)
    return _result(state, action, changed=True, verified=target.versions, history_key=history_key)


def _next_generation(store: Store, index: str, alias: str) -> int:
    """Generation for a new alias: after any history left by an earlier alias of that name."""
    prefix = layout.alias_history_prefix(index, alias)
    gens = [int(k.rsplit("/", 1)[-1].split(".")[0]) for k in store.list(prefix) if k.endswith(".json")]
    return max(gens, default=0) + 1


def _result(state: AliasState, action: str, *, changed: bool, verified: list[str],
            history_key: str | None) -> SwapResult:
    prev = state.previous
    return SwapResult(index=state.index, alias=state.alias, action=action, changed=changed,
                      generation=state.generation, version=state.version,
                      weighted=state.target.to_dict()["weighted"],
                      previous=prev.version if prev and changed else None,
                      previous_weighted=prev.to_dict()["weighted"] if prev and changed else None,
                      verified=verified, history_key=history_key)
