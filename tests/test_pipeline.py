"""The embed job's stages without Ray: outputs, manifest, readers, resume, refusals."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest

from engine.core.errors import ConfigError
from engine.embed.config import EmbedJobConfig
from engine.embed.pipeline import run_locally
from tests.corpus_utils import make_docs, write_corpus


def cfg_for(tmp_path, **kw) -> EmbedJobConfig:
    flat = {"corpus": str(tmp_path / "corpus"), "store": str(tmp_path / "store"), "model": "hash:24",
            "chunk_tokens": 40, "chunk_overlap": 8, "unit_rows": 16}
    flat.update(kw)
    return EmbedJobConfig.from_flat(flat)


@pytest.fixture
def corpus(tmp_path):
    docs = make_docs(60, seed=1)
    docs[5]["text"] = ""  # a reject
    docs[9]["doc_id"] = docs[8]["doc_id"]  # a duplicate
    return write_corpus(tmp_path / "corpus", docs, files=2)


def load_embeddings(store: str, run_id: str) -> pd.DataFrame:
    files = sorted(glob.glob(os.path.join(store, "runs", run_id, "embeddings", "*.parquet")))
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


def test_outputs_manifest_and_counts(tmp_path, corpus):
    cfg = cfg_for(tmp_path)
    m = run_locally(cfg)
    assert m["status"] == "succeeded"
    c = m["counts"]
    assert c["input_rows"] == 60 and c["accepted"] == 58 and c["rejected"] == 2
    assert m["rejects"]["by_reason"] == {"empty_text": 1, "duplicate_id": 1}
    df = load_embeddings(cfg.store, m["run_id"])
    assert len(df) == c["chunks"] and df["chunk_id"].is_unique
    assert set(df["doc_id"]) == {d for d in df["doc_id"]} and df["doc_id"].nunique() == 58
    vecs = np.stack(df["embedding"].to_numpy())
    assert vecs.shape == (c["chunks"], 24)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    assert (df["n_tokens"] <= 512).all()
    # manifest: model identity, outputs with sha256 + rows, config, inputs
    assert m["model"]["name"] == "hash:24" and m["dim"] == 24
    assert sum(o["rows"] for o in m["outputs"]["embeddings"]) == c["chunks"]
    from engine.core.storage import sha256_file

    for o in m["outputs"]["embeddings"] + m["outputs"]["chunks"] + m["outputs"]["rejects"]:
        assert sha256_file(os.path.join(cfg.store, o["key"])) == o["sha256"]
    assert m["config"]["chunk"]["chunk_tokens"] == 40 and len(m["inputs"]) == 2
    assert m["identity"] and m["engine_version"]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_embeddings_readable_by_polars_and_duckdb(tmp_path, corpus, dtype):
    cfg = cfg_for(tmp_path, output_dtype=dtype)
    m = run_locally(cfg)
    pattern = os.path.join(cfg.store, "runs", m["run_id"], "embeddings", "*.parquet")
    pl_df = pl.read_parquet(pattern)
    assert pl_df.height == m["counts"]["chunks"]
    assert pl_df["embedding"].dtype.shape == (24,) if hasattr(pl_df["embedding"].dtype, "shape") else True
    rows = duckdb.sql(f"select count(*), count(distinct chunk_id), len(first(embedding)) from '{pattern}'").fetchall()[0]
    assert rows == (m["counts"]["chunks"], m["counts"]["chunks"], 24)
    rejects = duckdb.sql(
        f"select reason from '{os.path.join(cfg.store, 'runs', m['run_id'], 'rejects', '*.parquet')}' order by 1"
    ).fetchall()
    assert rejects == [("duplicate_id",), ("empty_text",)]


def test_rerun_is_a_noop_and_resume_redoes_only_missing_units(tmp_path, corpus):
    cfg = cfg_for(tmp_path)
    first = run_locally(cfg)
    run_dir = os.path.join(cfg.store, "runs", first["run_id"])
    before = {p: Path(p).read_bytes() for p in glob.glob(f"{run_dir}/*/*.parquet")}
    # simulate a crash that lost two units: their commits and one part are gone
    markers = sorted(glob.glob(f"{run_dir}/_state/done/*.json"))
    for mk in markers[:2]:
        unit = os.path.basename(mk)[:-5]
        os.remove(mk)
        os.remove(f"{run_dir}/embeddings/part-{unit}.parquet")
    again = run_locally(cfg)
    assert again["run_id"] == first["run_id"] and again["attempts"] == 2
    assert again["units"]["done_before_this_attempt"] == len(markers) - 2
    after = {p: Path(p).read_bytes() for p in glob.glob(f"{run_dir}/*/*.parquet")}
    assert after == before  # byte-for-byte identical parts
    assert again["counts"] == first["counts"]
    assert again["outputs"] == first["outputs"]


def test_same_run_id_with_other_config_is_refused(tmp_path, corpus):
    run_locally(cfg_for(tmp_path, run_id="r1"))
    with pytest.raises(ConfigError, match="different config"):
        run_locally(cfg_for(tmp_path, run_id="r1", chunk_tokens=50))


def test_changed_corpus_under_same_run_is_refused(tmp_path, corpus):
    run_locally(cfg_for(tmp_path, run_id="r2"))
    write_corpus(tmp_path / "corpus", make_docs(61, seed=2), files=2)
    with pytest.raises(ConfigError, match="corpus changed"):
        run_locally(cfg_for(tmp_path, run_id="r2"))


def test_unknown_config_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown config keys.*chunk_size"):
        EmbedJobConfig.from_flat({"corpus": "x", "store": "y", "chunk_size": 3})


def test_metadata_columns_are_carried(tmp_path, corpus):
    m = run_locally(cfg_for(tmp_path))
    df = load_embeddings(str(tmp_path / "store"), m["run_id"])
    assert (df["lang"] == "en").all()
    row = df.iloc[0]
    src = json.dumps(row["title"])
    assert "report" in src
