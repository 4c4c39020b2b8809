"""Evaluation: query and qrels files, metrics of a version beside exact search, the per-query file,
and (when ../shared/data/cranfield is present) the Cranfield benchmark with the packaged MiniLM."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from engine.cli.app import cli
from engine.core.errors import ConfigError, SchemaError
from engine.core.storage import open_store
from engine.embed.encoders import load_encoder
from engine.index.build import build_index
from engine.index.params import BuildConfig
from engine.index.searcher import Searcher
from engine.quality.evaluate import EvalConfig, evaluate_searcher, evaluate_version
from engine.quality.judgments import load_qrels, load_queries
from tests.index_utils import make_run

DIM = 64
TOPICS = ["wing lift drag", "shock wave supersonic", "heat transfer plate", "boundary layer turbulent",
          "panel flutter vibration", "nozzle jet flow"]


def write(path, text):
    path.write_text(text)
    return path


def test_load_queries_and_qrels(tmp_path):
    q = load_queries(write(tmp_path / "q.jsonl", '{"query_id": 1, "text": "a"}\n\n{"_id": "2", "query": "b"}\n'))
    assert [(x.query_id, x.text) for x in q] == [("1", "a"), ("2", "b")]
    with pytest.raises(SchemaError, match="duplicate"):
        load_queries(write(tmp_path / "d.jsonl", '{"query_id": 1, "text": "a"}\n{"query_id": 1, "text": "b"}\n'))
    with pytest.raises(SchemaError, match="needs 'query_id'"):
        load_queries(write(tmp_path / "m.jsonl", '{"text": "a"}\n'))
    with pytest.raises(ConfigError, match="cannot read"):
        load_queries(tmp_path / "absent.jsonl")
    qrels = write(tmp_path / "qrels.tsv", "query_id\tdoc_id\tgrade\n1\tA\t1\n1\tB\t4\n1\tC\t-1\n2\tA\t2\n")
    assert load_qrels(qrels) == {"1": {"A": 4.0, "B": 1.0}, "2": {"A": 3.0}}  # cranfield: 5 - grade
    assert load_qrels(qrels, "binary") == {"1": {"A": 1.0, "B": 1.0}, "2": {"A": 1.0}}
    assert load_qrels(qrels, "linear") == {"1": {"A": 1.0, "B": 4.0}, "2": {"A": 2.0}}
    with pytest.raises(ConfigError, match="gain"):
        load_qrels(qrels, "exp")
    with pytest.raises(SchemaError, match="header"):
        load_qrels(write(tmp_path / "nohdr.tsv", "1\tA\t1\n"))
    with pytest.raises(SchemaError, match="expected"):
        load_qrels(write(tmp_path / "bad.tsv", "query_id\tdoc_id\tgrade\n1\tA\thigh\n"))


@pytest.fixture
def bench(tmp_path):
    """Docs about topics (3 chunks each), queries per topic, graded judgments."""
    enc = load_encoder(f"hash:{DIM}")
    rng = np.random.default_rng(1)
    texts, cids, dids = [], [], []
    for d in range(60):
        topic = TOPICS[d % len(TOPICS)]
        for c in range(3):
            texts.append(" ".join(topic.split() + list(rng.choice(["the", "of", "data", "method", "model", "test"], 8))))
            cids.append(f"doc{d:02d}#{c}")
            dids.append(f"doc{d:02d}")
    store = open_store(tmp_path / "store")
    make_run(store, "r1", enc.encode_passages(texts), parts=2, model=enc.identity, chunk_ids=cids, doc_ids=dids)
    queries = [{"query_id": str(i), "text": t} for i, t in enumerate(TOPICS)] + [{"query_id": "99", "text": "x"}]
    write(tmp_path / "q.jsonl", "".join(json.dumps(q) + "\n" for q in queries))
    lines = ["query_id\tdoc_id\tgrade"]
    for i in range(len(TOPICS)):
        for d in range(i, 60, len(TOPICS)):
            lines.append(f"{i}\tdoc{d:02d}\t{1 + d % 4}")
    write(tmp_path / "qrels.tsv", "\n".join(lines) + "\n")
    return store, tmp_path


def test_flat_index_equals_exact_search(bench):
    store, tmp = bench
    res = build_index(store, "r1", "docs", BuildConfig(kind="flat"))
    out = tmp / "per-query.jsonl"
    s = evaluate_version(store, "docs", res.version_id, tmp / "q.jsonl", tmp / "qrels.tsv", EvalConfig(k=10),
                         per_query_path=out)
    m = s["metrics"]
    assert s["evaluated"] == len(TOPICS) and s["skipped_no_judgments"] == 1
    assert m["index"] == m["exact"]  # flat is exact
    assert all(v == pytest.approx(1.0) for v in m["retained"].values()) and m["recall_vs_exact@10"] == 1.0
    assert m["index"]["mrr@10"] == 1.0 and 0.5 < m["index"]["ndcg@10"] <= 1.0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(TOPICS) + 1 and rows[-1]["skipped"]
    assert set(rows[0]) >= {"query_id", "text", "relevant", "index", "exact", "recall_vs_exact@10"}
    assert len(rows[0]["index"]["docs"]) == 10 and len(set(rows[0]["index"]["docs"])) == 10  # collapsed to docs


def test_quantized_index_shows_its_cost(bench):
    store, tmp = bench
    res = build_index(store, "r1", "docs", BuildConfig(kind="binary-rerank"))
    with Searcher.load(store, "docs", res.version_id) as searcher:
        s = evaluate_searcher(searcher, load_queries(tmp / "q.jsonl"), load_qrels(tmp / "qrels.tsv"),
                              EvalConfig(k=5, rescore_multiplier=1), store=store)
        full = evaluate_searcher(searcher, load_queries(tmp / "q.jsonl"), load_qrels(tmp / "qrels.tsv"),
                                 EvalConfig(k=5, exact=False), store=store)
    assert set(s["metrics"]) == {"index", "exact", "retained", "recall_vs_exact@5"}
    assert 0.0 <= s["metrics"]["recall_vs_exact@5"] <= 1.0
    assert "exact" not in full["metrics"]


def test_cli_evaluate_json(bench, monkeypatch):
    store, tmp = bench
    res = build_index(store, "r1", "docs", BuildConfig(kind="flat"))
    monkeypatch.chdir(tmp)
    r = CliRunner().invoke(cli, ["evaluate", "--store", str(tmp / "store"), "--index", "docs", "--version", "latest",
                                 "--queries", str(tmp / "q.jsonl"), "--qrels", str(tmp / "qrels.tsv"), "-k", "5",
                                 "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["version"] == res.version_id and out["k"] == 5 and "ndcg@5" in out["metrics"]["index"]
    assert (tmp / f"eval-docs-{res.version_id}.jsonl").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_cranfield_minilm(cranfield_dir, tmp_path):
    """The standard benchmark: exact nDCG@10 ~ 0.383; binary+rerank keeps >= 97% of it."""
    docs = [json.loads(line) for line in (cranfield_dir / "corpus.jsonl").read_text().splitlines()]
    enc = load_encoder(None)
    vecs = enc.encode_passages([f"{d['title']} {d['text']}" for d in docs])
    store = open_store(tmp_path / "store")
    make_run(store, "cran", vecs, parts=2, model=enc.identity, chunk_ids=[d["doc_id"] for d in docs],
             doc_ids=[d["doc_id"] for d in docs])
    res = build_index(store, "cran", "cranfield", BuildConfig(kind="binary-rerank"))
    with Searcher.load(store, "cranfield", res.version_id, encoder=enc) as s:
        out = evaluate_searcher(s, load_queries(cranfield_dir / "queries.jsonl"),
                                load_qrels(cranfield_dir / "qrels.tsv"), EvalConfig(k=10), store=store)
    m = out["metrics"]
    assert out["evaluated"] == 225
    assert m["exact"]["ndcg@10"] == pytest.approx(0.383, abs=0.01)
    assert m["retained"]["ndcg@10"] >= 0.97
