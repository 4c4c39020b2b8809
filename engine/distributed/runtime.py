"""The one Ray helper: connect or start Ray, and size pools from the cluster's real resources.

On a 2-CPU machine an actor pool that reserves every CPU starves Ray Data's read and write
tasks and the pipeline hangs; pools here always leave CPU for the other stages.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from engine import OFFLINE_ENV

log = logging.getLogger(__name__)

DATASET_RESERVATION_EXPIRES_S = 40  # see init_ray


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> Any:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a private local Ray."""
    import ray

    if ray.is_initialized():
        return ray
    # Ray Data reserves a share of the cluster for each running dataset and keeps a dead driver's share
    # until its request expires (180 s by default): after a driver was killed, a resumed job on the same
    # cluster ran with half the CPUs (one chunk task instead of two on 2 CPUs) for three minutes. Live
    # drivers renew their request at least every 10 s; read when ray.data is imported, so set it first.
    os.environ.setdefault("RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S", str(DATASET_RESERVATION_EXPIRES_S))
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # A cluster's workers get their environment from the image / the job's runtime_env, and the
        # engine's defaults (OFFLINE_ENV) when they import it; only a value this driver changed
        # travels, since any job runtime_env costs every job fresh workers (see engine/__init__.py).
        # Inside a submitted job, a second runtime_env would fail to merge with the job's; and
        # credentials must never travel in a runtime_env (the dashboard shows it).
        in_submitted_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ or "RAY_JOB_SUBMISSION_ID" in os.environ
        env_vars = {} if in_submitted_job else changed_offline_env()
        ray.init(address=address, runtime_env={"env_vars": env_vars} if env_vars else None, log_to_driver=False,
                 logging_level=_ray_log_level())
    else:
        # A local Ray needs no auth token; "local" starts a fresh cluster even if a killed
        # `ray start` left /tmp/ray/ray_current_cluster behind. Its workers are children of the raylet
        # this process starts, so they inherit this environment (the engine's offline switches, S3
        # endpoint and credentials) with no job runtime_env: a job runtime_env, even env_vars only,
        # makes every worker wait for Ray's runtime-env agent (first actor ready 1.7-2.0 s after
        # ray.init with one, 0.6-0.7 s without, on 2 CPUs).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # ray.data (~0.8 s of imports, pandas among them) loads while ray.init waits for the
        # processes it starts, instead of after it.
        warm = threading.Thread(target=importlib.import_module, args=("ray.data",), daemon=True)
        warm.start()
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=_ray_log_level())
        atexit.register(_stop_private_ray, ray._private.worker._global_node)
        warm.join()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray


def changed_offline_env() -> dict[str, str]:
    """The engine's offline defaults this process runs with a different value of (a user's export)."""
    return {k: os.environ[k] for k, v in OFFLINE_ENV.items() if os.environ.get(k, v) != v}


def _stop_private_ray(node: Any) -> None:
    """At exit, stop the local Ray this process started, without Ray's own exit pauses: its exit hook
    sleeps 0.5 s for log lines (we do not forward any) and gives each process 1 s to stop on SIGTERM,
    which the autoscaler monitor always uses up: 2.4-2.6 s of every command's wall time after its job,
    ~1.0 s now (benchmarks/bench_start_up.py). The monitor keeps no state for a private cluster."""
    import ray

    if node is None or not ray.is_initialized() or ray._private.worker._global_node is not node:
        return  # already stopped (a test, Serve), or not the Ray this process started
    from ray._private import ray_constants

    for info in getattr(node, "all_processes", {}).get(ray_constants.PROCESS_TYPE_MONITOR, []):
        try:
            info.process.kill()
        except OSError:
            pass
    ray.shutdown()


def _ray_log_level() -> int:
    """Ray's own INFO chatter ("Started a local Ray instance", executor plans) only when the user asked
    for INFO logs (``embedctl -v``); warnings and errors always pass."""
    return logging.INFO if logging.getLogger().getEffectiveLevel() <= logging.INFO else logging.WARNING


@contextmanager
def quiet_ray_data() -> Iterator[None]:
    """Keep Ray's own chatter out of a user's terminal unless -v asked for INFO logs.

    Without it a first run prints Ray's C++ ERROR line "constructor arguments in the object store
    and max_restarts > 0" (Ray Data always passes its map transformer to actors by reference, and
    we want actor restarts: nothing is wrong) and Ray Data's progress-bar warning (we turn the
    bars off on purpose). Neither is actionable, and the C++ line cannot be switched off by level
    without another line saying so; so while Ray runs, writes to file descriptor 2 from native
    code go to a log file (``ray-chatter-<pid>.log`` in the temp folder), while Python's own
    ``sys.stderr`` (our logging, progress bar, errors) keeps the terminal. Failures still raise.
    """
    import warnings

    if logging.getLogger().getEffectiveLevel() <= logging.INFO:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("ray", "ray.data")]
    saved_levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), _native_stderr_to_file():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\..*")
            yield
    finally:
        for lg, level in zip(loggers, saved_levels, strict=True):
            lg.setLevel(level)


@contextmanager
def _native_stderr_to_file() -> Iterator[None]:
    """fd 2 -> a log file for native writers; ``sys.stderr`` and logging handlers keep the terminal."""
    import sys
    import tempfile

    try:
        sys.stderr.flush()
        term = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded interpreters)
        yield
        return
    path = os.path.join(tempfile.gettempdir(), f"ray-chatter-{os.getpid()}.log")
    old = sys.stderr
    py_err = os.fdopen(os.dup(term), "w", buffering=1, encoding=getattr(old, "encoding", None) or "utf-8",
                       errors="backslashreplace")
    handlers = [h for lg in (logging.getLogger(), logging.getLogger("ray")) for h in lg.handlers
                if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is old]
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
    sys.stderr = py_err
    for h in handlers:
        h.setStream(py_err)
    log.debug("Ray's native log lines go to %s", path)
    try:
        yield
    finally:
        py_err.flush()
        os.dup2(term, 2)
        os.close(term)
        sys.stderr = old
        for h in handlers:
            h.setStream(old)
        py_err.close()


GPU_ACTORS_PER_CARD = 2


@dataclass(frozen=True)
class PoolPlan:
    """How many embedding actors, and what each reserves."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    threads_per_actor: int
    cpus_per_task: float  # the chunk/read tasks
    reason: str
    cpus_per_writer: float = 0.25  # the tasks that write and commit each unit after the actors
    # Writer tasks at once. A cap matters beyond the writers: Ray Data hands the CPUs no stage has
    # claimed to the most downstream stage without a cap, so uncapped writers hold budget they never
    # use and the chunk stage runs one task at a time (on 2 CPUs, or ~1/3 of a 16-CPU GPU host).
    # Capped, the chunk stage gets the rest. One writer commits ~45k chunks per busy second.
    writers: int = 1


def plan_pool(resources: dict[str, float], device: str, workers: int | None = None,
              threads: int | None = None, actors_per_gpu: int = GPU_ACTORS_PER_CARD,
              standin: bool = False) -> PoolPlan:
    """Size the embedding actor pool from cluster resources, always leaving CPU for other stages.

    ``standin``: the actors do no forward pass (``--model standin:<model>``), as if a device computed
    it, so they reserve a quarter CPU each and the chunk and writer tasks get the rest."""
    cpus = float(resources.get("CPU", 1.0))
    gpus = float(resources.get("GPU", 0.0))
    on_gpu = device == "cuda" or (device == "auto" and gpus >= 1)
    if standin and not on_gpu:
        n = workers or 1
        task_cpus = 0.5 if cpus > 4 else 0.75
        return PoolPlan(n, 0.25, 0.0, threads or 1, task_cpus,
                        f"{n} stand-in actor(s) x 0.25 CPU (no forward pass), chunk tasks {task_cpus:g} CPU each, "
                        f"on {cpus:g} CPUs", 0.25, _writers(cpus))
    if on_gpu:
        if gpus < 1:
            # An autoscaling cluster starts with no GPU nodes: ask for GPU actors and let the
            # autoscaler bring the nodes (on a fixed CPU-only cluster the job waits; say so).
            log.warning("--device cuda but the cluster has no GPU yet; requesting GPU actors for the autoscaler")
        # Two actors per card when the CPUs allow: one actor leaves the card idle while it reads and
        # writes its unit (H200, MiniLM, one run: 1 -> 2 actors +9%; README GPU figures).
        # Not more by default: every actor holds its own copy of the model in GPU memory.
        per_gpu = actors_per_gpu if cpus >= 4 * max(gpus, 1.0) else 1
        n = workers or (max(1, int(gpus)) * per_gpu if gpus >= 1 else 1)
        gpa = min(1.0, gpus / n) if gpus >= 1 else 1.0
        cpa = min(1.0, max(0.25, (cpus - 1) / n)) if cpus > 1 else 0.25
        return PoolPlan(n, cpa, gpa, threads or 1, min(0.5, cpus / 4), f"{n} GPU actor(s) over {gpus:g} GPUs",
                        min(0.5, cpus / 4), _writers(cpus))
    # CPU: reserve at most cpus-1 for actors (>= 1 CPU stays free for reading/chunking/writing).
    spare = max(cpus - 1.0, cpus / 2)
    n = workers or max(1, int(spare // 2) if cpus > 4 else 1)
    cpa = max(0.25, min(spare / n, 2.0))
    # torch threads: the CPUs a worker can really use. One actor on a small machine may use all cores,
    # since chunk tasks are light next to the model's matrix work.
    thr = threads or max(1, math.floor(cpus / n))
    # Chunk tasks: half a CPU each on larger machines; on a small one, the CPUs the actors leave
    # (one task at a time beside the actor, so start-up is not a scramble of worker boots).
    # Writers take a quarter CPU so one can always run beside a chunk task and the actor.
    writer_cpus = 0.25
    task_cpus = min(0.5, cpus / 4) if cpus > 4 else min(1.0, max(0.5, cpus - n * cpa - writer_cpus))
    return PoolPlan(n, round(cpa, 3), 0.0, thr, round(task_cpus, 3),
                    f"{n} CPU actor(s) x {cpa:g} CPU reserved, {thr} torch thread(s) each, on {cpus:g} CPUs",
                    writer_cpus, _writers(cpus))


def _writers(cpus: float) -> int:
    """Writer tasks at once: one per 8 CPUs (a GPU host's actors hand over ~20k chunks/s; a writer
    commits ~45k per busy second), at least one."""
    return max(1, int(cpus // 8))
