"""Actor-pool sizing from cluster resources (no Ray needed)."""

from __future__ import annotations

from engine.distributed.runtime import plan_pool


def test_gpu_pool_puts_two_actors_on_each_card_when_cpus_allow():
    p = plan_pool({"CPU": 16.0, "GPU": 1.0}, "cuda")
    assert (p.actors, p.gpus_per_actor) == (2, 0.5)
    assert p.actors * p.cpus_per_actor <= 16 - 1  # CPU left for the chunk tasks
    p = plan_pool({"CPU": 32.0, "GPU": 4.0}, "auto")
    assert (p.actors, p.gpus_per_actor) == (8, 0.5)


def test_gpu_pool_one_actor_per_card_on_few_cpus_and_explicit_workers_win():
    assert plan_pool({"CPU": 2.0, "GPU": 1.0}, "cuda").actors == 1
    p = plan_pool({"CPU": 16.0, "GPU": 1.0}, "cuda", workers=4)
    assert (p.actors, p.gpus_per_actor) == (4, 0.25)


def test_cpu_pool_leaves_a_cpu_for_read_and_write_tasks():
    p = plan_pool({"CPU": 2.0}, "cpu")
    assert p.gpus_per_actor == 0
    assert p.actors * p.cpus_per_actor <= 1.0
    # one chunk task at a time beside the actor on a small machine (no scramble of worker boots at start),
    # and room for one writer task beside them (writers take the unit's I/O off the actor)
    assert p.cpus_per_task > 0.5 and p.actors * p.cpus_per_actor + p.cpus_per_task + p.cpus_per_writer <= 2.0
    assert plan_pool({"CPU": 16.0}, "cpu").cpus_per_task == 0.5


def test_standin_pool_leaves_the_cpus_to_chunk_and_writer_tasks():
    # the stand-in does no forward pass (a device would): two chunk tasks run beside it on 2 CPUs
    p = plan_pool({"CPU": 2.0}, "cpu", standin=True)
    assert (p.actors, p.cpus_per_actor, p.gpus_per_actor) == (1, 0.25, 0.0)
    assert p.cpus_per_actor + 2 * p.cpus_per_task + p.cpus_per_writer <= 2.0
    assert plan_pool({"CPU": 16.0}, "cpu", standin=True).cpus_per_task == 0.5
    # with a GPU the stand-in is sized like the device actors it stands in for
    assert plan_pool({"CPU": 16.0, "GPU": 1.0}, "cuda", standin=True).gpus_per_actor == 0.5


def test_unit_rows_by_device_and_identity_of_older_runs():
    from engine.embed.config import EmbedJobConfig

    def cfg(**kw):
        return EmbedJobConfig.from_flat({"corpus": "c", "store": "s", **kw})

    assert cfg(device="cpu").with_unit_rows(0).corpus.unit_rows == 256
    assert cfg(device="auto").with_unit_rows(0).corpus.unit_rows == 256
    assert cfg(device="auto").with_unit_rows(1).corpus.unit_rows == 8192
    assert cfg(device="cuda").with_unit_rows(0).corpus.unit_rows == 8192  # an autoscaler brings the GPU
    assert cfg(model="standin:").with_unit_rows(0).corpus.unit_rows == 2048
    assert cfg(device="cuda", unit_rows=100).with_unit_rows(1).corpus.unit_rows == 100  # the user's choice wins
    # a config that was never sized (refresh, in-process runs) plans and identifies as the old default did,
    # so their run ids are unchanged; an explicit 2048 names the same run as a run from an older release
    assert cfg().identity_dict() == cfg(unit_rows=2048).identity_dict()
    assert cfg(device="cpu").with_unit_rows(0).identity_dict() != cfg(device="cpu").identity_dict()


def test_an_int8_recipe_from_4_on_names_the_run_and_older_ids_stay():
    from engine.embed.config import EmbedJobConfig

    def ident(**kw):
        return EmbedJobConfig.from_flat({"corpus": "c", "store": "s", "device": "cpu", **kw}).identity_dict()["embed"]

    # openvino int8 is now the static recipe 4: a run of the weights-only recipe 3 (same flags) is not resumed
    assert ident(backend="openvino", quantize="int8")["int8_recipe"] == 4
    # runs whose ids never held a recipe keep them: onnx int8 (recipes 1-2), fp32, torch
    assert "int8_recipe" not in ident(backend="onnx", quantize="int8")
    assert "int8_recipe" not in ident(backend="openvino") and "int8_recipe" not in ident()


_PRIVATE_RAY = """
import json, os
from engine.distributed.runtime import init_ray
ray = init_ray(None, num_cpus=1)
node = ray._private.worker._global_node
pids = [p.process.pid for infos in node.all_processes.values() for p in infos]
@ray.remote
def worker_pid():
    return os.getpid()
pids.append(ray.get(worker_pid.remote()))
print(json.dumps(pids), flush=True)
"""


def test_a_command_that_started_ray_leaves_no_ray_process_behind(tmp_path):
    """At exit the command stops its private Ray itself (the autoscaler monitor killed, then ray.shutdown),
    skipping Ray's own exit pauses: every process it started is gone once the command has exited."""
    import json
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil

    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"PYTHONPATH": str(repo), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    out = subprocess.run([sys.executable, "-c", _PRIVATE_RAY], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    pids = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(pids) >= 5  # gcs, raylet, monitor, dashboard, log monitor ... and a worker

    def alive() -> list[int]:
        live = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    live.append(pid)
            except psutil.NoSuchProcess:
                pass
        return live

    deadline = time.monotonic() + 10  # a worker notices its raylet is gone on its own
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive() == []
