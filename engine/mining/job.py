"""The job around the miner: plan the batches, stage and commit each, resume, finalize (curriculum
stages, output, summary). Used in-process (``run_mining_locally``) and by the Ray driver in jobs/."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.core.errors import ConfigError
from engine.core.storage import Store, join, open_store, sha256_file
from engine.mining.config import RULES, MiningJobConfig
from engine.mining.corpus import MiningSource, resolve_source
from engine.mining.miner import NegativeMiner, current_rss_bytes, output_schema, peak_rss_bytes
from engine.mining.pairs import PairSet, QueryGroup, read_pairs, split_uri
from engine.mining.stats import BatchStats, _r

if TYPE_CHECKING:
    from engine.embed.encoders import Encoder

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# the job around the miner: plan, stage, resume, finalize
# ---------------------------------------------------------------------------------------------


@dataclass
class Output:
    """Where results go: ``--out x.parquet`` is one file (+ ``x.summary.json``); anything else a folder."""

    store: Store
    single_file: str | None  # key of the file, or None for a folder of parts
    prefix: str  # folder prefix ("" = the store root)
    uri: str

    @classmethod
    def for_uri(cls, uri: str, endpoint_url: str | None) -> Output:
        if uri.rstrip("/").endswith(".parquet"):
            store, name = split_uri(uri, endpoint_url)
            return cls(store, name, "", uri)
        return cls(open_store(uri, endpoint_url=endpoint_url), None, "", uri)

    @property
    def staging(self) -> str:
        return f"{self.single_file}.parts" if self.single_file else "_parts"

    @property
    def summary_key(self) -> str:
        if self.single_file:
            return self.single_file[: -len(".parquet")] + ".summary.json"
        return "summary.json"

    def batch_part(self, i: int) -> str:
        return join(self.staging, f"batch-{i:06d}.parquet")

    def batch_stats(self, i: int) -> str:
        return join(self.staging, f"batch-{i:06d}.json")


@dataclass
class PreparedMining:
    cfg: MiningJobConfig
    source: MiningSource
    pairs: PairSet
    output: Output
    batches: list[list[QueryGroup]]
    pending: list[int]
    identity: str
    finished: dict[str, Any] | None = None  # the summary of an identical finished job


def job_identity(cfg: MiningJobConfig, source: MiningSource, pairs: PairSet) -> str:
    d = cfg.identity()
    d.update(run_id=source.run_id, version_id=source.version_id, pairs_sha256=pairs.sha256,
             batch_size=cfg.runtime.batch_size, model=source.model.get("fingerprint"))
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_mining(cfg: MiningJobConfig) -> PreparedMining:
    """Validate everything before any work: source, pairs, output; list the batches still to do."""
    cfg.validate()
    given, cfg = cfg, cfg.with_absolute_paths()  # the actors it goes to run in another folder
    source = resolve_source(cfg)
    pairs = read_pairs(cfg.pairs, cfg.endpoint_url)
    out = Output.for_uri(cfg.out, cfg.endpoint_url)
    ident = job_identity(given, source, pairs)  # as given: a job started before paths were made absolute resumes
    b = cfg.runtime.batch_size
    batches = [pairs.groups[i:i + b] for i in range(0, len(pairs.groups), b)]
    job_key = join(out.staging, "job.json")
    if out.store.exists(out.summary_key) and not out.store.exists(job_key):
        previous = out.store.read_json(out.summary_key)
        if previous.get("identity") == ident and not cfg.overwrite:
            return PreparedMining(cfg, source, pairs, out, batches, [], ident, finished=previous)
        if not cfg.overwrite:
            raise ConfigError(f"{cfg.out} already holds triplets mined with other settings or inputs; pass "
                              "--overwrite to replace them, or choose another --out")
    if cfg.overwrite:
        out.store.delete_prefix(out.staging)
    if out.store.exists(job_key) and out.store.read_json(job_key).get("identity") != ident:
        raise ConfigError(f"{cfg.out} holds an unfinished mining job with other settings; rerun it with the same "
                          "flags to resume, or pass --overwrite")
    out.store.write_json(job_key, {"identity": ident, "batches": len(batches), "started_at": _now()})
    done = {i for i in range(len(batches)) if out.store.exists(out.batch_stats(i))}
    pending = [i for i in range(len(batches)) if i not in done]
    return PreparedMining(cfg, source, pairs, out, batches, pending, ident)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class BatchRunner:
    """The worker side: a miner plus the staging writes. One per Ray actor (or one in-process)."""

    def __init__(self, cfg: MiningJobConfig, source: MiningSource, *, max_positives: int,
                 encoder: Encoder | None = None, threads: int | None = None):
        self.miner = NegativeMiner(cfg, source, max_positives=max_positives, encoder=encoder, threads=threads)
        self.out = Output.for_uri(cfg.out, cfg.endpoint_url)

    def run(self, batch_index: int, groups: list[dict[str, Any]] | list[QueryGroup]) -> dict[str, Any]:
        from engine.embed.pipeline import write_part

        gs = [g if isinstance(g, QueryGroup) else QueryGroup.from_dict(g) for g in groups]
        table, st = self.miner.mine_batch(batch_index, gs)
        t0 = time.perf_counter()
        st.part = write_part(self.out.store, self.out.batch_part(batch_index), table)
        st.seconds["write"] += time.perf_counter() - t0
        del table
        release_memory()
        st.worker = {"pid": os.getpid(), "peak_rss_bytes": peak_rss_bytes(), "rss_bytes": current_rss_bytes(),
                     "load_seconds": round(self.miner.load_seconds, 3), "search": self.miner.search_mode}
        d = st.to_dict()
        # the commit marker: written after the part, so a batch with stats has its rows
        self.out.store.write_json(self.out.batch_stats(batch_index), d)
        return d


def release_memory() -> None:
    """Give the batch's freed memory back to the OS (glibc keeps freed arenas otherwise), so a worker's
    resident size between batches stays flat however many batches it has run."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def finalize_mining(prep: PreparedMining, wall_seconds: float, workers: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """Merge batch stats, set each row's curriculum stage from the global difficulty distribution,
    write the output (streaming one batch at a time) and the summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg, out = prep.cfg, prep.output
    total = BatchStats(batch=-1)
    per_worker: dict[int, dict[str, Any]] = {}
    missing = []
    for i in range(len(prep.batches)):
        if not out.store.exists(out.batch_stats(i)):
            missing.append(i)
            continue
        st = BatchStats.from_dict(out.store.read_json(out.batch_stats(i)))
        total.merge(st)
        w = st.worker or {}
        if w.get("pid") is not None:
            cur = per_worker.setdefault(int(w["pid"]), {"batches": 0, "queries": 0, "peak_rss_bytes": 0})
            cur["batches"] += 1
            cur["queries"] += st.queries
            cur["peak_rss_bytes"] = max(cur["peak_rss_bytes"], int(w.get("peak_rss_bytes", 0)))
            cur["search"] = w.get("search")
            # resident memory after this worker's first and last batch (flat = nothing accumulates)
            cur.setdefault("rss_bytes_first", int(w.get("rss_bytes", 0)))
            cur["rss_bytes_last"] = int(w.get("rss_bytes", 0))
    if missing:
        raise ConfigError(f"{len(missing)} mining batches did not finish (first: {missing[:5]}); rerun the same "
                          "command to resume them")
    stages = cfg.mining.curriculum_stages
    diff = total.hist["difficulty"]
    cuts = [diff.quantile(i / stages) for i in range(1, stages)] if diff.n else []
    cuts_arr = np.asarray([c for c in cuts if c is not None], dtype=np.float64)
    n = cfg.mining.num_negatives
    schema = output_schema(n)
    written: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="embedctl-mined-") as tmp:
        writer = None
        local_single = os.path.join(tmp, "out.parquet")
        if out.single_file:
            writer = pq.ParquetWriter(local_single, schema, compression="zstd")
        part_no = 0
        for i in range(len(prep.batches)):
            local = os.path.join(tmp, "batch.parquet")
            out.store.download_file(out.batch_part(i), local)
            table = pq.read_table(local)
            if table.num_rows:
                d = table.column("difficulty").to_numpy(zero_copy_only=False).astype(np.float64)
                stage = np.searchsorted(cuts_arr, d, side="right").astype(np.int8) if cuts_arr.size else \
                    np.zeros(len(d), np.int8)
                table = table.set_column(table.schema.get_field_index("curriculum_stage"),
                                         pa.field("curriculum_stage", pa.int8()), pa.array(stage, pa.int8()))
                if writer is not None:
                    writer.write_table(table, row_group_size=8192)
                else:
                    from engine.embed.pipeline import write_part

                    if part_no == 0:  # parts of an earlier job in this folder (--overwrite) must not linger
                        for key in out.store.list(""):
                            if re.fullmatch(r"part-\d+\.parquet", key):
                                out.store.delete(key)
                    written.append(write_part(out.store, f"part-{part_no:06d}.parquet", table))
                    part_no += 1
            os.unlink(local)
        if writer is not None:
            assert out.single_file is not None
            writer.close()
            digest, size = sha256_file(local_single), os.path.getsize(local_single)
            out.store.upload_file(out.single_file, local_single)
            written = [{"key": out.single_file, "rows": total.rows_written, "bytes": size, "sha256": digest}]
    summary = build_summary(prep, total, cuts, wall_seconds, written, per_worker, workers)
    out.store.write_json(out.summary_key, summary)
    out.store.delete_prefix(out.staging)
    return summary


def build_summary(prep: PreparedMining, total: BatchStats, cuts: list[float | None], wall_seconds: float,
                  files: list[dict[str, Any]], per_worker: dict[int, dict[str, Any]],
                  workers: dict[str, Any] | None) -> dict[str, Any]:
    cfg = prep.cfg
    considered = total.candidates
    mining_s = float((workers or {}).get("mining_seconds") or wall_seconds)
    removed = {k: {"count": v, "share": round(v / considered, 4) if considered else 0.0}
               for k, v in total.removed.items() if k in RULES}
    return {
        "kind": "mine-negatives",
        "identity": prep.identity,
        "status": "succeeded",
        "finished_at": _now(),
        "out": cfg.out,
        "files": files,
        "source": {**prep.source.to_dict(), "search": next((w.get("search") for w in per_worker.values()), None)},
        "pairs": {"uri": cfg.pairs, "sha256": prep.pairs.sha256, "pairs": prep.pairs.pairs,
                  "queries": len(prep.pairs.groups), "max_positives_per_query": prep.pairs.max_positives,
                  "rejects": prep.pairs.rejects, "columns": prep.pairs.columns},
        "config": asdict(cfg.mining),
        "counts": {"queries": total.queries, "pairs": total.pairs, "rows": total.rows_written,
                   "negatives": total.negatives, "rows_incomplete": total.rows_incomplete,
                   "queries_incomplete": total.queries_incomplete, "pairs_unresolved": total.pairs_unresolved,
                   "candidates_considered": considered, "cross_encoder_scored": total.ce_scored,
                   "cross_encoder_budget_exhausted": total.ce_budget_exhausted,
                   "negatives_by_source": total.by_source},
        "removed": removed,
        "scores": {"positive": total.hist["positive"].summary(), "negative": total.hist["negative"].summary(),
                   "difference": total.hist["difference"].summary()},
        "curriculum": {"field": "curriculum_stage", "stages": cfg.mining.curriculum_stages,
                       "difficulty": "mean negative score - positive score (higher = harder)",
                       "cut_points": [_r(c) for c in cuts], "distribution": total.hist["difficulty"].summary()},
        "timings": {"wall_seconds": round(wall_seconds, 3), "mining_seconds": round(mining_s, 3),
                    **{f"worker_{k}_seconds": round(v, 3) for k, v in total.seconds.items()}},
        "throughput": {
            # the mining phase (workers loaded, batches flowing) and the whole command (start-up included)
            "queries_per_second": round(total.queries / mining_s, 2) if mining_s else None,
            "end_to_end_queries_per_second": round(total.queries / wall_seconds, 2) if wall_seconds else None},
        "workers": {"pool": workers, "processes": [{"pid": pid, **w} for pid, w in sorted(per_worker.items())],
                    "peak_rss_bytes_max": max((w["peak_rss_bytes"] for w in per_worker.values()), default=None)},
    }


def run_mining_locally(cfg: MiningJobConfig, encoder: Encoder | None = None,
                       progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The whole job in this process, without Ray (tests, small corpora, ``--local``)."""
    t0 = time.perf_counter()
    prep = prepare_mining(cfg)
    if prep.finished is not None:
        return prep.finished
    info: dict[str, Any] = {"mode": "local", "actors": 1}
    if progress:
        progress({"event": "planned", "queries": len(prep.pairs.groups), "pairs": prep.pairs.pairs,
                  "batches": len(prep.batches), "pending": len(prep.pending), "corpus_rows": prep.source.rows})
    if prep.pending:
        runner = BatchRunner(cfg, prep.source, max_positives=prep.pairs.max_positives, encoder=encoder)
        info["startup_seconds"] = round(time.perf_counter() - t0, 3)
        t_mine = time.perf_counter()
        for i in prep.pending:
            d = runner.run(i, prep.batches[i])
            if progress:
                progress({"event": "batch", "batch": i, "queries": d["queries"], "rows": d["rows_written"]})
        info["mining_seconds"] = round(time.perf_counter() - t_mine, 3)
    return finalize_mining(prep, time.perf_counter() - t0, info)


def format_summary(summary: dict[str, Any]) -> str:
    """A table in the manner of sentence-transformers' mining printout, plus the removal counts."""
    s = summary["scores"]
    lines = [f"{'Metric':<8}{'Positive':>12}{'Negative':>12}{'Difference':>12}"]
    for k in ("count", "mean", "std", "min", "p25", "median", "p75", "max"):
        vals = [s[w].get(k) for w in ("positive", "negative", "difference")]
        lines.append(f"{k.capitalize():<8}" + "".join(f"{'' if v is None else v:>12}" for v in vals))
    c = summary["counts"]
    lines.append(f"{c['rows']} rows ({c['queries']} queries, {c['pairs']} pairs), {c['negatives']} negatives "
                 f"{c['negatives_by_source']}; {c['candidates_considered']} candidates considered")
    for rule, v in summary["removed"].items():
        if v["count"]:
            lines.append(f"removed {v['count']:>8} ({v['share']:.2%}) by {rule}")
    if c["rows_incomplete"]:
        lines.append(f"{c['rows_incomplete']} rows ({c['queries_incomplete']} queries) found fewer than "
                     f"{summary['config']['num_negatives']} negatives"
                     + (" and were written with nulls" if summary["config"]["keep_incomplete"]
                        else " and were left out")
                     + "; widen --range-max or loosen the margins to find more")
    if c.get("cross_encoder_scored"):
        lines.append(f"cross-encoder: {c['cross_encoder_scored']} pairs scored, "
                     f"{summary['removed']['cross_encoder']['count']} dropped as likely false negatives, "
                     f"{c['cross_encoder_budget_exhausted']} queries ran out of --ce-max-checks")
    if c["pairs_unresolved"]:
        lines.append(f"{c['pairs_unresolved']} pairs named a positive id that is not in the corpus and gave no text")
    t = summary["throughput"]
    lines.append(f"{summary['timings']['wall_seconds']:.1f} s, {t['queries_per_second']} queries/s; "
                 f"worker peak RSS {(summary['workers']['peak_rss_bytes_max'] or 0) / 2**20:.0f} MiB")
    return "\n".join(lines)
