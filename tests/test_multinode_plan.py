"""Planning that scales: plan.json's compact unit form (read with the inline form) and vectorised id partitions."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

import engine.embed.corpus as corpus_mod
from engine.embed.config import EmbedJobConfig
from engine.embed.corpus import CorpusConfig, CorpusFile, CorpusPlan, Unit, plan_corpus, unit_starts, units_from_starts
from engine.embed.dedup import partition_ids, string_partitions
from engine.embed.parts import state_key
from engine.embed.pipeline import run_locally
from tests.conftest import REPO
from tests.corpus_utils import make_docs, write_corpus


@pytest.fixture
def corpus(tmp_path):
    docs = make_docs(90, seed=4, min_words=5, max_words=12)
    docs[50]["doc_id"] = docs[3]["doc_id"]  # one duplicate id, rejected in either plan form
    return write_corpus(tmp_path / "corpus", docs, files=3, row_group_size=4)


def test_a_large_plan_keeps_unit_starts_and_reads_back_the_same_units(corpus, monkeypatch):
    _store, plan = plan_corpus(CorpusConfig(corpus=str(corpus), unit_rows=4))
    assert len(plan.units) > 20
    inline = plan.to_dict()
    assert [Unit(**u) for u in inline["units"]] == plan.units and "unit_starts" not in inline  # small: as before
    monkeypatch.setattr(corpus_mod, "PLAN_INLINE_UNITS", 5)
    compact = json.loads(json.dumps(plan.to_dict()))
    assert "units" not in compact and sum(len(v) for v in compact["unit_starts"].values()) == len(plan.units)
    assert CorpusPlan.from_dict(compact).units == plan.units
    assert CorpusPlan.from_dict(inline).units == plan.units  # plans written before the compact form
    assert len(json.dumps(compact["unit_starts"])) * 5 < len(json.dumps(inline["units"]))


def test_units_the_compact_form_cannot_say_stay_inline():
    files = [CorpusFile("a.parquet", 10, (10,), "fp", 1)]
    odd = [Unit("custom-id", "a.parquet", 0, 10)]  # not the <file tag>-<start> id the planner gives
    assert unit_starts(files, odd) is None
    gap = units_from_starts(files, {"a.parquet": [0, 6]})[:1]  # rows 6..10 missing
    assert unit_starts(files, gap) is None
    assert unit_starts(files, units_from_starts(files, {"a.parquet": [0, 6]})) == {"a.parquet": [0, 6]}


def test_a_run_resumes_from_a_compact_plan_with_identical_outputs(corpus, tmp_path, monkeypatch):
    def cfg(store: str) -> EmbedJobConfig:
        return EmbedJobConfig.from_flat({"corpus": str(corpus), "store": store, "model": "hash:16",
                                         "unit_rows": 4, "run_id": "r"})

    inline = run_locally(cfg(str(tmp_path / "inline")))
    monkeypatch.setattr(corpus_mod, "PLAN_INLINE_UNITS", 5)
    compact = run_locally(cfg(str(tmp_path / "compact")))
    plan = json.loads((tmp_path / "compact" / state_key("r", "plan.json")).read_text())
    assert "unit_starts" in plan and "units" not in plan
    again = run_locally(cfg(str(tmp_path / "compact")))  # a rerun reads the saved (compact) plan
    assert again["units"]["done_before_this_attempt"] == again["units"]["total"] == inline["units"]["total"]
    assert compact["counts"] == inline["counts"] and compact["counts"]["rejected"] == 1
    for kind in ("chunks", "embeddings", "rejects"):
        assert [o["sha256"] for o in compact["outputs"][kind]] == [o["sha256"] for o in inline["outputs"][kind]]


def test_units_pickle_with_slots():
    u = Unit("t-0000000000", "a.parquet", 0, 5)
    assert pickle.loads(pickle.dumps(u)) == u and u.rows == 5


def test_id_partitions_are_balanced_deterministic_and_type_blind():
    ids = pa.array([f"doc{i:09d}" for i in range(40_000)], pa.large_string())
    parts = string_partitions(ids, 7)
    counts = np.bincount(parts, minlength=7)
    assert counts.min() > 0.9 * counts.mean() and counts.max() < 1.1 * counts.mean()  # sequential ids spread
    # the same partitions in another process (Ray tasks on other nodes compute them independently)
    code = ("import pyarrow as pa; from engine.embed.dedup import string_partitions; "
            "print(string_partitions(pa.array([f'doc{i:09d}' for i in range(40000)], pa.large_string()), 7).tolist())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert json.loads(other.stdout) == parts.tolist()
    # integer ids partition as their decimal strings (the one-dict reader compares str(v)); nulls are skipped
    as_int = partition_ids(0, pa.array([5, None, 17, 5]), 3)
    as_str = partition_ids(0, pa.array(["5", None, "17", "5"]), 3)
    assert [t.to_pylist() for t in as_int] == [t.to_pylist() for t in as_str]
    assert sorted(r for t in as_int for r in t.column("row").to_pylist()) == [0, 2, 3]
    assert string_partitions(pa.array(["", "a", ""], pa.large_string()), 3).tolist()[0] == \
        string_partitions(pa.array(["", "a", ""], pa.large_string()), 3).tolist()[2]

