"""The context every phase works over: store, ids, state, tools, and the inputs frozen at start."""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core.errors import NotFoundError
from engine.core.failpoints import pause_point
from engine.core.storage import Store, join
from engine.migrate.evaluation import load_benchmark, load_canaries, query_set
from engine.migrate.plan import INPUT_FIELDS, MigrationPlan
from engine.migrate.state import MigrationState, artifact_key
from engine.migrate.tools import Tools

log = logging.getLogger(__name__)

PAUSE_ENV = "EMBEDCTL_MIGRATE_PAUSE"  # "<phase>.<point>:<marker file>": write it, then hang (tests kill us)


@dataclass
class MigrationContext:
    """One migration of one index alias, as the phases see it."""

    store: Store
    index: str
    migration_id: str
    state: MigrationState
    tools: Tools
    by: str
    _inputs_dir: str | None = field(default=None, repr=False)

    def read(self) -> dict[str, Any]:
        return self.state.read()

    @property
    def plan(self) -> MigrationPlan:
        return MigrationPlan.from_dict(self.read()["plan"])

    def key(self, name: str) -> str:
        return artifact_key(self.index, self.migration_id, name)

    def read_optional(self, name: str) -> dict[str, Any] | None:
        try:
            return self.store.read_json(self.key(name))
        except NotFoundError:
            return None

    def say(self, message: str) -> None:
        self.tools.say(message)

    def pause(self, point: str) -> None:
        """Test hook: hang at ``point`` when ``EMBEDCTL_MIGRATE_PAUSE`` names it (``engine.core.failpoints``)."""
        pause_point(point, env=PAUSE_ENV)

    def alias(self) -> Any:
        from engine.publish.aliases import read_alias

        return read_alias(self.store, self.index, self.read()["alias"])

    # --- inputs: the benchmark, canary, query and pair files, as they were at start -------------
    def store_inputs(self, plan: MigrationPlan) -> None:
        """Copy the benchmark, canary, query and pair files into the store beside the state, once:
        every phase (on any machine, after any crash) reads the very bytes the migration
        started with, and a file edited meanwhile cannot make baseline and compare disagree."""
        from engine.core.storage import sha256_bytes

        recorded = self.read().get("inputs") or {}
        new: dict[str, Any] = {}
        for name in INPUT_FIELDS:
            path = getattr(plan, name)
            if not path:
                continue
            p = Path(path)
            if not p.is_file():
                if name in recorded:
                    continue  # started elsewhere: the stored copy is what counts
                raise NotFoundError(f"--{name} {path} does not exist")
            data = p.read_bytes()
            digest = sha256_bytes(data)
            if name in recorded:
                if recorded[name]["sha256"] != digest:
                    log.warning("%s %s changed since migration %s started; the copy stored then is used", name, path,
                                self.migration_id)
                continue
            key = self.key(join("inputs", f"{name}-{p.name}"))
            self.store.write_bytes(key, data)
            new[name] = {"source": str(p.resolve()), "key": key, "sha256": digest, "bytes": len(data)}
        if new:
            self.state.update(lambda d: d.setdefault("inputs", {}).update(
                {k: v for k, v in new.items() if k not in (d.get("inputs") or {})}), need_lock=False)

    def input_path(self, name: str) -> str | None:
        """A local file holding the input ``name`` (benchmark, canaries, queries, pairs) as it
        was when the migration started (from the store), or None when the plan has none."""
        info = (self.read().get("inputs") or {}).get(name)
        if info is None:
            value = getattr(self.plan, name)
            return None if value is None else str(value)
        if self._inputs_dir is None:
            self._inputs_dir = tempfile.mkdtemp(prefix="embedctl-migrate-inputs-")
            weakref.finalize(self, shutil.rmtree, self._inputs_dir, ignore_errors=True)
        local = Path(self._inputs_dir) / info["key"].rsplit("/", 1)[-1].split("-", 1)[1]
        if not local.exists():
            tmp = local.with_name(local.name + ".part")
            self.store.download_file(info["key"], tmp)
            tmp.replace(local)
        return str(local)

    def benchmark(self) -> Any | None:
        return load_benchmark(self.input_path("benchmark"))

    def canaries(self, bench: Any | None) -> list[Any]:
        return load_canaries(self.input_path("canaries"), bench)

    def queries(self, bench: Any | None) -> list[dict[str, Any]]:
        return query_set(self.input_path("queries"), bench)
