"""Incremental refresh: the lease, the refresh run (stored-vector reuse counted with a counting
encoder), the diff, refusals, index update vs rebuild, gates, publishing, a real SIGKILL + rerun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from engine.core import layout
from engine.core.errors import ConflictError
from engine.core.lease import LeaseKeeper, lease_state
from engine.core.storage import json_bytes, open_store
from engine.refresh.lease import acquire_lease

IDX = "docs"


# --------------------------------------------------------------------------------------------
# the lease
# --------------------------------------------------------------------------------------------


def test_lease_second_refresh_fails_fast_with_a_clear_message(any_store_uri):
    store = open_store(any_store_uri)
    lease = acquire_lease(store, IDX, ttl_s=60, info={"run_id": "refresh-a", "stage": "embed"})
    t0 = time.monotonic()
    with pytest.raises(ConflictError) as err:
        acquire_lease(store, IDX, ttl_s=60, info={"run_id": "refresh-b"})
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert "another refresh of index 'docs' is running" in msg and "refresh-a" in msg and "stage embed" in msg
    assert "expires in" in msg and "--break-lease" in msg
    lease.release()
    again = acquire_lease(store, IDX, ttl_s=60)  # released: free again
    again.release()
    assert not store.exists(layout.lease_key(IDX, "refresh"))


def test_lease_left_by_a_crashed_run_expires(any_store_uri):
    store = open_store(any_store_uri)
    key = layout.lease_key(IDX, "refresh")
    # A lease from another machine whose holder died 10 s after its last renewal.
    store.put_if_absent(key, json_bytes({"lease_id": "x", "host": "elsewhere", "pid": 1, "by": "cron@elsewhere",
                                         "expires_at": time.time() - 10, "ttl_s": 300, "run_id": "refresh-old"}))
    lease = acquire_lease(store, IDX, ttl_s=60)
    assert lease.doc["took_over"]["run_id"] == "refresh-old"
    assert json.loads(store.read_bytes(key))["lease_id"] == lease.lease_id
    lease.release()


def test_lease_of_a_dead_process_on_this_host_is_taken_at_once(tmp_path):
    store = open_store(str(tmp_path / "store"))
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that no longer runs
    store.put_if_absent(layout.lease_key(IDX, "refresh"), json_bytes(
        {"lease_id": "x", "host": __import__("socket").gethostname(), "pid": proc.pid,
         "expires_at": time.time() + 300, "ttl_s": 300}))
    stale, why = lease_state(json.loads(store.read_bytes(layout.lease_key(IDX, "refresh"))))
    assert stale and "is gone" in why
    acquire_lease(store, IDX, ttl_s=60).release()


def test_lease_heartbeat_keeps_it_and_a_broken_lease_stops_the_holder(tmp_path):
    store = open_store(str(tmp_path / "store"))
    lease = acquire_lease(store, IDX, ttl_s=1.0)
    with LeaseKeeper(lease) as keeper:
        time.sleep(2.2)  # > 2 TTLs: only the heartbeat keeps it alive
        with pytest.raises(ConflictError, match="running"):
            acquire_lease(store, IDX, ttl_s=1.0)
        assert lease.doc["renewals"] >= 3
        thief = acquire_lease(store, IDX, ttl_s=60, break_lease=True)
        with pytest.raises(ConflictError, match="taken over"):
            keeper.check()  # the fence before publishing
    # the keeper's release must not delete the thief's lease
    assert json.loads(store.read_bytes(layout.lease_key(IDX, "refresh")))["lease_id"] == thief.lease_id
    thief.release()


# --------------------------------------------------------------------------------------------
# helpers: a live index version built from a seeded corpus, and snapshots that change 1%
# --------------------------------------------------------------------------------------------

import glob  # noqa: E402
import signal  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from engine.core.errors import ConfigError, GateError  # noqa: E402,F401
from engine.core.storage import Store  # noqa: E402
from engine.embed.chunking import content_hash  # noqa: E402
from engine.embed.config import EmbedJobConfig  # noqa: E402
from engine.embed.encoders import HashEncoder  # noqa: E402
from engine.embed.pipeline import run_locally  # noqa: E402
from engine.index.build import build_index  # noqa: E402
from engine.index.params import BuildConfig  # noqa: E402
from engine.index.searcher import Searcher  # noqa: E402
from engine.publish.aliases import alias_history, publish_version, read_alias  # noqa: E402
from engine.refresh.config import RefreshConfig  # noqa: E402
from engine.refresh.session import RefreshSession, run_refresh_locally  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.corpus_utils import make_docs, write_corpus  # noqa: E402

EMBED = {"model": "hash:24", "chunk_tokens": 40, "chunk_overlap": 8, "unit_rows": 32}


class CountingEncoder(HashEncoder):
    """The hash encoder, recording every text it is asked to embed."""

    def __init__(self, dim: int = 24):
        super().__init__(dim)
        self.seen: list[str] = []

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        self.seen.extend(texts)
        return super().encode_passages(texts)


def live_index(store_uri: str, corpus: Path, docs: list[dict], build: dict | None = None,
               **embed: object) -> tuple[Store, dict, str]:
    """Embed ``docs``, build an index version, publish it as ``live``."""
    write_corpus(corpus, docs, files=2)
    run = run_locally(EmbedJobConfig.from_flat({"corpus": str(corpus), "store": store_uri, **EMBED, **embed}))
    store = open_store(store_uri)
    res = build_index(store, run["run_id"], IDX, BuildConfig.from_dict(build or {"kind": "flat"}))
    publish_version(store, IDX, res.version_id, "live")
    return store, run, res.version_id


def change(docs: list[dict], *, modify: list[int], delete: list[int], add: int, seed: int = 7) -> list[dict]:
    """A new snapshot: some documents rewritten at their end, some deleted, some added."""
    out = [dict(d) for i, d in enumerate(docs) if i not in set(delete)]
    by_id = {d["doc_id"]: d for d in out}
    for i in modify:
        d = by_id[docs[i]["doc_id"]]
        d["text"] = d["text"] + " nozzle flutter added at the end of this revised report."
    extra = make_docs(add, seed=seed)
    for j, d in enumerate(extra):
        out.append({**d, "doc_id": f"added{j:03d}"})
    return out


def refresh_cfg(corpus: Path, store_uri: str, **kw) -> RefreshConfig:
    return RefreshConfig.from_flat({"corpus": str(corpus), "store": store_uri, "index": IDX, "alias": "live", **kw})


def chunk_table(store_uri: str, run_id: str, kind: str = "chunks") -> dict[str, str]:
    store = open_store(store_uri)
    man = store.read_json(layout.run_manifest_key(run_id))
    out: dict[str, str] = {}
    for o in man["outputs"][kind]:
        with store.arrow_filesystem().open_input_file(store.arrow_path(o["key"])) as f:
            t = pq.read_table(f, columns=["chunk_id", "content_hash"])
        out.update(zip(t.column("chunk_id").to_pylist(), t.column("content_hash").to_pylist(), strict=True))
    return out


# --------------------------------------------------------------------------------------------
# the refresh run: exactly the new and changed chunks reach the model
# --------------------------------------------------------------------------------------------


def test_one_percent_change_embeds_exactly_the_new_and_changed_chunks(any_store_uri, tmp_path):
    docs = make_docs(400, seed=1)
    store, run1, v1 = live_index(any_store_uri, tmp_path / "v1", docs, unit_rows=100)
    new_docs = change(docs, modify=[10, 200], delete=[300], add=1)  # 4 of 400 documents: 1%
    write_corpus(tmp_path / "v2", new_docs, files=2)
    enc = CountingEncoder()
    s = run_refresh_locally(refresh_cfg(tmp_path / "v2", any_store_uri, unit_rows=100), encoder=enc)

    # Reference: the chunks a full embed of the new snapshot makes, against the live run's.
    ref = run_locally(EmbedJobConfig.from_flat({"corpus": str(tmp_path / "v2"), "store": str(tmp_path / "ref"),
                                                **EMBED, "unit_rows": 100}))
    old, new = chunk_table(any_store_uri, run1["run_id"]), chunk_table(str(tmp_path / "ref"), ref["run_id"])
    incoming = {c: h for c, h in new.items() if old.get(c) != h}
    assert incoming and len(incoming) < 0.05 * len(new)
    assert sorted(content_hash(t) for t in enc.seen) == sorted(incoming.values())  # exactly these, once each
    assert s["embedding_calls"] == len(incoming) == s["chunks"]["new"] + s["chunks"]["changed"]
    assert s["reused_vectors"] == len(new) - len(incoming)
    assert s["docs"] == {"new": 1, "changed": 2, "unchanged": 397, "deleted": 1}
    assert s["chunks"]["deleted"] == sum(1 for c in old if c not in new)
    assert s["full_embed"]["embedding_calls"] == len(new) and s["saved_embedding_calls"] == len(new) - len(incoming)
    # The refresh run is a normal embed run: its parts equal a full embed's, byte for byte.
    man = store.read_json(layout.run_manifest_key(s["run_id"]))
    assert man["kind"] == "embed" and man["status"] == "succeeded" and man["refresh"]["parent_run"] == run1["run_id"]
    assert [o["sha256"] for o in man["outputs"]["embeddings"]] == [o["sha256"] for o in ref["outputs"]["embeddings"]]
    assert man["counts"] == ref["counts"]
    # ... and it was published by CAS, recording the choice and the reason in the version manifest.
    assert s["status"] == "published" and s["strategy"] == "incremental"
    state = read_alias(store, IDX, "live")
    assert state.version == s["version_id"] != v1 and state.generation == 2
    vman = store.read_json(layout.version_manifest_key(IDX, s["version_id"]))
    assert vman["parent_version"] == v1 and vman["source_run"] == s["run_id"]
    assert vman["refresh"]["strategy"] == "incremental" and "changed" in vman["refresh"]["reason"]
    assert vman["recall_gate"]["passed"] and vman["recall_gate"]["recall"] == 1.0
    assert not store.exists(layout.lease_key(IDX, "refresh"))  # released


def test_search_after_refresh_equals_a_full_rebuild_and_never_returns_deleted_docs(tmp_path):
    docs = make_docs(300, seed=2)
    uri = str(tmp_path / "store")
    store, _run1, _v1 = live_index(uri, tmp_path / "v1", docs)
    deleted = [docs[i]["doc_id"] for i in (5, 150)]
    new_docs = change(docs, modify=[20], delete=[5, 150], add=1)
    write_corpus(tmp_path / "v2", new_docs, files=2)
    s = run_refresh_locally(refresh_cfg(tmp_path / "v2", uri))
    assert s["status"] == "published" and s["strategy"] == "incremental"

    ref_run = run_locally(EmbedJobConfig.from_flat({"corpus": str(tmp_path / "v2"), "store": str(tmp_path / "ref"),
                                                    **EMBED}))
    ref_store = open_store(str(tmp_path / "ref"))
    ref_v = build_index(ref_store, ref_run["run_id"], IDX, BuildConfig.from_dict({"kind": "flat"})).version_id
    # Queries whose answers did not change (unchanged docs' text), plus the deleted and modified docs' text.
    queries = [d["text"][:80] for d in docs[40:60]] + [docs[5]["text"][:80], docs[150]["text"][:80],
                                                      docs[20]["text"][:80], "flutter nozzle revised report"]
    with Searcher.load(store, IDX, s["version_id"]) as got, Searcher.load(ref_store, IDX, ref_v) as want:
        a, b = got.search(queries, 10), want.search(queries, 10)
        for qa, qb in zip(a, b, strict=True):
            assert [(h.chunk_id, h.doc_id) for h in qa] == [(h.chunk_id, h.doc_id) for h in qb]
            np.testing.assert_allclose([h.score for h in qa], [h.score for h in qb], atol=1e-5)
        everything = got.search(queries, got.rows)
        assert got.rows == want.rows
    assert not {h.doc_id for hits in everything for h in hits} & set(deleted)


def test_rebuild_when_much_changes_and_the_reason_is_recorded(tmp_path):
    docs = make_docs(120, seed=3)
    uri = str(tmp_path / "store")
    store, _r, v1 = live_index(uri, tmp_path / "v1", docs)
    new_docs = change(docs, modify=list(range(0, 40)), delete=[50, 51], add=5)
    write_corpus(tmp_path / "v2", new_docs, files=2)
    s = run_refresh_locally(refresh_cfg(tmp_path / "v2", uri))
    assert s["strategy"] == "rebuild" and "rebuild-fraction" in s["strategy_reason"]
    assert s["status"] == "published"
    vman = store.read_json(layout.version_manifest_key(IDX, s["version_id"]))
    assert vman["parent_version"] == v1 and vman["source_run"] == s["run_id"]
    record = vman["refresh"]  # the builder's manifest_extra: the choice and the reason in the manifest itself
    assert record["strategy"] == "rebuild" and record["reason"] == s["strategy_reason"]
    assert record["build_config"]["kind"] == "flat" and record["diff"]["docs"]["changed"] == 40


def test_ivfpq_incremental_measures_drift_and_recall(tmp_path):
    docs = make_docs(260, seed=4, min_words=60, max_words=140)
    uri = str(tmp_path / "store")
    store, _r, _v1 = live_index(uri, tmp_path / "v1", docs,
                                build={"kind": "ivfpq", "factory": "IVF8,PQ8x4fs", "gate_recall": 0.5})
    write_corpus(tmp_path / "v2", change(docs, modify=[3], delete=[9], add=1), files=2)
    s = run_refresh_locally(refresh_cfg(tmp_path / "v2", uri))
    assert s["strategy"] == "incremental" and s["status"] == "published"
    drift = s["checks"]["drift"]
    assert drift["ratio"] is not None and "quantizer" in drift["ratios"] and "not judged" in s["strategy_reason"]
    assert 0.5 <= s["gates"]["recall"]["recall"] <= 1.0
    vman = store.read_json(layout.version_manifest_key(IDX, s["version_id"]))
    assert vman["kind"] == "ivfpq" and vman["files"]["trained"]  # the live quantizer, copied, not retrained
    with Searcher.load(store, IDX, s["version_id"]) as got:
        assert got.rows == s["snapshot_chunks"]


def test_chain_of_refreshes_then_a_rebuild_after_the_chain_limit(tmp_path):
    docs = make_docs(150, seed=5)
    uri = str(tmp_path / "store")
    store, _r, _v1 = live_index(uri, tmp_path / "v1", docs)
    strategies = []
    for step in range(3):
        docs = change(docs, modify=[step], delete=[], add=1, seed=100 + step)
        docs = [dict(d, doc_id=d["doc_id"] if d["doc_id"] != "added000" else f"step{step}") for d in docs]
        write_corpus(tmp_path / f"s{step}", docs, files=2)
        s = run_refresh_locally(refresh_cfg(tmp_path / f"s{step}", uri, max_incremental_chain=2))
        assert s["status"] == "published" and s["embedding_calls"] <= 6
        strategies.append(s["strategy"])
    assert strategies == ["incremental", "incremental", "rebuild"]
    assert "incremental versions in a row" in s["strategy_reason"]


def test_model_or_chunker_change_is_refused_with_a_pointer_to_migrate(tmp_path):
    docs = make_docs(40, seed=6)
    uri = str(tmp_path / "store")
    store, _r, v1 = live_index(uri, tmp_path / "v1", docs)
    before = sorted(store.list("runs"))
    for bad in ({"model": "hash:32"}, {"chunk_tokens": 64}, {"chunker": "recursive"}):
        with pytest.raises(ConfigError, match="embedctl migrate"):
            run_refresh_locally(refresh_cfg(tmp_path / "v1", uri, **bad))
    # Repeating the live settings is fine; nothing was written by the refusals.
    assert sorted(store.list("runs")) == before and not store.exists(layout.lease_key(IDX, "refresh"))
    s = run_refresh_locally(refresh_cfg(tmp_path / "v1", uri, model="hash:24", chunk_tokens=40))
    assert s["status"] == "up_to_date" and s["executor"] == "none" and read_alias(store, IDX, "live").version == v1


def test_unchanged_content_in_new_files_is_up_to_date_and_publishes_nothing(tmp_path):
    docs = make_docs(60, seed=8)
    uri = str(tmp_path / "store")
    store, _r, v1 = live_index(uri, tmp_path / "v1", docs)
    write_corpus(tmp_path / "v2", docs, files=3, row_group_size=7)  # other bytes, same documents
    enc = CountingEncoder()
    s = run_refresh_locally(refresh_cfg(tmp_path / "v2", uri), encoder=enc)
    assert s["status"] == "up_to_date" and s["version_id"] is None and not enc.seen
    assert read_alias(store, IDX, "live").generation == 1


def test_canary_failure_leaves_the_alias_alone(tmp_path):
    docs = make_docs(80, seed=9)
    uri = str(tmp_path / "store")
    store, _r, v1 = live_index(uri, tmp_path / "v1", docs)
    target = docs[12]
    canaries = tmp_path / "canaries.jsonl"
    canaries.write_text(json.dumps({"query": target["text"], "doc_id": target["doc_id"]}) + "\n")
    new_docs = [dict(d) for d in docs]
    new_docs[12]["text"] = "an entirely different subject: " + " ".join(["zebra"] * 30)
    write_corpus(tmp_path / "v2", new_docs, files=2)
    s = run_refresh_locally(refresh_cfg(tmp_path / "v2", uri, canary=str(canaries)))
    assert s["status"] == "gate_failed" and not s["published"]
    assert not s["gates"]["canary"]["passed"] and s["gates"]["recall"]["passed"]
    assert "canary" in s["reason"] and v1 in s["reason"]
    assert read_alias(store, IDX, "live").version == v1  # untouched
    # The built version stays for inspection; it is not what live serves.
    assert store.exists(layout.version_manifest_key(IDX, s["version_id"]))


def test_alias_moved_during_the_refresh_is_a_conflict_not_an_overwrite(tmp_path):
    docs = make_docs(60, seed=10)
    uri = str(tmp_path / "store")
    store, run1, v1 = live_index(uri, tmp_path / "v1", docs)
    write_corpus(tmp_path / "v2", change(docs, modify=[1], delete=[], add=0), files=2)
    session = RefreshSession(refresh_cfg(tmp_path / "v2", uri))
    with session:
        session.prepare()
        session.embed_locally()
        other = build_index(store, run1["run_id"], IDX, BuildConfig.from_dict({"kind": "flat"}), force=True)
        publish_version(store, IDX, other.version_id, "live")  # someone else publishes meanwhile
        s = session.finish()
    assert s["status"] == "conflict" and "moved" in s["reason"]
    assert read_alias(store, IDX, "live").version == other.version_id


def test_weighted_rollout_on_the_target_alias_is_refused(tmp_path):
    docs = make_docs(40, seed=11)
    uri = str(tmp_path / "store")
    store, run1, v1 = live_index(uri, tmp_path / "v1", docs)
    green = build_index(store, run1["run_id"], IDX, BuildConfig.from_dict({"kind": "flat"}), force=True).version_id
    publish_version(store, IDX, green, "live", weighted=10)
    with pytest.raises(ConflictError, match="weighted rollout"):
        run_refresh_locally(refresh_cfg(tmp_path / "v1", uri))
    assert read_alias(store, IDX, "live").weighted is not None


# --------------------------------------------------------------------------------------------
# crash safety: a real SIGKILL mid-refresh, then the same command again
# --------------------------------------------------------------------------------------------


def _job(tmp_path: Path, cfg: dict, env_extra: dict | None = None) -> subprocess.Popen:
    path = tmp_path / "refresh.json"
    path.write_text(json.dumps(cfg))
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / "refresh.py"), "--config", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _summary(stdout: str) -> dict:
    line = [x for x in stdout.splitlines() if x.startswith("EMBEDCTL_SUMMARY ")][-1]
    return json.loads(line.split(" ", 1)[1])


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["unit:3", "shard", "publish"])
def test_refresh_killed_at_any_point_then_rerun_finishes_without_duplicates(tmp_path, stage):
    docs = make_docs(240, seed=12)
    uri = str(tmp_path / "store")
    store, _r, v1 = live_index(uri, tmp_path / "v1", docs)
    alias_before = store.read_bytes(layout.alias_key(IDX, "live"))
    write_corpus(tmp_path / "v2", change(docs, modify=[2, 100], delete=[7], add=2), files=2)
    cfg = {"corpus": str(tmp_path / "v2"), "store": uri, "index": IDX, "alias": "live", "executor": "local"}
    flag = tmp_path / "stalled.flag"
    proc = _job(tmp_path, cfg, {"EMBEDCTL_REFRESH_STALL": stage, "EMBEDCTL_REFRESH_STALL_FLAG": str(flag)})
    try:
        assert wait_for_file(flag, proc, 60), f"the refresh never reached {stage}: {proc.stderr.read()[-2000:]}"
        if stage == "shard":  # while it runs, a second refresh fails fast with a clear message
            t0 = time.monotonic()
            second = _job(tmp_path, cfg)
            _out, err = second.communicate(timeout=60)
            assert second.returncode == 5 and "another refresh of index 'docs' is running" in err
            assert time.monotonic() - t0 < 30
        assert store.read_bytes(layout.alias_key(IDX, "live")) == alias_before  # not touched before the end
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert store.read_bytes(layout.alias_key(IDX, "live")) == alias_before
    assert store.exists(layout.lease_key(IDX, "refresh"))  # the crash left its lease ...

    rerun = _job(tmp_path, cfg)  # ... which the same host takes over at once (its process is gone)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err[-3000:]
    s = _summary(out)
    assert s["status"] == "published" and s["docs"] == {"new": 2, "changed": 2, "unchanged": 237, "deleted": 1}
    state = read_alias(store, IDX, "live")
    assert state.version == s["version_id"] and state.generation == 2 and len(alias_history(store, IDX, "live")) == 2
    chunks = chunk_table(uri, s["run_id"], "embeddings")
    emb = [pq.read_table(p, columns=["chunk_id"]).column(0).to_pylist()
           for p in glob.glob(os.path.join(uri, "runs", s["run_id"], "embeddings", "*.parquet"))]
    flat = [c for part in emb for c in part]
    assert len(flat) == len(set(flat)) == len(chunks) == s["snapshot_chunks"]  # no duplicate chunk ids
    with Searcher.load(store, IDX, s["version_id"]) as got:
        assert got.rows == s["snapshot_chunks"]
        ids = [h.chunk_id for h in got.search(["wing lift"], got.rows)[0]]
        assert len(ids) == len(set(ids)) == got.rows
    assert not store.exists(layout.lease_key(IDX, "refresh"))
    assert s["embedding_calls"] == s["chunks"]["new"] + s["chunks"]["changed"]


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------------------------
# the CLI verb, the job driver's dry run, and the Ray path
# --------------------------------------------------------------------------------------------


def test_cli_refresh_json_and_exit_codes(tmp_path):
    docs = make_docs(60, seed=13)
    uri = str(tmp_path / "store")
    store, _r, v1 = live_index(uri, tmp_path / "v1", docs)
    write_corpus(tmp_path / "v2", change(docs, modify=[4], delete=[5], add=1), files=2)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    base = [sys.executable, "-m", "engine.cli.app", "refresh", "--corpus", str(tmp_path / "v2"), "--store", uri,
            "--index", IDX, "--from-alias", "live"]
    plan = subprocess.run(base + ["--dry-run", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert plan.returncode == 0, plan.stderr
    p = json.loads(plan.stdout)
    assert p["from_version"] == v1 and p["lease"] is None and not p["resumes_existing_run"]
    assert store.list("runs") == sorted(store.list("runs")) and not any("refresh-" in k for k in store.list("runs"))
    built = subprocess.run(base + ["--json"], capture_output=True, text=True, env=env, timeout=120)
    assert built.returncode == 0, built.stderr
    s = json.loads(built.stdout)  # one JSON object, nothing else on stdout
    assert s["status"] == "built" and "embedctl publish" in s["reason"]
    assert read_alias(store, IDX, "live").version == v1  # no --publish-to: built and gated only
    human = subprocess.run(base + ["--publish-to", "live"], capture_output=True, text=True, env=env, timeout=120)
    assert human.returncode == 0 and human.stdout == ""
    assert "published: live ->" in human.stderr and "embedding calls" in human.stderr
    bad = subprocess.run(base + ["--model", "hash:32"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "embedctl migrate" in bad.stderr and "Traceback" not in bad.stderr


def test_job_dry_run_is_offline_and_check_store_reads_the_plan(tmp_path):
    cm = tmp_path / "refresh.yaml"
    cm.write_text("corpus: s3://embedctl-example/corpus/latest/\nstore: s3://embedctl-example/store\n"
                  "index: docs\nalias: live\nlease_wait_s: 180\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "refresh.py"), "--dry-run", "--config", str(cm)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout)["config"]
    assert cfg["from_alias"] == cfg["publish_to"] == "live" and cfg["lease_wait_s"] == 180
    bad = tmp_path / "bad.yaml"
    bad.write_text("corpus: x\nstore: y\nindex: docs\nchunk_size: 3\n")
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "refresh.py"), "--dry-run", "--config", str(bad)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and "chunk_size" in out.stderr

    docs = make_docs(30, seed=14)
    uri = str(tmp_path / "store")
    _store, run1, v1 = live_index(uri, tmp_path / "v1", docs)
    local = tmp_path / "local.json"
    local.write_text(json.dumps({"corpus": str(tmp_path / "v1"), "store": uri, "index": IDX}))
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "refresh.py"), "--dry-run", "--check-store", "--config",
                          str(local)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)["plan"]
    assert plan["from_version"] == v1 and plan["live_run"] == run1["run_id"]


@pytest.mark.ray
@pytest.mark.slow
def test_ray_path_equals_the_in_process_path(ray_session, tmp_path):
    from engine.distributed.refresh import run_refresh_job

    docs = make_docs(200, seed=15)
    for name in ("a", "b"):
        live_index(str(tmp_path / name), tmp_path / "v1", docs)
    write_corpus(tmp_path / "v2", change(docs, modify=[1, 50], delete=[3], add=1), files=2)
    on_ray = run_refresh_job(refresh_cfg(tmp_path / "v2", str(tmp_path / "a"), executor="ray"))
    local = run_refresh_locally(refresh_cfg(tmp_path / "v2", str(tmp_path / "b")))
    assert on_ray["executor"] == "ray" and on_ray["status"] == local["status"] == "published"
    for k in ("docs", "chunks", "embedding_calls", "reused_vectors", "run_id"):
        assert on_ray[k] == local[k], k
    ma = open_store(str(tmp_path / "a")).read_json(layout.run_manifest_key(on_ray["run_id"]))
    mb = open_store(str(tmp_path / "b")).read_json(layout.run_manifest_key(local["run_id"]))
    assert [o["sha256"] for o in ma["outputs"]["embeddings"]] == [o["sha256"] for o in mb["outputs"]["embeddings"]]


def test_model_process_reports_a_missing_model_clearly():
    from engine.refresh.model import ModelProcess

    proc = ModelProcess({"name": "no-such-model", "path": "/nonexistent/model", "dim": 8}, device="cpu",
                        dtype="auto", batch_tokens=1024)
    try:
        with pytest.raises(ConfigError, match="the model process failed: ConfigError: model 'no-such-model'"):
            proc.encode_passages(["a text"])
    finally:
        proc.close()


@pytest.mark.integration
@pytest.mark.slow
def test_real_model_refresh_embeds_in_a_model_process(tmp_path):
    """The packaged MiniLM: new chunks are embedded by the early-started model process, old ones reused."""
    from engine.distributed.refresh import run_refresh_job
    from engine.embed.encoders import load_encoder

    docs = make_docs(40, seed=16)
    uri = str(tmp_path / "store")
    write_corpus(tmp_path / "v1", docs, files=1)
    run = run_locally(EmbedJobConfig.from_flat({"corpus": str(tmp_path / "v1"), "store": uri, "unit_rows": 16,
                                                "backend": "torch"}))
    store = open_store(uri)
    publish_version(store, IDX, build_index(store, run["run_id"], IDX, BuildConfig.from_dict({"kind": "flat"}))
                    .version_id, "live")
    write_corpus(tmp_path / "v2", change(docs, modify=[3], delete=[], add=1), files=1)
    s = run_refresh_job(RefreshConfig.from_flat({"corpus": str(tmp_path / "v2"), "store": uri, "index": IDX,
                                                 "alias": "live", "unit_rows": 16}))
    assert s["status"] == "published" and s["executor"] == "driver"
    assert s["embedding_calls"] == s["chunks"]["new"] + s["chunks"]["changed"] >= 2
    # The native BERT served, after reproducing vectors the live run stored.
    assert s["model_loader"]["loader"] == "native" and s["model_loader"]["validated_on"] == 4
    # The new document's vector is the model's own (encoded here, compared with the process's result).
    man = store.read_json(layout.run_manifest_key(s["run_id"]))
    rows = {}
    for o in man["outputs"]["embeddings"]:
        t = pq.read_table(os.path.join(uri, o["key"]), columns=["doc_id", "text", "title", "embedding"])
        for d, x, ti, e in zip(*(t.column(c).to_pylist() for c in ("doc_id", "text", "title", "embedding")), strict=True):
            rows.setdefault(d, (x, ti, e))
    text, title, vec = rows["added000"]
    want = load_encoder(None).encode_passages([f"{title}\n{text}"])[0]
    np.testing.assert_allclose(vec, want, atol=1e-4)


@pytest.mark.integration
@pytest.mark.slow
def test_model_process_falls_back_when_the_native_encoder_does_not_reproduce_stored_vectors():
    from engine.embed.encoders import encoder_from_identity, load_encoder
    from engine.refresh.model import ModelProcess

    ident = load_encoder(None).identity
    texts = ["wing lift in a slipstream", "boundary layer transition"]
    right = encoder_from_identity(ident).encode_passages(texts)
    wrong = [(t, (-v).tolist()) for t, v in zip(texts, right, strict=True)]  # not what this model gives
    proc = ModelProcess(ident, device="cpu", dtype="auto", batch_tokens=4096, samples=wrong)
    try:
        got = proc.encode_passages(texts)
        assert proc.info["loader"] == "sentence-transformers" and "native_rejected" in proc.info
        np.testing.assert_allclose(got, right, atol=1e-5)
    finally:
        proc.close()


def test_binary_rerank_incremental_update_serves_new_docs_and_drops_deleted(tmp_path):
    docs = make_docs(200, seed=17)
    uri = str(tmp_path / "store")
    store, _r, _v1 = live_index(uri, tmp_path / "v1", docs, build={"kind": "binary-rerank", "gate_recall": 0.3})
    deleted = docs[11]["doc_id"]
    new_docs = change(docs, modify=[4], delete=[11], add=1)
    new_docs[-1]["text"] = "a cryogenic propellant sloshing study " * 4
    write_corpus(tmp_path / "v2", new_docs, files=2)
    s = run_refresh_locally(refresh_cfg(tmp_path / "v2", uri))
    assert s["status"] == "published" and s["strategy"] == "incremental"
    vman = store.read_json(layout.version_manifest_key(IDX, s["version_id"]))
    assert vman["kind"] == "binary-rerank"
    with Searcher.load(store, IDX, s["version_id"]) as got:
        assert got.rows == s["snapshot_chunks"]
        top = got.search(["cryogenic propellant sloshing study"], 3)[0]
        assert top[0].doc_id == "added000"
        everything = got.search([docs[11]["text"][:80]], got.rows)[0]
        assert deleted not in {h.doc_id for h in everything} and len(everything) == got.rows
