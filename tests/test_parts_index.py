"""A run's parts index: every run writes it; a run over the inline limit lists only totals in its manifest,
and every reader (through run_outputs) sees the same parts either way."""

from __future__ import annotations

import pytest

from engine.core.errors import ConfigError
from engine.core.storage import open_store
from engine.embed import parts_index
from engine.embed.config import EmbedJobConfig
from engine.embed.parts_index import parts_index_key, read_markers, read_parts_index, run_outputs
from engine.embed.pipeline import run_locally
from engine.index.runs import read_run
from tests.corpus_utils import make_docs, write_corpus


def _run(tmp_path, store_uri: str) -> dict:
    write_corpus(tmp_path / "corpus", make_docs(60, seed=4, min_words=10, max_words=40), files=2)
    cfg = EmbedJobConfig.from_flat({"corpus": str(tmp_path / "corpus"), "store": store_uri, "model": "hash:8",
                                    "chunk_tokens": 30, "chunk_overlap": 4, "unit_rows": 10})
    return run_locally(cfg)


def test_small_run_inlines_parts_and_still_writes_the_index(tmp_path):
    m = _run(tmp_path, str(tmp_path / "store"))
    store = open_store(str(tmp_path / "store"))
    n = m["units"]["total"]
    assert n >= 4 and len(m["outputs"]["embeddings"]) == n  # inline: existing readers unchanged
    rows = read_parts_index(store, parts_index_key(m["run_id"]))
    assert len(rows) == 3 * n and {r["kind"] for r in rows} == {"chunks", "embeddings", "rejects"}
    assert [r["key"] for r in rows if r["kind"] == "embeddings"] == [o["key"] for o in m["outputs"]["embeddings"]]
    assert all(r["unit"] and r["sha256"] for r in rows)
    assert sum(v["units"] for v in m["nodes"].values()) == n  # outside Ray: one "local" entry


def test_big_run_points_to_the_index_and_readers_follow_it(tmp_path, monkeypatch):
    small = _run(tmp_path, str(tmp_path / "small"))
    monkeypatch.setattr(parts_index, "INLINE_PARTS_LIMIT", 3)
    m = _run(tmp_path, str(tmp_path / "big"))
    store = open_store(str(tmp_path / "big"))
    out = m["outputs"]
    assert "embeddings" not in out and out["parts_index"]["key"] == parts_index_key(m["run_id"])
    assert out["totals"]["embeddings"]["parts"] == m["units"]["total"] > 3
    assert out["totals"]["embeddings"]["rows"] == m["counts"]["chunks"]
    for kind in ("chunks", "embeddings", "rejects"):  # same parts, same bytes, as the inline form
        assert [(o["key"], o["sha256"]) for o in run_outputs(store, m, kind)] == \
            [(o["key"], o["sha256"]) for o in small["outputs"][kind]]
    info = read_run(store, m["run_id"])  # the index reader goes through the same function
    assert [p.sha256 for p in info.parts] == [o["sha256"] for o in small["outputs"]["embeddings"]]
    with pytest.raises(ConfigError, match="parts.parquet"):
        run_outputs(None, m, "embeddings")


def test_older_manifest_without_index_reads_inline(tmp_path):
    legacy = {"run_id": "r", "outputs": {"embeddings": [{"key": "a", "rows": 1, "sha256": "x"}]}}
    assert run_outputs(None, legacy, "embeddings") == [{"key": "a", "rows": 1, "sha256": "x"}]
    assert run_outputs(None, legacy, "chunks") == [] and run_outputs(None, {}, "chunks") == []


def test_markers_read_in_parallel_keep_order(tmp_path):
    store = open_store(str(tmp_path / "s"))
    keys = [f"m/{i:03d}.json" for i in range(40)]
    for i, k in enumerate(keys):
        store.write_json(k, {"i": i})
    assert [m["i"] for m in read_markers(store, keys)] == list(range(40))
