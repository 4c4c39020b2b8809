"""`embedctl build-index | search | evaluate | tune-fusion`: index versions from embed runs, and queries against them."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import click

from engine.cli.app import emit_json
from engine.cli.common import ProgressBar, open_store, shared_filesystem_option, store_options, version_options

log = logging.getLogger(__name__)


class _BuildProgress:
    """The build's events as lines on stderr, with the shared progress bar over shards on a terminal."""

    def __init__(self, enabled: bool):
        self.bar = ProgressBar("adding shards", "shards", enabled=enabled)

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "planned":
            msg = (f"{event['index']}/{event['version']}: {event['kind']} ({event['factory']}) over {event['rows']:,} "
                   f"vectors in {event['shards']} shard(s)" + (" [resuming]" if event.get("resumed") else ""))
            click.echo(msg, err=True)
            for why in event.get("reasoning", []):
                click.echo(f"  - {why}", err=True)
            self.bar.start(event["shards"])
        elif kind == "trained":
            if not event.get("reused"):
                click.echo(f"trained on {event.get('vectors', 0):,} vectors in {event['seconds']:.1f}s", err=True)
            else:
                click.echo("reusing the trained quantizer of the interrupted build", err=True)
        elif kind == "shard_done":
            if self.bar.drawing:
                self.bar.update(event["done"])
            else:
                click.echo(f"shard {event['shard']} ({event['rows']:,} rows) "
                           f"{'already committed' if event['skipped'] else 'added'} [{event['done']}/{event['total']}]",
                           err=True)
        elif kind == "gate":
            self.close()
            if event.get("recall") is not None:
                knobs = ", ".join(f"{k}={event[k]}" for k in ("nprobe", "rescore_multiplier") if event.get(k))
                click.echo(f"recall@{event['k']} vs exact = {event['recall']:.4f} on {event['queries']} queries"
                           + (f" ({knobs})" if knobs else "") + f", gate {event['threshold']}", err=True)
        elif kind == "reused":
            click.echo(f"this build already finished: version {event['version']}", err=True)

    def close(self) -> None:
        self.bar.close()


@click.command("build-index")
@store_options
@click.option("--run", "run", required=True, help="The embed run to index.")
@click.option("--index", required=True, help="Index name (versions accumulate under it).")
@click.option("--kind", type=click.Choice(["ivfpq", "binary-rerank", "flat"]), default="ivfpq", show_default=True)
@click.option("--factory", default=None, help="FAISS factory string, e.g. 'OPQ48,IVF4096,PQ48x4fs' (or 'BIVF1024' "
                                              "for binary-rerank). Default: chosen from corpus size and budget.")
@click.option("--shards", type=click.IntRange(1), default=None, help="Index shards [auto: by size and workers].")
@click.option("--memory-budget", default=None, help="RAM for the whole index, e.g. 4GB or 512MiB.")
@click.option("--nlist", type=click.IntRange(1), default=None, help="IVF lists [auto: ~4*sqrt(N)].")
@click.option("--pq-m", type=click.IntRange(1), default=None, help="PQ sub-quantizers [auto: fits the budget].")
@click.option("--pq-nbits", type=click.IntRange(4, 8), default=None, help="Bits per PQ code [4: fast scan].")
@click.option("--train-size", type=click.IntRange(1), default=None, help="Training sample [auto: 64 per list].")
@click.option("--rescore", type=click.Choice(["int8", "fp16", "none"]), default="int8", show_default=True,
              help="Vectors stored beside each shard to re-rank candidates (memory-mapped).")
@click.option("--rescore-multiplier", type=click.IntRange(1), default=None,
              help="Candidates per shard = k x this [auto: tuned by the gate].")
@click.option("--nprobe", type=click.IntRange(1), default=None, help="Default IVF lists probed [auto: tuned].")
@click.option("--gate-recall", type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help="Fail (publish nothing) below this recall@10 against exact search.")
@click.option("--no-gate", is_flag=True, help="Measure recall but never fail on it.")
@click.option("--gate-queries", type=click.IntRange(1), default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sparse", type=click.Choice(["none", "bm25"]), default="none", show_default=True,
              help="bm25: BM25 shards (bm25s, English stop words, Snowball stemmer) beside the dense ones, for "
                   "search --mode sparse|hybrid.")
@click.option("--sparse-granularity", type=click.Choice(["chunk", "doc"]), default="chunk", show_default=True,
              help="What one BM25 row is: a chunk, or a whole document (its chunks joined, overlap cut; "
                   "hits come back as the document's first chunk). doc scored better on Cranfield.")
@click.option("--parent-version", default=None, help="Lineage: the version this one replaces [newest existing].")
@click.option("--force", is_flag=True, help="Build a new version even if this exact build finished before.")
@click.option("--executor", type=click.Choice(["ray", "local"]), default="ray", show_default=True,
              help="ray: shard tasks on Ray (local Ray, or --address); local: in this process.")
@click.option("--address", default=None, help="Ray address [RAY_ADDRESS, else a local Ray].")
@shared_filesystem_option
@click.option("--workers", type=click.IntRange(1), default=None, help="Shard tasks in flight [cluster CPUs].")
@click.option("--config", "config_path", default=None, help="YAML/JSON file with the same keys (flags win).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def build_index_cmd(store: str, endpoint_url: str | None, run: str, index: str, kind: str, factory: str | None,
                    shards: int | None, memory_budget: str | None, nlist: int | None, pq_m: int | None,
                    pq_nbits: int | None, train_size: int | None, rescore: str, rescore_multiplier: int | None,
                    nprobe: int | None, gate_recall: float, no_gate: bool, gate_queries: int, seed: int,
                    sparse: str, sparse_granularity: str, parent_version: str | None, force: bool, executor: str, address: str | None,
                    shared_filesystem: bool | None, workers: int | None, config_path: str | None,
                    as_json: bool) -> None:
    """Train once on a sample of an embed run, add its vectors to N shards in parallel, gate on recall.

    \b
    Examples:
      embedctl build-index --store ./store --run RUN_ID --index docs
      embedctl build-index --store ./store --run RUN_ID --index docs --kind binary-rerank --json
      embedctl build-index --store s3://bkt/emb --run RUN_ID --index docs --memory-budget 4GB --shards 8
      embedctl build-index --store ./store --run RUN_ID --index docs --factory "OPQ48,IVF4096,PQ48x4fs"
      embedctl build-index --store ./store --run RUN_ID --index docs --sparse bm25   # + BM25 for hybrid search
      embedctl build-index ... --sparse bm25 --sparse-granularity doc    # BM25 over whole documents
      python jobs/build_index.py --config build.yaml      # the same job, for `ray job submit`

    Rerunning the same command after a crash resumes (no retraining, committed shards kept);
    after success it prints the finished version. The version is published with `embedctl publish`.
    """
    from engine.core.config import load_config_file
    from engine.distributed.build_index import BuildJobConfig, run_build_job

    ctx = click.get_current_context()
    flat: dict[str, Any] = load_config_file(config_path)
    given = {
        "store": store, "endpoint_url": endpoint_url, "run": run, "index": index, "kind": kind, "factory": factory,
        "shards": shards, "memory_budget": memory_budget, "nlist": nlist, "pq_m": pq_m, "pq_nbits": pq_nbits,
        "train_size": train_size, "rescore": rescore, "rescore_multiplier": rescore_multiplier, "nprobe": nprobe,
        "gate_recall": gate_recall, "gate_queries": gate_queries, "seed": seed, "sparse": sparse,
        "sparse_granularity": sparse_granularity,
        "parent_version": parent_version, "force": force or None, "executor": executor, "address": address,
        "workers": workers, "shared_filesystem": shared_filesystem,
    }
    for name, value in given.items():
        if value is None:
            continue
        # A flag left at its default does not override the config file.
        source = ctx.get_parameter_source(name)
        if name in flat and source is not None and source.name == "DEFAULT":
            continue
        flat[name] = value
    if no_gate:
        flat["gate_recall"] = None  # measured and recorded, never failed on
    cfg = BuildJobConfig.from_flat(flat)
    progress = _BuildProgress(enabled=not as_json)
    try:
        result = run_build_job(cfg, progress=progress)
    finally:
        progress.close()
    summary = result.summary()
    if as_json:
        emit_json(summary)
        return
    gate = summary["recall_gate"] or {}
    recall = gate.get("recall")
    click.echo(f"{'reused' if result.reused else 'built'} {index}/{result.version_id}: {summary['kind']} "
               f"{summary['params']['factory']}, {summary['rows']:,} vectors in {summary['shards']} shard(s), "
               f"{summary['bytes'] / 1e6:.1f} MB"
               + (f", recall@{gate['k']} {recall:.4f}" if recall is not None else "")
               + f" ({summary['timings'].get('total_s', 0):.1f}s)")
    click.echo(f"publish it: embedctl publish --store {store} --index {index} --version {result.version_id}")


@click.command("search")
@store_options
@version_options
@click.option("--query", "-q", "queries", multiple=True, required=True, help="Query text (repeatable).")
@click.option("-k", "k", type=click.IntRange(1), default=10, show_default=True)
@click.option("--nprobe", type=click.IntRange(1), default=None, help="IVF lists probed [the version's tuned default].")
@click.option("--rescore-multiplier", type=click.IntRange(1), default=None,
              help="Candidates per shard = k x this [the version's tuned default].")
@click.option("--docs", "collapse_docs", is_flag=True, help="One hit per document (its best chunk).")
@click.option("--device", default="cpu", show_default=True, help="Where the query encoder runs (cpu, cuda).")
@click.option("--no-verify", is_flag=True, help="Skip checksum verification of the version's files.")
@click.option("--threshold", default=None,
              help="Drop hits below a score, or 'auto' (the version's calibrated thresholds; stale ones are refused).")
@click.option("--mode", type=click.Choice(["dense", "sparse", "hybrid"]), default="dense", show_default=True,
              help="dense vectors, BM25 shards (--sparse bm25 builds), or both fused.")
@click.option("--fusion", type=click.Choice(["rrf", "weighted"]), default=None,
              help="Hybrid fusion: reciprocal-rank or weighted normalised scores [the version's tuned default, else "
                   "rrf k=60].")
@click.option("--feedback-docs", type=click.IntRange(0), default=None,
              help="Hybrid: top fused hits whose vectors move the query for a second dense pass; 0 = one pass "
                   "[the fusion's own setting].")
@click.option("--where", "where", default=None,
              help="Metadata filter, e.g. \"lang = 'de' AND updated_at >= '2026-01-01'\" (= != < <= > >=, IN, "
                   "IS NULL, AND/OR/NOT, parentheses).")
@click.option("--rerank", "rerank_path", default=None, type=click.Path(exists=True, file_okay=False),
              help="A local sentence-transformers CrossEncoder folder that re-scores the top hits.")
@click.option("--rerank-depth", type=click.IntRange(1), default=None, help="Hits re-scored per query [k].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def search_cmd(store: str, endpoint_url: str | None, index: str, version: str | None, alias: str | None,
               queries: tuple[str, ...], k: int, nprobe: int | None, rescore_multiplier: int | None,
               collapse_docs: bool, device: str, no_verify: bool, threshold: str | None, mode: str,
               fusion: str | None, feedback_docs: int | None, where: str | None, rerank_path: str | None,
               rerank_depth: int | None, as_json: bool) -> None:
    """Search an index version with the model it was built with.

    \b
    Examples:
      embedctl search --store ./store --index docs --alias live --query "wing lift at high angle of attack"
      embedctl search --store ./store --index docs --version latest -q "heat transfer" -q "shock waves" -k 5 --json
      embedctl search --store ./store --index docs --alias live -q "buckling of panels" --docs --nprobe 64
      embedctl search --store ./store --index docs --alias live -q "heat transfer" --mode hybrid --fusion rrf
      embedctl search --store ./store --index docs --alias live -q "heat transfer" --mode hybrid --feedback-docs 0
      embedctl search --store ./store --index docs --alias live -q "Wärme" --where "lang = 'de' AND year >= 2020"
      embedctl search --store ./store --index docs --alias live -q "flutter" --rerank ./ce-model --rerank-depth 50
    """
    from engine.index.searcher import Searcher
    from engine.index.version import resolve_version

    st = open_store(store, endpoint_url)
    vid = resolve_version(st, index, version, alias)
    thresholds = None
    _check_search_flags(mode, threshold, feedback_docs, rerank_depth, rerank_path)
    if threshold is not None:
        from engine.quality.calibration_store import resolve_threshold

        thresholds = resolve_threshold(st, index, vid, threshold)  # refused here, before loading, if stale
    t0 = time.perf_counter()
    searcher = Searcher.load(st, index, vid, verify=not no_verify, device=device)
    reranker = searcher.reranker(rerank_path) if rerank_path else None
    t_load = time.perf_counter() - t0
    try:
        chosen = _hybrid_fusion(searcher, fusion, feedback_docs) if mode == "hybrid" else None
        t1 = time.perf_counter()
        results = searcher.search(list(queries), k, nprobe=nprobe, rescore_multiplier=rescore_multiplier,
                                  collapse_docs=collapse_docs, mode=mode, fusion=chosen or fusion, where=where,
                                  rerank=reranker, rerank_depth=rerank_depth)
        t_search = time.perf_counter() - t1
        fused = chosen.to_dict() if chosen is not None else None
    finally:
        searcher.close()
    reasons: list[str | None] = [None] * len(results)
    if thresholds is not None:
        from engine.quality.thresholds import apply_thresholds_batch

        results, reasons = apply_thresholds_batch(results, thresholds)
    if as_json:
        emit_json({"index": index, "version": vid, "alias": alias, "k": k, "threshold": threshold,
                   "results": [{"query": q, "empty_reason": why if not hits else None,
                                "hits": [{"chunk_id": h.chunk_id, "doc_id": h.doc_id, "score": h.score}
                                         for h in hits]} for q, hits, why in zip(queries, results, reasons, strict=True)],
                   "timings": {"load_s": round(t_load, 3), "search_s": round(t_search, 3),
                               **({"rerank_s": round(reranker.last_seconds, 3)} if reranker else {})},
                   **({"mode": mode} if mode != "dense" else {}), **({"fusion": fused} if fused else {}),
                   **({"where": where} if where is not None else {})})
        return
    click.echo(f"{index}/{vid}" + (f" (alias {alias})" if alias else "") + f": {len(queries)} quer"
               f"{'y' if len(queries) == 1 else 'ies'} in {t_search * 1000:.0f} ms"
               + (f" ({mode}" + (f", {fused['method']} {fused['source']}" if fused else "") + ")" if mode != "dense"
                  else "")
               + (f", rerank {reranker.last_seconds * 1000:.0f} ms" if reranker else ""), err=True)
    for q, hits, why in zip(queries, results, reasons, strict=True):
        click.echo(f"\n{q}")
        if not hits:
            click.echo(f"  (no results: {why})" if why else "  (no results)")
        for rank, h in enumerate(hits, start=1):
            click.echo(f"  {rank:>3}  {h.score:.4f}  {h.doc_id}  {h.chunk_id}")


def _check_search_flags(mode: str, threshold: str | None, feedback_docs: int | None, rerank_depth: int | None,
                        rerank_path: str | None) -> None:
    """Refuse flag combinations search cannot honour, before anything loads."""
    from engine.core.errors import ConfigError

    if threshold is not None and mode != "dense":
        raise ConfigError(f"--threshold is calibrated on dense scores; {mode} scores (BM25 or fused) need their own "
                          "calibration, which does not exist yet: drop --threshold or use --mode dense")
    if feedback_docs is not None and mode != "hybrid":
        raise ConfigError("--feedback-docs is a setting of hybrid fusion: add --mode hybrid")
    if rerank_depth is not None and rerank_path is None:
        raise ConfigError("--rerank-depth needs --rerank FOLDER")


def _hybrid_fusion(searcher: Any, fusion: str | None, feedback_docs: int | None) -> Any:
    """The FusionConfig a hybrid search runs with: ``--fusion`` or the version's default, ``--feedback-docs`` over it."""
    import dataclasses

    chosen = searcher.resolve_fusion(fusion)
    if feedback_docs is None:
        return chosen
    return dataclasses.replace(chosen, feedback_docs=feedback_docs, source="given").validate()


def _judgment_options(f: Any) -> Any:
    """``--queries`` / ``--qrels`` / ``--gain``: judged queries, as evaluate and tune-fusion read them."""
    f = click.option("--gain", type=click.Choice(["cranfield", "linear", "binary"]), default="cranfield",
                     show_default=True, help="Grade -> gain: cranfield = 5-grade for grades 1..4 (1 best), linear = "
                                             "grade, binary = 1 if > 0.")(f)
    f = click.option("--qrels", "qrels_path", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="TSV with a header: query_id doc_id grade.")(f)
    f = click.option("--queries", "queries_path", default=None, type=click.Path(exists=True, dir_okay=False),
                     help='JSON lines: {"query_id", "text"}.')(f)
    return f


@click.command("evaluate")
@store_options
@version_options
@_judgment_options
@click.option("--benchmark", "benchmark_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A benchmark file (embedctl benchmark build) instead of --queries/--qrels; per lang/type breakdown.")
@click.option("-k", "k", type=click.IntRange(1), default=10, show_default=True)
@click.option("--per-query", "per_query_path", default=None,
              help="Per-query results (JSON lines) [eval-<index>-<version>.jsonl].")
@click.option("--no-exact", is_flag=True, help="Skip the exact-search baseline.")
@click.option("--nprobe", type=click.IntRange(1), default=None)
@click.option("--rescore-multiplier", type=click.IntRange(1), default=None)
@click.option("--device", default="cpu", show_default=True)
@click.option("--modes", default=None,
              help="Also compare search modes side by side, e.g. dense,sparse,hybrid (a version with BM25 shards).")
@click.option("--by", "by", default=None, metavar="COLUMN",
              help="Also break the figures down by a metadata column (e.g. lang): per value, its queries searched "
                   "with the filter COLUMN = value, in each --modes mode [dense].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def evaluate_cmd(store: str, endpoint_url: str | None, index: str, version: str | None, alias: str | None,
                 queries_path: str | None, qrels_path: str | None, benchmark_path: str | None, k: int, gain: str,
                 per_query_path: str | None, no_exact: bool, nprobe: int | None, rescore_multiplier: int | None,
                 device: str, modes: str | None, by: str | None, as_json: bool) -> None:
    """recall@k, MRR@k and graded nDCG@k of a version on judged queries, beside exact search on the same vectors.

    \b
    Examples:
      embedctl evaluate --store ./store --index cranfield --alias live \\
          --queries ../shared/data/cranfield/queries.jsonl --qrels ../shared/data/cranfield/qrels.tsv
      embedctl evaluate --store ./store --index docs --version latest --queries q.jsonl --qrels q.tsv -k 20 --json
      embedctl evaluate --store ./store --index docs --alias live --queries q.jsonl --qrels q.tsv \
          --modes dense,sparse,hybrid
      embedctl evaluate --store ./store --index docs --alias live --queries q.jsonl --qrels q.tsv --by lang
    """
    from engine.core.errors import ConfigError
    from engine.index.version import resolve_version
    from engine.quality.evaluate import EvalConfig, evaluate_version

    st = open_store(store, endpoint_url)
    vid = resolve_version(st, index, version, alias)
    if benchmark_path is not None:
        if queries_path or qrels_path:
            raise ConfigError("give --benchmark or --queries/--qrels, not both")
        from engine.index.searcher import Searcher
        from engine.quality.benchmark import evaluate_benchmark, load_benchmark

        searcher = Searcher.load(st, index, vid, device=device)
        try:
            result = evaluate_benchmark(searcher, load_benchmark(benchmark_path), ks=(k,), store=st,
                                        exact=not no_exact, nprobe=nprobe)
        finally:
            searcher.close()
        if as_json:
            emit_json({"index": index, "version": vid, **result})
        else:
            click.echo(json.dumps({"index": index, "version": vid, **result}, indent=2, default=str))
        return
    if not (queries_path and qrels_path):
        raise ConfigError("evaluate needs --queries and --qrels, or --benchmark")
    per_query_path = per_query_path or f"eval-{index}-{vid}.jsonl"
    cfg = EvalConfig(k=k, gain=gain, exact=not no_exact, nprobe=nprobe, rescore_multiplier=rescore_multiplier)
    summary = evaluate_version(st, index, vid, queries_path, qrels_path, cfg, per_query_path=per_query_path,
                               device=device)
    if modes:
        summary["modes"] = _compare_modes(st, index, vid, queries_path, qrels_path, gain, k, modes, device)
    if by:
        summary["by"] = {"column": by, "values": _compare_modes(st, index, vid, queries_path, qrels_path, gain, k,
                                                                modes or "dense", device, by=by)}
    if as_json:
        emit_json(summary)
        return
    m = summary["metrics"]
    click.echo(f"{index}/{vid} ({summary['kind']}): {summary['evaluated']} judged queries, k={k}, gain {gain}")
    names = list(m["index"])
    click.echo(f"  {'':8}" + "".join(f"{n:>12}" for n in names))
    for row in ("index", "exact", "retained"):
        if row in m:
            click.echo(f"  {row:8}" + "".join(f"{m[row][n]:>12.4f}" if m[row][n] is not None else f"{'-':>12}"
                                              for n in names))
    if f"recall_vs_exact@{k}" in m:
        click.echo(f"  chunk recall@{k} of the index against exact search: {m[f'recall_vs_exact@{k}']:.4f}")
    click.echo(f"  per-query results: {summary['per_query_path']}")
    if modes:
        click.echo(f"  search modes (documents, k={k}):")
        for mode, row in summary["modes"].items():
            click.echo(f"  {mode:8}" + "".join(f"{row[n]:>12.4f}" for n in names))
    if by:
        click.echo(f"  by {by} (documents, k={k}; each value's queries searched with the filter {by} = value):")
        for value, entry in summary["by"]["values"].items():
            for mode, row in entry["modes"].items():
                click.echo(f"  {value[:12]:12} {mode:8} {entry['queries']:>5}q"
                           + "".join(f"{row[n]:>12.4f}" for n in names))


def _compare_modes(st: Any, index: str, vid: str, queries_path: str, qrels_path: str, gain: str, k: int,
                   modes: str, device: str, by: str | None = None) -> dict[str, Any]:
    from engine.core.errors import ConfigError
    from engine.index.retrieve import MODES
    from engine.index.searcher import Searcher
    from engine.index.tuning import compare_by, compare_modes
    from engine.quality.judgments import load_qrels, load_queries
    from engine.quality.metrics import query_metrics

    wanted = [m.strip() for m in modes.split(",") if m.strip()]
    bad = [m for m in wanted if m not in MODES]
    if bad or not wanted:
        raise ConfigError(f"--modes takes a comma list of {', '.join(MODES)}, got {modes!r}")
    queries = [(q.query_id, q.text) for q in load_queries(queries_path)]
    with Searcher.load(st, index, vid, device=device) as searcher:
        if by is not None:
            return compare_by(searcher, queries, load_qrels(qrels_path, gain), query_metrics, by, k=k, modes=wanted)
        return compare_modes(searcher, queries, load_qrels(qrels_path, gain), query_metrics, k=k, modes=wanted)


@click.command("tune-fusion")
@store_options
@version_options
@_judgment_options
@click.option("-k", "k", type=click.IntRange(1), default=10, show_default=True, help="nDCG@k is what is tuned.")
@click.option("--split", "share", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Share of the queries the fusion is tuned on; the rest report it (held out).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--fold", type=click.IntRange(0, 1), default=0, show_default=True,
              help="1 swaps the tuning and held-out parts (with --split 0.5: run both folds and every query is "
                   "reported by a fusion not tuned on it).")
@click.option("--depth", type=click.IntRange(1), default=100, show_default=True, help="Candidates from each list.")
@click.option("--feedback/--no-feedback", default=True, show_default=True,
              help="Also try a second dense pass from the query vector moved toward the top fused hits (vector "
                   "pseudo-relevance feedback: 2, 3 or 5 hits x weight 0.5, 1 or 2).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def tune_fusion_cmd(store: str, endpoint_url: str | None, index: str, version: str | None, alias: str | None,
                    queries_path: str | None, qrels_path: str | None, gain: str, k: int, share: float, seed: int,
                    fold: int, depth: int, feedback: bool, device: str, as_json: bool) -> None:
    """Tune hybrid fusion (RRF k and weights, or weighted normalised scores, each with or without a feedback pass)
    on judged queries; store it beside the version, where `search --mode hybrid` finds it as its default.

    \b
    Examples:
      embedctl tune-fusion --store ./store --index cranfield --alias live \\
          --queries ../shared/data/cranfield/queries.jsonl --qrels ../shared/data/cranfield/qrels.tsv
      embedctl tune-fusion ... --split 0.5 --fold 1      # the other half: together, a 2-fold figure
      embedctl tune-fusion ... --no-feedback             # one-pass fusions only (RRF / weighted)
    """
    from engine.index.searcher import Searcher
    from engine.index.tuning import tune_version
    from engine.index.version import resolve_version
    from engine.quality.judgments import load_qrels, load_queries
    from engine.quality.metrics import ndcg_at_k

    if not (queries_path and qrels_path):
        from engine.core.errors import ConfigError

        raise ConfigError("tune-fusion needs --queries and --qrels (judged queries)")
    st = open_store(store, endpoint_url)
    vid = resolve_version(st, index, version, alias)
    queries = [(q.query_id, q.text) for q in load_queries(queries_path)]
    qrels = load_qrels(qrels_path, gain)
    with Searcher.load(st, index, vid, device=device) as searcher:
        record = tune_version(searcher, st, queries, qrels, ndcg_at_k, k=k, share=share, seed=seed, depth=depth,
                              label=f"{queries_path} + {qrels_path}", fold=fold, feedback=feedback)
    bench = record["benchmark"]
    out = {"index": index, "version": vid, "record": record["key"], "chosen": record["chosen"],
           "tuned_on": bench["tuned_on"], "held_out": bench["held_out"], f"tuned_ndcg@{k}": record["tuned_value"],
           f"held_out_ndcg@{k}": record["held_out"]}
    if as_json:
        emit_json(out)
        return
    c = record["chosen"]
    how = f"rrf k={c['rrf_k']}" if c["method"] == "rrf" else f"weighted ({c.get('norm', 'minmax')})"
    fb = f", feedback {c['feedback_docs']} hits x {c['feedback_weight']}" if c.get("feedback_docs") else ""
    click.echo(f"{index}/{vid}: fusion {how}, dense weight {c['dense_weight']}{fb} (nDCG@{k} "
               f"{record['tuned_value']:.4f} on {bench['tuned_on']} queries); stored as {record['key']}")
    click.echo(f"  held out ({bench['held_out']} queries): " + ", ".join(
        f"{name} {v:.4f}" for name, v in record["held_out"].items()))
