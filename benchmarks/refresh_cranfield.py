"""Incremental refresh vs full re-embed on Cranfield, same script run, same machine.

    .venv/bin/python benchmarks/refresh_cranfield.py [--changes 14] [--model default] [--no-verify] [--out r.json]

1. Cranfield (../shared/data/cranfield/corpus.jsonl, 1,400 abstracts) -> Parquet snapshot v1;
2. full embed of v1 with the embed job on a local Ray (`engine.distributed.embed.run_embed_job`, what
   `embedctl embed` runs; Ray is started before the clock starts), then build (exact) and publish
   ``live``;
3. snapshot v2 = v1 with 1% of the documents changed (``--changes 14``: a third rewritten, a third
   deleted, a third added, from the seeded RNG);
4. `engine.distributed.refresh.run_refresh_job` (what `embedctl refresh --publish-to live` runs), timed end to
   end: plan, lease, chunk, reuse/embed, diff, index update, recall gate, CAS publish;
5. with verification (default): a full embed + build of v2 in another store, then the 225
   Cranfield queries against both: top-10 overlap, and deleted documents never returned.

Reported: both wall times and their ratio (the embed job timed with Ray already up, the
conservative figure; also with Ray's start, as `embedctl embed` is felt), embedding calls made vs
a full re-embed, the per-category counts, the strategy and its reason. The refresh pays a fixed
cost whatever the change: chunking the whole snapshot (to find what changed) and loading the
model in a side process (its import overlaps the chunking).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CRANFIELD = REPO.parent / "shared" / "data" / "cranfield"


def load_cranfield() -> list[dict]:
    path = CRANFIELD / "corpus.jsonl"
    if not path.exists():
        sys.exit(f"Cranfield not found at {path}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"doc_id": str(r["doc_id"]), "title": r.get("title"), "text": r["text"]} for r in rows]


def write_snapshot(out: Path, docs: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    for i in range(2):  # two files, as a daily export would be split
        part = docs[i::2]
        pq.write_table(pa.Table.from_pylist(part), out / f"part-{i}.parquet", row_group_size=128)
    return out


def one_percent_change(docs: list[dict], changes: int, seed: int = 0) -> tuple[list[dict], dict[str, list[str]]]:
    """``changes`` documents: rewritten (a sentence added, one replaced), deleted, and added (new ids)."""
    rng = random.Random(seed)
    n_mod = changes - 2 * (changes // 3)
    n_del = n_add = changes // 3
    picked = rng.sample(range(len(docs)), n_mod + n_del)
    mod, dele = set(picked[:n_mod]), set(picked[n_mod:])
    out = []
    for i, d in enumerate(docs):
        if i in dele:
            continue
        if i in mod:
            donor = docs[rng.randrange(len(docs))]["text"].split(" . ")
            sentences = d["text"].split(" . ")
            sentences[rng.randrange(len(sentences))] = rng.choice(donor)
            d = {**d, "text": " . ".join(sentences) + " . revised: " + rng.choice(donor)}
        out.append(d)
    for j in range(n_add):
        a, b = rng.sample(docs, 2)
        out.append({"doc_id": f"new-{j + 1}", "title": a["title"], "text": a["text"] + " . " + b["text"]})
    return out, {"modified": [docs[i]["doc_id"] for i in sorted(mod)],
                 "deleted": [docs[i]["doc_id"] for i in sorted(dele)], "added": [f"new-{j + 1}" for j in range(n_add)]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--changes", type=int, default=14, help="documents changed (14 = 1%% of Cranfield)")
    ap.add_argument("--model", default=None, help="model (default: the packaged all-MiniLM-L6-v2)")
    ap.add_argument("--no-verify", action="store_true", help="skip the full rebuild of v2 used to check results")
    ap.add_argument("--repeat", type=int, default=3, help="refreshes to time, each on a copy of the prepared store")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--out", default=None, help="also write the results JSON here")
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    from engine.core.storage import open_store
    from engine.distributed.embed import run_embed_job
    from engine.distributed.refresh import run_refresh_job
    from engine.distributed.runtime import init_ray
    from engine.embed.config import EmbedJobConfig
    from engine.index.build import build_index
    from engine.index.params import BuildConfig
    from engine.publish.aliases import publish_version, read_alias
    from engine.refresh.config import RefreshConfig

    work = Path(tempfile.mkdtemp(prefix="embedctl-refresh-bench-"))
    docs = load_cranfield()
    v1 = write_snapshot(work / "v1", docs)
    new_docs, changed = one_percent_change(docs, args.changes)
    v2 = write_snapshot(work / "v2", new_docs)
    store_uri = str(work / "store")
    embed_flat = {"model": args.model, "unit_rows": 256}
    res: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                 "python": platform.python_version(), "docs": len(docs), "changes": changed}

    t = time.perf_counter()
    init_ray(None)
    res["ray_start_s"] = round(time.perf_counter() - t, 2)

    print(f"full embed of v1 ({len(docs)} docs) ...", file=sys.stderr)
    t = time.perf_counter()
    m1 = run_embed_job(EmbedJobConfig.from_flat({"corpus": str(v1), "store": store_uri, **embed_flat}))
    res["full_embed_s"] = round(time.perf_counter() - t, 2)
    store = open_store(store_uri)
    t = time.perf_counter()
    b1 = build_index(store, m1["run_id"], "cranfield", BuildConfig.from_dict({"kind": "flat"}))
    publish_version(store, "cranfield", b1.version_id, "live")
    res["full_build_publish_s"] = round(time.perf_counter() - t, 2)
    res["full_chunks"] = m1["counts"]["chunks"]

    # Copies of the store as it is now (v1 live), one per timed refresh; the first one is kept for verification.
    copies = [store_uri] + [str(work / f"store-{i}") for i in range(1, max(1, args.repeat))]
    for c in copies[1:]:
        shutil.copytree(store_uri, c)
    times, s = [], None
    for i, c in enumerate(copies):
        print(f"refresh {i + 1}/{len(copies)} with {args.changes} changed docs ...", file=sys.stderr)
        t = time.perf_counter()
        si = run_refresh_job(RefreshConfig.from_flat({"corpus": str(v2), "store": c, "index": "cranfield",
                                                      "from_alias": "live", "publish_to": "live", **embed_flat}))
        times.append(round(time.perf_counter() - t, 2))
        assert si["status"] == "published" and si["embedding_calls"] == s_calls(si), si
        s = s or si
    assert s is not None
    res["refresh_runs_s"] = times
    res["refresh_s"] = sorted(times)[len(times) // 2]  # the median
    res["refresh_over_full_embed"] = round(res["refresh_s"] / res["full_embed_s"], 4)
    res["refresh_over_full_embed_with_ray_start"] = round(res["refresh_s"] / (res["full_embed_s"] + res["ray_start_s"]), 4)
    res["refresh"] = {k: s.get(k) for k in ("status", "docs", "chunks", "embedding_calls", "reused_vectors", "reused_by_hash",
                                            "saved_embedding_calls", "strategy", "strategy_reason", "timings",
                                            "executor", "version_id", "gates", "full_embed", "model_loader")}
    assert read_alias(store, "cranfield", "live").version == s["version_id"]

    if not args.no_verify:
        print("verification: full embed + build of v2 ...", file=sys.stderr)
        ref_uri = str(work / "ref")
        t = time.perf_counter()
        m2 = run_embed_job(EmbedJobConfig.from_flat({"corpus": str(v2), "store": ref_uri, **embed_flat}))
        res["full_embed_v2_s"] = round(time.perf_counter() - t, 2)
        # The machine is shared: full embeds of the same corpus vary; compare with the faster (conservative).
        res["refresh_over_fastest_full_embed"] = round(res["refresh_s"] / min(res["full_embed_s"],
                                                                               res["full_embed_v2_s"]), 4)
        ref = open_store(ref_uri)
        b2 = build_index(ref, m2["run_id"], "cranfield", BuildConfig.from_dict({"kind": "flat"}))
        res["verify"] = verify(store, s["version_id"], ref, b2.version_id, set(changed["deleted"]),
                               set(changed["modified"]) | set(changed["added"]))

    print(json.dumps(res, indent=2, default=str))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, default=str) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def s_calls(summary: dict) -> int:
    """New + changed chunks, less those whose exact text the live run had already embedded (moved text)."""
    return int(summary["chunks"]["new"]) + int(summary["chunks"]["changed"]) - int(summary["reused_by_hash"])


def verify(store, version: str, ref, ref_version: str, deleted: set[str], touched: set[str]) -> dict:
    """The 225 Cranfield queries on the refreshed version and on a full rebuild of v2 (both exact)."""
    from engine.index.searcher import Searcher

    queries = [json.loads(line) for line in (CRANFIELD / "queries.jsonl").read_text().splitlines() if line.strip()]
    texts = [q.get("text") or q.get("query") for q in queries]
    with Searcher.load(store, "cranfield", version) as a, Searcher.load(ref, "cranfield", ref_version) as b:
        ra, rb = a.search(texts, 10), b.search(texts, 10)
        deep = a.search(texts, 100)
    same_lists = sum([h.chunk_id for h in x] == [h.chunk_id for h in y] for x, y in zip(ra, rb, strict=True))
    overlap = sum(len({h.chunk_id for h in x} & {h.chunk_id for h in y}) for x, y in zip(ra, rb, strict=True)) / (10 * len(texts))
    # Queries whose answers did not change: neither top-10 touches a modified, added or deleted document.
    stable = [(x, y) for x, y in zip(ra, rb, strict=True) if not ({h.doc_id for h in x} | {h.doc_id for h in y}) & (touched | deleted)]
    stable_equal = sum([h.chunk_id for h in x] == [h.chunk_id for h in y] for x, y in stable)
    max_score_diff = max((abs(h1.score - h2.score) for x, y in stable for h1, h2 in zip(x, y, strict=False)), default=0.0)
    return {"queries": len(texts), "identical_top10_lists": same_lists, "top10_overlap": round(overlap, 4),
            "stable_queries": len(stable), "stable_identical": stable_equal,
            "stable_max_score_diff": float(f"{max_score_diff:.2e}"),
            "deleted_docs_returned_in_top100": sum(h.doc_id in deleted for hits in deep for h in hits)}


if __name__ == "__main__":
    main()
