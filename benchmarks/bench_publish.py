"""Publish benchmark: upload (multipart, verified), verification, alias swap latency, and a
serving searcher's hot swaps under HTTP load.

Two kinds of versions, both on local disk and on a moto S3 server this script starts on
loopback (moto keeps objects in memory in one Python process: its throughput is a floor
for a real S3, not an estimate):

- synthetic versions of ``--shards`` x ``--shard-mib`` random files (upload, verify, swap);
- real index versions (the stdlib-docstring demo corpus embedded in-process with
  ``--model``, default the deterministic ``hash:64`` encoder, then ``build_index`` flat)
  served by ``AliasSearcher`` + ``SearchServer`` while publish -> rollback -> publish run.

    .venv/bin/python benchmarks/bench_publish.py
    .venv/bin/python benchmarks/bench_publish.py --shard-mib 64 --model ""   # packaged MiniLM
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.core import layout  # noqa: E402
from engine.core.storage import MiB, Store, join, open_store, sha256_file, wait_for  # noqa: E402
from engine.publish.aliases import publish_version, rollback_alias  # noqa: E402
from engine.publish.copy import copy_version
from engine.publish.verify import verify_version

IDX = "bench"
SERVE_IDX = "serve"
QUERIES = ["parse command line options", "compress a file", "regular expressions", "send an email",
           "read a csv file", "random numbers", "date and time arithmetic", "http server"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto() -> tuple[subprocess.Popen, str]:
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: _connectable(port), timeout=20), "moto_server did not start"
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench-secret")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="bench")
    return proc, url


def _connectable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def build_local_version(store: Store, version: str, shards: int, shard_mib: int) -> None:
    """A version with ``shards`` random files and a manifest (the layout.py contract)."""
    prefix = layout.version_prefix(IDX, version)
    artifacts = []
    for i in range(shards):
        key = f"shards/{i}/index.faiss"
        path = store.local_path(join(prefix, key))  # type: ignore[attr-defined]
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            for _ in range(shard_mib):
                f.write(os.urandom(MiB))
        artifacts.append({"key": key, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    store.write_json(layout.version_manifest_key(IDX, version),
                     {"version_id": version, "index": IDX, "artifacts": artifacts, "kind": "flat", "dim": 0,
                      "shards": [], "model": {"name": "synthetic"}})


def build_real_versions(store: Store, tmp: Path, model: str | None) -> list[str]:
    """Two real versions of SERVE_IDX from two halves of the stdlib-docstring corpus."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.embed.config import EmbedJobConfig
    from engine.embed.pipeline import run_locally
    from engine.embed.stdlib_corpus import stdlib_docs
    from engine.index.build import build_index
    from engine.index.params import BuildConfig

    docs = stdlib_docs(300)
    out = []
    for i, part in enumerate((docs[: len(docs) // 2], docs[len(docs) // 2:])):
        corpus = tmp / f"corpus-{i}"
        corpus.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(part), corpus / "part-0.parquet")
        flat = {"corpus": str(corpus), "store": store.uri, "model": model, "unit_rows": 64}
        if getattr(store, "endpoint_url", None):
            flat["endpoint_url"] = store.endpoint_url  # type: ignore[attr-defined]
        cfg = EmbedJobConfig.from_flat(flat)
        manifest = run_locally(cfg)
        out.append(build_index(store, manifest["run_id"], SERVE_IDX, BuildConfig(kind="flat")).version_id)
    return out


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def swap_latency(store: Store, n: int) -> float:
    """Median seconds of one publish/rollback alias swap, verification excluded."""
    def no_verify(s: Store, i: str, v: str) -> dict:
        return {}
    times = []
    for i in range(n):
        fn = (lambda: rollback_alias(store, IDX, verifier=no_verify)) if i % 2 else \
            (lambda: publish_version(store, IDX, "v2", verifier=no_verify))
        times.append(timed(fn))
    return statistics.median(times)


def hot_swap_and_load(store: Store, blue: str, green: str, seconds: float) -> dict[str, Any]:
    """Serve SERVE_IDX over HTTP (the real Searcher) and query it from 4 threads while
    publish(green) -> rollback -> publish(green) run; count answers and failures."""
    from engine.serve.alias import AliasSearcher
    from engine.serve.server import SearchServer

    publish_version(store, SERVE_IDX, blue)
    s = AliasSearcher(store, SERVE_IDX, "live", poll_interval=0.05).start()
    server = SearchServer(s, port=0).start()
    stop = threading.Event()
    ok, failed = [0], [0]
    lock = threading.Lock()

    def client(worker: int) -> None:
        host, port = server.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        i = worker
        while not stop.is_set():
            body = json.dumps({"queries": [QUERIES[i % len(QUERIES)]], "k": 10}).encode()
            i += 1
            try:
                conn.request("POST", "/search", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                with lock:
                    (ok if resp.status == 200 else failed)[0] += 1
            except Exception:  # noqa: BLE001
                with lock:
                    failed[0] += 1
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    swaps = []
    try:
        for action, target in (("publish", green), ("rollback", blue), ("publish", green)):
            time.sleep(seconds / 4)
            t1 = time.perf_counter()
            if action == "publish":
                publish_version(store, SERVE_IDX, target)
            else:
                rollback_alias(store, SERVE_IDX)
            assert wait_for(lambda target=target: s.status().get("version") == target, timeout=300)
            swaps.append(time.perf_counter() - t1)
        time.sleep(seconds / 4)
    finally:
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        server.shutdown()
        s.stop()
    return {"queries": ok[0], "failed": failed[0], "qps": ok[0] / elapsed,
            "publish_to_serving_s": statistics.median(swaps)}


def bench(store: Store, build: Store, tmp: Path, args: argparse.Namespace, label: str) -> dict[str, Any]:
    total = args.shards * args.shard_mib * MiB
    out: dict[str, Any] = {"backend": label, "version_mib": total / MiB}
    for v in ("v1", "v2"):
        out[f"upload_{v}_s"] = timed(lambda v=v: copy_version(build, store, IDX, v))
    out["upload_mib_s"] = total / MiB / out["upload_v2_s"]
    out["verify_s"] = timed(lambda: verify_version(store, IDX, "v1"))
    out["verify_mib_s"] = total / MiB / out["verify_s"]
    publish_version(store, IDX, "v1")
    out["swap_median_ms"] = 1000 * swap_latency(store, args.swaps)
    blue, green = build_real_versions(store, tmp, args.model or None)
    out.update(hot_swap_and_load(store, blue, green, args.load_seconds))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-mib", type=int, default=16)
    ap.add_argument("--swaps", type=int, default=20)
    ap.add_argument("--load-seconds", type=float, default=8.0)
    ap.add_argument("--model", default="hash:64",
                    help="encoder of the served versions ('' = the packaged all-MiniLM-L6-v2)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-publish-"))
    moto, url = start_moto()
    try:
        build = open_store(tmp / "build")
        for v in ("v1", "v2"):
            build_local_version(build, v, args.shards, args.shard_mib)
        os.environ.setdefault("EMBEDCTL_CACHE_DIR", str(tmp / "searcher-cache"))
        rows = [bench(open_store(tmp / "store"), build, tmp / "local", args, "local disk"),
                bench(open_store("s3://bench/emb", endpoint_url=url, multipart_threshold=8 * MiB,
                                 multipart_chunksize=8 * MiB), build, tmp / "s3", args, "S3 (moto, loopback)")]
    finally:
        moto.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"synthetic version: {args.shards} shards x {args.shard_mib} MiB; served versions: stdlib docstrings, "
          f"model {args.model or 'all-MiniLM-L6-v2'}, flat; {os.cpu_count()} CPUs")
    print("| backend | upload (verified) MiB/s | verify MiB/s | alias swap (median) | publish -> serving | "
          "HTTP q/s during swaps | failed queries |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['upload_mib_s']:.0f} | {r['verify_mib_s']:.0f} | {r['swap_median_ms']:.1f} ms "
              f"| {r['publish_to_serving_s']:.2f} s | {r['qps']:.0f} | {r['failed']} of {r['queries'] + r['failed']} |")


if __name__ == "__main__":
    main()
