"""Duplicate ids across a corpus on Ray: a task per file then one per hash partition, or one task for one partition.

The driver receives only the duplicate rows (not the ids), so its memory grows with files and
duplicates, not with documents. The rule and the result equal ``engine.embed.dedup
.find_duplicates_local`` (tested against it and against the corpus reader's own answer).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from engine.embed.corpus import CorpusConfig
from engine.embed.dedup import (
    IDS_PER_PARTITION,
    DuplicateMap,
    duplicates_in_partition,
    partition_ids,
    partitions_for,
    read_id_column,
    to_duplicate_map,
)

log = logging.getLogger(__name__)


def _partition_file(cfg: CorpusConfig, key: str, file_index: int, partitions: int) -> Any:
    from engine.embed.corpus import corpus_store

    store, _keys = corpus_store(cfg)
    parts = partition_ids(file_index, read_id_column(store, key, cfg.id_column), partitions)
    return parts[0] if partitions == 1 else tuple(parts)


def _find_in_partition(*tables: Any) -> Any:
    return duplicates_in_partition(tables)


def _find_in_files(cfg: CorpusConfig, keys: Sequence[str]) -> Any:
    """Both steps in one task, for a corpus of one partition: one worker to start, nothing moved between tasks."""
    from engine.embed.corpus import corpus_store

    store, _keys = corpus_store(cfg)
    return duplicates_in_partition(partition_ids(i, read_id_column(store, key, cfg.id_column), 1)[0]
                                   for i, key in enumerate(keys))


def find_duplicates_ray(cfg: CorpusConfig, keys: Sequence[str], total_rows: int, *,
                        ids_per_partition: int = IDS_PER_PARTITION, cpus_per_task: float = 0.5) -> DuplicateMap:
    """Both steps as Ray tasks on the connected cluster (``ray.init`` done by the caller)."""
    import ray

    partitions = partitions_for(total_rows, ids_per_partition)
    if partitions == 1:
        # Up to one partition of ids (2M by default) the one task reading every file is the quickest start:
        # on a fresh job each task waits for a worker process to boot (seconds), longer than reading the ids.
        one = ray.remote(num_cpus=cpus_per_task, max_retries=3)(_find_in_files)
        dups = to_duplicate_map([ray.get(one.remote(cfg, list(keys)))], keys)
        log.info("duplicate ids: %d rows in %d file(s), one task over %d file(s)",
                 sum(len(v) for v in dups.values()), len(dups), len(keys))
        return dups
    split = ray.remote(num_cpus=cpus_per_task, num_returns=partitions, max_retries=3)(_partition_file)
    find = ray.remote(num_cpus=cpus_per_task, max_retries=3)(_find_in_partition)
    refs: list[Any] = [split.remote(cfg, key, i, partitions) for i, key in enumerate(keys)]
    per_file: list[list[Any]] = [[r] for r in refs] if partitions == 1 else [list(r) for r in refs]
    found = ray.get([find.remote(*[refs[p] for refs in per_file]) for p in range(partitions)])
    dups = to_duplicate_map(found, keys)
    log.info("duplicate ids: %d rows in %d file(s), %d partition(s) over %d file(s)",
             sum(len(v) for v in dups.values()), len(dups), partitions, len(keys))
    return dups
