"""Hybrid retrieval: BM25 sparse shards in a version, sparse/hybrid search and fusion, metadata filters inside
the search (exact against brute force), the --where grammar, fusion tuning records, and the rerank stage."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from engine.cli.app import cli, main
from engine.core.errors import ConfigError, IntegrityError
from engine.core.storage import join, open_store
from engine.index.build import build_index
from engine.index.fusion import FusionConfig, fuse, fusion_grid, latest_fusion_record, save_fusion_record
from engine.index.params import BuildConfig
from engine.index.searcher import Searcher
from engine.index.sparse import Bm25Index, tokenize
from engine.index.where import parse_where
from tests.index_utils import brute_force, clustered_vectors, make_run

DIM = 32
WORDS = ["wing", "lift", "shock", "wave", "heat", "transfer", "boundary", "layer", "flutter", "panel", "buckling",
         "nozzle", "turbulent", "laminar", "plate", "cylinder", "pressure", "drag", "vortex", "jet"]


def texts_for(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) for _ in range(n)]


def metadata_for(n: int, seed: int = 1) -> dict[str, pa.Array]:
    rng = np.random.default_rng(seed)
    rare = np.zeros(n, dtype=bool)
    rare[rng.choice(n, size=max(12, n // 150), replace=False)] = True  # < 1% of rows
    return {
        "lang": pa.array(rng.choice(["en", "de", "fr", "es"], size=n, p=[0.5, 0.2, 0.2, 0.1]).tolist(), pa.string()),
        "year": pa.array(rng.integers(1990, 2027, size=n).tolist(), pa.int64()),
        "updated_at": pa.array([f"2025-{m:02d}-01" for m in rng.integers(1, 13, size=n)], pa.string()),
        "flag": pa.array(rare.tolist(), pa.bool_()),
    }


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """A 2-shard flat version with BM25 shards and metadata, over 3000 chunks."""
    root = tmp_path_factory.mktemp("hybrid")
    store = open_store(root / "store")
    n = 3000
    x = clustered_vectors(n, DIM, clusters=40, seed=3)
    make_run(store, "r1", x, parts=3, texts=texts_for(n), columns=metadata_for(n))
    res = build_index(store, "r1", "docs", BuildConfig(kind="flat", shards=2, sparse="bm25", gate_recall=None))
    return store, res, x, root


def test_sparse_shards_are_files_of_the_version(hybrid):
    store, res, _, _ = hybrid
    m = res.manifest
    assert m["sparse"]["kind"] == "bm25" and m["sparse"]["library"].startswith("bm25s==")
    assert [s["rows"] for s in m["sparse"]["shards"]] == [s["rows"] for s in m["shards"]]
    keys = {a["key"]: a for a in m["artifacts"]}
    for shard in m["sparse"]["shards"]:
        for key in shard["files"].values():
            assert key.startswith(f"shards/shard-{shard['shard']:05d}.bm25/") and len(keys[key]["sha256"]) == 64
    assert set(m["metadata"]["columns"]) == {"lang", "year", "updated_at", "flag"}
    # a damaged BM25 file is caught on load, like any other file of the version
    key = m["sparse"]["shards"][0]["files"]["vocab.index.json"]
    path = store.local_path(join(f"indexes/docs/versions/{res.version_id}", key))
    good = path.read_bytes()
    try:
        path.write_bytes(good.replace(b'"', b"'", 1))
        with pytest.raises(IntegrityError, match="corrupt"):
            Searcher.load(store, "docs", res.version_id)
    finally:
        path.write_bytes(good)


def test_sparse_is_a_build_config_key(hybrid):
    from engine.distributed.build_index import BuildJobConfig

    cfg = BuildJobConfig.from_flat({"store": "x", "run": "r", "index": "i", "sparse": "bm25"})
    assert cfg.build.sparse == "bm25" and cfg.build.to_dict()["sparse"] == "bm25"
    with pytest.raises(ConfigError, match="sparse must be one of none, bm25"):
        BuildJobConfig.from_flat({"store": "x", "run": "r", "index": "i", "sparse": "splade"})
    summary = hybrid[1].summary()
    assert summary["sparse"] == {"kind": "bm25", "shards": 2}
    assert summary["filter_columns"] == ["flag", "lang", "updated_at", "year"]


def test_dense_only_versions_are_unchanged(tmp_path):
    store = open_store(tmp_path / "store")
    make_run(store, "r1", clustered_vectors(300, DIM, seed=1), parts=1)
    res = build_index(store, "r1", "docs", BuildConfig(kind="flat"))
    assert "sparse" not in res.manifest and "metadata" not in res.manifest
    assert "sparse" not in res.summary() and "filter_columns" not in res.summary()
    assert "sparse" not in BuildConfig().to_dict()  # the build key of a dense build is what it was
    with Searcher.load(store, "docs", res.version_id) as s:
        with pytest.raises(ConfigError, match="no sparse shards"):
            s.search(["anything"], 3, mode="hybrid")
        assert s.filter.columns() == ["chunk_id", "doc_id"]


def test_sparse_search_matches_bm25s_over_the_shard(hybrid):
    store, res, _, _ = hybrid
    texts = texts_for(3000)
    with Searcher.load(store, "docs", res.version_id) as s:
        hits = s.search(["flutter of a panel"], 10, mode="sparse")[0]
        first = s.sparse_shards[0]
        ref = Bm25Index.build(texts[: first.rows]).scores(tokenize(["flutter of a panel"])[0])
        top = [h for h in hits if int(h.chunk_id[1:]) < first.rows]
        for h in top:
            assert h.score == pytest.approx(float(ref[int(h.chunk_id[1:])]), rel=1e-5)
        assert all("flutter" in texts[int(h.chunk_id[1:])] or "panel" in texts[int(h.chunk_id[1:])] for h in hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_rrf_and_weighted_fusion_by_hand():
    dense = (np.array([[0.9, 0.8, 0.1]], np.float32), np.array([[1, 2, 3]]))
    sparse = (np.array([[7.0, 3.0, -np.inf]], np.float32), np.array([[3, 4, -1]]))
    s, i = fuse(dense, sparse, FusionConfig("rrf", rrf_k=60), 4)
    expect = {1: 0.5 / 61, 2: 0.5 / 62, 3: 0.5 / 63 + 0.5 / 61, 4: 0.5 / 62}
    assert i[0].tolist() == [3, 1, 2, 4]  # 2 and 4 tie: the smaller id first
    assert s[0].tolist() == pytest.approx([expect[j] for j in i[0].tolist()])
    s, i = fuse(dense, sparse, FusionConfig("weighted", dense_weight=0.25), 4)
    # dense normalised: 1, 0.875, 0; sparse: 1, 0
    assert i[0].tolist() == [3, 1, 2, 4] and s[0].tolist() == pytest.approx([0.75, 0.25, 0.21875, 0.0])


def test_weighted_fusion_zscore_by_hand():
    dense = (np.array([[3.0, 2.0, 1.0]], np.float32), np.array([[1, 2, 3]]))
    sparse = (np.array([[10.0, 0.0, -np.inf]], np.float32), np.array([[3, 4, -1]]))
    s, i = fuse(dense, sparse, FusionConfig("weighted", dense_weight=0.5, norm="zscore"), 4)
    # dense z: 1.2247, 0, -1.2247 -> shifted by its worst: 2.4495, 1.2247, 0; sparse z: 1, -1 -> 2, 0
    expect = {1: 0.5 * 2.4494897, 2: 0.5 * 1.2247449, 3: 0.0 + 0.5 * 2.0, 4: 0.0}
    assert i[0].tolist() == [1, 3, 2, 4]
    assert s[0].tolist() == pytest.approx([expect[j] for j in i[0].tolist()], rel=1e-5)
    # a list that misses a document adds what its worst candidate adds (0), not its average
    assert s[0][i[0].tolist().index(4)] == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="norm"):
        FusionConfig("weighted", norm="l2").validate()
    # records written before the norm existed read back as minmax
    assert FusionConfig.from_dict({"method": "weighted", "dense_weight": 0.3}).norm == "minmax"
    assert {c.norm for c in fusion_grid() if c.method == "weighted"} == {"minmax", "zscore"}


def test_hybrid_search_and_collapse(hybrid):
    store, res, x, _ = hybrid
    with Searcher.load(store, "docs", res.version_id) as s:
        assert s.fusion.source == "default" and s.fusion.method == "rrf" and s.fusion.rrf_k == 60
        hits = s.search(["heat transfer boundary layer"], 10, mode="hybrid")[0]
        assert len(hits) == 10 and len({h.chunk_id for h in hits}) == 10
        docs = s.search(["heat transfer boundary layer"], 10, mode="hybrid", collapse_docs=True)[0]
        assert len(docs) == 10 and len({h.doc_id for h in docs}) == 10
        w = s.search(["heat transfer"], 5, mode="hybrid", fusion="weighted")[0]
        assert len(w) == 5 and all(0.0 <= h.score <= 1.0 for h in w)
        dense = s.search(["heat transfer"], 5)[0]
        assert [h.chunk_id for h in dense] == [h.chunk_id for h in s.search(["heat transfer"], 5, mode="dense")[0]]


def test_hybrid_documents_fuse_by_document(hybrid):
    """With --docs a document's rank in each list is its best chunk's, and the two lists fuse by document."""
    store, res, _, _ = hybrid
    from engine.index.retrieve import sparse_ids

    query = "shock wave boundary layer"
    with Searcher.load(store, "docs", res.version_id) as s:
        got = [h.doc_id for h in s.search([query], 10, mode="hybrid", collapse_docs=True)[0]]
        dense = s.hits(*s.search_ids(s.encode_queries([query]), 100, depth_k=10))[0]
        sparse = s.hits(*sparse_ids(s.sparse_shards, [query], 100, None))[0]
    score: dict[str, float] = {}
    for hits in (dense, sparse):
        seen: list[str] = []
        for h in hits:
            if h.doc_id not in seen:
                seen.append(h.doc_id)
        for rank, doc in enumerate(seen, start=1):
            score[doc] = score.get(doc, 0.0) + 0.5 / (60 + rank)
    want = sorted(score, key=lambda d: -score[d])[:10]
    assert [score[d] for d in got] == pytest.approx([score[d] for d in want])


@pytest.mark.parametrize("where", ["flag = TRUE", "lang = 'de' AND year >= 2020", "lang IN ('fr', 'es') OR flag",
                                   "NOT (lang = 'en') AND updated_at < '2025-04-01'", "doc_id = 'd000010'"])
def test_filters_return_exactly_the_top_k_of_the_matching_rows(hybrid, where):
    store, res, x, _ = hybrid
    meta = pa.table(metadata_for(3000))
    meta = meta.append_column("doc_id", pa.array([f"d{i // 2:06d}" for i in range(3000)]))
    allowed = _rows_matching(meta, where)
    assert len(allowed) >= 1
    queries = clustered_vectors(8, DIM, clusters=40, seed=11)
    k = 10
    with Searcher.load(store, "docs", res.version_id) as s:
        assert np.array_equal(s.allowed_ids(where), allowed)
        got = s.search_vectors(queries, k, where=where)
        _, truth = brute_force(queries, x[allowed], min(k, len(allowed)))
        for hits, t in zip(got, truth, strict=True):
            assert len(hits) == min(k, len(allowed))
            assert [int(h.chunk_id[1:]) for h in hits] == allowed[t].tolist()
        sparse = s.search(["wing lift shock"], k, mode="sparse", where=where)[0]
        assert all(int(h.chunk_id[1:]) in set(allowed.tolist()) for h in sparse)
        hyb = s.search(["wing lift shock"], k, mode="hybrid", where=where)[0]
        assert len(hyb) == min(k, len(allowed)) and all(int(h.chunk_id[1:]) in set(allowed.tolist()) for h in hyb)


def _rows_matching(meta: pa.Table, where: str) -> np.ndarray:
    """The reference: rows kept by the filter, evaluated on the metadata in plain Python."""
    cols = {c: meta.column(c).to_pylist() for c in meta.column_names}
    refs = {
        "flag = TRUE": lambda r: r["flag"],
        "lang = 'de' AND year >= 2020": lambda r: r["lang"] == "de" and r["year"] >= 2020,
        "lang IN ('fr', 'es') OR flag": lambda r: r["lang"] in ("fr", "es") or r["flag"],
        "NOT (lang = 'en') AND updated_at < '2025-04-01'": lambda r: r["lang"] != "en" and r["updated_at"] < "2025-04-01",
        "doc_id = 'd000010'": lambda r: r["doc_id"] == "d000010",
    }
    fn = refs[where]
    return np.array([i for i in range(meta.num_rows) if fn({c: v[i] for c, v in cols.items()})], dtype=np.int64)


def test_rare_filter_is_under_one_percent_and_still_fills_k(hybrid):
    store, res, x, _ = hybrid
    with Searcher.load(store, "docs", res.version_id) as s:
        allowed = s.allowed_ids("flag = TRUE")
        assert 10 <= len(allowed) < 0.01 * len(x)


@pytest.mark.parametrize("settings", [{"kind": "ivfpq", "nlist": 32, "pq_m": 8, "nprobe": 1},
                                      {"kind": "binary-rerank"}, {"kind": "binary-rerank", "factory": "BIVF8"}])
def test_filters_inside_approximate_indexes_fill_k(tmp_path, settings):
    store = open_store(tmp_path / "store")
    n = 3000
    x = clustered_vectors(n, DIM, clusters=40, seed=5)
    make_run(store, "r1", x, parts=2, columns=metadata_for(n, seed=9))
    res = build_index(store, "r1", "docs", BuildConfig(shards=2, gate_recall=None, **settings))
    queries = clustered_vectors(6, DIM, clusters=40, seed=12)
    with Searcher.load(store, "docs", res.version_id) as s:
        allowed = s.allowed_ids("flag")
        assert len(allowed) < 0.01 * n
        got = s.search_vectors(queries, 10, where="flag")
        _, truth = brute_force(queries, x[allowed], 10)
        found = [{int(h.chunk_id[1:]) for h in hits} for hits in got]
        assert all(len(f) == 10 and f <= set(allowed.tolist()) for f in found)  # k hits, all matching
        recall = np.mean([len(f & set(allowed[t].tolist())) / 10 for f, t in zip(found, truth, strict=True)])
        assert recall >= 0.8


@pytest.mark.parametrize("bad, message", [
    ("colour = 'red'", "unknown column 'colour'; available columns: chunk_id, doc_id, flag, lang, updated_at, year"),
    ("lang = ", "malformed at position 7: expected a value"),
    ("lang = 'de' AND", "malformed"),
    ("(lang = 'de'", "expected \\)"),
    ("lang == 'de'", "malformed"),
    ("__import__('os').system('true')", "malformed at position 16: unexpected character '.'"),
    ("__import__('os')", "unknown column '__import__'"),
    ("year > 'soon'", "does not fit column 'year'"),
    ("", "needs an expression"),
])
def test_bad_filters_name_the_columns(hybrid, bad, message):
    store, res, _, _ = hybrid
    with Searcher.load(store, "docs", res.version_id) as s:
        with pytest.raises(ConfigError, match=message) as err:
            s.allowed_ids(bad)
        assert all(c in str(err.value) for c in ("chunk_id", "doc_id", "flag", "lang", "updated_at", "year"))
        assert s.filter.columns() == ["chunk_id", "doc_id", "flag", "lang", "updated_at", "year"]


def test_where_grammar():
    schema = {"lang": pa.string(), "year": pa.int64(), "d": pa.date32(), "t": pa.timestamp("us"), "ok": pa.bool_()}
    table = pa.table({"lang": ["de", "en", None], "year": [2020, 2019, 2021],
                      "d": pa.array([0, 20000, 20454], pa.date32()),
                      "t": pa.array([0, 10**15, 1767225600 * 10**6], pa.timestamp("us")), "ok": [True, False, None]})

    def rows(expr: str) -> list[int]:
        mask = table.append_column("i", pa.array([0, 1, 2])).filter(parse_where(expr, schema).expression)
        return mask.column("i").to_pylist()

    assert rows("lang = 'de'") == [0] and rows("lang != 'de'") == [1]  # null compares false
    assert rows("lang IS NULL") == [2] and rows("lang is not null") == [0, 1]
    assert rows("d >= '2026-01-01'") == [2] and rows("t >= '2026-01-01'") == [2]
    assert rows("year IN (2019, 2021) AND NOT ok") == [1] and rows("lang NOT IN ('de')") == [1]
    assert rows("(year > 2019 OR lang = 'en') AND year < 2021") == [0, 1]
    assert rows('"lang" = \'de\'') == [0] and rows("lang = 'it''s'") == []
    assert parse_where("year >= 2020 and lang = 'de'", schema).columns == ("lang", "year")


def test_fusion_record_beside_the_version_is_the_default(hybrid):
    store, res, _, _ = hybrid
    chosen = FusionConfig("rrf", rrf_k=20, dense_weight=0.7).to_dict()
    key = save_fusion_record(store, "docs", res.version_id, {"chosen": chosen, "metric": "ndcg@10"})
    try:
        assert key.startswith(f"indexes/docs/versions/{res.version_id}/fusion/")
        assert latest_fusion_record(store, "docs", res.version_id)["chosen"]["rrf_k"] == 20
        stored = store.read_json(f"indexes/docs/versions/{res.version_id}/manifest.json")
        assert "fusion" not in json.dumps(stored["artifacts"])  # never inside the immutable manifest
        with Searcher.load(store, "docs", res.version_id) as s:
            assert s.fusion.rrf_k == 20 and s.fusion.dense_weight == 0.7 and s.fusion.source.startswith("tuned:")
            assert s.resolve_fusion("weighted").source == "given"
    finally:
        store.delete(key)


def test_tune_fusion_cli_writes_the_record(hybrid, tmp_path):
    store, res, _, root = hybrid
    texts = texts_for(3000)
    queries = [{"query_id": f"q{i}", "text": texts[i * 7]} for i in range(20)]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(q) for q in queries))
    (tmp_path / "qrels.tsv").write_text("query_id\tdoc_id\tgrade\n" + "".join(
        f"q{i}\td{(i * 7) // 2:06d}\t1\n" for i in range(20)))
    r = CliRunner().invoke(cli, ["tune-fusion", "--store", str(root / "store"), "--index", "docs", "--version",
                                 res.version_id, "--queries", str(tmp_path / "q.jsonl"), "--qrels",
                                 str(tmp_path / "qrels.tsv"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["record"].startswith(f"indexes/docs/versions/{res.version_id}/fusion/")
    assert out["tuned_on"] + out["held_out"] == 20 and out["chosen"]["method"] in ("rrf", "weighted")
    assert set(out["held_out_ndcg@10"]) == {"dense", "sparse", "rrf60", "tuned"}
    store.delete(out["record"])


def test_evaluate_compares_modes_side_by_side(hybrid, tmp_path):
    _, res, _, root = hybrid
    texts = texts_for(3000)
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps({"query_id": f"q{i}", "text": texts[i * 11]})
                                                for i in range(12)))
    (tmp_path / "qrels.tsv").write_text("query_id\tdoc_id\tgrade\n" + "".join(
        f"q{i}\td{(i * 11) // 2:06d}\t1\n" for i in range(12)))
    args = ["evaluate", "--store", str(root / "store"), "--index", "docs", "--version", res.version_id, "--queries",
            str(tmp_path / "q.jsonl"), "--qrels", str(tmp_path / "qrels.tsv"), "--per-query",
            str(tmp_path / "pq.jsonl"), "--modes", "dense,sparse,hybrid"]
    r = CliRunner().invoke(cli, [*args, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["modes"]) == {"dense", "sparse", "hybrid"} and "ndcg@10" in out["modes"]["sparse"]
    assert out["modes"]["dense"]["ndcg@10"] == pytest.approx(out["metrics"]["index"]["ndcg@10"])
    assert out["modes"]["sparse"]["recall@10"] > 0.5  # the query is the relevant chunk's own text
    table = CliRunner().invoke(cli, args)
    assert table.exit_code == 0 and "search modes" in table.stdout and "hybrid" in table.stdout


def test_cli_search_modes_filters_and_errors(hybrid, capsys):
    _, res, _, root = hybrid
    base = ["search", "--store", str(root / "store"), "--index", "docs", "--version", res.version_id]
    runner = CliRunner()
    r = runner.invoke(cli, [*base, "-q", "shock wave", "-k", "4", "--mode", "hybrid", "--fusion", "rrf",
                            "--where", "lang = 'de'", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["mode"] == "hybrid" and out["where"] == "lang = 'de'" and out["fusion"]["rrf_k"] == 60
    assert len(out["results"][0]["hits"]) == 4
    with pytest.raises(SystemExit) as exc:
        main([*base, "-q", "x", "--where", "colour = 'red'"])
    assert exc.value.code == 2 and "available columns: chunk_id, doc_id, flag, lang" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([*base, "-q", "x", "--mode", "hybrid", "--threshold", "0.5"])
    assert exc.value.code == 2 and "own calibration" in capsys.readouterr().err


def _tiny_cross_encoder(folder: str) -> None:
    """A random-initialised one-layer BERT cross-encoder with a word-level vocabulary (nothing downloads)."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    os.makedirs(folder, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "of", "a", "the"]
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    BertTokenizerFast(vocab_file=os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    CrossEncoder(folder, device="cpu").save(folder)


@pytest.mark.slow
def test_rerank_with_a_local_cross_encoder(hybrid, tmp_path):
    store, res, _, root = hybrid
    folder = str(tmp_path / "ce")
    _tiny_cross_encoder(folder)
    from sentence_transformers import CrossEncoder

    with Searcher.load(store, "docs", res.version_id) as s:
        plain = s.search(["wing flutter"], 8, mode="hybrid")[0]
        hits = s.search(["wing flutter"], 5, mode="hybrid", rerank=folder, rerank_depth=8)[0]
        assert len(hits) == 5 and {h.chunk_id for h in hits} <= {h.chunk_id for h in plain}
        want = CrossEncoder(folder, device="cpu").predict([["wing flutter", t] for t in
                                                           s.chunk_texts([h.chunk_id for h in plain])])
        best = sorted(zip(want.tolist(), [h.chunk_id for h in plain], strict=True), key=lambda p: -p[0])[:5]
        assert [h.chunk_id for h in hits] == [c for _, c in best]
        assert [h.score for h in hits] == pytest.approx([v for v, _ in best], rel=1e-4)
    r = CliRunner().invoke(cli, ["search", "--store", str(root / "store"), "--index", "docs", "--version",
                                 res.version_id, "-q", "wing flutter", "-k", "3", "--rerank", folder,
                                 "--rerank-depth", "6", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["results"][0]["hits"]) == 3 and out["timings"]["rerank_s"] >= 0


def test_evaluate_breaks_figures_down_by_a_metadata_column(hybrid, tmp_path):
    from engine.index.tuning import compare_by
    from engine.quality.metrics import query_metrics

    store, res, _, root = hybrid
    texts, langs = texts_for(3000), metadata_for(3000)["lang"].to_pylist()
    queries = [(f"q{i}", texts[i * 11]) for i in range(12)]
    qrels = {f"q{i}": {f"d{(i * 11) // 2:06d}": 1.0} for i in range(12)}
    with Searcher.load(store, "docs", res.version_id) as s:
        out = compare_by(s, queries, qrels, query_metrics, "lang", k=10, modes=("dense", "sparse"))
        doc_lang = {f"d{c // 2:06d}": langs[c] for c in range(2999, -1, -1)}  # a document's first chunk's value
        table = s.filter.table()
        chunk_lang = dict(zip(table.column("chunk_id").to_pylist(), table.column("lang").to_pylist(), strict=True))
        expect_q: dict[str, list[str]] = {}
        for qid, gains in qrels.items():
            expect_q.setdefault(doc_lang[next(iter(gains))], []).append(qid)
        assert {v: e["queries"] for v, e in out.items()} == {v: len(q) for v, q in expect_q.items()}
        for value, entry in out.items():  # each value: its queries, searched with the filter, scored by hand
            assert entry["where"] == f"lang = '{value}'"
            mine = [(q, t) for q, t in queries if q in expect_q[value]]
            hits = s.search([t for _, t in mine], 10, collapse_docs=True, where=f"lang = '{value}'")
            assert all(chunk_lang[h.chunk_id] == value for row in hits for h in row)  # inside the filter
            ndcg = np.mean([query_metrics([h.doc_id for h in row], qrels[q], 10)["ndcg@10"]
                            for (q, _), row in zip(mine, hits, strict=True)])
            assert entry["modes"]["dense"]["ndcg@10"] == pytest.approx(ndcg)
            assert set(entry["modes"]) == {"dense", "sparse"}
        with pytest.raises(ConfigError, match="available columns: chunk_id, doc_id, flag, lang"):
            compare_by(s, queries, qrels, query_metrics, "colour")
        with pytest.raises(ConfigError, match="distinct values"):
            compare_by(s, queries, qrels, query_metrics, "chunk_id")
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps({"query_id": q, "text": t}) for q, t in queries))
    (tmp_path / "qrels.tsv").write_text("query_id\tdoc_id\tgrade\n" + "".join(
        f"{q}\t{next(iter(g))}\t1\n" for q, g in qrels.items()))
    args = ["evaluate", "--store", str(root / "store"), "--index", "docs", "--version", res.version_id, "--queries",
            str(tmp_path / "q.jsonl"), "--qrels", str(tmp_path / "qrels.tsv"), "--per-query",
            str(tmp_path / "pq.jsonl"), "--by", "lang"]
    r = CliRunner().invoke(cli, [*args, "--json"])
    assert r.exit_code == 0, r.output
    by = json.loads(r.stdout.strip().splitlines()[-1])["by"]
    assert by["column"] == "lang" and set(by["values"]) == set(out)
    for value, entry in out.items():  # --modes not given: dense only
        assert set(by["values"][value]["modes"]) == {"dense"}
        assert by["values"][value]["modes"]["dense"]["ndcg@10"] == pytest.approx(entry["modes"]["dense"]["ndcg@10"])
    table = CliRunner().invoke(cli, args)
    assert table.exit_code == 0 and "by lang" in table.stdout
