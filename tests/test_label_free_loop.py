"""The label-free loop chained through the CLI on a tiny seeded corpus: embed -> TSDAE -> generate-queries
(loopback chat server) -> mine-negatives -> finetune -> evaluate -> migrate, each step fed the previous
step's output as it is, and the live alias serving the fine-tuned model at the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.chat_server import ChatServer
from tests.corpus_utils import make_docs, write_corpus
from tests.test_finetune import write_bench  # the Cranfield-layout benchmark folder

IDX = "loop"


class Cli:
    """`embedctl <verb> ... --json` in this process (the session's Ray is reused by verbs that start one)."""

    def __init__(self, cwd: Path):
        from click.testing import CliRunner

        self.runner, self.cwd = CliRunner(), cwd

    def __call__(self, *args: str) -> dict[str, Any]:
        from engine.cli.app import cli

        res = self.runner.invoke(cli, [*args, "--json"], catch_exceptions=False)
        assert res.exit_code == 0, f"embedctl {' '.join(args)} exited {res.exit_code}: {res.output[-2000:]}"
        return json.loads(res.stdout)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.ray
def test_label_free_loop_chained_end_to_end(tmp_path, ray_session, monkeypatch):
    monkeypatch.chdir(tmp_path)
    docs = make_docs(30, seed=17, min_words=15, max_words=40)
    write_corpus(tmp_path / "corpus", docs)
    bench = write_bench(tmp_path / "bench", docs, 10)
    run = Cli(tmp_path)
    st = ["--store", str(tmp_path / "store")]

    # 1. unlabelled corpus -> run -> flat index live (hash encoder: the blue model stays cheap)
    # an absolute corpus path: the session's Ray workers run in another folder (a relative one is not resolved
    # before it travels to them; reported to the embed owner)
    emb = run("embed", "--corpus", str(tmp_path / "corpus"), *st, "--model", "hash:32", "--chunk-tokens", "64", "--run-id", "base")
    chunk_ids = set(pq.read_table(next((tmp_path / "store" / "runs" / "base" / "chunks").rglob("*.parquet")),
                                  columns=["chunk_id"]).column("chunk_id").to_pylist())
    built = run("build-index", *st, "--run", emb["run_id"], "--index", IDX, "--kind", "flat")
    blue = built["version"]
    run("publish", *st, "--index", IDX, "--version", blue, "--alias", "live")
    run("benchmark", "build", "--queries", str(bench / "queries.jsonl"), "--qrels", str(bench / "qrels.tsv"),
        "--corpus", str(bench / "corpus.jsonl"), "--out", "bench.json")
    judged = ["--queries", str(bench / "queries.jsonl"), "--qrels", str(bench / "qrels.tsv"), "--gain", "binary",
              "-k", "5", "--no-exact"]
    before = run("evaluate", *st, "--index", IDX, "--alias", "live", *judged, "--per-query", "before.jsonl")

    # 2. TSDAE on the run's chunks
    tsdae = run("finetune", "--objective", "tsdae", *st, "--run", "base", "--out", "model-tsdae", "--batch-size", "4",
                "--max-steps", "1", "--device", "cpu")
    assert tsdae["data"]["source_run"] == "base" and tsdae["data"]["rows_used"] == len(docs)

    # 3. generate-queries through the loopback chat server, on Ray tasks that run in another folder than this
    # one (the session's Ray started elsewhere): relative paths must reach them made absolute
    rel = ["--store", "store"]
    with ChatServer() as srv:
        gen = run("generate-queries", *rel, "--run", "base", "--endpoint", srv.url, "--model", "stand-in", "-n", "2",
                  "--consistency-k", "5", "--out", "pairs.parquet", "--backoff-s", "0.01")
    assert gen["runtime"]["mode"] == "ray" and srv.requests == gen["chunks"]["asked"] == len(chunk_ids)
    assert len(list((tmp_path / "store" / "generate" / "cache").rglob("*.json"))) == len(chunk_ids)  # cached here
    pairs = pq.read_table(tmp_path / "pairs.parquet")
    assert pairs.num_rows == gen["pairs"] > 10 and set(pairs.column("positive_id").to_pylist()) <= chunk_ids

    # 4. mine-negatives takes the pairs file as it is
    mined = run("mine-negatives", *rel, "--index", IDX, "--alias", "live", "--pairs", "pairs.parquet", "--out",
                "triplets.parquet", "--num-negatives", "2", "--range-min", "0", "--relative-margin", "none",
                "--workers", "1")
    assert mined["workers"]["pool"]["mode"] == "ray"
    assert mined["counts"]["pairs"] == gen["pairs"] and mined["counts"]["pairs_unresolved"] == 0
    triplets = pq.read_table(tmp_path / "triplets.parquet")
    assert triplets.num_rows == mined["counts"]["rows"] > 10
    assert set(triplets.column("query").to_pylist()) <= set(pairs.column("query").to_pylist())

    # 5. finetune the TSDAE model on the mined triplets, benchmark before/after
    ft = run("finetune", "--triplets", "triplets.parquet", "--base-model", "model-tsdae", "--out", "model-ft",
             "--batch-size", "4", "--max-steps", "1", "--eval", str(bench), "--device", "cpu")
    assert ft["base_model"]["path"] == str((tmp_path / "model-tsdae").resolve())
    assert ft["data"]["rows_in_file"] == triplets.num_rows and ft["data"]["columns"][:2] == ["query", "positive"]
    assert ft["eval"]["benchmark"]["before"]["queries"] == 10 and "ndcg@10" in ft["eval"]["benchmark"]["after"]

    # 6. migrate the live alias to the fine-tuned model, then evaluate what it serves
    mig = run("migrate", "run", *st, "--index", IDX, "--model", "model-ft", "--benchmark", "bench.json", "--k", "5",
              "--max-recall-drop", "1", "--in-process")  # the gate is tested in test_migrate; here: the hand-over
    assert mig["status"]["status"] == "cut_over" and mig["status"]["phase"] is None, mig["status"]
    assert mig["status"]["blue"]["version"] == blue
    status = run("status", *st, "--index", IDX)
    after = run("evaluate", *st, "--index", IDX, "--alias", "live", *judged, "--per-query", "after.jsonl")
    live = status["aliases"]["live"]
    assert live["weighted"] is None and live["version"] == mig["status"]["green"]["version"] != blue
    assert after["version"] == live["version"] != before["version"]
    manifest = json.loads((tmp_path / "store" / "indexes" / IDX / "versions" / live["version"] / "manifest.json")
                          .read_text())
    assert manifest["model"]["fingerprint"] == ft["fingerprint"]
    assert Path(manifest["model"]["path"]).resolve() == (tmp_path / "model-ft").resolve()


def test_paths_sent_to_ray_workers_are_absolute(tmp_path, monkeypatch):
    from engine.core.storage import absolute_uri
    from engine.mining import MiningJobConfig

    monkeypatch.chdir(tmp_path)
    assert absolute_uri("store") == str(tmp_path / "store") and absolute_uri("~/x").startswith("/")
    assert absolute_uri("s3://b/p") == "s3://b/p" and absolute_uri("file:///a") == "file:///a"
    assert absolute_uri(None) is None
    cfg = MiningJobConfig.from_flat({"store": "s", "run": "r", "pairs": "p.parquet", "out": "o.parquet",
                                     "cache_dir": "c"}).with_absolute_paths()
    assert (cfg.store, cfg.pairs, cfg.out, cfg.runtime.cache_dir) == tuple(
        str(tmp_path / n) for n in ("s", "p.parquet", "o.parquet", "c"))
