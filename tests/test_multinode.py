"""Jobs on a Ray cluster of a head and two worker nodes (this machine, loopback), store on loopback S3.

Asserts that work really lands on both nodes (the per-unit node ids the run records), that the
outputs equal a single-node run part for part, that build-index and mine-negatives run there,
that a local-path store is refused (and accepted with --shared-filesystem), and that a worker
node killed mid-embed (its raylet, for real) is survived with identical outputs.
"""

from __future__ import annotations

import json
import random
import subprocess
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.core.storage import open_store
from engine.embed.config import EmbedJobConfig
from engine.embed.parts_index import parts_index_key, read_parts_index, run_outputs
from engine.embed.pipeline import run_locally
from tests.corpus_utils import make_docs, write_corpus
from tests.multinode_utils import (
    EMBEDCTL,
    cli_env,
    embedctl,
    embedctl_json,
    loopback_address,
    start_cluster,
    upload_dir,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray]

EMBED_FLAGS = ["--model", "hash:16", "--chunk-tokens", "40", "--chunk-overlap", "8", "--unit-rows", "40"]


@pytest.fixture(scope="module")
def world(s3_endpoint, tmp_path_factory):
    """The cluster, a bucket, and a corpus (with duplicate ids across files) in S3 and on local disk."""
    import boto3

    tmp = tmp_path_factory.mktemp("multinode")
    docs = make_docs(400, seed=11, min_words=20, max_words=70)
    rng = random.Random(5)
    for d in rng.sample(docs[100:], 30):  # later rows repeat earlier ids, also across files
        d["doc_id"] = docs[rng.randrange(100)]["doc_id"]
    corpus_dir = write_corpus(tmp / "corpus", docs, files=4, row_group_size=20)
    bucket = f"mn-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    upload_dir(open_store(f"s3://{bucket}", endpoint_url=s3_endpoint), "corpus", corpus_dir)
    cluster, nodes = start_cluster(2)
    try:
        yield {"cluster": cluster, "nodes": nodes, "address": loopback_address(cluster), "endpoint": s3_endpoint,
               "bucket": f"s3://{bucket}", "corpus": f"s3://{bucket}/corpus", "corpus_dir": corpus_dir, "tmp": tmp}
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def reference(world) -> dict[str, Any]:
    """The same corpus embedded in one process (no Ray): the single-node answer."""
    cfg = EmbedJobConfig.from_flat({"corpus": str(world["corpus_dir"]), "store": str(world["tmp"] / "ref"),
                                    "model": "hash:16", "chunk_tokens": 40, "chunk_overlap": 8, "unit_rows": 40})
    m = run_locally(cfg)
    assert m["status"] == "succeeded" and m["counts"]["rejected"] >= 30  # the duplicate ids are rejected
    return m


def part_digests(store: Any, manifest: dict[str, Any]) -> dict[tuple[str, str], str]:
    """{(kind, unit part name): sha256} over every output part of a run."""
    return {(kind, o["key"].rsplit("/", 1)[-1]): o["sha256"]
            for kind in ("chunks", "embeddings", "rejects") for o in run_outputs(store, manifest, kind)}


def cluster_embed(world: dict[str, Any], store_uri: str, *extra: str) -> dict[str, Any]:
    return embedctl_json(["embed", "--corpus", world["corpus"], "--store", store_uri, *EMBED_FLAGS,
                          "--endpoint-url", world["endpoint"], "--address", world["address"], *extra])


@pytest.fixture(scope="module")
def cluster_run(world) -> dict[str, Any]:
    store_uri = world["bucket"] + "/store"
    summary = cluster_embed(world, store_uri)
    store = open_store(store_uri, endpoint_url=world["endpoint"])
    manifest = store.read_json(f"runs/{summary['run_id']}/manifest.json")
    return {"summary": summary, "store_uri": store_uri, "store": store, "manifest": manifest}


def test_embed_spreads_over_both_nodes_and_equals_a_single_node_run(world, reference, cluster_run):
    m, store = cluster_run["manifest"], cluster_run["store"]
    assert m["status"] == "succeeded" and m["counts"] == reference["counts"]
    assert m["rejects"] == reference["rejects"]  # same duplicate-id rejects, found by Ray tasks
    # every unit's commit names the nodes that chunked, embedded and wrote it; work landed on both nodes
    rows = read_parts_index(store, parts_index_key(m["run_id"]))
    assert all(r["node_id"] and r["embed_node_id"] for r in rows)
    markers = [store.read_json(k) for k in store.list(f"runs/{m['run_id']}/_state/done")]
    seen = {mk[w]["node_id"] for mk in markers for w in ("chunk_worker", "embed_worker", "write_worker")}
    worker_ids = {n.node_id for n in world["nodes"]}
    assert seen == worker_ids, (seen, worker_ids)
    assert set(m["nodes"]) <= worker_ids and sum(v["units"] for v in m["nodes"].values()) == m["units"]["total"]
    ref_store = open_store(str(world["tmp"] / "ref"))
    assert part_digests(store, m) == part_digests(ref_store, reference)  # byte-identical parts


def test_local_path_store_refused_on_several_nodes_unless_shared(world, tmp_path):
    local = str(tmp_path / "store")
    p = embedctl(["embed", "--corpus", world["corpus"], "--store", local, *EMBED_FLAGS,
                  "--endpoint-url", world["endpoint"], "--address", world["address"], "--json"])
    assert p.returncode == 2, p.stderr[-3000:]
    assert "local path" in p.stderr and "--shared-filesystem" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "store" / "runs").exists() or not list((tmp_path / "store" / "runs").rglob("*.parquet"))
    # build-index refuses too, before reading anything
    p = embedctl(["build-index", "--store", local, "--run", "r", "--index", "docs", "--address", world["address"]])
    assert p.returncode == 2 and "--shared-filesystem" in p.stderr, p.stderr[-3000:]
    # a local corpus is refused like a local store (workers on other nodes read it) ...
    p = embedctl(["embed", "--corpus", str(world["corpus_dir"]), "--store", world["bucket"] + "/x", *EMBED_FLAGS,
                  "--endpoint-url", world["endpoint"], "--address", world["address"]])
    assert p.returncode == 2 and "corpus" in p.stderr, p.stderr[-3000:]
    # ... and both are accepted when the user says the path is mounted on every node (it is, here)
    s = embedctl_json(["embed", "--corpus", str(world["corpus_dir"]), "--store", local, *EMBED_FLAGS,
                       "--address", world["address"], "--shared-filesystem"])
    assert s["status"] == "succeeded"


def test_build_index_and_mine_negatives_on_the_cluster(world, cluster_run, tmp_path):
    run_id, store_uri = cluster_run["summary"]["run_id"], cluster_run["store_uri"]
    built = embedctl_json(["build-index", "--store", store_uri, "--run", run_id, "--index", "docs",
                           "--endpoint-url", world["endpoint"], "--address", world["address"]])
    assert built.get("status", "succeeded") in ("succeeded", "built", "done") or built.get("version_id"), built
    docs = pq.read_table(world["corpus_dir"]).to_pylist()[:12]
    pairs = pa.Table.from_pylist([{"query": " ".join(d["text"].split()[:6]), "positive_id": d["doc_id"]}
                                  for d in docs])
    pq.write_table(pairs, tmp_path / "pairs.parquet")
    cluster_run["store"].upload_file("inputs/pairs.parquet", str(tmp_path / "pairs.parquet"))
    mined = embedctl_json(["mine-negatives", "--store", store_uri, "--run", run_id,
                           "--pairs", store_uri + "/inputs/pairs.parquet", "--out", store_uri + "/mined/t.parquet",
                           "--range-min", "1", "--range-max", "12", "--num-negatives", "2",
                           "--relative-margin", "none", "--cache-dir", str(tmp_path / "cache"),
                           "--endpoint-url", world["endpoint"], "--address", world["address"]])
    assert mined["kind"] == "mine-negatives" and mined["counts"]["rows"] == 12


def test_resume_after_kill_9_of_the_driver_is_byte_identical(world, reference):
    store_uri = world["bucket"] + "/resumed"
    store = open_store(store_uri, endpoint_url=world["endpoint"])
    proc = subprocess.Popen([EMBEDCTL, "embed", "--corpus", world["corpus"], "--store", store_uri, *EMBED_FLAGS,
                             "--endpoint-url", world["endpoint"], "--address", world["address"], "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    try:
        assert wait_for(lambda: any("/_state/done/" in k for k in store.list("runs")), timeout=180, every=0.2), \
            "no unit committed"
    finally:
        proc.kill()  # SIGKILL: no cleanup, no manifest written
        proc.wait(timeout=30)
    summary = cluster_embed(world, store_uri)
    assert summary["status"] == "succeeded" and summary["attempts"] == 2
    m = store.read_json(f"runs/{summary['run_id']}/manifest.json")
    assert m["units"]["done_before_this_attempt"] >= 1  # the killed attempt's commits were kept, not redone
    assert part_digests(store, m) == part_digests(open_store(str(world["tmp"] / "ref")), reference)


def test_a_worker_node_killed_mid_embed_is_survived(world, reference):
    """Runs last in this module: it removes the node of the only embedding actor (the survivor can host it)."""
    store_uri = world["bucket"] + "/killed"
    store = open_store(store_uri, endpoint_url=world["endpoint"])
    proc = subprocess.Popen([EMBEDCTL, "embed", "--corpus", world["corpus"], "--store", store_uri, *EMBED_FLAGS,
                             "--endpoint-url", world["endpoint"], "--address", world["address"], "--workers", "1",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert wait_for(lambda: any("/_state/done/" in k for k in store.list("runs")), timeout=180, every=0.2), \
            "no unit committed"
        first = store.read_json(next(k for k in store.list("runs") if "/_state/done/" in k))
        # the hard case: the node that hosts the (only) embedding actor
        victim = next(n for n in world["nodes"] if n.node_id == first["embed_worker"]["node_id"])
        world["cluster"].remove_node(victim, allow_graceful=False)  # SIGKILL its raylet and workers
        done_at_kill = sum("/_state/done/" in k for k in store.list("runs"))
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    # Ray's driver prints the raylet's death ("(raylet) Raylet is terminated ...") on stdout: --json sends it
    # to stderr, so the whole stdout is the one JSON object
    summary = json.loads(out)
    m = store.read_json(f"runs/{summary['run_id']}/manifest.json")
    assert done_at_kill < m["units"]["total"]  # the node died mid-run
    assert m["status"] == "succeeded" and m["counts"] == reference["counts"]
    assert part_digests(store, m) == part_digests(open_store(str(world["tmp"] / "ref")), reference)
