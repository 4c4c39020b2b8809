"""`embedctl submit embed` to a head started by the test (`ray start`, Jobs API) with two worker nodes.

The cluster is three `ray start --block` processes on 127.0.0.1 (a head with the dashboard and
no CPUs, two worker nodes with a custom resource each), every one with its own --temp-dir and
free ports, in its own process group. Teardown SIGKILLs those groups and any process whose
command line names the temp dir: never `ray stop`, which would kill every Ray on the machine.

The store and the corpus are on the loopback S3 endpoint. The submitted job must land on both
worker nodes and produce the same run as `embedctl embed --address` on the same cluster.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.core.storage import open_store
from engine.embed.parts_index import parts_index_key, read_parts_index
from tests.conftest import free_port
from tests.corpus_utils import make_docs, write_corpus
from tests.multinode_utils import CPUS_PER_NODE, EMBEDCTL, cli_env, embedctl, embedctl_json, upload_dir
from tests.test_cluster_submit import _kill_processes_naming
from tests.test_multinode import EMBED_FLAGS, part_digests

pytestmark = [pytest.mark.slow, pytest.mark.ray]

RAY = str(Path(EMBEDCTL).with_name("ray"))
NODE_PORTS = ("node_manager", "object_manager", "agent_http", "agent_grpc", "metrics", "renv")


def _node_args(temp_dir: str) -> list[str]:
    """The flags every node of this cluster shares: loopback, its own temp dir and free ports."""
    ports = {name: free_port() for name in NODE_PORTS}
    return ["--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
            f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
            f"--dashboard-agent-listen-port={ports['agent_http']}",
            f"--dashboard-agent-grpc-port={ports['agent_grpc']}", f"--metrics-export-port={ports['metrics']}",
            f"--runtime-env-agent-port={ports['renv']}", "--object-store-memory=268435456"]


def _ray_start(args: list[str], temp_dir: str, name: str) -> subprocess.Popen[bytes]:
    env = cli_env()
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")  # a node started with it set to 0 refuses to join a cluster
    # the job's `python` must be this venv's (as it is the image's on a real cluster)
    env["PATH"] = f"{Path(EMBEDCTL).parent}{os.pathsep}{env.get('PATH', '')}"
    with open(Path(temp_dir) / f"{name}.log", "wb") as log_file:
        return subprocess.Popen([RAY, "start", *args], env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=temp_dir)


def _live_worker_nodes(dashboard: str) -> int:
    """Worker nodes (those with CPUs) the head reports alive, through its state API."""
    from ray.util.state import list_nodes

    try:
        nodes = list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 - not up yet
        return 0
    return sum(1 for n in nodes if (n.resources_total or {}).get("CPU", 0) > 0)


@pytest.fixture(scope="module")
def ray_start_cluster(s3_endpoint) -> Iterator[dict[str, Any]]:
    """Head (dashboard, Jobs API, no CPUs) + two worker nodes, each ``--resources {"node_<i>": 1}``."""
    if not Path(RAY).exists():
        pytest.skip(f"{RAY} not found (install ray[default])")
    temp_dir = tempfile.mkdtemp(prefix="ectl-mns-", dir="/tmp")  # short: Ray's unix sockets live under it
    gcs, dash = free_port(), free_port()
    procs = [_ray_start(["--head", "--num-cpus=0", f"--port={gcs}", "--include-dashboard=true",
                         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                         f"--ray-client-server-port={free_port()}", *_node_args(temp_dir)], temp_dir, "head")]
    dashboard = f"http://127.0.0.1:{dash}"

    def teardown() -> None:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # Ray's processes ignore SIGTERM
            except ProcessLookupError:
                pass
        _kill_processes_naming(temp_dir)
        for p in procs:
            p.wait(timeout=30)
        time.sleep(0.5)
        shutil.rmtree(temp_dir, ignore_errors=True)

    def wait_until(ready: Any, what: str) -> None:
        deadline = time.monotonic() + 120
        while not ready():
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                logs = "\n".join(f.read_text(errors="replace")[-1500:] for f in Path(temp_dir).glob("*.log"))
                teardown()
                pytest.fail(f"{what} did not come up:\n{logs}")
            time.sleep(0.5)

    def dashboard_up() -> bool:
        try:
            urllib.request.urlopen(f"{dashboard}/api/version", timeout=1).read()
            return True
        except OSError:
            return False

    wait_until(dashboard_up, "the Ray head")
    for i in range(2):  # one at a time: a raylet gets 30 s to register, and this machine is small and busy
        procs.append(_ray_start([f"--address=127.0.0.1:{gcs}", f"--num-cpus={CPUS_PER_NODE}",
                                 f"--resources={json.dumps({f'node_{i}': 1})}", *_node_args(temp_dir)],
                                temp_dir, f"worker{i}"))
        wait_until(lambda n=i + 1: _live_worker_nodes(dashboard) == n, f"worker node {i}")
    try:
        yield {"dashboard": dashboard, "gcs": f"127.0.0.1:{gcs}", "temp_dir": temp_dir}
    finally:
        teardown()


@pytest.fixture(scope="module")
def s3_corpus(s3_endpoint, tmp_path_factory) -> dict[str, str]:
    """A bucket holding a small corpus with duplicate ids (also across files)."""
    import boto3

    docs = make_docs(240, seed=17, min_words=20, max_words=70)
    rng = random.Random(3)
    for d in rng.sample(docs[60:], 20):
        d["doc_id"] = docs[rng.randrange(60)]["doc_id"]
    corpus_dir = write_corpus(tmp_path_factory.mktemp("mns") / "corpus", docs, files=3, row_group_size=20)
    bucket = f"mns-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    upload_dir(open_store(f"s3://{bucket}", endpoint_url=s3_endpoint), "corpus", corpus_dir)
    return {"bucket": f"s3://{bucket}", "corpus": f"s3://{bucket}/corpus", "endpoint": s3_endpoint}


def test_submitted_embed_lands_on_both_nodes_and_equals_a_cli_run(ray_start_cluster, s3_corpus, tmp_path):
    endpoint, bucket = s3_corpus["endpoint"], s3_corpus["bucket"]
    # the same job from the CLI, its driver here, connected to the cluster's GCS
    cli_summary = embedctl_json(["embed", "--corpus", s3_corpus["corpus"], "--store", f"{bucket}/cli", *EMBED_FLAGS,
                                 "--endpoint-url", endpoint, "--address", ray_start_cluster["gcs"]])
    # ... and submitted through the Jobs API (the driver runs on the head, from a staged copy of engine/)
    config = tmp_path / "embed.yaml"
    config.write_text(textwrap.dedent(f"""\
        corpus: {s3_corpus['corpus']}
        store: {bucket}/submitted
        endpoint_url: {endpoint}
        run_id: submitted
        model: "hash:16"
        chunk_tokens: 40
        chunk_overlap: 8
        unit_rows: 40
        """))
    p = embedctl(["submit", "embed", "--address", ray_start_cluster["dashboard"], "--config", str(config),
                  "--submission-id", f"ectl-mns-{uuid.uuid4().hex[:6]}"], timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    result = json.loads(p.stdout)  # one JSON object, nothing else on stdout
    assert result["status"] == "SUCCEEDED" and result["summary"]["run_id"] == "submitted"
    assert result["summary"]["status"] == "succeeded"

    store = open_store(f"{bucket}/submitted", endpoint_url=endpoint)
    m = store.read_json("runs/submitted/manifest.json")
    cli_store = open_store(f"{bucket}/cli", endpoint_url=endpoint)
    cli_m = cli_store.read_json(f"runs/{cli_summary['run_id']}/manifest.json")
    assert m["status"] == "succeeded" and m["counts"] == cli_m["counts"] and m["rejects"] == cli_m["rejects"]
    assert m["counts"]["rejected"] >= 20  # the duplicate ids, found by Ray tasks on the workers
    # where work ran: the commits name both worker nodes (never the head, which has no CPUs)
    markers = [store.read_json(k) for k in store.list("runs/submitted/_state/done")]
    assert len(markers) == m["units"]["total"]
    nodes = {mk[w]["node_id"] for mk in markers for w in ("chunk_worker", "embed_worker", "write_worker")}
    assert len(nodes) == 2, nodes
    assert {r["node_id"] for r in read_parts_index(store, parts_index_key("submitted"))} <= nodes
    assert set(m["nodes"]) <= nodes and sum(v["units"] for v in m["nodes"].values()) == m["units"]["total"]
    assert part_digests(store, m) == part_digests(cli_store, cli_m)  # byte-identical parts

