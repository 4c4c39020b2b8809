"""`embedctl plan`: extrapolation arithmetic and a sample run with a given throughput."""

from __future__ import annotations

import json
import subprocess
import sys

from engine.embed.config import EmbedJobConfig
from engine.embed.plan import estimate, plan_job
from tests.conftest import REPO
from tests.corpus_utils import make_docs, write_corpus


def test_estimate_arithmetic():
    e = estimate(docs=1000, sample_docs=100, sample_chunks=300, sample_tokens=30000, sample_rejects=0,
                 chunks_per_second=100.0, workers=2, source="given", overhead_seconds=0)
    assert e.chunks_per_doc == 3 and e.est_chunks == 3000 and e.est_tokens == 300000
    assert abs(e.est_wall_hours - 15 / 3600) < 1e-4 and abs(e.est_worker_hours - 30 / 3600) < 1e-4


def test_estimate_accounts_for_rejects():
    e = estimate(docs=1000, sample_docs=100, sample_chunks=90, sample_tokens=900, sample_rejects=10,
                 chunks_per_second=10.0, workers=1, source="given", overhead_seconds=0)
    assert e.reject_rate == 0.1 and e.est_chunks == 900


def test_plan_job_on_sample(tmp_path):
    write_corpus(tmp_path / "c", make_docs(100, seed=9), files=2)
    cfg = EmbedJobConfig.from_flat({"corpus": str(tmp_path / "c"), "store": "unused", "model": "hash:16",
                                    "chunk_tokens": 32, "chunk_overlap": 0})
    e = plan_job(cfg, sample_docs=40, workers=4, throughput=50.0)
    assert e.docs == 100 and e.sample_docs == 40 and e.est_chunks > 100
    measured = plan_job(cfg, sample_docs=40, workers=1)
    assert measured.chunks_per_second_per_worker > 0 and "measured" in measured.throughput_source


def test_plan_cli_json(tmp_path):
    write_corpus(tmp_path / "c", make_docs(30, seed=9))
    out = subprocess.run([sys.executable, "-m", "engine.cli.app", "plan", "--corpus", str(tmp_path / "c"), "--model",
                          "hash:16", "--workers", "3", "--throughput", "100", "--json"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["workers"] == 3 and d["docs"] == 30
