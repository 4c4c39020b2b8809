"""Ray's own floor for goal 4's first unit: the fastest any Ray Data actor job's first row can come here.

    .venv/bin/python benchmarks/bench_ray_floor.py [--runs 3] [--running-ray] [--embed-docs 300]

Each run is a fresh process that starts (or, with ``--running-ray``, connects to) Ray exactly as
``embedctl embed`` does (``engine.distributed.runtime.init_ray``: the same flags, ray.data imported
while Ray starts) and runs a pipeline of the embed job's shape with nothing in it: one row through
a task (``map``), an actor pool of one (``map_batches``, an empty constructor) and a task again,
sized by the same ``plan_pool``. No model, no tokenizer, no store, no corpus. Prints, counted from
the process's start: Ray up, the actor's constructor entered, and the row out of the last stage.

What the embed command adds on top of this floor is ours (its plan, model load, the unit's chunking,
embedding and commit); what is below it belongs to Ray and Ray Data on this machine. ``--embed-docs N``
(0 to skip) runs ``embedctl embed`` on the first N Cranfield documents in turn with each floor run
(``bench_start_up``'s command, default backend), so both see the same machine.

``--job-runtime-env`` (with ``--running-ray``) also runs that command, in turn, with a job runtime_env
of one variable that changes nothing (``TOKENIZERS_PARALLELISM=0`` against the engine's ``false``;
``init_ray`` sends a value that differs from the engine's defaults): what a job runtime_env costs each
job on a running Ray, the cost the engine's commands no longer pay (engine/__init__.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class _Actor:
    def __init__(self) -> None:
        self.entered_at = time.time()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {**batch, "actor_entered_at": [self.entered_at] * len(batch["i"])}


def _task(row: dict[str, Any]) -> dict[str, Any]:
    return row


def child(address: str | None) -> None:
    """One job in this process; prints one JSON line of seconds since the process started."""
    import psutil

    born = psutil.Process().create_time()
    from engine.distributed.runtime import init_ray, plan_pool

    ray = init_ray(address)
    up = time.time()
    pool = plan_pool(ray.cluster_resources(), "cpu")
    ds = ray.data.from_items([{"i": 0}]).map(_task, num_cpus=pool.cpus_per_task)
    ds = ds.map_batches(_Actor, batch_size=1, num_cpus=pool.cpus_per_actor,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1))
    ds = ds.map(_task, num_cpus=pool.cpus_per_writer)
    row = next(iter(ds.iter_rows()))
    out = time.time()
    print(json.dumps({"ray_up_s": round(up - born, 2), "actor_entered_s": round(row["actor_entered_at"] - born, 2),
                      "row_out_s": round(out - born, 2)}), flush=True)


def floor_run(address: str | None) -> dict[str, Any]:
    from benchmarks.bench_start_up import ENV  # not at the top: the child's clock starts with its process

    cmd = [sys.executable, __file__, "--child"] + (["--address", address] if address else [])
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"the floor job failed:\n{proc.stderr[-2000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "load": round(os.getloadavg()[0], 2)}


def embed_beside(tmp: Path, i: int, address: str | None, with_runtime_env: bool) -> dict[str, Any]:
    """``embedctl embed`` on the bench corpus (and, asked, again with a job runtime_env; the order turns
    each round, so neither always runs on the warmer machine)."""
    from benchmarks.bench_start_up import one_command

    out: dict[str, Any] = {}
    variants = [("embed", None)] + ([("embed_with_runtime_env", {"TOKENIZERS_PARALLELISM": "0"})]
                                   if with_runtime_env else [])
    for name, extra in variants if i % 2 == 0 else variants[::-1]:
        e = one_command(tmp / "corpus", tmp / f"store-{name}-{i}", "default", address, extra)
        out[f"{name}_first_unit_embedded_s"] = e["first_unit_embedded_s"]
        out[f"{name}_ray_init_s"] = e["ray_init_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--running-ray", action="store_true", help="start a local Ray first (ray start --head), connect to it")
    ap.add_argument("--embed-docs", type=int, default=300, help="embedctl embed beside each run (0: skip)")
    ap.add_argument("--job-runtime-env", action="store_true",
                    help="with --running-ray: also the command with a job runtime_env, in turn")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--address", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.job_runtime_env and not args.running_ray:
        ap.error("--job-runtime-env needs --running-ray (a command that starts its own Ray sends no runtime_env)")
    if args.child:
        child(args.address)
        return
    from benchmarks.bench_embed import write_corpus
    from benchmarks.bench_start_up import running_ray

    runs: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-floor-"))
    try:
        if args.embed_docs:
            write_corpus(tmp / "corpus", args.embed_docs)
        with running_ray(args.running_ray) as address:
            for i in range(args.runs):
                r = floor_run(address)
                if args.embed_docs:
                    r.update(embed_beside(tmp, i, address, args.job_runtime_env))
                runs.append(r)
                beside = (f"; embedctl embed: first unit embedded {r['embed_first_unit_embedded_s']:5.2f} s"
                          if args.embed_docs else "")
                if "embed_with_runtime_env_first_unit_embedded_s" in r:
                    beside += f" ({r['embed_with_runtime_env_first_unit_embedded_s']:5.2f} s with a job runtime_env)"
                print(f"run {i + 1}: floor: Ray up {r['ray_up_s']:5.2f} s, actor entered {r['actor_entered_s']:5.2f} "
                      f"s, row out {r['row_out_s']:5.2f} s{beside}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res: dict[str, Any] = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs",
                           "ray": "running (ray start --head)" if address else "started by the process",
                           "median_row_out_s": statistics.median(r["row_out_s"] for r in runs), "runs": runs}
    for key in ("embed_first_unit_embedded_s", "embed_with_runtime_env_first_unit_embedded_s"):
        if all(key in r for r in runs):
            res[f"median_{key}"] = statistics.median(r[key] for r in runs)
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
