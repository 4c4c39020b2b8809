"""Duplicate ids by hash partitions: the same answer as the corpus reader's one-dict rule."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from engine.embed.corpus import CorpusConfig, _find_duplicates, corpus_store
from engine.embed.dedup import duplicates_in_partition, find_duplicates_local, partition_ids, read_id_column
from tests.corpus_utils import make_docs, write_corpus


def corpus_with_cross_file_duplicates(tmp_path, n=300, files=4, seed=3):
    rng = random.Random(seed)
    docs = make_docs(n, seed=seed, min_words=3, max_words=6)
    for d in docs:  # ids from a small pool: duplicates inside files and across them
        d["doc_id"] = f"id{rng.randrange(n // 2)}"
    docs[5]["doc_id"] = None  # a null id is not a duplicate (it is rejected as a null id)
    docs[6]["doc_id"] = None
    return write_corpus(tmp_path / "corpus", docs, files=files, row_group_size=7)


@pytest.mark.parametrize("per_partition", [1_000_000, 50, 7])
def test_partitioned_duplicates_equal_the_single_dict_rule(tmp_path, per_partition):
    path = corpus_with_cross_file_duplicates(tmp_path)
    cfg = CorpusConfig(corpus=str(path))
    store, keys = corpus_store(cfg)
    expected = _find_duplicates(store, keys, "doc_id")
    assert sum(len(v) for v in expected.values()) > 100  # the corpus really has duplicates
    assert len(expected) > 1  # ... in several files, including cross-file ones
    ids = [read_id_column(store, k, "doc_id") for k in keys]
    assert find_duplicates_local(ids, keys, ids_per_partition=per_partition) == expected


def test_first_occurrence_wins_by_file_then_row():
    a = pa.array(["x", "y", "x"])
    b = pa.array(["y", "x", None])
    parts = [partition_ids(0, a, 2), partition_ids(1, b, 2)]
    found = [duplicates_in_partition([parts[0][p], parts[1][p]]) for p in range(2)]
    rows = sorted(tuple(r.values()) for t in found for r in t.to_pylist())
    # (file, row, first_file, first_row): x first at file 0 row 0, y at file 0 row 1
    assert rows == [(0, 2, 0, 0), (1, 0, 0, 1), (1, 1, 0, 0)]


def test_no_duplicates_gives_an_empty_map(tmp_path):
    docs = make_docs(40, seed=1, min_words=3, max_words=5)
    path = write_corpus(tmp_path / "c", docs, files=3)
    store, keys = corpus_store(CorpusConfig(corpus=str(path)))
    assert find_duplicates_local([read_id_column(store, k, "doc_id") for k in keys], keys,
                                 ids_per_partition=10) == {}


@pytest.mark.ray
@pytest.mark.parametrize("per_partition", [60, 1_000_000])  # tasks per file and partition; one task (one partition)
def test_ray_tasks_give_the_same_map(tmp_path, ray_session, per_partition):
    from engine.distributed.dedup import find_duplicates_ray

    path = corpus_with_cross_file_duplicates(tmp_path, n=200, files=3)
    cfg = CorpusConfig(corpus=str(path))
    store, keys = corpus_store(cfg)
    expected = _find_duplicates(store, keys, "doc_id")
    assert find_duplicates_ray(cfg, keys, 200, ids_per_partition=per_partition) == expected
