"""Searcher: text queries through the version's model, refusals of other models and dimensions,
version resolution (ids, latest, aliases), document collapse, knobs, threads, S3 download cache."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from engine.core import layout
from engine.core.errors import ConfigError, IntegrityError, NotFoundError
from engine.core.storage import join, open_store
from engine.embed.encoders import load_encoder
from engine.index.build import build_index
from engine.index.params import BuildConfig
from engine.index.searcher import Hit, Searcher, cache_dir_for
from engine.index.version import resolve_version
from tests.index_utils import brute_force, clustered_vectors, make_run

DIM = 32
TOPICS = ["wing lift drag", "shock wave supersonic", "heat transfer plate", "boundary layer turbulent",
          "panel flutter vibration", "nozzle jet flow", "cylinder buckling stress", "cone pressure mach"]


def text_corpus(n_docs: int = 40, chunks_per_doc: int = 3) -> tuple[list[str], list[str], list[str]]:
    """Chunk texts mixing one topic with filler, and their chunk and doc ids."""
    rng = np.random.default_rng(0)
    texts, cids, dids = [], [], []
    filler = ["the", "of", "and", "a", "results", "method", "experimental", "theory", "data"]
    for d in range(n_docs):
        topic = TOPICS[d % len(TOPICS)]
        for c in range(chunks_per_doc):
            words = topic.split() * (1 + c) + list(rng.choice(filler, size=6))
            texts.append(" ".join(words))
            cids.append(f"doc{d:03d}#{c}")
            dids.append(f"doc{d:03d}")
    return texts, cids, dids


@pytest.fixture
def text_store(tmp_path):
    store = open_store(tmp_path / "store")
    enc = load_encoder(f"hash:{DIM}")
    texts, cids, dids = text_corpus()
    make_run(store, "r1", enc.encode_passages(texts), parts=2, model=enc.identity, chunk_ids=cids, doc_ids=dids)
    res = build_index(store, "r1", "docs", BuildConfig(kind="binary-rerank", shards=2))
    return store, res.version_id


def test_text_search_uses_the_manifest_model(text_store):
    store, vid = text_store
    with Searcher.load(store, "docs", vid) as s:
        assert s.version_id == vid and s.dim == DIM and s.manifest["kind"] == "binary-rerank"
        assert s.encoder.identity["fingerprint"] == f"hash-v1-{DIM}"  # loaded lazily from the manifest
        hits = s.search(["shock wave supersonic", "panel flutter vibration"], k=5)
        assert len(hits) == 2 and all(isinstance(h, Hit) for h in hits[0])
        top = [h.doc_id for h in hits[0]]
        assert all(int(d[3:]) % len(TOPICS) == 1 for d in top[:3])  # docs about shock waves
        assert [h.score for h in hits[0]] == sorted((h.score for h in hits[0]), reverse=True)
        assert s.search([], k=3) == []
        with pytest.raises(ConfigError, match="list of strings"):
            s.search("a bare string")


def test_collapse_docs_keeps_the_best_chunk_per_document(text_store):
    store, vid = text_store
    with Searcher.load(store, "docs", vid) as s:
        chunks = s.search(["heat transfer plate"], k=30)[0]
        docs = s.search(["heat transfer plate"], k=5, collapse_docs=True)[0]
        assert len(docs) == 5 and len({h.doc_id for h in docs}) == 5
        best = {}
        for h in chunks:
            best.setdefault(h.doc_id, h)
        for h in docs:
            assert h == best[h.doc_id]  # the document's best chunk, with its score
        many = s.search(["heat transfer plate"], k=1000, collapse_docs=True)[0]
        assert len(many) == 40  # every document once, no more


def test_other_model_or_dimension_refused(text_store, tmp_path):
    store, vid = text_store
    with pytest.raises(ConfigError, match="16 dimensions"):
        Searcher.load(store, "docs", vid, encoder=load_encoder("hash:16"))
    with Searcher.load(store, "docs", vid) as s:
        with pytest.raises(ConfigError, match="32-dim"):
            s.search_vectors(np.ones((2, 16), np.float32), 3)
        with pytest.raises(ConfigError, match="fingerprint"):
            s.search_vectors(np.ones((1, DIM), np.float32), 3,
                             model={"name": "other-model", "fingerprint": "f" * 64, "dim": DIM})
        with pytest.raises(ConfigError, match="NaN"):
            s.search_vectors(np.full((1, DIM), np.nan, np.float32), 3)
        assert len(s.search_vectors(np.ones(DIM, np.float32), 3)) == 1  # one vector = one query
    # A manifest whose model fingerprint differs from the installed model: queries are refused.
    key = layout.version_manifest_key("docs", vid)
    m = json.loads(store.read_bytes(key))
    m["model"]["fingerprint"] = "0" * 64
    store.write_bytes(key, json.dumps(m).encode())
    with Searcher.load(store, "docs", vid) as s, pytest.raises(ConfigError, match="fingerprint"):
        s.search(["wing lift"])


def test_resolve_version(text_store):
    store, vid = text_store
    assert resolve_version(store, "docs", version=vid) == vid
    assert resolve_version(store, "docs", version="latest") == vid
    store.write_json(layout.alias_key("docs", "live"), {"format": 1, "version": vid, "generation": 1,
                                                        "weighted": {"blue": vid, "green": "v2", "green_weight": 10}})
    assert resolve_version(store, "docs", alias="live") == vid
    with pytest.raises(NotFoundError, match="alias 'blue'"):
        resolve_version(store, "docs", alias="blue")
    with pytest.raises(ConfigError, match="exactly one"):
        resolve_version(store, "docs", version=vid, alias="live")
    with pytest.raises(ConfigError, match="exactly one"):
        resolve_version(store, "docs")
    with pytest.raises(NotFoundError, match="no complete version"):
        resolve_version(store, "nothing", version="latest")
    with pytest.raises(NotFoundError, match="not found"):
        Searcher.load(store, "docs", "v20990101000000-abcdef")


def test_knobs_and_threads(tmp_path):
    store = open_store(tmp_path / "store")
    x = clustered_vectors(3000, DIM, clusters=48, seed=5)
    q = clustered_vectors(64, DIM, clusters=48, seed=5, sample_seed=2)
    make_run(store, "r1", x, parts=2)
    res = build_index(store, "r1", "idx", BuildConfig(nlist=32, shards=3))
    _, truth = brute_force(q, x, 10)

    def recall(hits):
        return np.mean([len({int(h.chunk_id[1:]) for h in hs} & set(t.tolist())) / 10 for hs, t in zip(hits, truth, strict=True)])

    with Searcher.load(store, "idx", res.version_id) as s:
        assert s.default_nprobe == res.manifest["params"]["nprobe"]
        low = recall(s.search_vectors(q, 10, nprobe=1, rescore_multiplier=1))
        high = recall(s.search_vectors(q, 10, nprobe=32, rescore_multiplier=16))
        assert high > low and high >= 0.9
        serial = [s.search_vectors(q[i:i + 1], 10) for i in range(len(q))]
        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(lambda i: s.search_vectors(q[i:i + 1], 10), range(len(q))))
        assert serial == parallel  # a shared searcher answers the same from many threads
        assert s.search_vectors(q, 10) == [r[0] for r in serial]  # and a batch equals single queries
        with pytest.raises(ConfigError):
            s.search_vectors(q, 0)
    s.close()
    with pytest.raises(ConfigError, match="closed"):
        s.search_vectors(q, 3)


@pytest.mark.s3
def test_search_on_both_backends(any_store_uri, tmp_path):
    store = open_store(any_store_uri)
    x = clustered_vectors(800, DIM, seed=9)
    make_run(store, "r1", x, parts=2)
    res = build_index(store, "r1", "idx", BuildConfig(kind="binary-rerank", shards=2))
    cache = tmp_path / "cache"
    with Searcher.load(store, "idx", res.version_id, cache_dir=cache) as s:
        hits = s.search_vectors(x[:20], 1)
        assert [h[0].chunk_id for h in hits] == [f"c{i:06d}" for i in range(20)]
    local = cache_dir_for(store, "idx", res.version_id, cache)
    if any_store_uri.startswith("s3://"):
        shard = local / res.manifest["shards"][0]["files"]["rescore"]
        assert shard.is_file()  # downloaded once, memory-mapped from the cache
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))  # a damaged cache copy is fetched again
        with Searcher.load(store, "idx", res.version_id, cache_dir=cache) as s:
            assert s.search_vectors(x[:1], 1)[0][0].chunk_id == "c000000"
        # a damaged stored object is refused
        key = join(layout.version_prefix("idx", res.version_id), res.manifest["shards"][1]["files"]["index"])
        blob = bytearray(store.read_bytes(key))
        blob[-1] ^= 0xFF
        store.write_bytes(key, bytes(blob))
        with pytest.raises(IntegrityError, match="shard-00001.faiss"):
            Searcher.load(store, "idx", res.version_id, cache_dir=tmp_path / "cache2")
    else:
        assert not local.exists()  # a local store is read in place
