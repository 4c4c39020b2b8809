"""Model migration: compare metrics against brute force, the CAS state and its runner lock, every
phase end to end (local disk and a real S3 endpoint on loopback), gates that roll back by
themselves, a SIGKILL in each phase followed by a rerun that continues from that phase, and
zero failed HTTP queries through the publish engineer's server during rollout -> cutover ->
rollback. Models are the hashing encoder with two different dimensions (hash:32 blue,
hash:16 green), so nothing loads a real model."""

from __future__ import annotations

import http.client
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from engine.core import layout
from engine.core.errors import ConfigError, ConflictError, GateError, NotFoundError
from engine.core.storage import Store, open_store, wait_for
from engine.embed.config import EmbedJobConfig
from engine.embed.pipeline import run_locally
from engine.index.hits import doc_scores as dedupe_docs
from engine.migrate.compare_metrics import (
    compare_query,
    jaccard_at_k,
    kendall_tau_b,
    ks_2samp,
    overlap_at_k,
    rank_correlations,
    spearman,
    summarize_comparisons,
)
from engine.migrate.migration import Migration
from engine.migrate.plan import MigrationPlan, default_migration_id, parse_weights, plan_from_flat
from engine.migrate.state import PHASES, MigrationState
from engine.migrate.tools import Tools, default_index_builder, default_loader
from engine.publish.aliases import alias_history, publish_version, read_alias
from engine.serve.alias import AliasSearcher, hit_to_dict
from engine.serve.server import SearchServer
from tests.corpus_utils import make_docs, write_corpus

REPO = Path(__file__).resolve().parent.parent
IDX = "docs"


# =============================================================================================
# compare metrics against brute force
# =============================================================================================


def brute_kendall_tau_b(x, y):
    n = len(x)
    conc = disc = tx = ty = 0
    for i, j in itertools.combinations(range(n), 2):
        a, b = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        if a == 0 and b == 0:
            continue
        if a == 0:
            tx += 1
        elif b == 0:
            ty += 1
        elif a == b:
            conc += 1
        else:
            disc += 1
    denom = math.sqrt((conc + disc + tx) * (conc + disc + ty))
    return (conc - disc) / denom


def brute_ks(a, b):
    grid = sorted(set(a) | set(b))
    return max(abs(sum(v <= t for v in a) / len(a) - sum(v <= t for v in b) / len(b)) for t in grid)


def test_overlap_jaccard_top1_by_hand():
    a, b = ["d1", "d2", "d3", "d4"], ["d2", "d1", "d5", "d6"]
    assert overlap_at_k(a, b, 1) == 0.0 and overlap_at_k(a, b, 2) == 1.0 and overlap_at_k(a, b, 4) == 0.5
    assert jaccard_at_k(a, b, 4) == pytest.approx(2 / 6) and jaccard_at_k(a, b, 2) == 1.0
    assert overlap_at_k([], [], 5) == 1.0 and jaccard_at_k([], [], 5) == 1.0
    assert overlap_at_k(["x"], [], 5) == 0.0  # one side empty: nothing in common
    row = compare_query("q", "text", [{"doc_id": d, "score": 1 - i / 10} for i, d in enumerate(a)],
                        [{"doc_id": d, "score": 1 - i / 10} for i, d in enumerate(b)], k=4)
    assert not row.top1_agree and row.overlap[3] == pytest.approx(2 / 3) and sorted(row.overlap) == [1, 3, 4]


def test_rank_correlations_match_brute_force_and_extremes():
    rng = np.random.default_rng(0)
    for _ in range(30):
        x = rng.integers(0, 6, size=9).astype(float)
        y = rng.integers(0, 6, size=9).astype(float)
        if len(set(x)) > 1 and len(set(y)) > 1:
            assert kendall_tau_b(x, y) == pytest.approx(brute_kendall_tau_b(x, y))
            rx = np.argsort(np.argsort(x))  # Spearman without ties = Pearson on ranks
            if len(set(x)) == len(x) and len(set(y)) == len(y):
                ry = np.argsort(np.argsort(y))
                assert spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    same = ["a", "b", "c", "d"]
    assert rank_correlations(same, same, 4) == {"spearman": pytest.approx(1.0), "kendall": pytest.approx(1.0)}
    rev = rank_correlations(same, same[::-1], 4)
    assert rev["spearman"] == pytest.approx(-1.0) and rev["kendall"] == pytest.approx(-1.0)
    # Disjoint lists: each doc is ranked in one list and missing (rank k+1) in the other.
    disjoint = rank_correlations(["a", "b"], ["c", "d"], 2)
    assert disjoint["spearman"] < 0 and disjoint["kendall"] < 0
    assert spearman([1, 1, 1], [1, 2, 3]) is None and kendall_tau_b([1], [1]) is None


def test_ks_matches_brute_force_and_pvalue_behaves():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 200), rng.normal(0.5, 1, 150)
    got = ks_2samp(a, b)
    assert got["statistic"] == pytest.approx(brute_ks(list(a), list(b)))
    assert got["pvalue"] < 0.01
    same = ks_2samp(a, a)
    assert same["statistic"] == 0.0 and same["pvalue"] == 1.0
    assert ks_2samp([1, 2], [5, 6])["statistic"] == 1.0
    assert ks_2samp([], [1.0]) == {"statistic": None, "pvalue": None}


def test_dedupe_docs_keeps_each_docs_best_chunk_in_rank_order():
    hits = [{"doc_id": "a", "score": 0.9}, {"doc_id": "b", "score": 0.8}, {"doc_id": "a", "score": 0.7},
            {"doc_id": "c", "score": 0.6}]
    assert dedupe_docs(hits) == [("a", 0.9), ("b", 0.8), ("c", 0.6)]
    assert dedupe_docs(hits, 2) == [("a", 0.9), ("b", 0.8)]


def test_summary_reports_score_shift_and_agreement():
    rows = [compare_query(f"q{i}", "t", [{"doc_id": f"d{j}", "score": 0.9 - j / 10} for j in range(5)],
                          [{"doc_id": f"d{(j + i) % 7}", "score": 0.5 - j / 20} for j in range(5)], k=5)
            for i in range(4)]
    s = summarize_comparisons(rows, 5)
    assert s["queries"] == 4 and s["top1_agreement"] == 0.25  # only q0 keeps d0 on top
    assert s["score_shift"]["top1"]["delta"]["mean"] == pytest.approx(0.5 - 0.9)
    assert s["score_shift"]["top1"]["ks"]["statistic"] == 1.0
    assert set(s["overlap_at_k"]) == {"1", "3", "5"}


# =============================================================================================
# plan and configuration
# =============================================================================================


def test_weights_and_flat_config():
    assert parse_weights("5,25,100") == (5.0, 25.0, 100.0) and parse_weights([100]) == (100.0,)
    for bad in ("25,5,100", "5,25", "0,100", "5,x,100", ""):
        with pytest.raises(ConfigError):
            parse_weights(bad)
    plan, run = plan_from_flat({"index": IDX, "store": "/s", "dim": 128, "benchmark": "b.json", "weight": "10,100",
                                "retention": "2d", "soak": "30s", "index_kind": "flat", "chunk-tokens": 64,
                                "migration_id": "m1", "embed": {"query_prompt": "q: "}})
    assert plan.embed == {"truncate_dim": 128, "chunk_tokens": 64, "query_prompt": "q: "}
    assert plan.build == {"kind": "flat"} and plan.weights == (10.0, 100.0)
    assert plan.retention_s == 2 * 86400 and plan.soak_s == 30 and run == {"store": "/s", "migration_id": "m1"}
    with pytest.raises(ConfigError, match="unknown migration config keys"):
        plan_from_flat({"index": IDX, "model": "hash:8", "benchmark": "b", "modle": "x"})
    with pytest.raises(ConfigError, match="new model"):
        plan_from_flat({"index": IDX, "benchmark": "b.json"})
    with pytest.raises(ConfigError, match="query set"):
        plan_from_flat({"index": IDX, "model": "hash:8"})
    # Runtime knobs do not change the migration's identity; the model does.
    a = MigrationPlan(index=IDX, embed={"model": "hash:8", "workers": 2}, benchmark="b", soak_s=5)
    b = MigrationPlan(index=IDX, embed={"model": "hash:8"}, benchmark="b")
    c = MigrationPlan(index=IDX, embed={"model": "hash:9"}, benchmark="b")
    assert default_migration_id(a) == default_migration_id(b) != default_migration_id(c)


# =============================================================================================
# the state document
# =============================================================================================


def test_state_create_update_and_runner_lock(tmp_path):
    store = open_store(tmp_path / "store")
    plan = MigrationPlan(index=IDX, embed={"model": "hash:8"}, benchmark="b.json")
    st = MigrationState(store, IDX, "m1", lock_ttl_s=60)
    doc = st.create(plan, "tester")
    assert doc["phase"] == "baseline" and st.create(plan, "tester")["created_at"] == doc["created_at"]
    with pytest.raises(ConfigError, match="another plan"):
        st.create(MigrationPlan(index=IDX, embed={"model": "hash:9"}, benchmark="b.json"), "tester")
    with pytest.raises(ConflictError, match="does not hold the lock"):
        st.update(lambda d: d.update(x=1))
    st.acquire(by="runner-1")
    try:
        # A second runner is refused while the first is alive.
        other = MigrationState(store, IDX, "m1")
        with pytest.raises(ConflictError, match="is being run"):
            other.acquire(by="runner-2")

        # Concurrent compare-and-swap updates never lose one another.
        def bump(_: int) -> None:
            for _ in range(10):
                st.update(lambda d: d.update(counter=d.get("counter", 0) + 1))

        threads = [threading.Thread(target=bump, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert st.read()["counter"] == 40
    finally:
        st.release()
    assert st.read()["lock"] is None
    # A lock whose process is gone (a SIGKILLed runner on this host) is taken over at once;
    # the old runner, if it came back, could not write any more.
    st.acquire(by="runner-1")
    st._stop.set()  # stop the heartbeat as a killed process would
    st.update(lambda d: d["lock"].update(pid=2 ** 22 + 12345), need_lock=False)
    nxt = MigrationState(store, IDX, "m1")
    nxt.acquire(by="runner-3")
    try:
        with pytest.raises(ConflictError):
            st.update(lambda d: d.update(stale=True))
        assert nxt.read()["lock"]["by"] == "runner-3"
    finally:
        nxt.release()


# =============================================================================================
# a blue index to migrate from
# =============================================================================================


def make_blue(root: Path, store_uri: str, *, n_docs: int = 40, model: str = "hash:32", backend: str = "torch") -> dict:
    """A tiny corpus embedded with ``model`` (on ``backend``), built into a version and published as live, plus
    a benchmark (each query: the first words of one document, that document relevant)."""
    from engine.quality.benchmark import build_benchmark, save_benchmark

    docs = make_docs(n_docs, seed=3)
    write_corpus(root / "corpus", docs)
    store = open_store(store_uri)
    run = run_locally(EmbedJobConfig.from_flat({"corpus": str(root / "corpus"), "store": store_uri, "model": model,
                                                "backend": backend, "chunk_tokens": 40, "chunk_overlap": 8,
                                                "unit_rows": 16}))
    blue = default_index_builder(store, IDX, run["run_id"], parent_version=None, options={"kind": "flat"})["version_id"]
    publish_version(store, IDX, blue, reason="initial")
    queries = [{"query_id": f"q{i}", "text": " ".join(d["text"].split()[2:9])} for i, d in enumerate(docs[:14])]
    qrels = {f"q{i}": {d["doc_id"]: 1.0} for i, d in enumerate(docs[:14])}
    bench = build_benchmark(queries, qrels, corpus_ids={d["doc_id"] for d in docs}, name="tiny")
    save_benchmark(bench, root / "bench.json")
    return {"store": store, "blue": blue, "bench": str(root / "bench.json"), "docs": docs, "run": run["run_id"]}


def plan_for(setup: dict, **kw) -> MigrationPlan:
    kw.setdefault("embed", {"model": "hash:16"})
    kw.setdefault("max_recall_drop", 1.0)  # hash:16 is a worse model than hash:32; gates tested on their own
    return MigrationPlan(index=IDX, benchmark=setup["bench"], k=5, **kw)


@pytest.fixture
def blue_local(tmp_path) -> dict:
    return make_blue(tmp_path, str(tmp_path / "store"))


# =============================================================================================
# the whole migration
# =============================================================================================


def test_full_migration_on_both_backends(tmp_path, any_store_uri):
    setup = make_blue(tmp_path, any_store_uri)
    store: Store = setup["store"]
    m = Migration.start(store, plan_for(setup))
    doc = m.run()
    assert doc["status"] == "cut_over" and doc["phase"] is None
    assert all(doc["phases"][p]["status"] == "done" and doc["phases"][p]["attempts"] == 1 for p in PHASES)
    blue, green = doc["blue"], doc["green"]
    assert blue["version"] == setup["blue"] and blue["dim"] == 32 and blue["model"]["name"] == "hash:32"
    assert green["dim"] == 16 and green["model"]["name"] == "hash:16" and green["run_id"] == f"{m.migration_id}-green"
    # The green version carries its own model and dimension; blue is untouched and retained.
    gm = store.read_json(layout.version_manifest_key(IDX, green["version"]))
    assert gm["dim"] == 16 and gm["model"]["name"] == "hash:16" and gm["parent_version"] == blue["version"]
    alias = read_alias(store, IDX)
    assert alias.version == green["version"] and alias.weighted is None and doc["retain_until"]
    steps = [(s["weight"], s["status"]) for s in doc["rollout"]["steps"]]
    assert steps == [(5.0, "passed"), (25.0, "passed"), (100.0, "passed")]
    # The alias history tells the story: publish, three weighted steps, cutover.
    hist = alias_history(store, IDX)
    assert [h["to_weighted"]["green_weight"] if h["to_weighted"] else h["to"] for h in hist] == \
        [blue["version"], 5, 25, 100, green["version"]]
    # Figures stored beside the state; the report is a path in the store.
    cmp_ = store.read_json(m.key("compare.json"))
    assert cmp_["summary"]["queries"] == 14 and set(cmp_["benchmark"]) >= {"blue", "green"}
    assert 0 <= cmp_["summary"]["jaccard_at_k"]["5"] <= 1 and len(cmp_["disagreements"]) == 14
    base = store.read_json(m.key("baseline.json"))
    assert base["benchmark"]["metrics"]["recall@5"] == pytest.approx(cmp_["benchmark"]["blue"]["recall@5"])
    page = store.read_bytes(m.key("report.html")).decode()
    assert "Queries that disagree most" in page and "data:image/png;base64," in page and "cut_over" in page
    st = m.status()
    assert st["report"].endswith("report.html") and st["runner"] is None
    # Calibrated thresholds for green, its own (not inherited from blue).
    from engine.quality.calibration_store import load_calibration

    assert load_calibration(store, IDX, green["version"], inherit=False)["version_id"] == green["version"]
    # Rerunning a finished migration changes nothing.
    before = m.read()
    m.run()
    assert m.read()["phases"] == before["phases"] and read_alias(store, IDX).generation == alias.generation
    # gc must keep blue for the retention period (engine.migrate.state.retained_versions says why).
    from engine.migrate.state import retained_versions

    kept = retained_versions(store, IDX)
    assert list(kept) == [blue["version"]] and "retained for rollback until" in kept[blue["version"]]
    assert retained_versions(store, IDX, now="9999-01-01T00:00:00Z") == {}
    from engine.publish.gc import gc_index

    gc = gc_index(store, IDX, keep=0, grace_s=0)  # no history kept: only the migration protects blue
    assert blue["version"] not in [d.get("version") for d in gc.deleted]
    assert any(k.get("version") == blue["version"] and "retained for rollback" in str(k) for k in gc.kept)
    assert store.exists(f"indexes/{IDX}/versions/{blue['version']}/manifest.json")
    # Rollback after cutover: instant, blue is still there.
    res = m.rollback("post-cutover check")
    assert res["changed"] and read_alias(store, IDX).version == blue["version"]
    assert m.read()["status"] == "rolled_back" and m.read()["phases"]["cutover"]["status"] == "pending"
    assert set(retained_versions(store, IDX)) == {blue["version"], green["version"]}  # unfinished again


def test_each_version_embeds_queries_with_its_own_model(blue_local):
    """Dimensions differ (32 vs 16): during a weighted step each query is answered wholly by one
    version, embedded by that version's model, exactly as that version alone answers it."""
    store = blue_local["store"]
    m = Migration.start(store, plan_for(blue_local, weights=(25.0, 100.0)))
    m.run(until="calibrate")
    doc = m.read()
    blue_v, green_v = doc["blue"]["version"], doc["green"]["version"]
    publish_version(store, IDX, green_v, weighted={"blue": blue_v, "green_weight": 50}, expect_current=blue_v)
    searchers = {v: default_loader(store, IDX, v) for v in (blue_v, green_v)}
    assert searchers[blue_v].encoder.dim == 32 and searchers[green_v].encoder.dim == 16
    queries = [" ".join(d["text"].split()[:5]) for d in blue_local["docs"]]
    with AliasSearcher(store, IDX, "live", poll_interval=3600, loader=default_loader) as s:
        ans = s.search(queries, k=3)
    assert set(ans.versions) == {blue_v, green_v}
    for q, v, hits in zip(queries, ans.versions, ans.results, strict=True):
        alone = searchers[v].search([q], k=3)[0]
        assert [(h.chunk_id, round(h.score, 5)) for h in hits] == [(h.chunk_id, round(h.score, 5)) for h in alone]
    # The alias is not where the migration left it: the rollout refuses to touch it.
    publish_version(store, IDX, blue_v)
    publish_version(store, IDX, green_v, weighted={"blue": blue_v, "green_weight": 50})
    publish_version(store, IDX, green_v)
    with pytest.raises(ConflictError, match="someone else moved it"):
        m.rollout()


def test_phases_run_in_order_and_are_idempotent(blue_local):
    store = blue_local["store"]
    m = Migration.start(store, plan_for(blue_local))
    with pytest.raises(ConfigError, match="needs 'baseline' first"):
        m.phase("build")
    m.phase("baseline")
    first = m.read()["phases"]["baseline"]
    again = m.phase("baseline")  # done: recorded result, nothing rerun
    assert again == first["result"] and m.read()["phases"]["baseline"]["attempts"] == 1
    m.phase("baseline", redo=True)
    assert m.read()["phases"]["baseline"]["attempts"] == 2
    # The inputs were copied into the store at start: a benchmark file edited (or gone)
    # afterwards changes nothing for this migration.
    assert m.read()["inputs"]["benchmark"]["key"].startswith(f"indexes/{IDX}/migrations/{m.migration_id}/inputs/")
    Path(blue_local["bench"]).write_text("not a benchmark any more")
    m.run(until="compare")
    assert store.read_json(m.key("compare.json"))["benchmark"]["queries"] == 14
    with pytest.raises(ConfigError, match="cutover"):
        Migration.open(store, IDX).phase("cutover")
    # `open` finds the index's only unfinished migration.
    assert Migration.open(store, IDX).migration_id == m.migration_id
    with pytest.raises(NotFoundError):
        Migration.open(store, IDX, "no-such-migration")


def test_a_failed_gate_rolls_back_by_itself_and_records_why(blue_local, tmp_path):
    store = blue_local["store"]
    canaries = tmp_path / "canaries.jsonl"
    canaries.write_text("".join(json.dumps({"query": " ".join(d["text"].split()[:6]), "doc_id": d["doc_id"]}) + "\n"
                                for d in blue_local["docs"][:10]))
    # Green must find every canary's document in its top 5: the hashing model at 16 dims cannot.
    m = Migration.start(store, plan_for(blue_local, canaries=str(canaries), min_recall=1.0))
    m.run(until="calibrate")
    with pytest.raises(GateError, match=r"step 5% failed its gates: green canary recall@5 .* below the minimum"):
        m.rollout()
    doc = m.read()
    assert doc["status"] == "rolled_back" and doc["rollback"]["automatic"]
    assert "below the minimum" in doc["rollback"]["reason"]
    step = doc["rollout"]["steps"][-1]
    assert step["weight"] == 5.0 and step["status"] == "failed" and step["failures"]
    alias = read_alias(store, IDX)
    assert alias.version == doc["blue"]["version"] and alias.weighted is None and alias.action == "rollback"
    assert "below the minimum" in alias.reason
    with pytest.raises(GateError, match="rolled back"):
        m.run()  # `run` does not retry a rolled-back rollout on its own
    page = store.read_bytes(m.key("report.html")).decode()
    assert "Rolled back to blue" in page and "below the minimum" in page
    from engine.migrate.state import retained_versions

    assert doc["green"]["version"] in retained_versions(store, IDX)  # still protected from gc...
    m.abandon("green cannot pass the canaries")
    assert retained_versions(store, IDX) == {}  # ...until the migration is given up
    with pytest.raises(ConfigError, match="abandoned"):
        m.rollout()
    assert "Abandoned" in store.read_bytes(m.key("report.html")).decode()


def test_calibrate_refuses_to_go_on_without_thresholds(blue_local, monkeypatch):
    import engine.quality.calibration

    m = Migration.start(blue_local["store"], plan_for(blue_local))
    m.run(until="compare")
    monkeypatch.setattr(engine.quality.calibration, "calibrate", lambda *a, **kw: {"absolute": {}})  # fits nothing
    with pytest.raises(GateError, match="no calibrated thresholds"):
        m.phase("calibrate")
    doc = m.read()
    assert doc["phases"]["calibrate"]["status"] == "failed" and doc["phase"] == "calibrate"
    with pytest.raises(ConfigError, match="needs 'calibrate' first"):
        m.rollout()
    assert read_alias(blue_local["store"], IDX).version == doc["blue"]["version"]


def test_matryoshka_green_keeps_blues_model_and_truncates(blue_local):
    store = blue_local["store"]
    m = Migration.start(store, plan_for(blue_local, embed={"truncate_dim": 8}))
    m.run(until="baseline")
    cfg = m.green_embed_config()
    assert cfg.embed.model == "hash:32" and cfg.embed.truncate_dim == 8 and cfg.chunk.chunk_tokens == 40
    assert cfg.corpus.corpus == str(Path(blue_local["bench"]).parent / "corpus")
    m.run(until="build")
    green = m.read()["green"]
    assert green["dim"] == 8 and green["model"]["truncate_dim"] == 8 and green["model"]["native_dim"] == 32


@pytest.mark.ray
@pytest.mark.slow
def test_build_runs_the_embed_job_on_ray(blue_local, ray_session):
    """The green build is the same job as `embedctl embed`, on Ray (what `jobs/migrate.py` and
    `embedctl migrate` without --in-process use)."""
    from engine.distributed.migrate import ray_embed_runner

    store = blue_local["store"]
    m = Migration.start(store, plan_for(blue_local), tools=Tools(embed_runner=ray_embed_runner()))
    m.run(until="build")
    green = m.read()["green"]
    run = store.read_json(layout.run_manifest_key(green["run_id"]))
    assert run["status"] == "succeeded" and run["model"]["name"] == "hash:16" and green["dim"] == 16
    assert run["counts"]["accepted"] == len(blue_local["docs"])


# =============================================================================================
# kill -9 in each phase, then a rerun continues from that phase
# =============================================================================================


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli.app", *args]


@pytest.mark.parametrize("point,phase", [
    pytest.param("baseline.searched", "baseline", marks=pytest.mark.slow),
    ("build.after-embed", "build"),
    pytest.param("compare.searched-green", "compare", marks=pytest.mark.slow),
    pytest.param("calibrate.pairs", "calibrate", marks=pytest.mark.slow),
    ("rollout.step-25", "rollout"),
    pytest.param("cutover.swapped", "cutover", marks=pytest.mark.slow),
])
def test_sigkill_in_a_phase_then_rerun_continues_from_it(blue_local, tmp_path, point, phase):
    store = blue_local["store"]
    marker = tmp_path / "paused"
    args = ["migrate", "run", "--store", store.uri, "--index", IDX, "--model", "hash:16", "--benchmark",
            blue_local["bench"], "--k", "5", "--max-recall-drop", "1", "--in-process", "--json"]
    env = {**os.environ, "EMBEDCTL_MIGRATE_PAUSE": f"{point}:{marker}", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_cli(*args), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: marker.exists() or proc.poll() is not None, timeout=120), "never reached the point"
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    m = Migration.open(store, IDX)
    killed = m.read()
    assert killed["phase"] == phase and killed["phases"][phase]["status"] == "running"
    assert killed["lock"] is not None  # the dead runner's lock: taken over below without waiting
    before = {p: killed["phases"][p]["attempts"] for p in PHASES}
    if phase == "rollout":
        assert read_alias(store, IDX).weighted.green_weight == 25  # killed mid-step
    doc = m.run()
    assert doc["status"] == "cut_over"
    for i, p in enumerate(PHASES):
        expected = 1 if i < PHASES.index(phase) else (2 if p == phase else 1)
        assert before[p] == (1 if i <= PHASES.index(phase) else 0)
        assert doc["phases"][p]["attempts"] == expected, (p, doc["phases"][p])
    if phase == "build":
        run = store.read_json(layout.run_manifest_key(doc["green"]["run_id"]))
        assert run["attempts"] == 2 and run["units"]["done_before_this_attempt"] == run["units"]["total"]
    if phase == "rollout":
        steps = {s["weight"]: s for s in doc["rollout"]["steps"]}
        assert steps[5.0]["attempts"] == 1 and steps[25.0]["attempts"] == 2  # continued at 25%, not from 5%
        assert [s["status"] for s in doc["rollout"]["steps"]] == ["passed"] * 3


# =============================================================================================
# zero downtime over HTTP through rollout -> cutover -> rollback
# =============================================================================================


def http_search(conn: http.client.HTTPConnection, query: str) -> tuple[int, dict, dict]:
    body = json.dumps({"queries": [query], "k": 3, "keys": [query]})
    conn.request("POST", "/search", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read() or b"{}")
    return resp.status, data, dict(resp.getheaders())


def test_zero_failed_queries_during_rollout_cutover_and_rollback(blue_local):
    store = blue_local["store"]
    queries = [" ".join(d["text"].split()[i:i + 5]) for d in blue_local["docs"][:20] for i in (0, 7)]
    m = Migration.start(store, plan_for(blue_local))
    m.run(until="calibrate")
    doc = m.read()
    blue_v, green_v = doc["blue"]["version"], doc["green"]["version"]
    reference = {v: [[hit_to_dict(h) for h in r] for r in default_loader(store, IDX, v).search(queries, k=3)]
                 for v in (blue_v, green_v)}

    searcher = AliasSearcher(store, IDX, "live", poll_interval=0.05, loader=default_loader).start()
    server = SearchServer(searcher, port=0).start()
    host, port = server.url.removeprefix("http://").split(":")
    stop = threading.Event()
    answers: list[tuple[str, int, list[dict]]] = []
    failures: list[str] = []
    lock = threading.Lock()
    max_queries, deadline = 6000, time.monotonic() + 180  # bounded by count and by time

    def client(worker: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        i = worker
        while not stop.is_set() and time.monotonic() < deadline:
            with lock:
                if len(answers) + len(failures) >= max_queries:
                    return
            qi = i % len(queries)
            i += 3
            try:
                code, body, headers = http_search(conn, queries[qi])
                with lock:
                    if code != 200:
                        failures.append(f"HTTP {code}: {body}")
                    else:
                        versions = [r["version"] for r in body["results"]]
                        if len(versions) != 1 or headers.get("X-Embedctl-Version") != versions[0]:
                            failures.append(f"answer names {versions} / {headers.get('X-Embedctl-Version')}")
                        answers.append((versions[0], qi, body["results"][0]["hits"]))
            except Exception as err:  # noqa: BLE001 - every failure counts
                with lock:
                    failures.append(f"{type(err).__name__}: {err}")
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.close()

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()

    def settle(n: int = 150) -> None:
        """Let the clients answer n more queries (or run out of their bounded budget)."""
        start = len(answers)
        assert wait_for(lambda: len(answers) >= start + n or not any(t.is_alive() for t in threads), timeout=60)

    try:
        settle()
        # The rollout's own gates also probe this server over HTTP (plan.probe_url).
        m2 = Migration(store, IDX, m.migration_id, tools=Tools())
        m2.state.update(lambda d: d["plan"].update(probe_url=server.url), need_lock=False)
        m2.rollout()
        assert all(s["gates"]["http"]["errors"] == 0 for s in m2.read()["rollout"]["steps"])
        settle()
        m2.cutover()
        assert wait_for(lambda: searcher.status().get("version") == green_v and
                        searcher.status().get("weighted") is None, timeout=20)
        settle()
        m2.rollback("zero-downtime test")
        assert wait_for(lambda: searcher.status().get("version") == blue_v, timeout=20)
        settle()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        server.shutdown()
        searcher.stop()

    assert failures == []
    by_version = Counter(v for v, _, _ in answers)
    assert set(by_version) == {blue_v, green_v}, by_version
    for version, qi, hits in answers:  # wholly one version's answer, never a mix
        ref = reference[version][qi]
        assert [h["chunk_id"] for h in hits] == [h["chunk_id"] for h in ref]
        assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in ref], abs=1e-5)


# =============================================================================================
# command line and the Ray driver
# =============================================================================================


def test_cli_run_status_report_and_refusals(blue_local, tmp_path):
    from click.testing import CliRunner

    from engine.cli.app import cli

    store = blue_local["store"]
    runner = CliRunner()
    base = ["migrate", "run", "--store", store.uri, "--index", IDX, "--model", "hash:16", "--benchmark",
            blue_local["bench"], "--k", "5", "--in-process", "--until", "compare", "--json"]
    res = runner.invoke(cli, base, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["status"]["phase"] == "calibrate" and out["status"]["report"].endswith("report.html")
    assert Path(out["status"]["report"]).exists()
    res = runner.invoke(cli, ["migrate", "status", "--store", store.uri, "--index", IDX])
    assert res.exit_code == 0 and "compare    done" in res.stdout and "report:" in res.stdout
    res = runner.invoke(cli, ["migrate", "rollout", "--store", store.uri, "--index", IDX, "--weight", "5,100"])
    assert res.exit_code != 0 and "needs 'calibrate' first" in str(res.exception)
    res = runner.invoke(cli, ["migrate", "compare", "--store", store.uri, "--index", IDX, "--model", "x"])
    assert res.exit_code == 2  # plan flags only start a migration (no such option here)
    out_html = tmp_path / "r.html"
    res = runner.invoke(cli, ["migrate", "report", "--store", store.uri, "--index", IDX, "--out", str(out_html),
                              "--json"])
    assert res.exit_code == 0 and out_html.read_text().startswith("<!DOCTYPE html>")
    res = runner.invoke(cli, ["migrate", "list", "--store", store.uri, "--index", IDX, "--json"])
    assert json.loads(res.stdout)["migrations"][0]["status"] == "running"


def test_job_driver_dry_run(tmp_path):
    cfg = tmp_path / "migrate.yaml"
    cfg.write_text(f"store: {tmp_path / 'store'}\nindex: docs\nmodel: hash:16\nbenchmark: b.json\n"
                   "weights: [5, 50, 100]\nembed: {chunk_tokens: 64}\nbuild: {kind: flat}\n")
    out = subprocess.run([sys.executable, "jobs/migrate.py", "--config", str(cfg), "--dry-run"], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["plan"]["weights"] == [5.0, 50.0, 100.0] and got["plan"]["embed"] == {"model": "hash:16",
                                                                                      "chunk_tokens": 64}
    assert got["plan"]["build"] == {"kind": "flat"} and got["migration_id"].startswith("mig-")
    bad = cfg.with_name("bad.yaml")
    bad.write_text("store: /x\nindex: docs\nmodel: hash:16\nbenchmark: b.json\nweights: [50, 5]\n")
    out = subprocess.run([sys.executable, "jobs/migrate.py", "--config", str(bad), "--dry-run"], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 2 and "weights must increase" in out.stderr
