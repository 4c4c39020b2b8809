"""Refresh building blocks in isolation: the config's key space, the in-driver policy, stored-vector lookup,
shard fill, exit codes, the stall test hook, and the human dry run."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from engine.core.errors import ConfigError
from engine.embed.chunking import content_hash
from engine.refresh.config import RefreshConfig, split_refresh_keys
from engine.refresh.index_update import _assign_adds, _assign_adds_fast
from engine.refresh.reuse import VectorLookup, _hash_keys
from engine.refresh.summary import exit_code
from tests.conftest import REPO

BASE = {"corpus": "snap/", "store": "store/", "index": "docs"}


# --------------------------------------------------------------------------------------------
# RefreshConfig.from_flat: the same keys, spellings and errors as the flags
# --------------------------------------------------------------------------------------------


def test_alias_is_shorthand_for_from_alias_and_publish_to_and_explicit_keys_win():
    cfg = RefreshConfig.from_flat({**BASE, "alias": "live"})
    assert (cfg.from_alias, cfg.publish_to) == ("live", "live")
    cfg = RefreshConfig.from_flat({**BASE, "alias": "live", "publish-to": "staging"})
    assert (cfg.from_alias, cfg.publish_to) == ("live", "staging")
    assert RefreshConfig.from_flat(BASE).publish_to is None  # no alias: build only


def test_embed_keys_become_overrides_and_nested_sections_are_flattened():
    cfg = RefreshConfig.from_flat({**BASE, "chunk-tokens": 200, "dim": 64, "device": "cpu", "strategy": None,
                                   "refresh": {"strategy": "rebuild", "lease_wait_s": 30},
                                   "runtime": {"workers": 2}})
    assert cfg.strategy == "rebuild" and cfg.lease_wait_s == 30
    assert cfg.overrides == {"chunk_tokens": 200, "dim": 64, "device": "cpu", "workers": 2}
    assert cfg.to_dict()["overrides"] == cfg.overrides  # what the dry run prints
    own, embed = split_refresh_keys({"corpus": {"corpus": "s3://b/c", "text_column": "body"}, "store": "s",
                                     "index": "i"})
    assert own["corpus"] == "s3://b/c" and embed == {"text_column": "body"}


def test_unknown_and_missing_keys_are_clear_config_errors():
    with pytest.raises(ConfigError) as err:
        RefreshConfig.from_flat({**BASE, "chunk_size": 3})
    msg = str(err.value)
    assert msg.startswith("unknown refresh config keys ['chunk_size']; allowed: ")
    for key in ("alias", "from_alias", "publish_to", "chunk_tokens", "dim", "model", "workers", "lease_ttl_s"):
        assert f" {key}," in msg or msg.endswith(f" {key}"), key
    assert "overrides" not in msg
    with pytest.raises(ConfigError, match=r"^refresh needs corpus, index \(as flags or config keys\)$"):
        RefreshConfig.from_flat({"store": "s"})
    with pytest.raises(ConfigError, match="strategy must be auto, incremental or rebuild"):
        RefreshConfig.from_flat({**BASE, "strategy": "sometimes"})
    with pytest.raises(ConfigError, match="rebuild_fraction must be in"):
        RefreshConfig.from_flat({**BASE, "rebuild_fraction": 2})


def test_where_the_work_runs_follows_executor_and_the_local_limits():
    cfg = RefreshConfig.from_flat({**BASE, "local_max_docs": 100, "local_max_embed": 10})
    assert cfg.chunk_in_driver("auto", 100) and not cfg.chunk_in_driver("auto", 101)
    assert cfg.embed_in_driver("auto", 10) and not cfg.embed_in_driver("auto", 11)
    assert cfg.chunk_in_driver("local", 10**9) and cfg.embed_in_driver("local", 10**9)
    assert not cfg.chunk_in_driver("ray", 0) and not cfg.embed_in_driver("ray", 0)


# --------------------------------------------------------------------------------------------
# small pure pieces
# --------------------------------------------------------------------------------------------


def test_vector_lookup_finds_stored_hashes_and_counts_distinct_misses():
    stored = [content_hash(t) for t in ("wing", "nozzle", "flutter")]
    unseen = [content_hash(t) for t in ("slipstream", "shock")]
    keys = _hash_keys(stored)
    order = np.argsort(keys)
    lookup = VectorLookup("unused", None, ["p0"], keys[order], np.zeros(3, np.int32), order.astype(np.int32), 4)
    assert lookup.contains([stored[0], unseen[0]]).tolist() == [True, False]
    assert lookup.find(stored).tolist() == np.argsort(order).tolist()  # positions in the sorted index
    assert lookup.misses([unseen[0], unseen[0], unseen[1], stored[1]]) == 2  # distinct unseen texts
    assert lookup.misses([]) == 0


def test_added_rows_fill_the_smallest_shards_first():
    assert _assign_adds([10, 4, 7], 5) == [0, 4, 1]
    assert _assign_adds([3, 3], 0) == [0, 0]
    sizes = [50_000, 20_000, 35_000]
    fast = _assign_adds(sizes, 150_000)  # the closed form above 100k rows
    assert sum(fast) == 150_000 and fast == _assign_adds_fast(sizes, 150_000)
    assert max(s + t for s, t in zip(sizes, fast, strict=True)) - min(s + t for s, t in zip(sizes, fast, strict=True)) <= 1


def test_exit_codes_of_a_refresh_summary():
    assert [exit_code({"status": s}) for s in ("published", "built", "up_to_date", "gate_failed", "conflict")] == \
        [0, 0, 0, 7, 5]


def test_stall_point_pauses_at_the_nth_call_and_writes_the_flag(tmp_path):
    flag = tmp_path / "flag"
    code = ("from engine.refresh.failpoints import stall_point\n"
            "stall_point('unit', 1)\nprint('past 1', flush=True)\nstall_point('shard')\n"
            "stall_point('unit', 2)\nprint('past 2', flush=True)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), EMBEDCTL_REFRESH_STALL="unit:2",
               EMBEDCTL_REFRESH_STALL_FLAG=str(flag))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not flag.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert flag.read_text().split() == ["unit", str(proc.pid)]
        assert proc.poll() is None  # hanging at the 2nd unit, not exited
    finally:
        proc.kill()
    out, _ = proc.communicate(timeout=10)
    assert out.splitlines() == ["past 1"]


# --------------------------------------------------------------------------------------------
# the verb's human dry run
# --------------------------------------------------------------------------------------------


def test_cli_dry_run_without_json_prints_the_plan(tmp_path):
    from click.testing import CliRunner

    from engine.cli.refresh import refresh
    from tests.corpus_utils import make_docs, write_corpus
    from tests.test_refresh import change, live_index

    docs = make_docs(20, seed=3)
    _store, run1, v1 = live_index(str(tmp_path / "store"), tmp_path / "v1", docs)
    write_corpus(tmp_path / "v2", change(docs, modify=[1], delete=[2], add=1), files=1)
    flags = {"--corpus": tmp_path / "v2", "--store": tmp_path / "store", "--index": "docs", "--from-alias": "live",
             "--publish-to": "live"}
    res = CliRunner().invoke(refresh, [str(x) for kv in flags.items() for x in kv] + ["--dry-run"])
    assert res.exit_code == 0, res.output
    assert res.stdout == "" and res.exception is None
    assert f"would refresh docs from live={v1} (run {run1['run_id']})" in res.stderr
    assert "then publish to live" in res.stderr


# --------------------------------------------------------------------------------------------
# an incremental update keeps the version's metadata filter columns in step with its rows
# --------------------------------------------------------------------------------------------


def test_incremental_update_keeps_metadata_filters_in_step(tmp_path):
    from engine.core import layout
    from engine.index.searcher import Searcher
    from engine.refresh.session import run_refresh_locally
    from tests.corpus_utils import make_docs, write_corpus
    from tests.test_refresh import IDX, change, live_index, refresh_cfg

    docs = make_docs(60, seed=21)
    uri = str(tmp_path / "store")
    store, _run, v1 = live_index(uri, tmp_path / "v1", docs)
    if not (store.read_json(layout.version_manifest_key(IDX, v1)).get("metadata") or {}).get("shards"):
        pytest.skip("this index builder writes no metadata filter columns")
    new_docs = change(docs, modify=[4], delete=[5], add=1)
    new_docs[-1]["lang"] = "de"
    write_corpus(tmp_path / "v2", new_docs, files=2)
    s = run_refresh_locally(refresh_cfg(tmp_path / "v2", uri))
    assert s["status"] == "published" and s["strategy"] == "incremental"
    with Searcher.load(store, IDX, s["version_id"]) as got:
        de = got.search([new_docs[-1]["text"][:60]], got.rows, where="lang = 'de'")[0]
        assert {h.doc_id for h in de} == {"added000"}
        en = {h.doc_id for h in got.search([docs[4]["text"][:60]], got.rows, where="lang = 'en'")[0]}
        assert docs[4]["doc_id"] in en and docs[5]["doc_id"] not in en and "added000" not in en


def test_a_version_with_bm25_shards_is_rebuilt_not_updated_in_place(tmp_path):
    from engine.index.searcher import Searcher
    from engine.refresh.session import run_refresh_locally
    from tests.corpus_utils import make_docs, write_corpus
    from tests.test_refresh import IDX, change, live_index, refresh_cfg

    docs = make_docs(40, seed=22)
    uri = str(tmp_path / "store")
    try:
        store, _run, _v1 = live_index(uri, tmp_path / "v1", docs, build={"kind": "flat", "sparse": "bm25"})
    except (ConfigError, TypeError) as err:
        pytest.skip(f"this index builder makes no BM25 shards ({err})")
    write_corpus(tmp_path / "v2", change(docs, modify=[2], delete=[3], add=1), files=2)
    s = run_refresh_locally(refresh_cfg(tmp_path / "v2", uri))
    assert s["status"] == "published" and s["strategy"] == "rebuild" and "BM25" in s["strategy_reason"]
    from engine.core import layout

    assert store.read_json(layout.version_manifest_key(IDX, s["version_id"]))["sparse"]["shards"]  # BM25 kept
    with Searcher.load(store, IDX, s["version_id"]) as got:
        assert got.rows == s["snapshot_chunks"]


def test_the_refresh_run_inherits_the_live_runtime_backend_and_refuses_another():
    from engine.refresh.live import LiveVersion, embed_job_config

    run = {"config": {"corpus": {"corpus": "old/"}, "chunk": {"chunk_tokens": 64},
                      "embed": {"model": "hash:8", "backend": "onnx", "quantize": "int8", "device": "cuda"}},
           "model": {"name": "hash:8", "dim": 8, "fingerprint": "hash-v1-8"}}
    live = LiveVersion(alias="live", alias_generation=1, alias_etag=None, weighted=False, version_id="v1",
                       version_manifest={"dim": 8}, run_id="r1", run_manifest=run)
    cfg = embed_job_config(RefreshConfig.from_flat({**BASE, "device": "cpu"}), live)
    assert (cfg.embed.backend, cfg.embed.quantize, cfg.chunk.chunk_tokens) == ("onnx", "int8", 64)
    assert cfg.embed.device == "cpu" and cfg.corpus.corpus == "snap/"  # free keys: this run's own
    with pytest.raises(ConfigError, match=r"backend='torch' \(live: 'onnx'\).*embedctl migrate"):
        embed_job_config(RefreshConfig.from_flat({**BASE, "backend": "torch"}), live)
