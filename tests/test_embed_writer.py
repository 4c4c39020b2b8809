"""The embed stage split: actors only compute, writer tasks commit; codecs; the stand-in encoder; a quiet CLI."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from engine.embed.config import EmbedJobConfig
from engine.embed.pipeline import run_locally
from tests.conftest import REPO
from tests.corpus_utils import make_docs, write_corpus
from tests.test_embed_job import flat


@pytest.mark.ray
@pytest.mark.slow
def test_writer_killed_between_part_and_commit_is_retried_byte_identical(ray_session, tmp_path, monkeypatch):
    from engine.distributed.embed import run_embed_job

    write_corpus(tmp_path / "corpus", make_docs(64, seed=8))
    flag = tmp_path / "writer-crashed.flag"
    monkeypatch.setenv("EMBEDCTL_TEST_CRASH_IN_WRITE_ONCE", str(flag))
    m = run_embed_job(EmbedJobConfig.from_flat(flat(tmp_path, "ray")))
    assert flag.exists(), "the writer fault hook never fired: the test proved nothing"
    monkeypatch.delenv("EMBEDCTL_TEST_CRASH_IN_WRITE_ONCE")
    ref = run_locally(EmbedJobConfig.from_flat(flat(tmp_path, "local")))
    assert m["status"] == "succeeded" and m["counts"] == ref["counts"]
    assert [o["sha256"] for o in m["outputs"]["embeddings"]] == [o["sha256"] for o in ref["outputs"]["embeddings"]]
    up = m["timings"]["start_up"]
    assert {"plan_s", "ray_init_s", "first_unit_done_s", "model_load_s"} <= set(up)
    assert m["timings"]["write_worker_seconds"] > 0


def test_embedding_parts_store_vectors_plain_and_stay_readable(tmp_path):
    write_corpus(tmp_path / "corpus", make_docs(20, seed=9))
    m = run_locally(EmbedJobConfig.from_flat(flat(tmp_path, "store", unit_rows=64)))
    (path,) = glob.glob(str(tmp_path / "store" / "runs" / m["run_id"] / "embeddings" / "*.parquet"))
    meta = pq.ParquetFile(path).metadata.row_group(0)
    codecs = {meta.column(i).path_in_schema: meta.column(i).compression for i in range(meta.num_columns)}
    assert codecs["embedding.list.element"] == "UNCOMPRESSED" and codecs["text"] == "ZSTD"
    n = m["counts"]["chunks"]
    assert pl.read_parquet(path).height == n
    assert duckdb.sql(f"select count(*) from '{path}'").fetchall()[0][0] == n
    vecs = np.stack(pq.read_table(path).column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_standin_encoder_runs_the_whole_job_with_zero_vectors_of_the_models_shape(tmp_path):
    write_corpus(tmp_path / "corpus", make_docs(30, seed=10))
    m = run_locally(EmbedJobConfig.from_flat(flat(tmp_path, "standin", model="standin:", chunk_tokens=64)))
    real_chunks = run_locally(EmbedJobConfig.from_flat(flat(tmp_path, "real", model=None, chunk_tokens=64)))["counts"]
    assert m["status"] == "succeeded" and m["dim"] == 384 and m["model"]["name"].startswith("standin:")
    assert m["counts"] == real_chunks  # same chunks as the real model: same tokenizer, same rules
    files = glob.glob(str(tmp_path / "standin" / "runs" / m["run_id"] / "embeddings" / "*.parquet"))
    vecs = np.concatenate([np.stack(pq.read_table(f).column("embedding").to_numpy(zero_copy_only=False))
                           for f in files])
    assert vecs.shape == (m["counts"]["chunks"], 384) and not vecs.any()


@pytest.mark.ray
@pytest.mark.slow
def test_cli_output_has_no_ray_chatter(ray_session, tmp_path):
    import ray

    write_corpus(tmp_path / "corpus", make_docs(20, seed=11))
    out = subprocess.run(
        [sys.executable, "-m", "engine.cli.app", "embed", "--corpus", str(tmp_path / "corpus"), "--store",
         str(tmp_path / "store"), "--model", "hash:16", "--address", ray.get_runtime_context().gcs_address],
        capture_output=True, text=True, timeout=180, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for noise in ("constructor arguments", "Progress bars", "ray_remote_args", "Started a local Ray", "core_worker",
                  "logging.cc"):
        assert noise not in out.stderr, out.stderr


def test_start_up_line_counts_the_first_unit_from_the_command_start():
    from engine.cli.embed import start_up_line

    line = start_up_line({"start_up": {"process_s": 0.8, "ray_init_s": 2.0, "first_unit_start_s": 4.5,
                                       "first_unit_embedded_s": 6.0, "first_unit_committed_s": 6.2,
                                       "first_unit_done_s": 6.4}})
    assert "Ray 2.0 s" in line and "embedded at 6.0 s" in line and "committed at 6.2 s" in line
    assert line.endswith("(first unit 5.3 s after the command started)")
    assert start_up_line({}) == ""
