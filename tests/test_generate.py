"""generate-queries against a real chat-completions server on loopback: retries per failure kind, the
cache (rerun and SIGKILL mid-run ask only for the rest), failures counted, pairs that mine-negatives and
finetune read as they are, the key kept out of logs and manifests, Ray tasks, the CLI."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine.core.errors import ConfigError
from engine.embed.config import EmbedJobConfig
from engine.embed.pipeline import run_locally
from engine.generate import (
    ChatClient,
    EndpointError,
    GenerateJobConfig,
    GenerationIncomplete,
    LLMConfig,
    parse_queries,
    run_generation_locally,
)
from engine.generate.client import ChunkFailed, RateLimiter
from tests.chat_server import ChatServer
from tests.corpus_utils import make_docs, write_corpus

EMBEDCTL = str(Path(sys.executable).with_name("embedctl"))
KEY = "sk-test-0123456789abcdef"


@pytest.fixture(scope="module")
def run_store(tmp_path_factory) -> tuple[Path, str, int]:
    """An embed run (hash encoder) of 24 short documents: one chunk each."""
    tmp = tmp_path_factory.mktemp("gen")
    docs = make_docs(24, seed=5, min_words=12, max_words=30)
    write_corpus(tmp / "corpus", docs)
    m = run_locally(EmbedJobConfig.from_flat({"corpus": str(tmp / "corpus"), "store": str(tmp / "store"),
                                              "model": "hash:32", "chunk_tokens": 128}))
    return tmp / "store", m["run_id"], int(m["counts"]["chunks"])


def cfg_for(store: Path, run: str, server: ChatServer, **kw) -> GenerateJobConfig:
    flat = {"store": str(store), "run": run, "endpoint": server.url, "model": "stand-in", "local": True,
            "queries_per_chunk": 2, "backoff_s": 0.01, "max_backoff_s": 0.05, "request_timeout_s": 5,
            "concurrency": 2, **kw}
    return GenerateJobConfig.from_flat(flat)


def llm(server: ChatServer, **kw) -> LLMConfig:
    return LLMConfig(**{"endpoint": server.url, "model": "m", "backoff_s": 0.01, "max_backoff_s": 0.05,
                        "request_timeout_s": 0.5, **kw})


def test_every_failure_kind_is_retried_then_answered():
    with ChatServer(slow_s=1.5) as srv:
        kinds = ["429", "500", "malformed", "truncated", "nochoices", "garbage", "cutoff", "slow"]
        srv.queue(kinds)
        client = ChatClient(llm(srv, max_retries=len(kinds)), None)
        ans = client.ask("Passage:\nwing flutter at supersonic speed")
        client.close()
    assert srv.requests == len(kinds) + 1 and ans.attempts == len(kinds) + 1
    assert ans.retries == {"rate_limited": 1, "server_error": 1, "malformed_response": 2, "connection": 1,
                           "unparseable_output": 2, "timeout": 1}
    assert len(ans.queries) == 3 and all("wing" in q or "flutter" in q or "speed" in q for q in ans.queries[:1])


def test_retries_run_out_fatal_and_rejected_answers():
    with ChatServer() as srv:
        client = ChatClient(llm(srv, max_retries=2), None)
        with pytest.raises(ChunkFailed) as err:
            client.ask("FAIL:500 here")
        assert err.value.reason == "server_error" and srv.requests == 3
        with pytest.raises(ChunkFailed) as err:
            client.ask("FAIL:400 here")
        assert err.value.reason == "rejected_400" and srv.requests == 4  # never retried: same answer again
        with pytest.raises(EndpointError, match="401"):
            client.ask("FAIL:401 here")
        client.close()


def test_parse_queries_forms():
    assert parse_queries('["a b", "c d"]') == ["a b", "c d"]
    assert parse_queries('```json\n{"queries": ["x y"]}\n```') == ["x y"]
    assert parse_queries("1. first query\n2) second one\n- third") == ["first query", "second one", "third"]
    assert parse_queries('["cut off at') is None and parse_queries("  ") is None


def test_rate_limiter_paces_requests():
    lim = RateLimiter(1200)  # one every 50 ms
    t0 = time.perf_counter()
    for _ in range(6):
        lim.acquire()
    assert time.perf_counter() - t0 >= 0.24


def test_generate_pairs_rerun_cached_and_read_by_mining_and_finetune(run_store, tmp_path, monkeypatch, caplog):
    store, run, chunks = run_store
    monkeypatch.setenv("GEN_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    with ChatServer() as srv:
        srv.require_key = KEY
        srv.queue(["429", "truncated"])
        out = tmp_path / "pairs.parquet"
        cfg = cfg_for(store, run, srv, out=str(out), api_key_env="GEN_KEY")
        s = run_generation_locally(cfg)
        first = srv.requests
        again = run_generation_locally(cfg)  # everything cached: nothing asked
        assert srv.requests == first
    assert s["status"] == "succeeded" and s["chunks"]["answered"] == chunks and s["chunks"]["asked"] == chunks
    assert s["requests"]["retries_by_reason"] == {"rate_limited": 1, "connection": 1}
    assert first == chunks + 2
    assert again["chunks"]["asked"] == 0 and again["chunks"]["cached_before"] == chunks
    assert again["pairs"] == s["pairs"]
    q = s["queries"]
    assert q["generated"] == 2 * chunks and q["kept"] + sum(q["dropped"].values()) == q["generated"]
    table = pq.read_table(out)
    assert {"query", "positive", "query_id", "doc_id", "chunk_id", "positive_id", "generator_model"} <= set(
        table.column_names)
    assert table.num_rows == s["pairs"] and set(table.column("generator_model").to_pylist()) == {"stand-in"}
    # the key went in the header, and nowhere else
    assert set(srv.auth) == {f"Bearer {KEY}"}
    texts = [(store / "runs" / s["job_id"] / "manifest.json").read_text(), out.with_suffix(".summary.json")
             .read_text(), caplog.text, json.dumps(s)]
    assert not any(KEY in t for t in texts)
    man = json.loads((store / "runs" / s["job_id"] / "manifest.json").read_text())
    assert man["kind"] == "generate-queries" and man["generator"]["api_key_env"] == "GEN_KEY"
    # mine-negatives and finetune take the file as it is
    from engine.finetune.train import read_triplets, training_columns
    from engine.mining import MiningJobConfig, read_pairs, run_mining_locally

    pairs = read_pairs(str(out))
    assert pairs.pairs == table.num_rows and pairs.columns["positive_id"] == "positive_id"
    assert training_columns(read_triplets(str(out)), None) == ["query", "positive"]
    mined = run_mining_locally(MiningJobConfig.from_flat({
        "store": str(store), "run": run, "pairs": str(out), "out": str(tmp_path / "triplets.parquet"),
        "range_min": 0, "range_max": 10, "num_negatives": 2, "relative_margin": "none",
        "cache_dir": str(tmp_path / "cache")}))
    assert mined["counts"]["rows"] > 0


def test_failed_chunk_is_counted_written_around_and_retried_on_rerun(tmp_path):
    docs = make_docs(6, seed=3, min_words=12, max_words=20)
    docs[2]["text"] += " FAIL:500 marker"
    docs.append({**docs[0], "doc_id": "copy-of-0"})  # the same passage: asked once, its queries deduplicated
    write_corpus(tmp_path / "corpus", docs)
    m = run_locally(EmbedJobConfig.from_flat({"corpus": str(tmp_path / "corpus"), "store": str(tmp_path / "s"),
                                              "model": "hash:16"}))
    with ChatServer() as srv:
        cfg = cfg_for(tmp_path / "s", m["run_id"], srv, max_retries=1)
        with pytest.raises(GenerationIncomplete) as err:
            run_generation_locally(cfg)
        assert err.value.exit_code == 9 and "1 of 7 chunks" in str(err.value)
        assert err.value.summary["status"] == "incomplete" and err.value.summary["chunks"]["failed"] == 1
        assert srv.requests == 5 + 2
        with pytest.raises(GenerationIncomplete):
            run_generation_locally(cfg)  # only the failed chunk is asked again
        assert srv.requests == 7 + 2
    job_id = cfg.job_id()
    man = json.loads((tmp_path / "s" / "runs" / job_id / "manifest.json").read_text())
    c = man["summary"]["chunks"]
    assert man["status"] == "incomplete" and c["failed_by_reason"] == {"server_error": 1}
    assert c["cached_before"] == 6 and c["asked"] == 1 and c["same_passage_as_another"] == 0  # the rerun's view
    assert man["summary"]["queries"]["dropped"]["duplicate"] == 2
    assert [f["reason"] for f in man["failed"]] == ["server_error"]
    assert pq.read_table(tmp_path / "s" / "runs" / job_id / "pairs.parquet").num_rows == 10  # 5 chunks x 2


def test_consistency_filter_counts_what_it_drops(run_store, tmp_path):
    store, run, chunks = run_store
    with ChatServer() as srv:
        s = run_generation_locally(cfg_for(store, run, srv, out=str(tmp_path / "p.parquet"), consistency_k=1))
    c = s["consistency"]
    assert c["k"] == 1 and c["checked"] == s["queries"]["generated"] - sum(
        v for k, v in s["queries"]["dropped"].items() if k != "inconsistent")
    assert s["queries"]["dropped"]["inconsistent"] == c["dropped"] and s["pairs"] == c["checked"] - c["dropped"]


def test_config_refusals(run_store):
    store, run, _ = run_store
    base = {"store": str(store), "run": run, "endpoint": "http://127.0.0.1:1/v1", "model": "m"}
    for bad in ({"endpoint": "localhost:8000"}, {"model": ""}, {"prompt": "no placeholder"},
                {"prompt": "{passage} {other}"}, {"out": "x.csv"}, {"bogus_key": 1}, {"concurrency": 0}):
        with pytest.raises(ConfigError):
            GenerateJobConfig.from_flat({**base, **bad})
    a = GenerateJobConfig.from_flat(base)
    b = GenerateJobConfig.from_flat({**base, "temperature": 0.1})
    c = GenerateJobConfig.from_flat({**base, "endpoint": "http://other:9/v1", "concurrency": 9})
    assert a.llm.settings_id() != b.llm.settings_id() and a.llm.settings_id() == c.llm.settings_id()


def test_ray_tasks_share_the_limits(run_store, tmp_path, ray_session):
    from engine.distributed.generate_queries import plan_tasks, run_generation_job

    store, run, chunks = run_store
    with ChatServer() as srv:
        cfg = cfg_for(store, run, srv, local=False, out=str(tmp_path / "r.parquet"), concurrency=3, tasks=2,
                      requests_per_minute=6000, queries_per_chunk=1)
        plan = plan_tasks(cfg, chunks)
        assert [p[1] for p in plan] == [2, 1] and sum(p[0] for p in plan) == chunks
        assert sum(p[2] for p in plan) == pytest.approx(6000)
        s = run_generation_job(cfg)
        assert srv.requests == chunks
    assert s["runtime"]["tasks"] == 2 and s["chunks"]["answered"] == chunks


def test_sigkill_mid_run_then_rerun_asks_only_for_the_rest(run_store, tmp_path):
    store, run, chunks = run_store
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cache = store / "generate" / "cache"
    old = set(cache.rglob("*.json")) if cache.exists() else set()
    with ChatServer(delay_s=0.15) as srv:
        args = [EMBEDCTL, "generate-queries", "--store", str(store), "--run", run, "--endpoint", srv.url,
                "--model", "killed", "--local", "--concurrency", "1", "--out", str(tmp_path / "k.parquet"),
                "--json"]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while srv.requests < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        before = dict(srv.by_passage)
        cached = len(set(cache.rglob("*.json")) - old)  # answers stored before the kill
        assert 0 < srv.requests < chunks
        srv.delay_s = 0
        p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    s = json.loads(p.stdout)
    assert s["chunks"]["cached_before"] == cached > 0
    assert s["chunks"]["asked"] == chunks - s["chunks"]["cached_before"]
    twice = [k for k, v in srv.by_passage.items() if v > 1]
    assert len(twice) <= 1  # at most the one request in flight at the kill is asked again
    assert all(k in before for k in twice)
    assert s["chunks"]["answered"] + s["chunks"]["cached_before"] == chunks


def test_cli_dry_run_and_config_file(run_store, tmp_path):
    store, run, chunks = run_store
    conf = tmp_path / "gen.yaml"
    conf.write_text(f"store: {store}\nrun: {run}\nendpoint: http://127.0.0.1:9/v1\nmodel: m\nllm:\n  "
                    "queries_per_chunk: 4\nselect:\n  sample: 5\n")
    p = subprocess.run([EMBEDCTL, "generate-queries", "--config", str(conf), "--where", "doc_id <> 'd0000'",
                        "--dry-run"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert plan["selected"] == 5 and plan["to_ask"] == 5
    p = subprocess.run([EMBEDCTL, "generate-queries", "--config", str(conf), "--where", "nope ==", "--dry-run"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--where" in p.stderr and "Traceback" not in p.stderr
