"""`embedctl benchmark | calibrate | canary | drift`: the quality loop's instruments."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

from engine.cli.app import emit_json
from engine.cli.common import open_store as _open
from engine.cli.common import store_options

log = logging.getLogger(__name__)


def _f(x: Any, nd: int = 4) -> str:
    return "-" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


# ---------------------------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------------------------


@click.group("benchmark")
def benchmark_group() -> None:
    """Offline benchmarks: queries + graded judgments + the corpus they were judged against.

    \b
    Examples:
      embedctl benchmark build --queries q.jsonl --qrels qrels.tsv --store ./store --corpus-run RUN --out bench.json
      embedctl benchmark show bench.json
      embedctl benchmark pairs bench.json --store ./store --index docs --version v1 --out pairs.jsonl
      embedctl benchmark evaluate bench.json --store ./store --index docs --alias live -k 10 -k 100
    """


@benchmark_group.command("build")
@click.option("--queries", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Queries: JSONL/CSV/TSV/Parquet with query_id, text (optional lang, type).")
@click.option("--qrels", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Judgments: TSV/CSV with query_id, doc_id, grade (header), TREC qrels, or JSONL.")
@click.option("--corpus-run", default=None, help="The embed run whose documents the judgments must point at.")
@click.option("--store", default=None, envvar="EMBEDCTL_STORE", help="Store holding --corpus-run.")
@click.option("--endpoint-url", default=None, envvar="EMBEDCTL_S3_ENDPOINT_URL")
@click.option("--corpus", "corpus_path", default=None, type=click.Path(exists=True),
              help="Or a corpus file/folder (Parquet or JSONL) to check doc ids against.")
@click.option("--id-column", default="doc_id", show_default=True, help="Doc id column of --corpus.")
@click.option("--gains", default="identity", show_default=True,
              help="Grade -> gain: identity (grades <= 0 are non-relevant), cranfield (1..4 best..least -> 4..1, "
                   "-1 -> 0), or a map like '1=4,2=3,3=2,4=1,-1=0'.")
@click.option("--relevant-min-gain", type=float, default=1.0, show_default=True,
              help="Gain from which a doc counts as relevant for recall/MRR and calibration pairs.")
@click.option("--name", default=None, help="Benchmark name [the --out file's stem].")
@click.option("--drop-unknown", is_flag=True, help="Drop judgments of docs missing from the corpus (counted) "
                                                   "instead of refusing the benchmark.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Benchmark file to write (.json or .json.gz).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def benchmark_build(queries: str, qrels: str, corpus_run: str | None, store: str | None, endpoint_url: str | None,
                    corpus_path: str | None, id_column: str, gains: str, relevant_min_gain: float, name: str | None,
                    drop_unknown: bool, out: str, as_json: bool) -> None:
    """Build a versioned offline benchmark and print its summary.

    Judgments that point at documents not in the corpus are refused, with their count.

    \b
    Examples:
      embedctl benchmark build --queries q.jsonl --qrels qrels.tsv --store ./store --corpus-run RUN --out b.json
      embedctl benchmark build --queries ../shared/data/cranfield/queries.jsonl \\
          --qrels ../shared/data/cranfield/qrels.tsv --corpus ../shared/data/cranfield/corpus.jsonl \\
          --gains cranfield --relevant-min-gain 2 --out cranfield.json
    """
    from engine.core.errors import ConfigError
    from engine.quality.benchmark import build_benchmark, corpus_doc_ids, run_doc_ids, save_benchmark
    from engine.quality.judgments import parse_gain_map, read_qrels, read_queries

    if corpus_run and corpus_path:
        raise ConfigError("give --corpus-run or --corpus, not both")
    if corpus_run and not store:
        raise ConfigError("--corpus-run needs --store (the store that holds the run)")
    gain_map = parse_gain_map(gains)
    corpus_ids: set[str] | None = None
    source: dict[str, Any] | None = None
    if corpus_run:
        assert store is not None  # checked above
        st = _open(store, endpoint_url)
        corpus_ids, manifest = run_doc_ids(st, corpus_run)
        source = {"run": corpus_run, "store": st.describe(), "inputs": manifest.get("inputs")}
    elif corpus_path:
        corpus_ids = corpus_doc_ids(corpus_path, id_column)
        source = {"path": str(Path(corpus_path).resolve())}
    else:
        log.warning("no --corpus-run/--corpus: judgments are not checked against a corpus, coverage is unknown")
    bench = build_benchmark(
        read_queries(queries), read_qrels(qrels, gain_map), corpus_ids=corpus_ids, corpus_source=source,
        grades={"scheme": gains, "gain_map": {str(k): v for k, v in (gain_map or {}).items()} or None,
                "relevant_min_gain": relevant_min_gain},
        name=name or Path(out).name.split(".")[0], drop_unknown=drop_unknown)
    save_benchmark(bench, out)
    if as_json:
        emit_json({"out": out, "benchmark_id": bench.benchmark_id, "corpus": bench.corpus, "summary": bench.summary})
        return
    _echo_benchmark(bench, out)


def _echo_benchmark(bench: Any, path: str) -> None:
    s = bench.summary
    click.echo(f"benchmark {bench.benchmark_id} -> {path}")
    click.echo(f"  queries            {s['queries']} ({s['queries_with_relevant']} with a relevant doc, "
               f"{s['queries_without_judgments']} unjudged)")
    click.echo(f"  judgments          {s['judgments']} ({s['relevant_judgments']} relevant at gain >= "
               f"{bench.relevant_min_gain:g}); gains {s['gain_histogram']}")
    jd, rd = s["judged_docs_per_query"], s["relevant_docs_per_query"]
    click.echo(f"  judged per query   mean {jd['mean']}, median {jd['median']:g}, min {jd['min']:g}, max {jd['max']:g}"
               f"  (relevant: mean {rd['mean']})")
    if bench.corpus.get("docs"):
        click.echo(f"  corpus             {bench.corpus['docs']} docs, fingerprint {bench.corpus['fingerprint'][:12]}; "
                   f"{s['judged_docs']} judged = coverage {s['corpus_coverage']:.1%}")
    else:
        click.echo("  corpus             not checked (no --corpus-run/--corpus)")
    if s.get("unknown_doc_judgments_dropped"):
        click.echo(f"  dropped            {s['unknown_doc_judgments_dropped']} judgments of docs not in the corpus")
    for col in ("lang", "type"):
        if s.get(f"by_{col}"):
            click.echo(f"  by {col:<15} {s[f'by_{col}']}")


@benchmark_group.command("show")
@click.argument("benchmark", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def benchmark_show(benchmark: str, as_json: bool) -> None:
    """Print a benchmark's summary (queries, judgments, corpus coverage)."""
    from engine.quality.benchmark import load_benchmark
    bench = load_benchmark(benchmark)
    if as_json:
        emit_json({"benchmark_id": bench.benchmark_id, "name": bench.name, "created_at": bench.created_at,
                   "grades": bench.grades, "corpus": bench.corpus, "summary": bench.summary})
        return
    _echo_benchmark(bench, benchmark)


@benchmark_group.command("pairs")
@click.argument("benchmark", type=click.Path(exists=True, dir_okay=False))
@click.option("--store", default=None, envvar="EMBEDCTL_STORE", help="Store holding --index (for hard negatives).")
@click.option("--endpoint-url", default=None, envvar="EMBEDCTL_S3_ENDPOINT_URL")
@click.option("--index", default=None, help="With --version: sample unjudged top results as hard negatives.")
@click.option("--version", "version", default=None)
@click.option("--unjudged-per-query", type=click.IntRange(min=0), default=3, show_default=True,
              help="Unjudged docs from each query's top --depth taken as negatives (needs --index/--version).")
@click.option("--depth", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--relevant-min-gain", type=float, default=None,
              help="Gain from which a judged doc is a positive [the benchmark's].")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Pairs file to write (JSONL).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def benchmark_pairs(benchmark: str, store: str | None, endpoint_url: str | None, index: str | None, version: str | None,
                    unjudged_per_query: int, depth: int, seed: int, relevant_min_gain: float | None, out: str,
                    as_json: bool) -> None:
    """Labelled (query, doc_id, relevant) pairs for `calibrate`, from a benchmark.

    Relevant: gain >= the benchmark's relevant-min-gain. Non-relevant: judged with gain 0, plus
    sampled unjudged docs from the version's top results (hard negatives). Judged docs in
    between are left out.
    """
    from engine.core.errors import ConfigError
    from engine.quality.benchmark import load_benchmark
    from engine.quality.pairs import make_pairs, write_pairs

    bench = load_benchmark(benchmark)
    searcher = None
    if index or version:
        if not (index and version and store):
            raise ConfigError("hard negatives need --store, --index and --version together")
        from engine.index.searcher import Searcher

        searcher = Searcher.load(_open(store, endpoint_url), index, version, verify=True)
    pairs = make_pairs(bench, searcher=searcher, depth=depth,
                         unjudged_per_query=unjudged_per_query if searcher else 0, seed=seed,
                         min_gain=relevant_min_gain)
    write_pairs(pairs, out)
    summary = {"out": out, "pairs": len(pairs), "relevant": sum(p.relevant for p in pairs),
               "non_relevant": sum(not p.relevant for p in pairs), "queries": len({p.query for p in pairs})}
    if as_json:
        emit_json(summary)
    else:
        click.echo(f"{summary['pairs']} pairs ({summary['relevant']} relevant, {summary['non_relevant']} non-relevant) "
                   f"over {summary['queries']} queries -> {out}")


@benchmark_group.command("evaluate")
@click.argument("benchmark", type=click.Path(exists=True, dir_okay=False))
@store_options
@click.option("--index", required=True, help="Index name.")
@click.option("--version", "version", default=None, help="Version id, or 'latest'.")
@click.option("--alias", default=None, help="Use the version this alias points to.")
@click.option("-k", "ks", type=click.IntRange(1), multiple=True, default=(10, 100), show_default=True,
              help="Cutoffs (repeatable).")
@click.option("--no-exact", is_flag=True, help="Skip the exact-search baseline.")
@click.option("--nprobe", type=click.IntRange(1), default=None)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the JSON result here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def benchmark_evaluate(benchmark: str, store: str, endpoint_url: str | None, index: str, version: str | None,
                       alias: str | None, ks: tuple[int, ...], no_exact: bool, nprobe: int | None, out: str | None,
                       as_json: bool) -> None:
    """recall@k, MRR@k, nDCG@k of a version on a benchmark, per lang and per type when present.

    \b
    Example:
      embedctl benchmark evaluate cranfield.json --store ./store --index cranfield --alias live -k 10 -k 100
    """
    from engine.index.searcher import Searcher
    from engine.index.version import resolve_version
    from engine.quality.benchmark import evaluate_benchmark, load_benchmark
    from engine.quality.reports import write_text_atomic

    st = _open(store, endpoint_url)
    vid = resolve_version(st, index, version, alias)
    with Searcher.load(st, index, vid, verify=True) as searcher:
        res = evaluate_benchmark(searcher, load_benchmark(benchmark), ks=ks, store=st, exact=not no_exact,
                                   nprobe=nprobe)
    if out:
        write_text_atomic(out, json.dumps(res, indent=1, sort_keys=True) + "\n")
    if as_json:
        emit_json(res)
        return
    names = list(res["index"])
    click.echo(f"{index}/{vid} ({res['kind']}) on {res['benchmark']}: {res['evaluated']} queries "
               f"({res['skipped_no_relevant']} without a relevant doc skipped)"
               + ("" if res["corpus_match"] in (None, True) else "; WARNING: judged against another corpus"))
    click.echo(f"  {'':20}{'queries':>8}" + "".join(f"{n:>12}" for n in names))
    rows = [("all", res)] + [(f"{col}={v}", t) for col in ("lang", "type") for v, t in res.get(f"by_{col}", {}).items()]
    for label, t in rows:
        for side in ("index", "exact"):
            if side in t:
                cells = "".join(f"{t[side][n]:>12.4f}" for n in names)
                click.echo(f"  {(label + ' ' + side):20}{t['queries']:>8}{cells}")


# ---------------------------------------------------------------------------------------------
# calibrate
# ---------------------------------------------------------------------------------------------


@click.command()
@store_options
@click.option("--index", required=True, help="Index name.")
@click.option("--version", "version", required=True, help="The version to calibrate.")
@click.option("--pairs", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Labelled pairs: JSONL/CSV/TSV/Parquet with query, doc_id, relevant (0/1).")
@click.option("--beta", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="F-beta weight: >1 favours recall, <1 precision.")
@click.option("--rule", type=click.Choice(["absolute", "relative"]), default="absolute", show_default=True,
              help="What `search --threshold auto` applies: the absolute F-beta threshold, or within-delta-of-top.")
@click.option("--depth", type=click.IntRange(min=1), default=100, show_default=True,
              help="Hits searched per query; a pair outside them counts as not retrieved.")
@click.option("--floor", type=float, default=None, help="A fixed minimum-score floor [chosen from --floor-recall].")
@click.option("--floor-recall", type=click.FloatRange(0, 1, min_open=True), default=0.99, show_default=True,
              help="The chosen floor keeps this share of the retrieved relevant pairs.")
@click.option("--no-plot", "plot", flag_value=False, default=True, help="Skip the PNG.")
@click.option("--plot-out", type=click.Path(dir_okay=False), default=None, help="Also save the PNG here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def calibrate(store: str, endpoint_url: str | None, index: str, version: str, pairs: str, beta: float, rule: str,
              depth: int, floor: float | None, floor_recall: float, plot: bool, plot_out: str | None,
              as_json: bool) -> None:
    """Fit similarity thresholds for an index version from labelled pairs.

    Pairs are scored through the version's model and index (quantization included); the
    threshold maximising F-beta, a relative-to-best margin and a minimum-score floor are stored
    with the precision-recall curve as indexes/<index>/versions/<v>/calibration/<UTC ts>.json,
    with the curve plotted next to it (.png).

    \b
    Examples:
      embedctl calibrate --store ./store --index docs --version v2 --pairs pairs.jsonl
      embedctl calibrate --store ./store --index docs --version v2 --pairs pairs.jsonl --beta 2 --rule relative
    """
    from engine.quality.calibration import CalibrationConfig, calibrate
    from engine.quality.calibration_store import calibration_prefix
    from engine.quality.pairs import read_pairs

    st = _open(store, endpoint_url)
    cfg = CalibrationConfig(beta=beta, depth=depth, rule="relative" if rule == "relative" else "absolute",
                            floor=floor, floor_recall=floor_recall, plot=plot)
    rec = calibrate(st, index, version, read_pairs(pairs), cfg, pairs_source=str(Path(pairs).resolve()))
    if plot_out and rec.get("plot"):
        Path(plot_out).write_bytes(st.read_bytes(f"{calibration_prefix(index, version)}/{rec['plot']}"))
    if as_json:
        emit_json({k: v for k, v in rec.items() if k not in ("curve", "reference")})
        return
    a, r, fl, p = rec["absolute"], rec["relative"], rec["floor"], rec["pairs"]
    click.echo(f"calibrated {index}/{version} ({rec['calibration_id']}) on {p['n']} pairs "
               f"({p['relevant']} relevant, {p['relevant_not_retrieved']} of them not in the top {p['depth']})")
    rows = [("absolute", f"score >= {a['threshold']:.4f}", a), ("relative", f"top - {r['delta']:.4f}", r)]
    for name, rule, pt in rows:
        click.echo(f"  {name:<9} {rule:<17} P {pt['precision']:.3f}  R {pt['recall']:.3f}  "
                   f"F{beta:g} {pt['f_beta']:.3f}")
    click.echo(f"  {'floor':<9} {'score >= ' + _f(fl['score']):<17} ({fl['chosen']})")
    empty = ", ".join(f"{k} {v:.1%}" for k, v in rec["empty_rate"].items())
    click.echo(f"  AP {rec['average_precision']:.3f}; queries left empty: {empty}; "
               f"`search --threshold auto` applies the {rec['rule']} rule")
    if rec.get("plot"):
        click.echo(f"  plot      {st.describe(calibration_prefix(index, version) + '/' + rec['plot'])}")


# ---------------------------------------------------------------------------------------------
# canary
# ---------------------------------------------------------------------------------------------


@click.command()
@store_options
@click.option("--index", required=True, help="Index name.")
@click.option("--alias", default="live", show_default=True)
@click.option("--version", "version", default=None, help="Check this version instead of what the alias serves.")
@click.option("--set", "canary_set", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Canaries: JSONL/CSV/TSV with query and doc_id (or expected: [ids]), or a benchmark file.")
@click.option("--k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--baseline", type=click.Path(dir_okay=False), default=None,
              help="A previous canary report (JSON) to compare with.")
@click.option("--write-baseline", type=click.Path(dir_okay=False), default=None,
              help="Save this report as the baseline for later runs (only when it passed).")
@click.option("--max-recall-drop", type=float, default=0.05, show_default=True)
@click.option("--max-mrr-drop", type=float, default=0.05, show_default=True)
@click.option("--max-score-drop", type=float, default=0.05, show_default=True, help="Mean top-1 score.")
@click.option("--max-empty-rate-increase", type=float, default=0.05, show_default=True)
@click.option("--min-recall", type=float, default=None, help="Absolute recall@k floor (with or without a baseline).")
@click.option("--no-thresholds", "use_thresholds", flag_value=False, default=True,
              help="Do not apply the stored thresholds (empty-result rate is then about raw hits).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the JSON report here.")
@click.option("--prom", type=click.Path(dir_okay=False), default=None,
              help="Write Prometheus text format here (e.g. node_exporter's textfile collector dir).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout.")
def canary(store: str, endpoint_url: str | None, index: str, alias: str, version: str | None, canary_set: str, k: int,
           baseline: str | None, write_baseline: str | None, max_recall_drop: float, max_mrr_drop: float,
           max_score_drop: float, max_empty_rate_increase: float, min_recall: float | None, use_thresholds: bool,
           out: str | None, prom: str | None, as_json: bool) -> None:
    """Known-good queries against the live alias: recall@k, MRR, score distribution, empty rate.

    Exits 7 when recall, MRR, the mean top-1 score or the empty-result rate move past the
    limits against --baseline (or recall is under --min-recall), so a scheduler can alert.
    During a weighted rollout both versions are checked.

    \b
    Examples:
      embedctl canary --store ./store --index docs --set canaries.jsonl --write-baseline base.json
      embedctl canary --store ./store --index docs --alias live --set canaries.jsonl --baseline base.json \\
          --out canary.json --prom /var/lib/node_exporter/embedctl_canary.prom
    """
    from engine.core.errors import NotFoundError, SchemaError
    from engine.quality.canary import CanaryLimits, canary_gate, canary_prometheus, read_canaries, run_canary
    from engine.quality.reports import write_text_atomic

    base = None
    if baseline:
        if not Path(baseline).exists():
            raise NotFoundError(f"baseline {baseline} does not exist; create one with --write-baseline")
        try:
            base = json.loads(Path(baseline).read_text())
        except json.JSONDecodeError as err:
            raise SchemaError(f"baseline {baseline} is not JSON: {err}") from err
    limits = CanaryLimits(max_recall_drop=max_recall_drop, max_mrr_drop=max_mrr_drop, max_score_drop=max_score_drop,
                            max_empty_rate_increase=max_empty_rate_increase, min_recall=min_recall)
    report = run_canary(_open(store, endpoint_url), index, read_canaries(canary_set), alias=alias, version=version,
                          k=k, baseline=base, limits=limits, use_thresholds=use_thresholds)
    text = json.dumps(report, indent=1, sort_keys=True, default=str)
    if out:
        write_text_atomic(out, text + "\n")
    if prom:
        write_text_atomic(prom, canary_prometheus(report))
    if write_baseline and report["passed"]:
        write_text_atomic(write_baseline, text + "\n")
    if as_json:
        emit_json(report)
    else:
        _echo_canary(report)
    if write_baseline and not report["passed"]:
        click.echo(f"baseline {write_baseline} not written: the canary failed", err=True)
    canary_gate(report)


def _echo_canary(report: dict[str, Any]) -> None:
    k = report["k"]
    for r in report["versions"]:
        st, d = r["stats"], r["baseline_diff"]

        def delta(key: str, d: dict[str, Any] = d) -> str:
            return f" ({d[key]:+.4f})" if d.get(key) is not None else ""

        mark = "PASS" if r["passed"] else "FAIL"
        click.echo(f"{mark} {report['index']}/{report.get('alias') or r['version']} -> {r['version']}: "
                   f"{st['canaries']} canaries")
        click.echo(f"  recall@{k} {st[f'recall@{k}']:.4f}{delta(f'recall@{k}')}   mrr@{k} {st[f'mrr@{k}']:.4f}"
                   f"{delta(f'mrr@{k}')}   hit rate {st[f'hit_rate@{k}']:.4f}")
        t1, tk = st["top1_scores"], st["topk_scores"]
        click.echo(f"  top-1 score mean {_f(t1['mean'])}{delta('top1_mean')}   top-{k} mean {_f(tk['mean'])} "
                   f"median {_f(tk['median'])} p5 {_f(tk['p5'])} p95 {_f(tk['p95'])}")
        cal = r["calibration"]
        th = "no calibration" if not cal.get("calibrated") else f"calibration {cal['calibration_id']}" + \
            (" (STALE: recalibrate)" if cal.get("needs_recalibration") else "")
        click.echo(f"  empty-result rate {_f(st['empty_rate'])}{delta('empty_rate')} under the stored threshold ({th})")
        for m in st["misses"][:5]:
            click.echo(f"  missed {m['id']}: expected {m['expected']}, got {m['got']}")
        for w in r.get("warnings", []):
            click.echo(f"  WARNING: {w}")
        for f in r["failures"]:
            click.echo(f"  FAIL: {f}")


# ---------------------------------------------------------------------------------------------
# drift
# ---------------------------------------------------------------------------------------------


@click.command()
@store_options
@click.option("--index", required=True, help="Index name.")
@click.option("--alias", default="live", show_default=True)
@click.option("--version", "version", default=None, help="Check this version instead of what the alias serves.")
@click.option("--queries", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Recent queries: a text file (one per line), JSONL/CSV/Parquet with text or query.")
@click.option("--max-score-psi", type=float, default=0.25, show_default=True)
@click.option("--max-length-psi", type=float, default=0.25, show_default=True)
@click.option("--max-novel-rate", type=float, default=0.25, show_default=True)
@click.option("--max-empty-rate-increase", type=float, default=0.10, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the JSON report here.")
@click.option("--prom", type=click.Path(dir_okay=False), default=None, help="Write Prometheus text format here.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout.")
def drift(store: str, endpoint_url: str | None, index: str, alias: str, version: str | None, queries: str,
          max_score_psi: float, max_length_psi: float, max_novel_rate: float, max_empty_rate_increase: float,
          out: str | None, prom: str | None, as_json: bool) -> None:
    """Compare recent queries with those the live version was calibrated on.

    Query distribution (embedding centroid, share of queries unlike any calibration query,
    length) and top-1 scores (PSI, KS), plus the empty-result rate; exits 7 past the limits.

    \b
    Example:
      embedctl drift --store ./store --index docs --alias live --queries last-24h.txt --prom drift.prom
    """
    from engine.quality.drift import DriftLimits, drift_gate, drift_prometheus, read_query_texts, run_drift
    from engine.quality.reports import write_text_atomic
    limits = DriftLimits(max_score_psi=max_score_psi, max_length_psi=max_length_psi, max_novel_rate=max_novel_rate,
                           max_empty_rate_increase=max_empty_rate_increase)
    report = run_drift(_open(store, endpoint_url), index, read_query_texts(queries), alias=alias, version=version,
                         limits=limits)
    if out:
        write_text_atomic(out, json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
    if prom:
        write_text_atomic(prom, drift_prometheus(report))
    if as_json:
        emit_json(report)
    else:
        e, s, ln, em = report["embedding"], report["top1_score"], report["query_length"], report["empty_rate"]
        click.echo(f"{'DRIFT' if report['drifted'] else 'OK'} {index}/{alias} -> {report['version']}: "
                   f"{report['queries']['current']} recent vs {report['queries']['reference']} calibration queries "
                   f"({report['calibration_id']}{'' if report['calibration_fits'] else ', STALE calibration'})")
        click.echo(f"  queries   centroid cos {e['centroid_similarity']:.4f}; novel {e['novel_rate']:.1%} "
                   f"(~{e['expected_novel_rate']:.0%} expected); length PSI {_f(ln['psi'], 3)}")
        click.echo(f"  top-1     mean {_f(s['reference']['mean'])} -> {_f(s['current']['mean'])}; "
                   f"PSI {_f(s['psi'], 3)} "
                   f"(noise ~{_f(s['psi_noise'], 3)}), KS {_f(s['ks'], 3)}")
        click.echo(f"  empty     {_f(em['reference'])} -> {_f(em['current'])}")
        for a in report["alerts"]:
            click.echo(f"  ALERT: {a}")
    drift_gate(report)
