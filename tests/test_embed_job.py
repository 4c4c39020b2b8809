"""The embed job on a real local Ray: parity with the in-process path, worker crash retry, kill -9 resume."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from engine.embed.config import EmbedJobConfig
from engine.embed.pipeline import run_locally
from tests.conftest import REPO
from tests.corpus_utils import make_docs, write_corpus

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def embeddings(store: str, run_id: str) -> pd.DataFrame:
    files = sorted(glob.glob(os.path.join(store, "runs", run_id, "embeddings", "*.parquet")))
    df = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
    return df.sort_values("chunk_id").reset_index(drop=True)


def flat(tmp_path, store: str, **kw):
    d = {"corpus": str(tmp_path / "corpus"), "store": str(tmp_path / store), "model": "hash:24",
         "chunk_tokens": 40, "chunk_overlap": 8, "unit_rows": 16}
    d.update(kw)
    return d


def test_ray_job_equals_in_process_run(ray_session, tmp_path):
    from engine.distributed.embed import run_embed_job

    write_corpus(tmp_path / "corpus", make_docs(80, seed=3), files=3)
    events = []
    m_ray = run_embed_job(EmbedJobConfig.from_flat(flat(tmp_path, "ray")), progress=events.append)
    m_loc = run_locally(EmbedJobConfig.from_flat(flat(tmp_path, "local")))
    assert m_ray["status"] == "succeeded" and m_ray["run_id"] == m_loc["run_id"]
    assert m_ray["counts"] == m_loc["counts"]
    assert [o["sha256"] for o in m_ray["outputs"]["embeddings"]] == [o["sha256"] for o in m_loc["outputs"]["embeddings"]]
    assert sum(1 for e in events if e["event"] == "unit") == m_ray["units"]["total"]
    up = m_ray["timings"]["start_up"]  # where the fixed start went, in order
    assert 0 <= up["first_worker_created_s"] <= up["first_worker_ready_s"] <= up["first_unit_start_s"]
    assert up["first_unit_start_s"] < m_ray["timings"]["wall_seconds"] and up["model_load_s"] >= 0
    # the first unit's own timeline: embedded, committed by a writer, then reported to the driver
    assert up["first_unit_start_s"] <= up["first_unit_embedded_s"] <= up["first_unit_committed_s"]
    assert up["first_unit_committed_s"] <= up["first_unit_done_s"] + 0.01 and up["process_s"] >= 0


def test_relative_paths_work_on_a_ray_started_in_another_folder(ray_session, tmp_path, monkeypatch):
    """Ray workers run in the folder their Ray started in (the repo, for the session's Ray): relative corpus and
    store paths given here must reach them absolute, and the run's id keeps the paths as given."""
    from engine.distributed.embed import run_embed_job

    write_corpus(tmp_path / "corpus", make_docs(40, seed=5), files=2)
    monkeypatch.chdir(tmp_path)
    rel = {**flat(tmp_path, "store"), "corpus": "corpus", "store": "store"}
    m = run_embed_job(EmbedJobConfig.from_flat(rel))
    assert m["status"] == "succeeded" and m["counts"]["accepted"] == 40
    assert os.path.exists(tmp_path / "store" / "runs" / m["run_id"] / "manifest.json")
    assert not os.path.exists(os.path.join(REPO, "store")), "a worker wrote into its own folder"
    assert m["config"]["corpus"]["corpus"] == "corpus"  # recorded as given


def test_worker_killed_mid_unit_is_retried(ray_session, tmp_path, monkeypatch):
    from engine.distributed.embed import run_embed_job

    write_corpus(tmp_path / "corpus", make_docs(64, seed=4))
    flag = tmp_path / "crashed.flag"
    monkeypatch.setenv("EMBEDCTL_TEST_CRASH_ONCE", str(flag))
    m = run_embed_job(EmbedJobConfig.from_flat(flat(tmp_path, "store")))
    assert flag.exists(), "the fault hook never fired: the test proved nothing"
    assert m["status"] == "succeeded" and m["counts"]["accepted"] == 64
    df = embeddings(str(tmp_path / "store"), m["run_id"])
    assert df["chunk_id"].is_unique and len(df) == m["counts"]["chunks"]


@pytest.mark.integration
def test_kill_dash_nine_of_driver_then_rerun_equals_uninterrupted(ray_session, tmp_path):
    """Real model, real SIGKILL of the driver process mid-run, then the same command again."""
    import ray

    docs = make_docs(160, seed=5, min_words=150, max_words=300)
    write_corpus(tmp_path / "corpus", docs)
    cfg = flat(tmp_path, "store", model=None, chunk_tokens=128, chunk_overlap=16, unit_rows=8)
    del cfg["chunk_tokens"]
    cfg["chunk_tokens"] = 128
    (tmp_path / "job.json").write_text(json.dumps(cfg))
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, str(REPO / "jobs" / "embed.py"), "--config", str(tmp_path / "job.json"), "--address", address]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    done_glob = str(tmp_path / "store" / "runs" / "*" / "_state" / "done" / "*.json")
    deadline = time.monotonic() + 240
    while len(glob.glob(done_glob)) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(glob.glob(done_glob))
    assert 3 <= committed < 20, f"kill landed at {committed} of 20 units; the test needs a mid-run kill"

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1].split(" ", 1)[1])
    assert summary["status"] == "succeeded" and summary["attempts"] == 2
    assert summary["units"]["done_before_this_attempt"] >= committed - 1  # only missing work was redone

    # reference: the same config run uninterrupted (in-process, no Ray) into another store
    ref_cfg = dict(cfg, store=str(tmp_path / "ref"))
    ref = run_locally(EmbedJobConfig.from_flat(ref_cfg))
    got = embeddings(cfg["store"], summary["run_id"])
    want = embeddings(ref_cfg["store"], ref["run_id"])
    assert got["chunk_id"].is_unique
    assert list(got["chunk_id"]) == list(want["chunk_id"])
    assert list(got["content_hash"]) == list(want["content_hash"])
    a, b = np.stack(got["embedding"].to_numpy()), np.stack(want["embedding"].to_numpy())
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert summary["counts"] == ref["counts"]


def test_cli_embed_json_summary(ray_session, tmp_path):
    import ray

    write_corpus(tmp_path / "corpus", make_docs(20, seed=6))
    out = subprocess.run(
        [sys.executable, "-m", "engine.cli.app", "embed", "--corpus", str(tmp_path / "corpus"), "--store",
         str(tmp_path / "store"), "--model", "hash:16", "--address", ray.get_runtime_context().gcs_address, "--json"],
        capture_output=True, text=True, timeout=180, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)  # exactly one JSON object on stdout
    assert summary["status"] == "succeeded" and summary["counts"]["accepted"] == 20 and summary["dim"] == 16


def test_cli_schema_error_is_clear_and_early(tmp_path):
    import pyarrow as pa

    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), tmp_path / "corpus" / "x.parquet")
    out = subprocess.run(
        [sys.executable, "-m", "engine.cli.app", "embed", "--corpus", str(tmp_path / "corpus"), "--store",
         str(tmp_path / "store"), "--model", "hash:16"],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert out.returncode == 3
    assert "x.parquet has no column 'doc_id'" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "store").exists()  # nothing started
