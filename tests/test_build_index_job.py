"""The build-index job driver and CLI: config keys, dry run, Ray task pool, and the CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli.app import cli, main
from engine.core.errors import ConfigError
from engine.core.storage import open_store
from engine.distributed.build_index import BuildJobConfig, plan_ray_pool, run_build_job
from engine.index.build import build_index
from engine.index.params import BuildConfig
from tests.index_utils import clustered_vectors, make_run

REPO = Path(__file__).resolve().parent.parent
DIM = 32


def test_config_keys_aliases_and_refusals():
    cfg = BuildJobConfig.from_flat({"store": "s3://b/store", "run_id": "r1", "index": "docs", "index_kind": "ivfpq",
                                    "nlist": 4096, "pq_m": 48, "recall_gate": 0.9, "memory-budget": "4GB"})
    assert cfg.run == "r1" and cfg.build.kind == "ivfpq" and cfg.build.nlist == 4096
    assert cfg.build.gate_recall == 0.9 and cfg.build.memory_budget == 4_000_000_000
    nested = BuildJobConfig.from_flat({"store": "x", "run": "r", "index": "i", "build": {"kind": "flat"}})
    assert nested.build.kind == "flat"
    assert BuildJobConfig.from_flat({"store": "x", "run": "r", "index": "i", "gate_recall": None}).build.gate_recall \
        is None  # null: measure the recall, never fail on it
    with pytest.raises(ConfigError, match="unknown config keys"):
        BuildJobConfig.from_flat({"store": "x", "run": "r", "index": "i", "nlists": 5})
    with pytest.raises(ConfigError, match="lacks run"):
        BuildJobConfig.from_flat({"store": "x", "index": "i"})
    with pytest.raises(ConfigError, match="executor"):
        BuildJobConfig.from_flat({"store": "x", "run": "r", "index": "i", "executor": "spark"})


def test_pool_sized_from_cluster_resources():
    assert plan_ray_pool({"CPU": 2.0}, None, 1.0).size == 2
    assert plan_ray_pool({"CPU": 16.0}, None, 4.0).size == 4
    assert plan_ray_pool({"CPU": 0.0}, None, 1.0).size == 1  # autoscaling from zero: still one task
    assert plan_ray_pool({"CPU": 8.0}, 3, 1.0).size == 3
    on_cluster = plan_ray_pool({"CPU": 32.0, "embedctl_cpu_node": 2000.0}, None, 2.0)
    assert on_cluster.resources == {"embedctl_cpu_node": 0.001}  # lands on CPU worker nodes
    assert plan_ray_pool({"CPU": 2.0}, None, 1.0).resources == {}


def test_dry_run_and_local_run_as_a_script(tmp_path):
    store = open_store(tmp_path / "store")
    make_run(store, "r1", clustered_vectors(500, DIM, seed=2), parts=2)
    config = tmp_path / "job.yaml"
    config.write_text(f"store: {tmp_path / 'store'}\nrun_id: r1\nindex: docs\nindex_kind: flat\nexecutor: local\n")
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    dry = subprocess.run([sys.executable, "jobs/build_index.py", "--dry-run", "--config", str(config)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    resolved = json.loads(dry.stdout.strip().splitlines()[-1])
    assert resolved["run"] == "r1" and resolved["build"]["kind"] == "flat" and resolved["executor"] == "local"
    assert not store.list("indexes")  # a dry run builds nothing
    run = subprocess.run([sys.executable, "jobs/build_index.py", "--config", str(config)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    marker, payload = run.stdout.strip().splitlines()[-1].split(" ", 1)
    summary = json.loads(payload)
    assert marker == "EMBEDCTL_SUMMARY" and summary["kind"] == "flat" and summary["rows"] == 500
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: x\nrun: r\nindex: i\nshards: many\n")
    proc = subprocess.run([sys.executable, "jobs/build_index.py", "--dry-run", "--config", str(bad)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "shards" in proc.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_ray_tasks_build_the_same_index(ray_session, tmp_path):
    x = clustered_vectors(6000, DIM, clusters=48, seed=4)
    ray_store, local_store = open_store(tmp_path / "ray"), open_store(tmp_path / "local")
    for st in (ray_store, local_store):
        make_run(st, "r1", x, parts=4)
    events = []
    cfg = BuildJobConfig(store=str(tmp_path / "ray"), run="r1", index="docs",
                         build=BuildConfig(nlist=32, shards=4), executor="ray")
    res = run_build_job(cfg, progress=events.append)
    ref = build_index(local_store, "r1", "docs", BuildConfig(nlist=32, shards=4))
    assert sorted(e["shard"] for e in events if e["event"] == "shard_done") == [0, 1, 2, 3]
    shards = [{a["key"]: a["sha256"] for a in r.manifest["artifacts"] if a["key"].startswith("shards/")}
              for r in (res, ref)]
    assert shards[0] == shards[1]  # Ray tasks and the in-process path write byte-identical shards
    assert res.manifest["recall_gate"]["recall"] == ref.manifest["recall_gate"]["recall"]


def test_cli_build_search_and_config_file(tmp_path, capsys):
    store = open_store(tmp_path / "store")
    x = clustered_vectors(900, DIM, seed=6)
    make_run(store, "r1", x, parts=3)
    runner = CliRunner()
    config = tmp_path / "build.yaml"
    config.write_text("kind: binary-rerank\nshards: 2\n")
    r = runner.invoke(cli, ["build-index", "--store", str(tmp_path / "store"), "--run", "r1", "--index", "docs",
                            "--config", str(config), "--executor", "local", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["kind"] == "binary-rerank" and summary["shards"] == 2  # from the file: flags left at defaults
    assert summary["recall_gate"]["passed"] and not summary["reused"]
    again = runner.invoke(cli, ["build-index", "--store", str(tmp_path / "store"), "--run", "r1", "--index", "docs",
                                "--config", str(config), "--executor", "local", "--json"])
    assert json.loads(again.output.strip().splitlines()[-1])["reused"]
    # an impossible gate fails with the figure, exit code 7 (GateError), nothing published
    with pytest.raises(SystemExit) as exc:
        main(["build-index", "--store", str(tmp_path / "store"), "--run", "r1", "--index", "strict", "--kind",
              "ivfpq", "--nlist", "16", "--pq-m", "2", "--rescore", "none", "--nprobe", "1", "--gate-recall", "1.0",
              "--executor", "local"])
    assert exc.value.code == 7
    assert "recall gate failed for strict: recall@10 = 0." in capsys.readouterr().err
    assert not store.list("indexes/strict/versions")
    s = runner.invoke(cli, ["search", "--store", str(tmp_path / "store"), "--index", "docs", "--version", "latest",
                            "-q", "anything at all", "-k", "3", "--json"])
    assert s.exit_code == 0, s.output
    out = json.loads(s.output.strip().splitlines()[-1])
    assert out["version"] == summary["version"] and len(out["results"][0]["hits"]) == 3
    missing = runner.invoke(cli, ["search", "--store", str(tmp_path / "store"), "--index", "docs", "--alias", "live",
                                  "-q", "x"])
    assert missing.exit_code != 0
