"""Model migration on Cranfield with real models: blue = the packaged all-MiniLM-L6-v2 (384 dims),
green = the same model truncated Matryoshka-style to --dim dims (default 128), through every
phase, with HTTP queries on loopback during rollout -> cutover and a count of failed ones.

    .venv/bin/python benchmarks/migrate_cranfield.py                    # 384 -> 128
    .venv/bin/python benchmarks/migrate_cranfield.py --dim 64 --json
    .venv/bin/python benchmarks/migrate_cranfield.py --green-model /models/all-mpnet-base-v2  # 384 -> 768

Reads ../shared/data/cranfield (1,400 abstracts, 225 queries, graded judgments); writes the
store, the report, its screenshot and results.json under --out (default a temp dir). Prints a
markdown table (or JSON) of the figures. The embed jobs run in-process (no Ray): on a 2-core CPU
each MiniLM pass over Cranfield takes 1-3 minutes.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CRANFIELD = REPO.parent / "shared" / "data" / "cranfield"
IDX = "cranfield"


def write_corpus(out: Path, docs: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (CRANFIELD / "corpus.jsonl").read_text(encoding="utf-8").splitlines()][:docs]
    path = out / "corpus"
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{"doc_id": r["doc_id"], "title": r.get("title"), "text": r["text"]}
                                         for r in rows]), path / "part-000.parquet", row_group_size=256)
    return path


def pq_doc_ids(corpus: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [str(d) for d in pq.read_table(corpus / "part-000.parquet", columns=["doc_id"]).column("doc_id").to_pylist()]


def write_benchmark(out: Path, doc_ids: set[str]) -> Path:
    from engine.quality.benchmark import build_benchmark, save_benchmark
    from engine.quality.judgments import parse_gain_map, read_qrels, read_queries

    queries = read_queries(CRANFIELD / "queries.jsonl")
    qrels = read_qrels(CRANFIELD / "qrels.tsv", gains=parse_gain_map("cranfield"))
    bench = build_benchmark(queries, qrels, corpus_ids=doc_ids, grades={"scheme": "cranfield", "relevant_min_gain": 1},
                            name="cranfield", drop_unknown=True)
    path = out / "cranfield-bench.json"
    save_benchmark(bench, path)
    return path


class LoadLoop:
    """Two client threads sending one query per HTTP request to `embedctl serve`'s server on
    loopback, until stopped or ``max_queries``; every non-200, transport error or answer naming
    other than exactly one version counts as a failure."""

    def __init__(self, url: str, queries: list[str], max_queries: int = 20000):
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.queries = queries
        self.max_queries = max_queries
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.by_version: dict[str, int] = {}
        self.failures: list[str] = []
        self.latencies: list[float] = []
        self.threads = [threading.Thread(target=self._client, args=(w,), daemon=True) for w in range(2)]

    def _client(self, worker: int) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        i = worker
        while not self.stop.is_set():
            with self.lock:
                if sum(self.by_version.values()) + len(self.failures) >= self.max_queries:
                    return
            q = self.queries[i % len(self.queries)]
            i += 2
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/search", body=json.dumps({"queries": [q], "k": 10}),
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                body = json.loads(resp.read())
                versions = [r["version"] for r in body.get("results", [])]
                with self.lock:
                    if resp.status != 200 or len(versions) != 1:
                        self.failures.append(f"HTTP {resp.status}: {versions}")
                    else:
                        self.by_version[versions[0]] = self.by_version.get(versions[0], 0) + 1
                        self.latencies.append(time.perf_counter() - t0)
            except Exception as err:  # noqa: BLE001 - counted
                with self.lock:
                    self.failures.append(f"{type(err).__name__}: {err}")
                conn.close()
                conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        conn.close()

    def __enter__(self) -> LoadLoop:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="work dir (store, report, results) [a temp dir]")
    ap.add_argument("--dim", type=int, default=128, help="green: MiniLM truncated to this many dims")
    ap.add_argument("--green-model", default=None, help="green: another model folder instead of a truncation")
    ap.add_argument("--weights", default="5,25,100")
    ap.add_argument("--max-recall-drop", type=float, default=0.05)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--docs", type=int, default=None, help="only the first N Cranfield documents [all 1,400]")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not (CRANFIELD / "corpus.jsonl").exists():
        print(f"Cranfield not found at {CRANFIELD}", file=sys.stderr)
        return 2
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from engine.core.errors import GateError
    from engine.core.storage import open_store
    from engine.embed.config import EmbedJobConfig
    from engine.embed.pipeline import run_locally
    from engine.migrate.migration import Migration
    from engine.migrate.plan import MigrationPlan
    from engine.migrate.report import find_chromium, screenshot
    from engine.migrate.tools import Tools, default_index_builder, default_loader
    from engine.publish.aliases import publish_version
    from engine.serve.alias import AliasSearcher
    from engine.serve.server import SearchServer

    out = Path(args.out or tempfile.mkdtemp(prefix="embedctl-migrate-cranfield-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    store_uri = str(out / "store")
    store = open_store(store_uri)
    timings: dict[str, float] = {}
    def say(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    corpus = write_corpus(out, args.docs)
    t0 = time.perf_counter()
    blue_run = run_locally(EmbedJobConfig.from_flat({"corpus": str(corpus), "store": store_uri, "progress": False}))
    timings["blue_embed_s"] = time.perf_counter() - t0
    from engine.publish.aliases import read_alias

    if read_alias(store, IDX, missing_ok=True) is None:
        blue = default_index_builder(store, IDX, blue_run["run_id"], parent_version=None,
                                     options={"kind": "flat"})["version_id"]
        publish_version(store, IDX, blue, reason="Cranfield blue (MiniLM 384)")
    bench = write_benchmark(out, {json.loads(line)["doc_id"] for line in (CRANFIELD / "corpus.jsonl").read_text(encoding="utf-8").splitlines()}
                            if args.docs is None else set(pq_doc_ids(corpus)))
    # Blue's own thresholds (what production runs with today), so the report shows how far
    # green's calibrated threshold lands from them.
    from engine.quality.benchmark import load_benchmark
    from engine.quality.calibration import calibrate
    from engine.quality.calibration_store import load_calibration
    from engine.quality.pairs import make_pairs

    blue = read_alias(store, IDX).version
    if load_calibration(store, IDX, blue, inherit=False) is None:
        s = default_loader(store, IDX, blue)
        pairs = make_pairs(load_benchmark(bench), searcher=s, depth=20, unjudged_per_query=5)
        calibrate(store, IDX, blue, pairs, searcher=s, pairs_source="cranfield benchmark")
        s.close()
    embed = {"model": args.green_model} if args.green_model else {"truncate_dim": args.dim}
    plan = MigrationPlan(index=IDX, embed=embed, benchmark=str(bench), k=args.k, weights=tuple(
        float(w) for w in args.weights.split(",")), max_recall_drop=args.max_recall_drop, soak_s=2.0)
    m = Migration.start(store, plan, tools=Tools(progress=say))

    phase_s: dict[str, float] = {}
    for phase in ("baseline", "build", "compare", "calibrate"):
        t = time.perf_counter()
        m.phase(phase)
        phase_s[phase] = time.perf_counter() - t

    doc = m.read()
    queries = [q["text"] for q in json.loads(Path(bench).read_text())["queries"]]
    searcher = AliasSearcher(store, IDX, "live", poll_interval=0.1, loader=default_loader).start()
    server = SearchServer(searcher, port=0).start()
    outcome = "cut over"
    rollback_reason = None
    try:
        with LoadLoop(server.url, queries) as load:
            time.sleep(1.0)
            t = time.perf_counter()
            try:
                m2 = Migration(store, IDX, m.migration_id, tools=Tools(progress=say))
                m2.state.update(lambda d: d["plan"].update(probe_url=server.url), need_lock=False)
                m2.rollout()
                phase_s["rollout"] = time.perf_counter() - t
                t = time.perf_counter()
                m2.cutover()
                phase_s["cutover"] = time.perf_counter() - t
                green = doc["green"]["version"]
                deadline = time.time() + 30
                while searcher.status().get("version") != green and time.time() < deadline:
                    time.sleep(0.1)
            except GateError as err:
                outcome = "rolled back by a gate"
                rollback_reason = str(err)
                phase_s["rollout"] = time.perf_counter() - t
            time.sleep(1.0)
    finally:
        server.shutdown()
        searcher.stop()

    # The report the migration keeps in the store, as it stood after the last phase (before the
    # explicit rewrite below): it must say what the state says.
    import re

    stored = store.read_bytes(m.key("report.html")).decode()
    stored_status = (re.search(r'status <span class="pill (\w+)">', stored) or [None, None])[1]
    report_path = m.write_report(out / "report.html")
    shot = None
    if find_chromium():
        shot = str(screenshot(out / "report.html", out / "report.png", width=1280, height=3200))
    cmp_ = store.read_json(m.key("compare.json"))
    base = store.read_json(m.key("baseline.json"))
    final = m.read()
    k = args.k
    s = cmp_["summary"]
    cal = (final["phases"]["calibrate"].get("result") or {})
    lat = sorted(load.latencies)
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "load_average_at_end": [round(x, 1) for x in os.getloadavg()],  # other work on the machine skews timings
        "blue": {"version": doc["blue"]["version"], "model": doc["blue"]["model"].get("name"),
                 "dim": doc["blue"]["dim"]},
        "green": {"version": doc["green"]["version"], "model": doc["green"]["model"].get("name"),
                  "dim": doc["green"]["dim"], "truncate_dim": doc["green"]["model"].get("truncate_dim")},
        "benchmark": {"queries": cmp_["benchmark"]["queries"], "blue": cmp_["benchmark"]["blue"],
                      "green": cmp_["benchmark"]["green"]},
        "baseline_canary_recall": (base.get("canary") or {}).get("canary_recall"),
        "compare": {f"overlap@{k}": s["overlap_at_k"][str(k)], f"jaccard@{k}": s["jaccard_at_k"][str(k)],
                    "overlap_at_k": s["overlap_at_k"], "top1_agreement": s["top1_agreement"],
                    "spearman": s["spearman"], "kendall": s["kendall"],
                    "ks_top1": s["score_shift"]["top1"]["ks"]["statistic"],
                    "top1_mean_blue": s["score_shift"]["top1"]["blue"]["mean"],
                    "top1_mean_green": s["score_shift"]["top1"]["green"]["mean"]},
        "thresholds": {"blue": cal.get("blue_threshold"), "green": cal.get("threshold"),
                       "green_precision": cal.get("precision"), "green_recall": cal.get("recall")},
        "rollout": [{k2: st.get(k2) for k2 in ("weight", "status")} | {
            "green_recall": (st.get("gates") or {}).get("green_recall"),
            "error_rate": (st.get("gates") or {}).get("error_rate"),
            "probe_queries": (st.get("gates") or {}).get("queries")} for st in final["rollout"]["steps"]],
        "outcome": outcome, "rollback_reason": rollback_reason,
        "load": {"queries": sum(load.by_version.values()) + len(load.failures), "failed": len(load.failures),
                 "failure_samples": sorted(set(load.failures))[:5],
                 "by_version": load.by_version,
                 "p50_ms": round(1000 * lat[len(lat) // 2], 2) if lat else None,
                 "p99_ms": round(1000 * lat[int(len(lat) * 0.99)], 2) if lat else None},
        "seconds": {**{k2: round(v, 1) for k2, v in timings.items()}, **{k2: round(v, 1) for k2, v in phase_s.items()}},
        "report": report_path, "screenshot": shot, "out": str(out),
        "stored_report": {"status": stored_status, "state_status": final["status"],
                          "says_phase": bool(re.search(r"Phase: \w+", stored))},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    if args.json:
        print(json.dumps(results, indent=2, default=str))
        return 0
    b, g = results["benchmark"]["blue"], results["benchmark"]["green"]
    print(f"| Cranfield ({results['benchmark']['queries']} judged queries) | blue: {results['blue']['model']} "
          f"{results['blue']['dim']}d | green: {results['green']['model']} {results['green']['dim']}d | green - blue |")
    print("|---|---|---|---|")
    for key in (f"ndcg@{k}", f"recall@{k}", f"mrr@{k}"):
        print(f"| {key} | {b[key]:.4f} | {g[key]:.4f} | {g[key] - b[key]:+.4f} |")
    c = results["compare"]
    print(f"\noverlap@{k} {c[f'overlap@{k}']:.3f}, Jaccard@{k} {c[f'jaccard@{k}']:.3f}, top-1 agreement "
          f"{c['top1_agreement']:.3f}, Spearman {c['spearman']:.3f}, Kendall {c['kendall']:.3f}, KS(top-1) "
          f"{c['ks_top1']:.3f}; mean top-1 score {c['top1_mean_blue']:.3f} -> {c['top1_mean_green']:.3f}")
    print(f"thresholds: blue {results['thresholds']['blue']}, green {results['thresholds']['green']}")
    print(f"rollout: {results['rollout']} -> {outcome}")
    print(f"load: {results['load']}")
    print(f"seconds: {results['seconds']}")
    print(f"report: {report_path}\nscreenshot: {shot}")
    print(f"stored report after the last phase: {results['stored_report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
