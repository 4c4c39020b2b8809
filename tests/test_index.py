"""Index builds: parameter choice, quantization helpers, recall against brute force, shard merge,
resume after kill -9, the recall gate, checksums, empty and single-vector runs, the manifest contract."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.core import layout
from engine.core.errors import ConfigError, GateError, IntegrityError, NotFoundError
from engine.core.storage import join, open_store, sha256_file
from engine.index.build import build_index
from engine.index.params import BuildConfig, choose_params, parse_bytes
from engine.index.quantize import dequantize_int8, int8_ranges, pack_sign_bits, quantize_int8, rescore_scores
from engine.index.searcher import Searcher
from engine.index.verify import verify_version
from engine.index.version import list_versions
from tests.index_utils import brute_force, clustered_vectors, hash_identity, make_run

REPO = Path(__file__).resolve().parent.parent
DIM = 32


def row_of(hit) -> int:
    return int(hit.chunk_id[1:])


def recall_vs_brute(searcher: Searcher, queries: np.ndarray, corpus: np.ndarray, k: int = 10, **kw) -> float:
    _, truth = brute_force(queries, corpus, k)
    hits = searcher.search_vectors(queries, k, **kw)
    return float(np.mean([len({row_of(h) for h in hs} & set(t.tolist())) / k for hs, t in zip(hits, truth, strict=True)]))


@pytest.fixture
def store(tmp_path):
    return open_store(tmp_path / "store")


@pytest.fixture(scope="module")
def corpus() -> np.ndarray:
    return clustered_vectors(4000, DIM, clusters=64, seed=7)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return clustered_vectors(100, DIM, clusters=64, seed=7, sample_seed=1)


# --- parameters --------------------------------------------------------------------------------


def test_auto_params_scale_with_corpus_and_budget():
    small = choose_params(5_000, 384, BuildConfig())
    assert small.kind == "flat" and any("flat" in r for r in small.reasoning)
    p = choose_params(100_000, 384, BuildConfig())
    assert p.kind == "ivfpq" and p.nlist == 1024  # 4*sqrt(1e5) = 1265 -> 1024
    assert 4 * 100_000 ** 0.5 / 2 <= p.nlist <= 16 * 100_000 ** 0.5
    assert p.factory == "IVF1024,PQ192x4fs" and p.pq_m == 192  # 2 dims per sub-quantizer, 16x
    assert 30 * p.nlist <= p.train_size <= 256 * p.nlist
    assert p.rescore == "int8" and p.rescore_multiplier is None and p.nprobe is None  # tuned by the gate
    big = choose_params(1_000_000, 384, BuildConfig())
    assert big.nlist == 4096 and big.shards == 1
    assert choose_params(1_000_000, 384, BuildConfig(), parallelism=4).shards == 4
    # a budget too small for 192 sub-quantizers picks fewer; far too small is a clear error
    tight = choose_params(1_000_000, 384, BuildConfig(memory_budget=parse_bytes("80MB")))
    assert tight.pq_m < 192 and tight.ram_bytes <= 80e6
    with pytest.raises(ConfigError, match="memory budget"):
        choose_params(1_000_000, 384, BuildConfig(memory_budget=parse_bytes("1MB")))
    # no rescore: the codes must carry the precision -> 1 dim per sub-quantizer (8x)
    assert choose_params(100_000, 384, BuildConfig(rescore="none")).pq_m == 384
    # overrides win and are recorded
    o = choose_params(50_000, 64, BuildConfig(factory="OPQ16,IVF64,PQ16x4fs"))
    assert o.factory == "OPQ16,IVF64,PQ16x4fs" and o.nlist == 64 and o.overrides == {"factory": "OPQ16,IVF64,PQ16x4fs"}
    # a corpus too small for the lists asked for falls back to flat, with the reason
    f = choose_params(20, 64, BuildConfig(nlist=64))
    assert f.kind == "flat" and "cannot train" in " ".join(f.reasoning)
    b = choose_params(3_000, 384, BuildConfig(kind="binary-rerank"))
    assert b.kind == "binary-rerank" and b.factory == "BFlat" and b.ram_bytes == 3_000 * (48 + 8)


def test_config_validation_and_sizes():
    assert parse_bytes("4GB") == 4_000_000_000 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes(None) is None
    with pytest.raises(ConfigError):
        parse_bytes("lots")
    with pytest.raises(ConfigError, match="binary-rerank needs rescore"):
        BuildConfig(kind="binary-rerank", rescore="none").validate()
    with pytest.raises(ConfigError, match="kind"):
        BuildConfig(kind="hnsw").validate()
    with pytest.raises(ConfigError, match="unknown build settings"):
        BuildConfig.from_dict({"nlists": 5})
    with pytest.raises(ConfigError, match="FAISS rejects"):
        choose_params(50_000, 64, BuildConfig(factory="IVF64,Bogus"))


# --- quantization helpers ----------------------------------------------------------------------


def test_quantization_helpers():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 20)).astype(np.float32)
    bits = pack_sign_bits(x)
    assert bits.shape == (50, 3) and bits.dtype == np.uint8
    assert np.array_equal(np.unpackbits(bits, axis=1)[:, :20], (x > 0).astype(np.uint8))  # ubinary, zero-padded
    ranges = int8_ranges(x)
    codes = quantize_int8(x, ranges)
    assert codes.dtype == np.int8
    step = (ranges[1] - ranges[0]) / 255
    assert np.all(np.abs(dequantize_int8(codes, ranges) - x) <= step / 2 + 1e-6)
    q = rng.standard_normal((3, 20)).astype(np.float32)
    cand = np.stack([codes[:7]] * 3)  # [3, 7, 20]
    want = np.einsum("qd,qcd->qc", q, np.stack([dequantize_int8(codes[:7], ranges)] * 3))
    np.testing.assert_allclose(rescore_scores(q, cand, "int8", ranges), want, rtol=1e-4, atol=1e-4)
    half = np.stack([x[:7].astype(np.float16)] * 3)
    np.testing.assert_allclose(rescore_scores(q, half, "fp16", None), np.einsum("qd,qcd->qc", q, half.astype(np.float32)),
                               rtol=1e-5)


# --- recall against brute force ------------------------------------------------------------------


@pytest.mark.parametrize("kind,extra,floor", [
    ("flat", {}, 1.0),
    ("ivfpq", {"nlist": 32}, 0.9),
    ("ivfpq", {"nlist": 32, "rescore": "fp16"}, 0.95),
    ("binary-rerank", {}, 0.9),
    ("binary-rerank", {"factory": "BIVF16"}, 0.85),
])
def test_recall_against_brute_force(store, corpus, queries, kind, extra, floor):
    make_run(store, "r1", corpus, parts=3)
    res = build_index(store, "r1", "idx", BuildConfig(kind=kind, shards=2, **extra))
    m = res.manifest
    assert m["kind"] == kind and m["recall_gate"]["passed"]
    with Searcher.load(store, "idx", res.version_id) as s:
        r = recall_vs_brute(s, queries, corpus)
        assert r >= floor, f"{kind} {extra}: recall {r:.3f} < {floor}"
        if kind == "flat":  # exact: same ids, same scores
            scores, truth = brute_force(queries, corpus, 10)
            hits = s.search_vectors(queries, 10)
            assert [[row_of(h) for h in hs] for hs in hits] == truth.tolist()
            np.testing.assert_allclose([[h.score for h in hs] for hs in hits], scores, atol=1e-5)
    # the gate's figure is an honest estimate of what a user sees
    assert m["recall_gate"]["recall"] >= floor - 0.05


def test_shard_merge_finds_every_chunk_exactly_once(store, corpus):
    n = 600
    vecs = corpus[:n]
    make_run(store, "r1", vecs, parts=4)
    res = build_index(store, "r1", "idx", BuildConfig(kind="flat", shards=5))
    shards = res.manifest["shards"]
    assert [s["rows"] for s in shards] == [120] * 5
    prefix = layout.version_prefix("idx", res.version_id)
    ids = np.concatenate([pq.read_table(store.local_path(join(prefix, s["files"]["ids"]))).column("id").to_numpy()
                          for s in shards])
    assert sorted(ids.tolist()) == list(range(n))  # every chunk in exactly one shard
    with Searcher.load(store, "idx", res.version_id) as s:
        top1 = s.search_vectors(vecs, 1)
        assert [row_of(h[0]) for h in top1] == list(range(n))  # each finds itself across the shard fan-out
        everything = s.search_vectors(vecs[:3], n)
        for hits in everything:
            assert len(hits) == n and len({h.chunk_id for h in hits}) == n  # merged once, no duplicates
            assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))
        assert len(s.search_vectors(vecs[:1], n + 50)[0]) == n


def test_parallel_mapper_matches_sequential(tmp_path, corpus):
    a, b = open_store(tmp_path / "a"), open_store(tmp_path / "b")
    for st in (a, b):
        make_run(st, "r1", corpus, parts=3)
    cfg = BuildConfig(kind="ivfpq", nlist=32, shards=3)
    ra = build_index(a, "r1", "idx", cfg)
    with ThreadPoolExecutor(2) as pool:
        rb = build_index(b, "r1", "idx", cfg, mapper=lambda fn, items: pool.map(fn, items), parallelism=2)
    shas = [{x["key"]: x["sha256"] for x in r.manifest["artifacts"] if x["key"].startswith("shards/")}
            for r in (ra, rb)]
    assert shas[0] == shas[1] and len(shas[0]) == 9  # index, id map, rescore per shard: byte-identical


def test_rerun_reuses_and_force_builds_anew(store, corpus):
    make_run(store, "r1", corpus[:500], parts=2)
    first = build_index(store, "r1", "idx", BuildConfig(kind="flat"))
    again = build_index(store, "r1", "idx", BuildConfig(kind="flat"))
    assert again.reused and again.version_id == first.version_id
    forced = build_index(store, "r1", "idx", BuildConfig(kind="flat"), force=True)
    assert not forced.reused and forced.version_id > first.version_id
    assert forced.manifest["parent_version"] == first.version_id
    assert list_versions(store, "idx") == [first.version_id, forced.version_id]


# --- manifest contract ---------------------------------------------------------------------------


def test_manifest_contract_and_plain_faiss_loading(store, corpus):
    import faiss

    make_run(store, "r1", corpus, parts=2)
    res = build_index(store, "r1", "idx", BuildConfig(kind="binary-rerank", shards=2))
    m = json.loads(store.read_bytes(layout.version_manifest_key("idx", res.version_id)))
    for key in ("version_id", "index", "created_at", "model", "dim", "metric", "kind", "params", "source_run",
                "parent_version", "shards", "artifacts", "recall_gate", "thresholds"):
        assert key in m, key
    assert m["thresholds"] == {} and m["source_run"] == "r1" and m["parent_version"] is None
    assert m["model"]["name"] == f"hash:{DIM}" and m["dim"] == DIM and m["metric"] == "cosine"
    assert m["params"]["reasoning"] and m["recall_gate"]["k"] == 10 and m["recall_gate"]["threshold"] == 0.9
    prefix = layout.version_prefix("idx", res.version_id)
    on_disk = {k[len(prefix) + 1:] for k in store.list(prefix)} - {"manifest.json"}
    listed = {a["key"]: a for a in m["artifacts"]}
    assert set(listed) == on_disk  # every file of the version, and nothing else
    for key, art in listed.items():
        path = store.local_path(join(prefix, key))
        assert art["bytes"] == path.stat().st_size and art["sha256"] == sha256_file(path)
    for sh in m["shards"]:
        assert {"shard", "rows", "files"} <= set(sh) and set(sh["files"]) == {"index", "ids", "rescore"}
        idx = faiss.read_index_binary(str(store.local_path(join(prefix, sh["files"]["index"]))))
        assert idx.ntotal == sh["rows"] and idx.d == DIM
        resc = np.load(store.local_path(join(prefix, sh["files"]["rescore"])), mmap_mode="r")
        assert resc.shape == (sh["rows"], DIM) and resc.dtype == np.int8
        ids = pq.read_table(store.local_path(join(prefix, sh["files"]["ids"])))
        assert ids.column_names == ["id", "chunk_id", "doc_id"] and ids.num_rows == sh["rows"]
    assert verify_version(store, "idx", res.version_id)["version_id"] == res.version_id


def test_ivfpq_files_load_with_plain_read_index(store, corpus):
    import faiss

    make_run(store, "r1", corpus, parts=2)
    res = build_index(store, "r1", "idx", BuildConfig(nlist=32, shards=1))
    prefix = layout.version_prefix("idx", res.version_id)
    sh = res.manifest["shards"][0]
    idx = faiss.read_index(str(store.local_path(join(prefix, sh["files"]["index"]))))
    assert idx.ntotal == len(corpus)
    trained = faiss.read_index(str(store.local_path(join(prefix, res.manifest["files"]["trained"]))))
    assert trained.is_trained and trained.ntotal == 0  # the quantizer, reusable for more adds
    faiss.extract_index_ivf(idx).nprobe = 32
    _, ids = idx.search(corpus[:50], 10)  # global ids: row numbers of the run (PQ alone is coarse here)
    assert ((ids >= 0) & (ids < len(corpus))).all()
    assert np.mean([i in row for i, row in enumerate(ids.tolist())]) > 0.6


# --- the recall gate -------------------------------------------------------------------------------


def test_gate_below_threshold_fails_and_publishes_nothing(store, corpus):
    make_run(store, "r1", corpus, parts=2)
    cfg = BuildConfig(kind="ivfpq", nlist=64, pq_m=2, rescore="none", nprobe=1, gate_recall=0.99)
    with pytest.raises(GateError, match=r"recall@10 = 0\.\d+ .* below --gate-recall 0.99"):
        build_index(store, "r1", "idx", cfg)
    assert list_versions(store, "idx") == []
    assert store.list(join(layout.index_prefix("idx"), "versions")) == []  # nothing left where searchers look
    # without a gate the same index is built, and its recall recorded
    res = build_index(store, "r1", "idx", BuildConfig(kind="ivfpq", nlist=64, pq_m=2, rescore="none", nprobe=1,
                                                      gate_recall=None))
    assert res.manifest["recall_gate"]["passed"] and res.manifest["recall_gate"]["recall"] < 0.99


def test_gate_tunes_nprobe_and_multiplier(store, corpus):
    make_run(store, "r1", corpus, parts=2)
    res = build_index(store, "r1", "idx", BuildConfig(nlist=64))
    params = res.manifest["params"]
    assert params["nprobe"] >= 1 and params["rescore_multiplier"] >= 1
    curve = params["tuning"]["nprobe"]["curve"]
    assert [c["nprobe"] for c in curve] == [1, 2, 4, 8, 16, 32, 64][:len(curve)]
    assert res.manifest["recall_gate"]["nprobe"] == params["nprobe"]


# --- checksums, resume, odd runs ----------------------------------------------------------------


def test_checksum_mismatch_refused(store, corpus):
    make_run(store, "r1", corpus[:800], parts=2)
    res = build_index(store, "r1", "idx", BuildConfig(kind="binary-rerank", shards=2))
    prefix = layout.version_prefix("idx", res.version_id)
    target = store.local_path(join(prefix, res.manifest["shards"][1]["files"]["rescore"]))
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="shard-00001.rescore.npy is corrupt"):
        Searcher.load(store, "idx", res.version_id)
    with pytest.raises(IntegrityError, match="corrupt"):
        verify_version(store, "idx", res.version_id)
    target.write_bytes(bytes(data[:-1]))
    with pytest.raises(IntegrityError, match="bytes; the manifest says"):
        verify_version(store, "idx", res.version_id)
    target.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        verify_version(store, "idx", res.version_id)
    # an artifact key that escapes the version prefix is refused before anything is read
    m = json.loads(store.read_bytes(layout.version_manifest_key("idx", res.version_id)))
    m["artifacts"][0]["key"] = "../../../runs/r1/manifest.json"
    store.write_bytes(layout.version_manifest_key("idx", res.version_id), json.dumps(m).encode())
    with pytest.raises(IntegrityError, match="escapes|plain relative"):
        verify_version(store, "idx", res.version_id)
    with pytest.raises(NotFoundError):
        verify_version(store, "idx", "v-missing")


def test_empty_and_single_vector_runs(store):
    make_run(store, "empty", np.zeros((0, DIM), np.float32), parts=2, model=hash_identity(DIM))
    res = build_index(store, "empty", "e", BuildConfig())
    assert res.manifest["kind"] == "flat" and res.manifest["shards"] == [] and res.manifest["counts"]["vectors"] == 0
    assert res.manifest["artifacts"]  # the build report, at least: a version is never file-less
    with Searcher.load(store, "e", res.version_id) as s:
        assert s.search_vectors(np.ones((2, DIM), np.float32), 5) == [[], []]
        assert s.search_vectors(np.ones((1, DIM), np.float32), 5, collapse_docs=True) == [[]]
    one = clustered_vectors(1, DIM, seed=3)
    make_run(store, "one", one, parts=3)
    for kind in ("ivfpq", "binary-rerank", "flat"):
        r = build_index(store, "one", f"one-{kind}", BuildConfig(kind=kind))
        with Searcher.load(store, f"one-{kind}", r.version_id) as s:
            hits = s.search_vectors(one, 10)
            assert [(h.chunk_id, h.doc_id) for h in hits[0]] == [("c000000", "d000000")]
            assert hits[0][0].score == pytest.approx(1.0, abs=0.02)


def test_fp16_runs_and_unnormalised_input(store, corpus):
    make_run(store, "r16", corpus[:700] * 3.0, parts=2, dtype="float16")  # off unit length, half precision
    res = build_index(store, "r16", "idx", BuildConfig(kind="flat"))
    with Searcher.load(store, "idx", res.version_id) as s:
        hits = s.search_vectors(corpus[:5], 1)
        assert [row_of(h[0]) for h in hits] == [0, 1, 2, 3, 4]
        assert hits[0][0].score == pytest.approx(1.0, abs=1e-2)  # cosine: vectors were renormalised


def test_incomplete_or_missing_run_refused(store, corpus):
    with pytest.raises(NotFoundError, match="run 'nope' not found"):
        build_index(store, "nope", "idx")
    make_run(store, "half", corpus[:100], status="incomplete")
    with pytest.raises(ConfigError, match="not complete"):
        build_index(store, "half", "idx")
    make_run(store, "r1", corpus[:100])
    with pytest.raises(ConfigError, match="invalid index name"):
        build_index(store, "r1", "../escape")


RESUME_SCRIPT = textwrap.dedent("""
    import sys, time
    from engine.index.build import build_index
    from engine.index.params import BuildConfig
    from engine.core.storage import open_store

    store_path, ready = sys.argv[1], sys.argv[2]
    def progress(event):
        if event["event"] == "shard_done" and event["done"] == 2:
            open(ready, "w").write("ok")
            time.sleep(600)  # killed here: two shards committed, two not
    build_index(open_store(store_path), "r1", "idx", BuildConfig(nlist=32, shards=4), progress=progress)
""")


def test_resume_after_kill_9(tmp_path, corpus):
    """A real SIGKILL mid-build; the rerun reuses the trained quantizer and the committed shards
    and ends byte-identical to a build that was never interrupted."""
    store = open_store(tmp_path / "store")
    make_run(store, "r1", corpus, parts=3)
    script = tmp_path / "build.py"
    script.write_text(RESUME_SCRIPT)
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "store"), str(ready)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "the build never reached its second shard"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert list_versions(store, "idx") == []  # no manifest: nothing half-built is visible
    state_key = next(k for k in store.list(layout.index_prefix("idx")) if k.endswith("state.json"))
    state = store.read_json(state_key)
    assert state["status"] == "building" and "trained" in state
    trained_key = join(layout.version_prefix("idx", state["version_id"]), "trained.faiss")
    trained_mtime = store.local_path(trained_key).stat().st_mtime_ns

    events = []
    res = build_index(store, "r1", "idx", BuildConfig(nlist=32, shards=4), progress=events.append)
    assert res.resumed and res.version_id == state["version_id"]
    kinds = [e["event"] for e in events]
    assert "sampled" not in kinds  # no new training sample was read
    assert {k: v for k, v in events[kinds.index("trained")].items()
                                                    if k in ("event", "reused")} == {"event": "trained", "reused": True}
    done = {e["shard"]: e["skipped"] for e in events if e["event"] == "shard_done"}
    assert done == {0: True, 1: True, 2: False, 3: False}
    assert store.local_path(trained_key).stat().st_mtime_ns == trained_mtime  # never retrained

    fresh = open_store(tmp_path / "fresh")
    make_run(fresh, "r1", corpus, parts=3)
    ref = build_index(fresh, "r1", "idx", BuildConfig(nlist=32, shards=4))
    def files(m):
        return {a["key"]: a["sha256"] for a in m["artifacts"] if a["key"] != "build-report.json"}
    assert files(res.manifest) == files(ref.manifest)
    assert res.manifest["recall_gate"]["recall"] == ref.manifest["recall_gate"]["recall"]


def test_resume_retrains_when_its_files_were_collected(store, corpus):
    """A build abandoned long enough for gc to remove its files trains again instead of failing."""
    make_run(store, "r1", corpus, parts=2)

    class Crash(Exception):
        pass

    def crash_after_training(event):
        if event["event"] == "trained":
            raise Crash()

    with pytest.raises(Crash):
        build_index(store, "r1", "idx", BuildConfig(nlist=32, shards=2), progress=crash_after_training)
    state_key = next(k for k in store.list(layout.index_prefix("idx")) if k.endswith("state.json"))
    vid = store.read_json(state_key)["version_id"]
    store.delete_prefix(layout.version_prefix("idx", vid))  # what gc does to an old unpublished build
    events = []
    res = build_index(store, "r1", "idx", BuildConfig(nlist=32, shards=2), progress=events.append)
    assert res.resumed and res.version_id == vid
    assert [e.get("reused") for e in events if e["event"] == "trained"] == [False]
    verify_version(store, "idx", vid)


def test_version_ids_sort_by_creation_time():
    from datetime import datetime, timezone

    from engine.index.version import new_version_id

    t = datetime(2026, 1, 2, 3, 4, 5, 999_999, tzinfo=timezone.utc)
    times = [t.replace(second=s, microsecond=us) for s in (4, 5) for us in (0, 1, 15, 16, 999_998)]
    ids = [new_version_id(x) for x in times]
    assert ids == sorted(ids)
    assert new_version_id(t).startswith("v20260102030405-f423f")
    assert new_version_id(t.replace(microsecond=1)) < new_version_id(t)
