"""Ray driver for the refresh job: `python jobs/refresh.py --config refresh.yaml` (also `embedctl refresh`).

Spreads work as: pending units of the new snapshot -> chunk (in the driver for small
snapshots, else Ray tasks) -> units whose chunks all have a stored vector are copied by cheap
Ray tasks (no model), units with new/changed chunks go to an embedding actor pool; when few
chunks need the model (``local_max_embed``), everything runs in the driver and no actor or
model start is paid. The library steps (lease, diff, index build, gates, publish) are
``engine.refresh.session.RefreshSession``'s.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine.refresh.session import RefreshConfig, RefreshSession, VectorLookup

if TYPE_CHECKING:
    from engine.embed.encoders import Encoder

from engine.distributed.driver import drive, driver_parser

log = logging.getLogger("embedctl.engine.distributed.refresh")

Progress = Callable[[dict[str, Any]], None]


def _chunk_task(row: dict[str, Any], session_cfg: Any, plan_meta: dict[str, Any], lookup: VectorLookup) -> dict[str, Any]:
    """Ray map task: chunk one unit (the embed job's stage) and count its chunks that need the model."""
    from engine.embed.corpus import Unit
    from engine.embed.pipeline import chunk_unit

    unit = Unit(**json.loads(row["unit"]))
    dups = {int(k): v for k, v in json.loads(row["dups"]).items()}
    chunked = chunk_unit(session_cfg, plan_meta, unit, dups)
    return {"chunked": json.dumps(chunked), "misses": _misses(session_cfg, chunked, lookup)}


def _misses(cfg: Any, chunked: dict[str, Any], lookup: VectorLookup) -> int:
    from engine.refresh.session import _read_columns
    from engine.core.storage import open_store

    store = open_store(cfg.store, endpoint_url=cfg.endpoint_url)
    hashes = _read_columns(store, chunked["chunk_file"]["key"], ["content_hash"]).column(0).to_pylist()
    return int((~lookup.contains(list(set(hashes)))).sum())


class _RefreshActor:
    """Embedding actor: a RefreshEmbedder (the embed job's UnitEmbedder with stored-vector reuse)."""

    def __init__(self, cfg: Any, run_id: str, identity: dict[str, Any], lookup: VectorLookup, threads: int | None):
        from engine.refresh.session import RefreshEmbedder

        self.embedder = RefreshEmbedder(cfg, run_id, identity, lookup, threads=threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.embedder(batch)


def _copy_task(row: dict[str, Any], cfg: Any, run_id: str, identity: dict[str, Any], lookup: VectorLookup) -> dict[str, Any]:
    """Ray map task for a unit whose every chunk has a stored vector: no model is loaded."""
    from engine.refresh.session import RefreshEmbedder

    marker = RefreshEmbedder(cfg, run_id, identity, lookup).embed_unit(json.loads(row["chunked"]))
    return {"marker": json.dumps(marker)}


class ModelProcess:
    """The model in a child process, started as soon as the refresh knows which model it needs, so the
    model's import and load (seconds: torch + sentence-transformers) run beside planning and chunking on
    another core instead of after them (a thread would share the GIL with the chunker).

    A plain subprocess (``python -c``), not multiprocessing: ``spawn`` would re-run an unguarded
    ``__main__`` of the caller. Requests and replies are length-prefixed pickles over its stdin/stdout;
    it exits when its stdin closes (the driver ended or died)."""

    def __init__(self, identity: dict[str, Any], *, device: str, dtype: str, batch_tokens: int,
                 samples: list[tuple[str, list[float]]] | None = None):
        import subprocess
        import threading

        self.dim = int(identity["dim"])
        self.info: dict[str, Any] = {}
        args = json.dumps({"identity": identity, "device": device, "dtype": dtype, "batch_tokens": batch_tokens})
        self._proc = subprocess.Popen([sys.executable, "-c", "from engine.distributed.refresh import _model_server; _model_server()",
                                       args], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._lock = threading.Lock()
        self._ready = False
        # Stored vectors the child must reproduce before it may use its light loader.
        _send(self._proc.stdin, list(samples or []))

    def encode_passages(self, texts: list[str]) -> Any:
        """[n, dim] float32, L2-normalised, from the child's encoder (waits for it to finish loading)."""
        from engine.core.errors import ConfigError

        with self._lock:
            try:
                if not self._ready:
                    _tag, self.info = _recv(self._proc.stdout)  # ("ready", {"loader": ..., ...})
                    self._ready = True
                    log.info("refresh model process: %s", self.info)
                _send(self._proc.stdin, list(texts))
                ok, value = _recv(self._proc.stdout)
            except (EOFError, OSError, BrokenPipeError) as err:
                raise ConfigError(f"the model process died (exit code {self._proc.poll()}); see its log above") from err
        if not ok:
            raise ConfigError(f"the model process failed: {value}")
        return value

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()  # still loading a model nobody needs, or done: stop it either way
        self._proc.wait(timeout=10)
        for f in (self._proc.stdin, self._proc.stdout):
            if f is not None:
                f.close()


def _send(f: Any, obj: Any) -> None:
    import pickle
    import struct

    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(struct.pack("<Q", len(data)) + data)
    f.flush()


def _recv(f: Any) -> Any:
    import pickle
    import struct

    head = f.read(8)
    if len(head) < 8:
        raise EOFError("the other end closed")
    (n,) = struct.unpack("<Q", head)
    data = f.read(n)
    if len(data) < n:
        raise EOFError("the other end closed mid-message")
    return pickle.loads(data)


def _model_server() -> None:
    """Child process: load the encoder, then answer ``encode_passages`` requests until stdin closes.

    The engine's encoder loads the native BERT where the model allows (``engine.embed.bert``: no
    sentence-transformers import, most of a small refresh's start-up). It is trusted only when it
    reproduces the stored vectors the driver sent (cosine >= 0.99999 on every one); otherwise the
    model is reloaded through sentence-transformers, and the reason is reported."""
    import os

    import numpy as np

    out = os.fdopen(os.dup(1), "wb")  # replies only; anything the libraries print goes to stderr
    os.dup2(2, 1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = json.loads(sys.argv[1])
    inp = sys.stdin.buffer
    try:
        samples = _recv(inp)
    except EOFError:
        return
    enc: Any = None
    info: dict[str, Any] = {}
    error = None
    try:
        from engine.embed.encoders import NativeBertEncoder, encoder_from_identity

        def load() -> Any:
            return encoder_from_identity(args["identity"], device=args["device"], dtype=args["dtype"],
                                         batch_tokens=args["batch_tokens"])

        enc = load()
        info["loader"] = "native" if isinstance(enc, NativeBertEncoder) else "sentence-transformers"
        if isinstance(enc, NativeBertEncoder) and samples:
            got = enc.encode_passages([t for t, _v in samples])  # [k, dim]
            want = np.asarray([v for _t, v in samples], dtype=np.float32)
            want /= np.maximum(np.linalg.norm(want, axis=1, keepdims=True), 1e-12)
            cos = float((got * want).sum(1).min())
            info.update(validated_on=len(samples), min_cosine=cos)
            if cos < 0.99999:
                os.environ["EMBEDCTL_ENCODER"] = "sentence-transformers"
                info = {"native_rejected": f"min cosine {cos:.6f} to the stored vectors"}
                enc = load()
                info["loader"] = "sentence-transformers"
    except Exception as err:  # noqa: BLE001 - reported to the driver on its first request
        error = f"{type(err).__name__}: {err}"
        info["error"] = error
    _send(out, ("ready", info))
    while True:
        try:
            texts = _recv(inp)
        except EOFError:
            return
        if enc is None:
            _send(out, (False, error))
            continue
        try:
            _send(out, (True, enc.encode_passages(texts)))
        except Exception as err:  # noqa: BLE001
            _send(out, (False, f"{type(err).__name__}: {err}"))


def run_refresh_job(rcfg: RefreshConfig, progress: Progress | None = None, encoder: Encoder | None = None) -> dict[str, Any]:
    """Run (or resume) a refresh and return its summary. ``encoder`` (tests) forces the in-driver path."""
    session = RefreshSession(rcfg)
    live, cfg = session.resolve()  # every refusal (alias, model/chunker, rollout) comes first
    executor = "local" if encoder is not None else rcfg.executor
    if executor == "auto" and not _driver_can_embed(cfg.embed.device):
        executor = "ray"  # device: cuda, and this driver (e.g. a RayJob head) has no GPU: embed on the cluster
    # The model loads in its own process from now on, beside planning and chunking (killed if unused).
    model_proc = _start_model(session, live.model, cfg) if encoder is None and executor != "ray" else None
    try:
        quick = session.up_to_date()  # "the snapshot's files are the live run's files": nothing to do
        if quick is not None:
            return {**quick, "executor": "none"}
        return _run(session, rcfg, executor, encoder, progress, model_proc)
    finally:
        if model_proc is not None:
            model_proc.close()


def _run(session: RefreshSession, rcfg: RefreshConfig, executor: str, encoder: Encoder | None,
         progress: Progress | None, model_proc: ModelProcess | None) -> dict[str, Any]:
    with session:
        st = session.prepare()
        prepared = st.prepared
        if progress:
            progress({"event": "planned", "run_id": st.run_id, "units": len(prepared.plan.units),
                      "pending": len(prepared.pending), "docs": prepared.plan.total_rows})
        pending_docs = sum(u.rows for u in prepared.pending)
        chunk_here = executor == "local" or (executor == "auto" and pending_docs <= rcfg.local_max_docs)
        t = time.perf_counter()
        tables: dict[str, Any] = {}
        if chunk_here:
            done = session.chunk_locally()
            chunked = [(c, session.unit_misses_in(table)) for c, table in done]
            tables = {c["unit_id"]: table for c, table in done}
        else:
            chunked = _chunk_on_ray(session)
        session.timings["chunk_seconds"] = time.perf_counter() - t
        misses = sum(m for _c, m in chunked)
        t = time.perf_counter()
        session.stage("embed")
        if executor == "local" or (executor == "auto" and misses <= rcfg.local_max_embed):
            where = "driver"
            # Units whose chunks all have stored vectors first: they need no model, so they are written while
            # the model process is still loading; then one batched pass over every unseen chunk; then the rest.
            session.write_units([c for c, m in chunked if not m], encoder, progress)
            need = [tables[c["unit_id"]] if c["unit_id"] in tables else _read_chunks(session, c)
                    for c, m in chunked if m]
            session.embed_ahead(need, encoder)
            session.write_units([c for c, m in chunked if m], encoder, progress)
        else:
            where = "ray"
            if model_proc is not None:
                model_proc.close()  # the cluster's actors embed: free this core now
            _embed_on_ray(session, chunked, progress)
        session.timings["embed_seconds"] = time.perf_counter() - t
        log.info("refresh %s: %d units, %d chunks needed the model; embedded in the %s", st.run_id, len(chunked),
                 misses, where)
        summary = session.finish()
        summary["executor"] = where
        if model_proc is not None and model_proc.info:
            summary["model_loader"] = model_proc.info
        return summary


def _driver_can_embed(device: str) -> bool:
    """Whether this process can run the model as configured (only ``device: cuda`` needs a look at torch)."""
    if device != "cuda":
        return True
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def _start_model(session: RefreshSession, identity: dict[str, Any], cfg: Any) -> ModelProcess | None:
    """A model process for the driver path (not for the instant hash test encoder)."""
    from engine.refresh.session import stored_samples

    if str(identity.get("name", "")).startswith("hash:"):
        return None
    e = cfg.embed
    live = session.resolve()[0]
    samples = stored_samples(session.store, live.run_manifest, cfg)
    proc = ModelProcess(identity, device=e.device, dtype=e.dtype, batch_tokens=e.batch_tokens, samples=samples)
    session.set_model_loader(lambda: proc)  # type: ignore[arg-type, return-value]
    return proc


def _read_chunks(session: RefreshSession, chunked: dict[str, Any]) -> Any:
    from engine.embed.pipeline import read_part

    return read_part(session.store, chunked["chunk_file"]["key"])


def _items(session: RefreshSession) -> list[dict[str, str]]:
    import dataclasses

    st = session.state
    assert st is not None and st.prepared is not None
    items = []
    for u in st.prepared.pending:
        dups = st.prepared.plan.duplicates.get(u.file, {})
        unit_dups = {str(r): loc for r, loc in dups.items() if u.row_start <= r < u.row_end}
        items.append({"unit": json.dumps(dataclasses.asdict(u)), "dups": json.dumps(unit_dups)})
    return items


def _chunk_on_ray(session: RefreshSession) -> list[tuple[dict[str, Any], int]]:
    import ray

    from engine.embed.pipeline import plan_meta_for
    from engine.distributed.runtime import init_ray, plan_pool

    st = session.state
    assert st is not None and st.prepared is not None
    session.stage("chunk")
    if not st.prepared.pending:
        return []
    init_ray(st.cfg.runtime.address)
    pool = plan_pool(ray.cluster_resources(), "cpu", None, None)
    items = _items(session)
    ds: Any = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 1000)))
    ds = ds.map(_chunk_task, fn_kwargs={"session_cfg": st.cfg, "plan_meta": plan_meta_for(st.prepared),
                                        "lookup": st.lookup}, num_cpus=pool.cpus_per_task)
    return [(json.loads(r["chunked"]), int(r["misses"])) for r in ds.iter_rows()]


def _embed_on_ray(session: RefreshSession, chunked: list[tuple[dict[str, Any], int]], progress: Progress | None) -> None:
    import ray

    from engine.distributed.runtime import init_ray, plan_pool

    st = session.state
    assert st is not None
    init_ray(st.cfg.runtime.address)
    copy_only = [{"chunked": json.dumps(c)} for c, m in chunked if m == 0]
    to_embed = [{"chunked": json.dumps(c)} for c, m in chunked if m > 0]
    warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
    rows: list[dict[str, Any]] = []
    if copy_only:
        ds: Any = ray.data.from_items(copy_only, override_num_blocks=max(1, min(len(copy_only), 1000)))
        ds = ds.map(_copy_task, fn_kwargs={"cfg": st.cfg, "run_id": st.run_id, "identity": st.live.model,
                                           "lookup": st.lookup}, num_cpus=0.5)
        rows.extend(ds.iter_rows())
    if to_embed:
        pool = plan_pool(ray.cluster_resources(), st.cfg.embed.device, st.cfg.runtime.workers,
                         st.cfg.runtime.threads_per_worker)
        n = max(1, min(pool.actors, len(to_embed)))
        log.info("embedding pool for %d units with changed chunks: %s", len(to_embed), pool.reason)
        ds2: Any = ray.data.from_items(to_embed, override_num_blocks=max(1, min(len(to_embed), 1000)))
        ds2 = ds2.map_batches(
            _RefreshActor,
            fn_constructor_kwargs={"cfg": st.cfg, "run_id": st.run_id, "identity": st.live.model,
                                   "lookup": st.lookup, "threads": pool.threads_per_actor},
            batch_size=1, compute=ray.data.ActorPoolStrategy(min_size=n, max_size=n),
            num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor or None,
            max_restarts=3, max_task_retries=3,  # a unit's writes are idempotent: retry it on a new actor
        )
        rows.extend(ds2.iter_rows())
    for row in rows:
        marker = json.loads(row["marker"])
        session.record_unit(marker)
        if progress:
            progress({"event": "unit", **marker})


def build_parser() -> argparse.ArgumentParser:
    p = driver_parser("refresh", "YAML/JSON config (same keys as `embedctl refresh` flags)",
                      "validate the config (offline), print it resolved as JSON, exit")
    p.add_argument("--check-store", action="store_true",
                   help="with --dry-run: also read the store (live version, its run, model/chunker compatibility, "
                        "the lease) without writing anything")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return drive(args, RefreshConfig.from_flat,
                 lambda rcfg: run_refresh_job(rcfg, progress=lambda e: log.info("%s", json.dumps(_short(e)))),
                 dry=lambda rcfg: dry_run(rcfg, check_store=args.check_store), exit_code=exit_code)


def dry_run(rcfg: RefreshConfig, *, check_store: bool = False) -> dict[str, Any]:
    """The resolved config (offline: CI lints ConfigMaps where the store is unreachable); with
    ``check_store`` also the live version, the refresh run id and the compatibility verdict."""
    out: dict[str, Any] = {"config": rcfg.to_dict()}
    if check_store:
        out["plan"] = RefreshSession(rcfg).describe_plan()
    return out


def exit_code(summary: dict[str, Any]) -> int:
    """0 published/built/up to date; 7 a gate failed (nothing published); 5 the alias moved meanwhile."""
    return {"gate_failed": 7, "conflict": 5}.get(str(summary.get("status")), 0)


def _short(event: dict[str, Any]) -> dict[str, Any]:
    keep = ("event", "run_id", "unit_id", "units", "pending", "docs", "accepted", "chunks", "refresh")
    return {k: v for k, v in event.items() if k in keep}


if __name__ == "__main__":
    sys.exit(main())
