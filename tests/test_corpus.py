"""Corpus validation: schema errors name file and column; row problems become rejects; counts add up."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.core.errors import ConfigError, SchemaError
from engine.embed.chunking import normalize_text
from engine.embed.corpus import (
    DUPLICATE_ID,
    EMPTY_ID,
    EMPTY_TEXT,
    INVALID_UTF8,
    NULL_ID,
    NULL_TEXT,
    OVERSIZED,
    CorpusConfig,
    _cut_units,
    plan_corpus,
    read_unit,
    validate_unit,
)
from tests.corpus_utils import make_docs, write_corpus


def validate_all(cfg: CorpusConfig):
    store, plan = plan_corpus(cfg)
    accepted, rejects = [], []
    for unit in plan.units:
        rows = validate_unit(read_unit(store, unit), unit, cfg, plan, normalize_text)
        accepted += rows.doc_ids
        rejects += rows.rejects
    return plan, accepted, rejects


def test_missing_id_column_names_file_and_column(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(SchemaError, match=r"a\.parquet has no column 'doc_id'.*--id-column"):
        plan_corpus(CorpusConfig(str(tmp_path)))


def test_mistyped_text_column(tmp_path):
    pq.write_table(pa.table({"doc_id": ["a"], "text": [1.5]}), tmp_path / "b.parquet")
    with pytest.raises(SchemaError, match=r"b\.parquet: text column 'text' has type double"):
        plan_corpus(CorpusConfig(str(tmp_path)))


def test_corrupt_parquet_is_a_clear_error(tmp_path):
    write_corpus(tmp_path, make_docs(5))
    (tmp_path / "part-000.parquet").write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(SchemaError, match=r"part-000\.parquet is not a readable Parquet file.*fix or remove"):
        plan_corpus(CorpusConfig(str(tmp_path)))


def test_truncated_parquet_is_a_clear_error(tmp_path):
    write_corpus(tmp_path, make_docs(50))
    data = (tmp_path / "part-000.parquet").read_bytes()
    (tmp_path / "part-000.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(SchemaError, match="not a readable Parquet file"):
        plan_corpus(CorpusConfig(str(tmp_path)))


def test_missing_corpus_and_empty_folder(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        plan_corpus(CorpusConfig(str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .parquet files"):
        plan_corpus(CorpusConfig(str(tmp_path / "empty")))


def test_explicit_title_column_must_exist(tmp_path):
    pq.write_table(pa.table({"doc_id": ["a"], "text": ["x"]}), tmp_path / "a.parquet")
    plan_corpus(CorpusConfig(str(tmp_path)))  # default 'title' is optional
    with pytest.raises(SchemaError, match="no column 'heading'"):
        plan_corpus(CorpusConfig(str(tmp_path), title_column="heading"))


def test_every_row_problem_is_a_reject_with_reason(tmp_path):
    table = pa.table({
        "doc_id": ["ok1", None, " ", "dup", "dup", "nt", "empty", "bad", "big", "ok2"],
        "text": [b"fine text", b"x", b"x", b"first", b"second", None, b"  \n ", b"\xff\xfe broken", b"y" * 500,
                 b"more fine text"],
    })
    pq.write_table(table, tmp_path / "c.parquet")
    cfg = CorpusConfig(str(tmp_path), max_doc_chars=100)
    plan, accepted, rejects = validate_all(cfg)
    assert accepted == ["ok1", "dup", "ok2"]
    reasons = {(r["doc_id"], r["reason"]) for r in rejects}
    assert reasons == {(None, NULL_ID), (" ", EMPTY_ID), ("dup", DUPLICATE_ID), ("nt", NULL_TEXT),
                       ("empty", EMPTY_TEXT), ("bad", INVALID_UTF8), ("big", OVERSIZED)}
    assert plan.total_rows == len(accepted) + len(rejects)
    bad = next(r for r in rejects if r["reason"] == INVALID_UTF8)
    assert bad["raw_text"] == b"\xff\xfe broken" and bad["source_file"] == "c.parquet" and bad["row_index"] == 7
    dup = next(r for r in rejects if r["reason"] == DUPLICATE_ID)
    assert dup["detail"] == "first seen at c.parquet#3"


def test_duplicates_across_files_first_wins(tmp_path):
    docs = make_docs(10)
    docs[7]["doc_id"] = docs[2]["doc_id"]
    write_corpus(tmp_path, docs, files=2)
    _plan, accepted, rejects = validate_all(CorpusConfig(str(tmp_path)))
    assert len(accepted) == 9 and [r["reason"] for r in rejects] == [DUPLICATE_ID]
    assert rejects[0]["source_file"] == "part-001.parquet"


def test_integer_ids_are_accepted_as_strings(tmp_path):
    pq.write_table(pa.table({"doc_id": [1, 2], "text": ["a b", "c d"]}), tmp_path / "i.parquet")
    _plan, accepted, _rej = validate_all(CorpusConfig(str(tmp_path)))
    assert accepted == ["1", "2"]


def test_metadata_type_conflict_across_files(tmp_path):
    pq.write_table(pa.table({"doc_id": ["a"], "text": ["x"], "year": [2001]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"doc_id": ["b"], "text": ["y"], "year": ["2002"]}), tmp_path / "b.parquet")
    with pytest.raises(SchemaError, match="metadata column 'year'"):
        plan_corpus(CorpusConfig(str(tmp_path)))


def test_units_cover_every_row_once():
    for groups in [(100, 100, 100), (1000,), (5, 7, 300, 2, 2), ()]:
        for ramp in (0, 3):
            units = _cut_units("f.parquet", groups, 150, ramp=ramp)
            rows = [r for u in units for r in range(u.row_start, u.row_end)]
            assert rows == list(range(sum(groups)))
            assert len({u.unit_id for u in units}) == len(units)


def test_a_new_plan_ramps_its_first_units_up(tmp_path):
    """The first units of a run are 1/8, 1/4, 1/2 of unit_rows (first vectors sooner); the rest full size,
    later files untouched; small units (tests, tiny corpora) are cut as before."""
    write_corpus(tmp_path / "c", make_docs(3000), files=2)
    _store, plan = plan_corpus(CorpusConfig(str(tmp_path / "c"), unit_rows=256), find_duplicates=False)
    first, second = plan.files[0].key, plan.files[1].key
    sizes = [u.row_end - u.row_start for u in plan.units if u.file == first]
    assert sizes[:4] == [32, 64, 128, 256] and set(sizes[4:-1]) == {256}
    assert [u.row_end - u.row_start for u in plan.units if u.file == second][0] == 256
    _store, small = plan_corpus(CorpusConfig(str(tmp_path / "c"), unit_rows=100), find_duplicates=False)
    assert [u.row_end - u.row_start for u in small.units][:2] == [112, 112]  # 7 row groups of 16, as before
