"""Where things live in a store (the DESIGN.md layout), in one place.

```
runs/<run_id>/manifest.json                 run manifest (kind, config, model, inputs, outputs, counts, status)
runs/<run_id>/chunks/part-<unit>.parquet    chunk rows (no vectors)
runs/<run_id>/embeddings/part-<unit>.parquet  chunk rows + `embedding` fixed_size_list<float32|float16>[dim]
runs/<run_id>/rejects/part-<unit>.parquet   rejected input rows with a reason
runs/<run_id>/_state/...                    resume bookkeeping (unit plan, per-unit commit markers)
indexes/<name>/versions/<version_id>/manifest.json   immutable once written
indexes/<name>/versions/<version_id>/<artifact keys>  faiss files, id maps, rescore vectors
indexes/<name>/aliases/<alias>.json                 pointer, compare-and-swap
indexes/<name>/aliases/<alias>/history/<generation>.json  one rollback record per swap
indexes/<name>/leases/<what>.json                   leases (one refresh at a time)
```

Index version manifest (``version_manifest_key``): a JSON object with at least
``version_id``, ``index``, ``created_at``, ``model`` (the run's model identity: name, path,
fingerprint, dim, max_seq_length, prompts), ``dim``, ``metric``, ``kind``, ``params``,
``source_run``, ``parent_version``, ``shards`` (list of ``{"shard", "rows", "files": {role:
key}}``), ``artifacts`` (list of ``{"key", "bytes", "sha256"}``, one per file of the version;
keys are relative to the version prefix and must pass ``storage.check_key``), ``recall_gate``
and ``thresholds``.
"""

from __future__ import annotations

from engine.core.storage import check_key, join

RUNS = "runs"
INDEXES = "indexes"


def run_prefix(run_id: str) -> str:
    return join(RUNS, check_key(run_id))


def run_manifest_key(run_id: str) -> str:
    return join(run_prefix(run_id), "manifest.json")


def run_part_key(run_id: str, kind: str, unit: str) -> str:
    """``kind`` is one of chunks, embeddings, rejects."""
    return join(run_prefix(run_id), kind, f"part-{unit}.parquet")


def index_prefix(index: str) -> str:
    return join(INDEXES, check_key(index))


def version_prefix(index: str, version_id: str) -> str:
    return join(index_prefix(index), "versions", check_key(version_id))


def version_manifest_key(index: str, version_id: str) -> str:
    return join(version_prefix(index, version_id), "manifest.json")


def alias_key(index: str, alias: str) -> str:
    return join(index_prefix(index), "aliases", f"{check_key(alias)}.json")


def alias_history_prefix(index: str, alias: str) -> str:
    return join(index_prefix(index), "aliases", check_key(alias), "history")


def alias_history_key(index: str, alias: str, generation: int) -> str:
    return join(alias_history_prefix(index, alias), f"{generation:08d}.json")


def lease_key(index: str, what: str) -> str:
    return join(index_prefix(index), "leases", f"{check_key(what)}.json")


def retention_key(index: str, holder: str) -> str:
    """A retention record: versions a workflow (e.g. a migration) still needs, read by gc."""
    return join(index_prefix(index), "retention", f"{check_key(holder)}.json")
