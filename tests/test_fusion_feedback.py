"""Vector pseudo-relevance feedback in hybrid search: its math, the stored vectors it reads per index kind, the
tuned record carrying it as the search default, old records without it, and tuning scoring what search returns."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from engine.cli.app import cli
from engine.core.errors import ConfigError
from engine.core.storage import open_store
from engine.index.build import build_index
from engine.index.feedback import feedback_grid, feedback_queries, stored_vectors
from engine.index.fusion import FusionConfig, default_fusion, save_fusion_record
from engine.index.params import BuildConfig
from engine.index.searcher import Searcher
from engine.index.tuning import HybridLists, tune_version, tuning_grid
from engine.quality.metrics import ndcg_at_k
from tests.index_utils import clustered_vectors, make_run
from tests.test_hybrid import DIM, texts_for

N = 1200


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    """A 2-shard flat version with BM25 shards over N chunks (two chunks per document)."""
    root = tmp_path_factory.mktemp("feedback")
    store = open_store(root / "store")
    x = clustered_vectors(N, DIM, clusters=24, seed=5)
    make_run(store, "r1", x, parts=2, texts=texts_for(N, seed=2))
    res = build_index(store, "r1", "docs", BuildConfig(kind="flat", shards=2, sparse="bm25", gate_recall=None))
    return store, res.version_id, root


def test_feedback_query_is_the_normalised_rocchio_sum():
    q = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]], np.float32)  # the first is normalised too
    table = {7: np.array([0.0, 1.0], np.float32), 9: np.array([0.6, 0.8], np.float32),
             4: np.array([-1.0, 0.0], np.float32)}
    ids = np.array([[7, 9, 4], [-1, -1, -1], [4, -1, 7]])  # row 2: the -1 is skipped, not a stop
    seen = []

    def lookup(i):
        seen.append(i.tolist())
        return np.stack([table[int(j)] for j in i])

    out = feedback_queries(q, ids, FusionConfig(feedback_docs=2, feedback_weight=1.0), lookup)
    # row 0: [1, 0] + mean([0, 1], [0.6, 0.8]) = [1.3, 0.9], normalised; id 4 is past the first 2
    np.testing.assert_allclose(out[0], np.array([1.3, 0.9]) / np.hypot(1.3, 0.9), rtol=1e-6)
    np.testing.assert_allclose(out[1], [0.0, 1.0])  # no fused hit: the query as it was
    # row 2: only id 4 in its first two slots: [1, 0] + [-1, 0] = [0, 0] has no direction, the query stays
    np.testing.assert_allclose(out[2], [1.0, 0.0], atol=1e-7)
    assert seen == [[4, 7, 9]]  # one lookup of the distinct ids
    w2 = feedback_queries(q, ids, FusionConfig(feedback_docs=1, feedback_weight=2.0), lookup)
    np.testing.assert_allclose(w2[0], np.array([1.0, 2.0]) / np.sqrt(5.0), rtol=1e-6)
    off = feedback_queries(q, ids, FusionConfig(), lookup)
    np.testing.assert_allclose(off, q / np.linalg.norm(q, axis=1, keepdims=True))


@pytest.mark.parametrize("build", [dict(kind="flat"), dict(kind="ivfpq", rescore="fp16", nlist=8),
                                   dict(kind="ivfpq", rescore="int8", nlist=8),
                                   dict(kind="ivfpq", rescore="none", nlist=8, pq_m=16, pq_nbits=8)])
def test_stored_vectors_are_the_indexed_vectors(tmp_path, build):
    store = open_store(tmp_path / "store")
    x = clustered_vectors(600, DIM, clusters=8, seed=4)
    make_run(store, "r1", x, parts=2)
    res = build_index(store, "r1", "docs", BuildConfig(shards=2, gate_recall=None, **build))
    with Searcher.load(store, "docs", res.version_id) as s:
        scores, ids = s.search_ids(x[[3, 599, 250, 17]], 5)
        got = stored_vectors(s, ids.ravel())  # [20, dim]
        rows = [int(h.chunk_id[1:]) for hits in s.hits(scores, ids) for h in hits]  # chunk c<i> is x[i]
    exact = x[rows]
    cos = (got * exact).sum(axis=1) / np.linalg.norm(got, axis=1)
    if build.get("rescore", "int8") in ("none", "int8"):  # a PQ or int8 code: close, not equal
        assert (cos > 0.95).all(), cos
    else:
        np.testing.assert_allclose(got, exact, atol=2e-3)


def test_feedback_weight_zero_is_one_pass_and_feedback_changes_the_ranking(version):
    store, vid, _ = version
    queries = texts_for(40, seed=9)
    with Searcher.load(store, "docs", vid) as s:
        plain = s.search(queries, 10, mode="hybrid", collapse_docs=True, fusion=FusionConfig())
        zero = s.search(queries, 10, mode="hybrid", collapse_docs=True,
                        fusion=FusionConfig(feedback_docs=3, feedback_weight=0.0))
        fb = s.search(queries, 10, mode="hybrid", fusion=FusionConfig(feedback_docs=3, feedback_weight=2.0))
        chunks = s.search(queries, 10, mode="hybrid", fusion=FusionConfig())
    assert [[h.chunk_id for h in r] for r in zero] == [[h.chunk_id for h in r] for r in plain]
    assert sum([h.chunk_id for h in a] != [h.chunk_id for h in b] for a, b in zip(fb, chunks, strict=True)) >= 10


def test_tuned_feedback_record_is_the_search_default_and_old_records_load(version):
    store, vid, _ = version
    queries = texts_for(30, seed=3)
    tuned = FusionConfig("weighted", dense_weight=0.7, norm="zscore", feedback_docs=2, feedback_weight=1.0)
    key = save_fusion_record(store, "docs", vid, {"chosen": tuned.to_dict(), "metric": "ndcg@10"})
    try:
        with Searcher.load(store, "docs", vid) as s:
            assert (s.fusion.feedback_docs, s.fusion.feedback_weight) == (2, 1.0)
            default = s.search(queries, 10, mode="hybrid", collapse_docs=True)
            given = s.search(queries, 10, mode="hybrid", collapse_docs=True, fusion=tuned)
            one_pass = s.search(queries, 10, mode="hybrid", collapse_docs=True,
                                fusion=dataclasses.replace(tuned, feedback_docs=0))
            assert s.resolve_fusion("weighted").feedback_docs == 2  # the tuned settings of that method
        ids = [[h.chunk_id for h in r] for r in default]
        assert ids == [[h.chunk_id for h in r] for r in given]
        assert ids != [[h.chunk_id for h in r] for r in one_pass]
    finally:
        store.delete(key)
    old = json.loads(json.dumps({"record_id": "r0", "chosen": {"method": "rrf", "rrf_k": 20, "dense_weight": 0.6,
                                                                 "depth": 100, "source": "tuned"}}))
    cfg = default_fusion(old)  # a record written before feedback existed: one pass, as it was tuned
    assert (cfg.rrf_k, cfg.feedback_docs, cfg.source) == (20, 0, "tuned:r0")


def test_feedback_settings_are_validated():
    with pytest.raises(ConfigError, match="feedback_docs"):
        FusionConfig(feedback_docs=-1).validate()
    with pytest.raises(ConfigError, match="feedback_docs"):
        FusionConfig(depth=10, feedback_docs=11).validate()
    with pytest.raises(ConfigError, match="feedback_weight"):
        FusionConfig.from_dict({"feedback_docs": 2, "feedback_weight": -0.5})


def test_tuning_grid_and_its_scores_are_what_search_returns(version):
    store, vid, _ = version
    base = tuning_grid(50, feedback=False)
    grid = tuning_grid(50)
    assert all(c.feedback_docs == 0 for c in base) and len(grid) == len(base) * 10
    assert {(c.feedback_docs, c.feedback_weight) for c in feedback_grid(base[:1])} == {
        (m, w) for m in (2, 3, 5) for w in (0.5, 1.0, 2.0)}
    queries = texts_for(12, seed=11)
    cfg = FusionConfig("rrf", rrf_k=10, dense_weight=0.6, depth=50, feedback_docs=3, feedback_weight=2.0)
    with Searcher.load(store, "docs", vid) as s:
        lists = HybridLists(s, queries, 50, 10)
        names = s.doc_codes(np.zeros(0, np.int64))[1]
        tuned_docs = [[names[c] for c in row[:10] if c >= 0] for row in lists.fused(cfg, range(12))]
        searched = [[h.doc_id for h in r] for r in s.search(queries, 10, mode="hybrid", collapse_docs=True,
                                                            fusion=cfg)]
    assert tuned_docs == searched


def test_tune_version_chooses_among_feedback_fusions(version):
    store, vid, _ = version
    texts = texts_for(N, seed=2)
    queries = [(f"q{i}", texts[i * 37]) for i in range(24)]
    qrels = {f"q{i}": {f"d{(i * 37) // 2:06d}": 1.0} for i in range(24)}
    with Searcher.load(store, "docs", vid) as s:
        rec = tune_version(s, store, queries, qrels, ndcg_at_k, save=False, depth=40)
        plain = tune_version(s, store, queries, qrels, ndcg_at_k, save=False, depth=40, feedback=False)
    assert rec["benchmark"]["feedback"] is True and plain["chosen"]["feedback_docs"] == 0
    assert len(rec["grid"]) == 10 * len(plain["grid"])
    assert rec["tuned_value"] >= plain["tuned_value"]  # the grid with feedback holds the one without
    assert set(rec["held_out"]) == {"dense", "sparse", "rrf60", "tuned"}


def test_cli_tune_fusion_without_feedback_and_search_feedback_docs(version, tmp_path):
    store, vid, root = version
    texts = texts_for(N, seed=2)
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps({"query_id": f"q{i}", "text": texts[i * 37]})
                                                for i in range(16)))
    (tmp_path / "qrels.tsv").write_text("query_id\tdoc_id\tgrade\n" + "".join(
        f"q{i}\td{(i * 37) // 2:06d}\t1\n" for i in range(16)))
    base = ["--store", str(root / "store"), "--index", "docs", "--version", vid]
    r = CliRunner().invoke(cli, ["tune-fusion", *base, "--queries", str(tmp_path / "q.jsonl"), "--qrels",
                                 str(tmp_path / "qrels.tsv"), "--no-feedback", "--depth", "40", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["chosen"]["feedback_docs"] == 0
    store.delete(out["record"])
    r = CliRunner().invoke(cli, ["search", *base, "-q", "flutter of a panel", "--mode", "hybrid", "--feedback-docs",
                                 "3", "--json"])
    assert r.exit_code == 0, r.output
    fused = json.loads(r.stdout.strip().splitlines()[-1])["fusion"]
    assert (fused["feedback_docs"], fused["source"]) == (3, "given")
    r = CliRunner().invoke(cli, ["search", *base, "-q", "flutter", "--feedback-docs", "3"])
    assert r.exit_code != 0 and "--mode hybrid" in str(r.exception or r.output)
