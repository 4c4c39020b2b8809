"""BM25 shards at document granularity: a document's chunks joined (overlap cut by char offsets) into one BM25
row, hits answered by a chunk row of the document (the first one a filter keeps), checksummed like every file."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from engine.cli.app import cli
from engine.core.errors import ConfigError, IntegrityError
from engine.core.storage import join, open_store
from engine.index.build import build_index
from engine.index.params import BuildConfig
from engine.index.retrieve import SparseShard
from engine.index.searcher import Searcher
from engine.index.sparse import ROW_DOC_FILE, Bm25Index, document_texts, tokenize
from tests.index_utils import clustered_vectors, make_run

DIM = 16
WORDS = ["wing", "lift", "shock", "wave", "heat", "transfer", "boundary", "layer", "flutter", "panel", "nozzle",
         "drag", "vortex", "jet", "plate", "cylinder"]
N, PER_DOC = 600, 3  # 200 documents of 3 chunks


def corpus(seed: int = 0) -> tuple[list[str], list[str], list[int], list[int], list[str]]:
    """Per chunk row: (full document text, chunk text, char_start, char_end, lang); chunks overlap by 6 chars."""
    rng = np.random.default_rng(seed)
    docs, chunks, starts, ends, langs = [], [], [], [], []
    for d in range(N // PER_DOC):
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(12, 30))))
        bounds = np.linspace(0, len(text), PER_DOC + 1).astype(int)
        for c in range(PER_DOC):
            a, b = max(0, int(bounds[c]) - 6 * (c > 0)), int(bounds[c + 1])
            docs.append(text)
            chunks.append(text[a:b])
            starts.append(a)
            ends.append(b)
            langs.append(["en", "de"][(d + c) % 2])  # varies inside a document: a filter keeps some chunks of it
    return docs, chunks, starts, ends, langs


@pytest.fixture(scope="module")
def docver(tmp_path_factory):
    """A 2-shard flat version with document-level BM25 shards (shard 0 ends inside document 99)."""
    root = tmp_path_factory.mktemp("docbm25") / "store"
    store = open_store(root)
    docs, chunks, starts, ends, langs = corpus()
    cols = {"char_start": pa.array(starts, pa.int32()), "char_end": pa.array(ends, pa.int32()),
            "lang": pa.array(langs, pa.string())}
    make_run(store, "r1", clustered_vectors(N, DIM, clusters=10, seed=2), parts=2, texts=chunks, columns=cols,
             doc_of=lambda i: i // PER_DOC)
    res = build_index(store, "r1", "docs", BuildConfig(kind="flat", shards=2, sparse="bm25", sparse_granularity="doc",
                                                       gate_recall=None))
    return store, res, docs, root


def test_document_texts_cut_the_overlap_and_keep_the_title_once():
    row_doc, texts = document_texts(["b", "a", "b", "a"], ["T2", "T1", "T2", "T1"],
                                    ["ghij", "abcdef", "cdefgh", "defxyz"], [6, 0, 2, 3], [10, 6, 8, 9])
    assert row_doc.tolist() == [0, 1, 0, 1]  # documents numbered in order of first appearance
    assert texts == ["T2\ncdefghij", "T1\nabcdefxyz"]  # chunks in char order, each from where the last ended
    _, plain = document_texts(["a", "a"], [None, None], ["one", "two"])
    assert plain == ["one\ntwo"]  # no offsets: the chunks joined in row order


def test_build_config_key_and_build_keys():
    assert "sparse_granularity" not in BuildConfig(sparse="bm25").to_dict()  # chunk builds keep their build keys
    assert BuildConfig(sparse="bm25", sparse_granularity="doc").to_dict()["sparse_granularity"] == "doc"
    with pytest.raises(ConfigError, match="needs BM25 shards"):
        BuildConfig.from_dict({"sparse_granularity": "doc"})
    with pytest.raises(ConfigError, match="sparse_granularity must be one of chunk, doc"):
        BuildConfig.from_dict({"sparse": "bm25", "sparse_granularity": "page"})


def test_doc_shards_are_checksummed_files_of_the_version(docver):
    store, res, _, _ = docver
    m = res.manifest
    assert m["sparse"]["granularity"] == "doc"
    arts = {a["key"]: a for a in m["artifacts"]}
    for shard in m["sparse"]["shards"]:
        assert shard["granularity"] == "doc" and len(arts[shard["files"][ROW_DOC_FILE]]["sha256"]) == 64
    key = m["sparse"]["shards"][1]["files"][ROW_DOC_FILE]
    path = store.local_path(join(f"indexes/docs/versions/{res.version_id}", key))
    good = path.read_bytes()
    try:
        path.write_bytes(good[:-4] + b"\x07\x00\x00\x00")
        with pytest.raises(IntegrityError):
            Searcher.load(store, "docs", res.version_id)
    finally:
        path.write_bytes(good)
    entry = dict(m["sparse"]["shards"][0])
    entry["files"] = {k: v for k, v in entry["files"].items() if k != ROW_DOC_FILE}
    with pytest.raises(IntegrityError, match="granularity doc but row_doc.npy is missing"):
        SparseShard(entry, {}, "test")


def test_doc_bm25_scores_whole_documents(docver):
    store, res, docs, _ = docver
    query = "flutter of a panel near the nozzle"
    with Searcher.load(store, "docs", res.version_id) as s:
        first = s.sparse_shards[0]
        hits = s.search([query], 20, mode="sparse")[0]
    # reference: bm25s over shard 0's documents, each its whole original text (a title-less run: the text alone)
    rows = first.rows
    doc_rows: dict[str, list[int]] = {}
    for r in range(rows):
        doc_rows.setdefault(f"d{r // PER_DOC:06d}", []).append(r)
    ref = Bm25Index.build([docs[rs[0]] if len(rs) == PER_DOC else _partial(rs) for rs in doc_rows.values()])
    want = ref.scores(tokenize([query])[0])
    names = list(doc_rows)
    got = {h.doc_id: h for h in hits if int(h.chunk_id[1:]) < rows}
    assert got and len({h.doc_id for h in hits}) == len(hits)  # one hit per document and shard
    for doc, h in got.items():
        assert h.score == pytest.approx(float(want[names.index(doc)]), rel=1e-5)
        assert int(h.chunk_id[1:]) == doc_rows[doc][0]  # the document's first chunk stands for it
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def _partial(rows: list[int]) -> str:
    """A document cut by the shard boundary: its chunks in this shard, overlap cut."""
    _, chunks, starts, ends, _ = corpus()
    return document_texts(["x"] * len(rows), [None] * len(rows), [chunks[r] for r in rows],
                          [starts[r] for r in rows], [ends[r] for r in rows])[1][0]


def test_doc_bm25_filters_return_an_allowed_chunk_and_fill_k(docver):
    store, res, _, _ = docver
    with Searcher.load(store, "docs", res.version_id) as s:
        allowed = set(s.allowed_ids("lang = 'de'").tolist())
        for mode in ("sparse", "hybrid"):
            hits = s.search(["shock wave on a wing"], 15, mode=mode, where="lang = 'de'")[0]
            assert len(hits) == 15
            ids = [int(h.chunk_id[1:]) for h in hits]
            assert all(i in allowed for i in ids)  # never a chunk the filter drops
        docs = s.search(["shock wave on a wing"], 10, mode="hybrid", collapse_docs=True)[0]
        assert len(docs) == 10 and len({h.doc_id for h in docs}) == 10


def test_cli_builds_document_bm25(tmp_path):
    store = open_store(tmp_path / "store")
    _, chunks, _, _, _ = corpus()
    make_run(store, "r1", clustered_vectors(N, DIM, seed=1), parts=1, texts=chunks, doc_of=lambda i: i // PER_DOC)
    runner = CliRunner()
    args = ["build-index", "--store", str(tmp_path / "store"), "--run", "r1", "--index", "docs", "--kind", "flat",
            "--executor", "local", "--no-gate", "--json"]
    bad = runner.invoke(cli, [*args, "--sparse-granularity", "doc"])
    assert isinstance(bad.exception, ConfigError) and "needs BM25 shards" in str(bad.exception)
    ok = runner.invoke(cli, [*args, "--sparse", "bm25", "--sparse-granularity", "doc"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.output.strip().splitlines()[-1])
    version = summary["version"]
    with Searcher.load(store, "docs", version) as s:
        assert s.sparse_shards[0].granularity == "doc" and s.sparse_shards[0].bm25.docs == N // PER_DOC


def test_tune_fusion_folds_and_evaluate_modes_on_document_bm25(docver, tmp_path):
    store, res, docs, root = docver
    queries = [{"query_id": f"q{i}", "text": " ".join(docs[i * 30].split()[:4])} for i in range(20)]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(q) for q in queries))
    (tmp_path / "qrels.tsv").write_text("query_id\tdoc_id\tgrade\n" + "".join(
        f"q{i}\td{(i * 30) // PER_DOC:06d}\t1\n" for i in range(20)))
    base = ["--store", str(root), "--index", "docs", "--version", res.version_id,
            "--queries", str(tmp_path / "q.jsonl"), "--qrels", str(tmp_path / "qrels.tsv"), "--json"]
    runner = CliRunner()
    folds = []
    for fold in ("0", "1"):
        r = runner.invoke(cli, ["tune-fusion", *base, "--split", "0.3", "--fold", fold])
        assert r.exit_code == 0, r.output
        folds.append(json.loads(r.output.strip().splitlines()[-1]))
        assert store.read_json(folds[-1]["record"])["benchmark"]["fold"] == int(fold)
    assert (folds[0]["tuned_on"], folds[0]["held_out"]) == (6, 14)
    assert (folds[1]["tuned_on"], folds[1]["held_out"]) == (14, 6)  # the parts swapped
    r = runner.invoke(cli, ["evaluate", *base, "--modes", "dense,sparse,hybrid", "--no-exact", "--per-query",
                            str(tmp_path / "per-query.jsonl")])  # not into the working folder
    assert r.exit_code == 0, r.output
    modes = json.loads(r.output.strip().splitlines()[-1])["modes"]
    # the vectors are random clusters, the query's words come from its one relevant document
    assert set(modes) == {"dense", "sparse", "hybrid"} and modes["sparse"]["ndcg@10"] > modes["dense"]["ndcg@10"]
    for f in folds:
        store.delete(f["record"])


def test_refresh_rebuilds_with_the_live_granularity(docver):
    """A refresh rebuilds a BM25 version with the live version's build settings: document BM25 stays per document."""
    from engine.refresh.strategy import live_build_config

    store, res, _, _ = docver
    cfg = BuildConfig.from_dict(live_build_config(store, "docs", res.manifest))
    assert (cfg.sparse, cfg.sparse_granularity) == ("bm25", "doc")
