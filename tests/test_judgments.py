"""The one judgments reader: every format gives the same judgments, both entry points (``read_qrels``
for benchmarks, ``load_qrels`` for evaluate) agree, and a document judged twice keeps its highest gain."""

from __future__ import annotations

import gzip
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.core.errors import ConfigError, NotFoundError, SchemaError
from engine.quality.judgments import load_qrels, load_queries, parse_gain_map, read_judgments, read_qrels, read_queries

ROWS = [("1", "A", 1), ("1", "B", 4), ("1", "C", -1), ("2", "A", 2)]
IDENTITY = {"1": {"A": 1.0, "B": 4.0, "C": 0.0}, "2": {"A": 2.0}}


def write_all_formats(tmp_path, rows):
    """The same judgments in every format the reader takes."""
    files = {
        "tsv": "query_id\tdoc_id\tgrade\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in rows),
        "space.txt": "query_id doc_id grade\n" + "".join(f"{q} {d} {g}\n" for q, d, g in rows),
        "beir.tsv": "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in rows),
        "trec": "".join(f"{q} 0 {d} {g}\n" for q, d, g in rows),
        "csv": "qid,docid,relevance\n" + "".join(f"{q},{d},{g}\n" for q, d, g in rows),
        "jsonl": "".join(json.dumps({"query_id": q, "doc_id": d, "grade": g}) + "\n" for q, d, g in rows),
    }
    paths = {}
    for name, text in files.items():
        paths[name] = tmp_path / f"qrels.{name}"
        paths[name].write_text(text)
    paths["tsv.gz"] = tmp_path / "qrels.tsv.gz"
    paths["tsv.gz"].write_bytes(gzip.compress(files["tsv"].encode()))
    paths["parquet"] = tmp_path / "qrels.parquet"
    pq.write_table(pa.table({"query_id": [q for q, _, _ in rows], "doc_id": [d for _, d, _ in rows],
                             "grade": [g for _, _, g in rows]}), paths["parquet"])
    return paths


def test_every_format_reads_the_same_judgments(tmp_path):
    for name, path in write_all_formats(tmp_path, ROWS).items():
        assert read_qrels(path) == IDENTITY, name
        assert [(j.query_id, j.doc_id, j.grade) for j in read_judgments(path)] == \
            [(q, d, float(g)) for q, d, g in ROWS], name
        # evaluate's named mappings read every format too (they used to need a TSV with a header)
        assert load_qrels(path, "cranfield") == {"1": {"A": 4.0, "B": 1.0}, "2": {"A": 3.0}}, name


def test_both_entry_points_agree(tmp_path):
    """``load_qrels(linear)`` is ``read_qrels`` (identity) without the judged-non-relevant documents,
    and ``read_qrels(cranfield map)`` gives ``load_qrels(cranfield)`` plus the zero gains."""
    path = write_all_formats(tmp_path, ROWS)["tsv"]
    identity = read_qrels(path)
    assert load_qrels(path, "linear") == {q: {d: g for d, g in docs.items() if g > 0} for q, docs in identity.items()}
    strict = read_qrels(path, parse_gain_map("cranfield"))
    assert strict == {"1": {"A": 4.0, "B": 1.0, "C": 0.0}, "2": {"A": 3.0}}
    assert load_qrels(path, "cranfield") == {q: {d: g for d, g in docs.items() if g > 0} for q, docs in strict.items()}


@pytest.mark.parametrize("order", [0, 1])
def test_a_document_judged_twice_keeps_its_highest_gain(tmp_path, caplog, order):
    dup = [("1", "A", 3), ("1", "A", 1), ("1", "B", 2), ("2", "C", -1), ("2", "C", 2)]
    rows = dup if order == 0 else list(reversed(dup))  # the rule never depends on the line order
    paths = write_all_formats(tmp_path, rows)
    with caplog.at_level(logging.WARNING, logger="engine.quality.judgments"):
        for name, path in paths.items():
            assert read_qrels(path) == {"1": {"A": 3.0, "B": 2.0}, "2": {"C": 2.0}}, name
            # cranfield: grade 1 is the best answer, so doc A's gain is 5 - 1 = 4, not 5 - 3
            assert read_qrels(path, parse_gain_map("cranfield")) == {"1": {"A": 4.0, "B": 3.0}, "2": {"C": 3.0}}
            assert load_qrels(path, "cranfield") == {"1": {"A": 4.0, "B": 3.0}, "2": {"C": 3.0}}
            assert load_qrels(path, "binary") == {"1": {"A": 1.0, "B": 1.0}, "2": {"C": 1.0}}
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings and all("2 documents judged twice with different grades keep their highest gain" in w
                            for w in warnings[:2])


def test_identical_repeats_are_silent(tmp_path, caplog):
    path = write_all_formats(tmp_path, ROWS + ROWS[:2])["tsv"]
    with caplog.at_level(logging.WARNING, logger="engine.quality.judgments"):
        assert read_qrels(path) == IDENTITY
    assert not caplog.records


def test_bad_judgment_files_say_what_is_wrong(tmp_path):
    def write(name, text):
        (tmp_path / name).write_text(text)
        return tmp_path / name

    with pytest.raises(SchemaError, match="needs a header 'query_id doc_id grade'"):
        read_qrels(write("nohdr.tsv", "1\tA\t1\n"))
    with pytest.raises(SchemaError, match=r"bad.tsv:2: expected a numeric grade"):
        read_qrels(write("bad.tsv", "query_id\tdoc_id\tgrade\n1\tA\thigh\n"))
    with pytest.raises(SchemaError, match=r"short.tsv:3: expected 'query_id doc_id grade'"):
        load_qrels(write("short.tsv", "query_id\tdoc_id\tgrade\n1\tA\t1\n1\tB\n"))
    with pytest.raises(SchemaError, match="TREC qrels lines have 4 fields"):
        read_qrels(write("t.trec", "q1 0 d1 1\nq1 0 d2\n"))
    with pytest.raises(SchemaError, match="holds no judgments"):
        read_qrels(write("header-only.tsv", "query_id\tdoc_id\tgrade\n"))
    with pytest.raises(SchemaError, match="is empty"):
        load_qrels(write("empty.tsv", "\n"))
    with pytest.raises(SchemaError, match="needs 'query_id', 'doc_id' and 'grade'"):
        read_qrels(write("q.jsonl", '{"query_id": "1", "doc": "A", "grade": 1}\n'))
    with pytest.raises(SchemaError, match="not in the gain map"):
        read_qrels(write("g.tsv", "query_id\tdoc_id\tgrade\n1\tA\t1.5\n"), parse_gain_map("cranfield"))
    with pytest.raises(SchemaError, match="not UTF-8"):
        (tmp_path / "latin1.tsv").write_bytes("query_id\tdoc_id\tgrade\n1\t\xe9\t1\n".encode("latin-1"))
        read_qrels(tmp_path / "latin1.tsv")
    # a missing file: NotFoundError for benchmark files (exit 4), ConfigError for evaluate's flags (exit 2)
    with pytest.raises(NotFoundError):
        read_qrels(tmp_path / "absent.tsv")
    with pytest.raises(ConfigError, match="cannot read qrels file"):
        load_qrels(tmp_path / "absent.tsv")


def test_queries_in_every_format(tmp_path):
    rows = [{"query_id": "1", "text": "wing lift", "lang": "en"}, {"query_id": "2", "text": "shock", "lang": "en"}]
    jsonl = "".join(json.dumps(r) + "\n" for r in rows)
    for name in ("q.jsonl", "q.json", "q.txt"):  # JSON lines whatever the suffix says
        (tmp_path / name).write_text(jsonl)
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "q.tsv").write_text("qid\tquery\tlang\n1\twing lift\ten\n2\tshock\ten\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "q.parquet")
    for name in ("q.jsonl", "q.json", "q.txt", "list.json", "q.tsv", "q.parquet"):
        assert read_queries(tmp_path / name) == rows, name
        assert [(q.query_id, q.text) for q in load_queries(tmp_path / name)] == [("1", "wing lift"), ("2", "shock")]
    (tmp_path / "dup.jsonl").write_text(jsonl + json.dumps(rows[0]) + "\n")
    with pytest.raises(SchemaError, match="duplicate query id '1'"):
        read_queries(tmp_path / "dup.jsonl")
    with pytest.raises(NotFoundError):
        read_queries(tmp_path / "absent.jsonl")
