"""A small job's start-up and exit as a user meets them: `embedctl embed --json`, timed from outside.

    .venv/bin/python benchmarks/bench_start_up.py [--docs 300] [--runs 2] [--backends torch,onnx]
                                                  [--running-ray]

For each backend (``default``: no ``--backend`` flag), ``--runs`` fresh commands on the first
``--docs`` Cranfield documents (CPU). Prints, counted from the command's start: the first unit
started and embedded (``process_s`` plus the manifest's ``start_up``), Ray's own start, and the
seconds between the command's result on stdout and its exit (stopping the Ray it started).
``--running-ray`` first starts a local Ray (``ray start --head``) and passes ``--address``, as on a
machine where Ray is already up; the first job on it also starts Ray Data's own actors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_embed import write_corpus  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
       "RAY_USAGE_STATS_ENABLED": "0"}
RAY_PORT = 6391


def tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@contextmanager
def running_ray(wanted: bool, port: int = RAY_PORT) -> Iterator[str | None]:
    """A local Ray for the block (``ray start --head`` on ``port``; its address), or None when not
    ``wanted``; stopped after (``ray stop --force``: every local Ray, so never beside a test session)."""
    if not wanted:
        yield None
        return
    subprocess.run([tool("ray"), "start", "--head", "--num-cpus", str(os.cpu_count() or 1), "--port", str(port),
                    "--include-dashboard", "false", "--disable-usage-stats"], env=ENV, check=True, capture_output=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([tool("ray"), "stop", "--force"], env=ENV, capture_output=True)


def one_command(corpus: Path, store: Path, backend: str, address: str | None,
                extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    cmd = [tool("embedctl"), "embed", "--corpus", str(corpus), "--store", str(store), "--json", "--device", "cpu"]
    cmd += (["--backend", backend] if backend != "default" else []) + (["--address", address] if address else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**ENV, **(extra_env or {})}, cwd=store.parent)
    assert proc.stdout is not None
    out = proc.stdout.read()  # the whole result: stdout closes when the process exits
    result_at = time.perf_counter() - t0
    proc.wait()
    exit_at = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"embedctl embed failed ({proc.returncode}): {' '.join(cmd)}")
    summary = json.loads(out)
    up = summary["timings"]["start_up"]
    job_end = up.get("process_s", 0.0) + summary["timings"]["wall_seconds"]
    return {
        "command_s": round(exit_at, 2),
        "ray_init_s": up.get("ray_init_s"),
        "first_unit_started_s": round(up.get("process_s", 0.0) + up.get("first_unit_start_s", 0.0), 2),
        "first_unit_embedded_s": round(up.get("process_s", 0.0) + up.get("first_unit_embedded_s", 0.0), 2),
        # the job's end (in the process's clock) to the process's exit: printing, then stopping Ray
        "exit_after_job_s": round(exit_at - job_end, 2),
        "stdout_closed_s": round(result_at, 2),
        "load": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--backends", default="torch,onnx")
    ap.add_argument("--running-ray", action="store_true", help="start a local Ray first and pass --address")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-start-up-"))
    try:
        corpus = write_corpus(tmp / "corpus", args.docs)
        with running_ray(args.running_ray) as address:
            runs: dict[str, list[dict[str, Any]]] = {}
            for backend in args.backends.split(","):
                for i in range(args.runs):
                    r = one_command(tmp / "corpus", tmp / f"store-{backend}-{i}", backend, address)
                    runs.setdefault(backend, []).append(r)
                    print(f"{backend:6s} run {i + 1}: first unit started {r['first_unit_started_s']:5.2f} s, embedded "
                          f"{r['first_unit_embedded_s']:5.2f} s, Ray {r['ray_init_s']} s, exit "
                          f"{r['exit_after_job_s']} s after the job, command {r['command_s']} s", flush=True)
        res = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "corpus": corpus,
               "ray": "running (ray start --head, --address)" if address else "started by the command", "runs": runs}
        print(json.dumps(res, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
