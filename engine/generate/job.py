"""The generate-queries job: plan (chunks, cache), ask (one work function for threads or Ray tasks), finalize.

Resumability comes from the cache: every answer is written to the store the moment it
arrives, keyed by (settings, passage hash), so a killed job loses at most the requests in
flight, and a rerun (or a refresh's new run, whose unchanged chunks have the same passages)
asks only for chunks without an answer. Failed chunks are never cached: a rerun retries them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from engine import __version__
from engine.core import layout
from engine.core.errors import ConfigError
from engine.core.storage import Store, absolute_uri, json_bytes, open_store, remember_secret
from engine.embed.parts_index import run_outputs
from engine.generate.client import (
    Answer,
    ChatClient,
    ChunkFailed,
    EndpointError,
    GenerationIncomplete,
    RateLimiter,
)
from engine.generate.config import GenerateJobConfig, LLMConfig
from engine.generate.filters import DROP_REASONS, Candidate, consistency_filter, text_filter
from engine.generate.source import (
    ChunkItem,
    cache_key,
    cached_keys,
    read_chunks,
    read_run_manifest,
    select_chunks,
)

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]


class Secret:
    """The API key on its way to a worker: its repr never shows the value."""

    def __init__(self, value: str | None):
        self.value = value or None

    def __repr__(self) -> str:
        return "Secret(***)" if self.value else "Secret(None)"


def api_key_from_env(cfg: LLMConfig) -> Secret:
    value = os.environ.get(cfg.api_key_env) or None
    remember_secret(value)  # any log line or error that ever carried it is redacted
    return Secret(value)


@dataclass
class PreparedGeneration:
    cfg: GenerateJobConfig
    store: Store
    manifest: dict[str, Any]  # the embed run's
    items: list[ChunkItem]
    pending: list[ChunkItem]
    skipped_short: int
    job_id: str
    out_uri: str
    cached: int = 0  # selected chunks whose answer was already stored


def prepare_generation(cfg: GenerateJobConfig) -> PreparedGeneration:
    """Read the run's chunks, select, and find which already have a cached answer."""
    cfg.validate()
    # the tasks it goes to (Ray workers) run in another folder: a relative store would cache elsewhere
    cfg = dataclasses.replace(cfg, store=str(absolute_uri(cfg.store)), out=absolute_uri(cfg.out))
    store = open_store(cfg.store, endpoint_url=cfg.endpoint_url)
    man = read_run_manifest(store, cfg.run)
    items, short = select_chunks(cfg, read_chunks(store, man), man.get("config") or {})
    if not items:
        raise ConfigError(f"no chunk of run {cfg.run!r} is selected (filter --where, --sample, min_chunk_chars "
                          f"{cfg.select.min_chunk_chars}; {short} too short)")
    have = cached_keys(store, cfg.llm.settings_id())
    seen: set[str] = set()
    pending = []
    for it in items:  # equal passages (copies in the corpus) are asked once
        if it.passage_key not in have and it.passage_key not in seen:
            pending.append(it)
            seen.add(it.passage_key)
    job_id = cfg.job_id()
    out = cfg.out or f"{cfg.store.rstrip('/')}/{layout.run_prefix(job_id)}/pairs.parquet"
    log.info("%d chunks selected, %d cached, %d to ask %s for", len(items), len(items) - len(pending),
             len(pending), cfg.llm.model)
    return PreparedGeneration(cfg, store, man, items, pending, short, job_id, out,
                              sum(1 for it in items if it.passage_key in have))


# ---------------------------------------------------------------------------------------------
# asking: the body of a Ray task (or of the in-process run)
# ---------------------------------------------------------------------------------------------


def ask_chunks(items: list[ChunkItem], cfg: GenerateJobConfig, key: Secret, threads: int,
               requests_per_minute: float | None, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Answer each chunk with ``threads`` requests in flight, paced to ``requests_per_minute``; cache each
    answer as it arrives. Returns one result per chunk: ok, or failed with its reason. An EndpointError
    (bad key, URL or model) stops the rest and is raised."""
    remember_secret(key.value)
    store = open_store(cfg.store, endpoint_url=cfg.endpoint_url)
    settings = cfg.llm.settings_id()
    client = ChatClient(cfg.llm, key.value, RateLimiter(requests_per_minute))
    stop = threading.Event()
    lock = threading.Lock()

    def one(item: ChunkItem) -> dict[str, Any]:
        if stop.is_set():
            return {"passage_key": item.passage_key, "chunk_id": item.chunk_id, "status": "cancelled"}
        t0 = time.perf_counter()
        try:
            answer = client.ask(item.passage)
        except ChunkFailed as err:
            res: dict[str, Any] = {"passage_key": item.passage_key, "chunk_id": item.chunk_id, "status": "failed",
                   "reason": err.reason, "detail": err.detail}
        else:
            store.write_bytes(cache_key(settings, item.passage_key), json_bytes(_cache_entry(cfg.llm, answer)))
            res = {"passage_key": item.passage_key, "chunk_id": item.chunk_id, "status": "ok",
                   "attempts": answer.attempts, "retries": answer.retries,
                   "seconds": round(time.perf_counter() - t0, 3)}
        if progress:
            with lock:
                progress({"event": "chunk", **{k: res[k] for k in ("chunk_id", "status")}})
        return res

    try:
        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="gen") as pool:
            futures = [pool.submit(one, it) for it in items]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:
                    stop.set()
                    for other in futures:
                        other.cancel()
                    raise f.exception()  # type: ignore[misc]  # an EndpointError: the whole job stops
            return [f.result() for f in futures]
    finally:
        client.close()


def _cache_entry(llm: LLMConfig, answer: Answer) -> dict[str, Any]:
    return {"queries": answer.queries, "raw": answer.raw, "finish_reason": answer.finish_reason,
            "model": llm.model, "response_model": answer.response_model, "usage": answer.usage,
            "settings_id": llm.settings_id(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_generation_locally(cfg: GenerateJobConfig, progress: Progress | None = None) -> dict[str, Any]:
    """The whole job in this process: ``concurrency`` threads, one rate limiter."""
    t0 = time.perf_counter()
    prep = prepare_generation(cfg)
    if progress:
        progress({"event": "planned", "chunks": len(prep.items), "pending": len(prep.pending)})
    results = ask_chunks(prep.pending, cfg, api_key_from_env(cfg.llm), cfg.rate.concurrency,
                         cfg.rate.requests_per_minute, progress) if prep.pending else []
    return finalize_generation(prep, results, time.perf_counter() - t0, {"mode": "local",
                                                                           "threads": cfg.rate.concurrency})


# ---------------------------------------------------------------------------------------------
# finalize: cached answers -> filtered pairs Parquet, summary, manifest
# ---------------------------------------------------------------------------------------------


def _read_answers(store: Store, settings: str, items: list[ChunkItem]) -> dict[str, dict[str, Any]]:
    keys = sorted({it.passage_key for it in items} & cached_keys(store, settings))
    with ThreadPoolExecutor(max_workers=8) as pool:
        entries = list(pool.map(lambda k: store.read_json(cache_key(settings, k)), keys))
    return dict(zip(keys, entries, strict=True))


def _candidates(items: list[ChunkItem], answers: dict[str, dict[str, Any]], n: int) -> list[Candidate]:
    out = []
    for it in items:
        ans = answers.get(it.passage_key)
        if ans is None:
            continue
        for j, q in enumerate(ans["queries"][:n]):
            out.append(Candidate(str(q), j, it, ans))
    return out


def pairs_table(cands: list[Candidate], settings_id: str) -> Any:
    import pyarrow as pa

    rows = [{"query_id": f"{c.chunk.chunk_id}:q{c.query_index}", "query": c.query, "positive": c.chunk.passage,
             "positive_id": c.chunk.chunk_id, "chunk_id": c.chunk.chunk_id, "doc_id": c.chunk.doc_id,
             "content_hash": c.chunk.content_hash, "query_index": c.query_index,
             "generator_model": c.answer.get("model"), "response_model": c.answer.get("response_model"),
             "settings_id": settings_id} for c in cands]
    schema = pa.schema([("query_id", pa.string()), ("query", pa.string()), ("positive", pa.string()),
                        ("positive_id", pa.string()), ("chunk_id", pa.string()), ("doc_id", pa.string()),
                        ("content_hash", pa.string()), ("query_index", pa.int32()), ("generator_model", pa.string()),
                        ("response_model", pa.string()), ("settings_id", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def _write_pairs(uri: str, table: Any, endpoint_url: str | None) -> tuple[str, dict[str, Any]]:
    """Write the pairs file (upload verified); returns (summary key, output record)."""
    import pyarrow.parquet as pq

    from engine.mining import split_uri

    store, key = split_uri(uri, endpoint_url)
    with tempfile.TemporaryDirectory(prefix="embedctl-gen-out-") as tmp:
        local = os.path.join(tmp, "pairs.parquet")
        pq.write_table(table, local)
        sha = store.upload_file(key, local)
        size = os.path.getsize(local)
    return key[: -len(".parquet")] + ".summary.json", {"uri": uri, "rows": table.num_rows, "bytes": size, "sha256": sha}


def _check_out(uri: str, job_id: str, cfg: GenerateJobConfig) -> None:
    from engine.mining import split_uri

    store, key = split_uri(uri, cfg.endpoint_url)
    skey = key[: -len(".parquet")] + ".summary.json"
    if store.exists(key) and not cfg.overwrite:
        prev = store.read_json(skey) if store.exists(skey) else {}
        if prev.get("job_id") != job_id:
            raise ConfigError(f"{uri} exists and was not written by this job ({prev.get('job_id')!r}); pass "
                              "--overwrite or choose another --out")


def finalize_generation(prep: PreparedGeneration, results: list[dict[str, Any]], ask_seconds: float,
                        runtime: dict[str, Any]) -> dict[str, Any]:
    """Build, filter and write the pairs; write summary + manifest; raise GenerationIncomplete on failures."""
    cfg, store = prep.cfg, prep.store
    settings = cfg.llm.settings_id()
    _check_out(prep.out_uri, prep.job_id, cfg)
    answers = _read_answers(store, settings, prep.items)
    failed = [r for r in results if r["status"] != "ok"]
    failed_keys = {r["passage_key"] for r in failed}
    unanswered = [it for it in prep.items if it.passage_key not in answers]
    cands = _candidates(prep.items, answers, cfg.llm.queries_per_chunk)
    generated = len(cands)
    kept, dropped = text_filter(cands, cfg.filter)
    consistency = None
    if cfg.filter.consistency_k:
        kept, consistency = consistency_filter(kept, _mining_source(cfg, prep.manifest), cfg.filter.consistency_k)
        dropped["inconsistent"] = consistency["dropped"]
    table = pairs_table(kept, settings)
    summary_key, output = _write_pairs(prep.out_uri, table, cfg.endpoint_url)
    summary = _summary(prep, results, answers, unanswered, failed, generated, dropped, table.num_rows, ask_seconds)
    summary.update(consistency=consistency, runtime=runtime, out=prep.out_uri)
    from engine.mining import split_uri

    out_store, _ = split_uri(prep.out_uri, cfg.endpoint_url)
    out_store.write_json(summary_key, summary)
    manifest = {"kind": "generate-queries", "run_id": prep.job_id, "engine_version": __version__,
                "config": _config_record(cfg), "source_run": cfg.run, "source_model": prep.manifest.get("model"),
                "generator": {"endpoint": _safe_url(cfg.llm.endpoint), "model": cfg.llm.model,
                              "settings_id": settings, "api_key_env": cfg.llm.api_key_env},
                "outputs": {"pairs": [output]}, "summary": summary,
                "failed": [{k: r.get(k) for k in ("chunk_id", "reason", "detail")} for r in failed],
                "status": summary["status"]}
    store.write_json(layout.run_manifest_key(prep.job_id), manifest)
    if unanswered:
        reasons = summary["chunks"]["failed_by_reason"]
        raise GenerationIncomplete(
            f"{len(unanswered)} of {len(prep.items)} chunks have no queries after retries ({reasons}); the "
            f"{table.num_rows} pairs of the others are in {prep.out_uri}. Rerun the same command to retry only "
            f"those chunks (answers are cached); failed chunk ids are in the manifest "
            f"{store.describe(layout.run_manifest_key(prep.job_id))}", summary)
    assert not failed_keys - {it.passage_key for it in unanswered}
    return summary


def _summary(prep: PreparedGeneration, results: list[dict[str, Any]], answers: dict[str, Any],
             unanswered: list[ChunkItem], failed: list[dict[str, Any]], generated: int, dropped: dict[str, int],
             rows: int, seconds: float) -> dict[str, Any]:
    by_reason: dict[str, int] = {}
    for r in failed:
        by_reason[r.get("reason") or r["status"]] = by_reason.get(r.get("reason") or r["status"], 0) + 1
    retries: dict[str, int] = {}
    attempts = 0
    for r in results:
        attempts += int(r.get("attempts") or 0)
        for k, v in (r.get("retries") or {}).items():
            retries[k] = retries.get(k, 0) + v
    asked = len(prep.pending)
    n = prep.cfg.llm.queries_per_chunk
    counts = {"selected": len(prep.items), "skipped_short": prep.skipped_short,
              "cached_before": prep.cached, "asked": asked,
              "same_passage_as_another": len(prep.items) - prep.cached - asked,
              "answered": sum(1 for r in results if r["status"] == "ok"), "failed": len(unanswered),
              "failed_by_reason": by_reason}
    # every selected chunk is answered (now or before) or counted as failed: nothing vanishes
    assert counts["selected"] == len(prep.items) and len(unanswered) + sum(
        1 for it in prep.items if it.passage_key in answers) == len(prep.items)
    return {"job_id": prep.job_id, "run": prep.cfg.run, "model": prep.cfg.llm.model,
            "status": "succeeded" if not unanswered else "incomplete", "chunks": counts,
            "requests": {"ok": counts["answered"], "attempts_of_answered": attempts, "retries_by_reason": retries},
            "queries": {"requested": len(answers) * n, "generated": generated, "kept": rows,
                        "dropped": {k: dropped.get(k, 0) for k in DROP_REASONS}},
            "pairs": rows, "seconds": round(seconds, 2)}


def _mining_source(cfg: GenerateJobConfig, man: dict[str, Any]) -> Any:
    from engine.mining import MiningSource

    store = open_store(cfg.store, endpoint_url=cfg.endpoint_url)
    parts = tuple((str(p["key"]), int(p["rows"]), str(p["sha256"])) for p in run_outputs(store, man, "embeddings")
                  if int(p["rows"]) > 0)
    return MiningSource(store=cfg.store, endpoint_url=cfg.endpoint_url, run_id=cfg.run, model=man["model"],
                        dim=int(man["dim"]), rows=sum(p[1] for p in parts), parts=parts,
                        run_config=man.get("config") or {})


def _safe_url(url: str) -> str:
    """The endpoint without userinfo or query string (either may carry a credential)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _config_record(cfg: GenerateJobConfig) -> dict[str, Any]:
    rec = cfg.to_dict()
    rec["llm"] = {**dataclasses.asdict(cfg.llm), "endpoint": _safe_url(cfg.llm.endpoint)}
    return json.loads(json.dumps(rec, default=str))


def format_summary(s: dict[str, Any]) -> str:
    c, q = s["chunks"], s["queries"]
    lines = [f"generate-queries {s['job_id']} ({s['status']}): {c['selected']} chunks, {c['cached_before']} cached, "
             f"{c['asked']} asked, {c['answered']} answered, {c['failed']} failed {c['failed_by_reason'] or ''}",
             f"queries: {q['generated']} generated, {q['kept']} kept; dropped {q['dropped']}",
             f"retries: {s['requests']['retries_by_reason'] or 'none'}; {s['seconds']:.1f} s"]
    return "\n".join(lines)


def raise_endpoint_error(err: BaseException) -> None:
    """Re-raise an EndpointError carried out of a worker (Ray wraps it) as itself."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, EndpointError):
        raise cause from None
