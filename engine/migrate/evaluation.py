"""Evaluation helpers the phases share: searching a version, benchmark and canary figures, version facts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from engine.core import layout
from engine.core.errors import NotFoundError
from engine.core.storage import Store
from engine.embed.parts_index import run_outputs
from engine.index.hits import doc_scores


def search_hits(searcher: Any, texts: Sequence[str], k: int, batch: int = 256) -> list[list[Any]]:
    """Chunk hits for each text, deep enough (3k chunks) that k distinct documents survive the
    collapse to documents when documents have several chunks."""
    depth = max(3 * k, k + 10)
    out: list[list[Any]] = []
    for i in range(0, len(texts), batch):
        out.extend(list(r) for r in searcher.search(list(texts[i:i + batch]), k=depth))
    return out


def doc_rankings(hits: Sequence[Sequence[Any]], k: int) -> list[list[tuple[str, float]]]:
    """Each query's chunk hits as ``[(doc_id, best score)]``, k documents at most."""
    return [doc_scores(h, k) for h in hits]


def benchmark_metrics(bench: Any, rankings: Mapping[str, Sequence[str]],
                      k: int) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean recall@k, MRR@k, nDCG@k over the benchmark's judged queries (doc-level rankings by
    query id), and the per-query rows."""
    from engine.quality.metrics import mean_metrics, query_metrics

    per: dict[str, dict[str, float]] = {}
    for q in bench.judged_queries():
        qid = q["query_id"]
        gains = {d: g for d, g in bench.qrels.get(qid, {}).items() if g >= bench.relevant_min_gain}
        per[qid] = query_metrics(list(rankings.get(qid, [])), gains, k)
    return mean_metrics(list(per.values())), per


def canary_figures(canaries: Sequence[Any], rankings: Sequence[Sequence[tuple[str, float]]], k: int,
                   thresholds: Any = None) -> dict[str, Any]:
    """The canary figures the gates and the report use, from ``quality.canary_stats`` (recall@k,
    MRR@k, hit rate, top-1 scores, empty-result rate under ``thresholds``, misses)."""
    from engine.quality.canary import canary_stats

    st = canary_stats(canaries, rankings, k, thresholds)
    return {"canaries": st["canaries"], "k": k, "canary_recall": st.get(f"recall@{k}"),
            "canary_mrr": st.get(f"mrr@{k}"), "canary_hit_rate": st.get(f"hit_rate@{k}"),
            "top1": st.get("top1_scores"), "empty_rate": st.get("empty_rate"), "missed": st.get("missed"),
            "misses": st.get("misses")}


def load_canaries(path: str | None, bench: Any | None) -> list[Any]:
    """The canary file, else the benchmark's judged queries with their relevant documents."""
    from engine.quality.canary import Canary, read_canaries

    if path:
        return read_canaries(path)
    if bench is None:
        return []
    return [Canary(q["text"], tuple(sorted(bench.relevant(q["query_id"]))), q["query_id"])
            for q in bench.queries if bench.relevant(q["query_id"])]


def load_benchmark(path: str | None) -> Any | None:
    if not path:
        return None
    from engine.quality.benchmark import load_benchmark as load

    return load(path)


def query_set(path: str | None, bench: Any | None) -> list[dict[str, Any]]:
    """The dual-run query file, else the benchmark's queries."""
    if path:
        from engine.quality.judgments import read_queries

        return read_queries(path)
    assert bench is not None  # MigrationPlan.validate
    return list(bench.queries)


def close_searcher(searcher: Any) -> None:
    close = getattr(searcher, "close", None)
    if callable(close):
        close()


def version_facts(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What the state records of a version: id, model identity, dim, kind, params, run, rows."""
    model = manifest.get("model") or {}
    rows = manifest.get("rows")
    if rows is None and isinstance(manifest.get("shards"), list):
        rows = sum(int(s.get("rows") or 0) for s in manifest["shards"])
    return {"version": manifest.get("version_id"),
            "model": dict(model) if isinstance(model, Mapping) else {"name": model},
            "dim": manifest.get("dim") or (model.get("dim") if isinstance(model, Mapping) else None),
            "kind": manifest.get("kind"), "params": manifest.get("params"),
            "source_run": manifest.get("source_run"), "rows": rows,
            "sparse": (manifest.get("sparse") or {}).get("kind"),
            "sparse_granularity": (manifest.get("sparse") or {}).get("granularity")}


def same_model(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two model identities give the same vectors: weights, dims, prompts, and runtime
    (backend/quantization: an int8 or exported model places vectors slightly differently)."""
    from engine.embed.backends import identity_backend

    keys = ("fingerprint", "dim", "truncate_dim", "query_prompt", "passage_prompt")
    return all((a or {}).get(k) == (b or {}).get(k) for k in keys) and \
        identity_backend(a or {}) == identity_backend(b or {})


def doc_titles(store: Store, run_id: str | None, doc_ids: set[str], max_chunks: int = 2_000_000) -> dict[str, str]:
    """Titles of ``doc_ids`` from an embed run's chunk parts (for the report); {} when the run is
    unknown, has no titles, or is too big to scan for a report."""
    if not run_id or not doc_ids:
        return {}
    try:
        run = store.read_json(layout.run_manifest_key(run_id))
    except NotFoundError:
        return {}
    parts = run_outputs(store, run, "chunks")
    if sum(int(p.get("rows") or 0) for p in parts) > max_chunks:
        return {}
    import pyarrow.parquet as pq

    out: dict[str, str] = {}
    for part in parts:
        try:
            with store.arrow_filesystem().open_input_file(store.arrow_path(part["key"])) as f:
                t = pq.read_table(f, columns=["doc_id", "title"])
        except Exception:  # noqa: BLE001 - titles are a nicety of the report, never a failure
            return out
        for d, title in zip(t.column("doc_id").to_pylist(), t.column("title").to_pylist(), strict=True):
            if d in doc_ids and title and d not in out:
                out[str(d)] = str(title)
    return out
