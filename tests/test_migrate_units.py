"""Migration units: the scipy statistics against the hand-written ones they replaced, the report
kept current at every phase end through cutover, the runner lock as an engine.core.lease lease in
the state document, and the plan's flat keys through engine.core.config."""

from __future__ import annotations

import re

import numpy as np
import pytest

from engine.core.errors import ConfigError, ConflictError
from engine.migrate.compare_metrics import kendall_tau_b, ks_2samp, rank_correlations, spearman
from engine.migrate.migration import Migration
from engine.migrate.plan import plan_from_flat
from engine.migrate.state import PHASES, MigrationState
from tests.test_migrate import IDX, make_blue, plan_for

# =============================================================================================
# statistics: scipy.stats against the values the hand-written code gave (computed before the
# switch on the same seeded data, kept here)
# =============================================================================================

# (spearman, kendall tau-b) of 4 pairs of 15 tied integer ranks, rng = default_rng(2026)
OLD_CORRELATIONS = [(-0.4353951997936596, -0.3617840255724682), (0.3055051014314596, 0.2127659574468085),
                    (0.14352821495179452, 0.12429576904403139), (0.4462089477894274, 0.36272497736747344)]
# (n_a, n_b, shift, KS statistic, asymptotic p-value with Stephens' correction), same generator after the above
OLD_KS = [(30, 25, 0.3, 0.21999999999999997, 0.47239951108261946),
          (200, 150, 0.5, 0.1816666666666667, 0.00593550374318158),
          (1000, 800, 0.05, 0.03299999999999992, 0.7115127362063737),
          (8, 12, 1.0, 0.8333333333333334, 0.000867748259031379)]
OLD_RANKINGS = [((list("abcdefg"), list("cabgdhi"), 7), (0.6386554621848739, 0.45714285714285713)),
                ((list("abcde"), list("edcba"), 5), (-1.0, -1.0)),
                ((list("ab"), list("cd"), 2), (-0.8888888888888888, -0.8)),
                ((list("abcdefghij"), list("bacdxyzefg"), 10), (0.5333333333333333, 0.4533333333333333))]


def test_scipy_statistics_match_the_hand_written_ones_they_replaced():
    rng = np.random.default_rng(2026)
    for sp, kt in OLD_CORRELATIONS:
        x = rng.integers(0, 8, size=15).astype(float)
        y = rng.integers(0, 8, size=15).astype(float)
        assert spearman(x, y) == pytest.approx(sp, abs=1e-12)
        assert kendall_tau_b(x, y) == pytest.approx(kt, abs=1e-12)
    for na, nb, shift, stat, p in OLD_KS:
        got = ks_2samp(rng.normal(0, 1, na), rng.normal(shift, 1, nb))
        assert got["statistic"] == pytest.approx(stat, abs=1e-12)
        # scipy's p-value is exact for these sizes; the old one was asymptotic: close, not equal
        assert got["pvalue"] == pytest.approx(p, rel=0.06)
    for (a, b, k), (sp, kt) in OLD_RANKINGS:
        got = rank_correlations(a, b, k)
        assert got["spearman"] == pytest.approx(sp, abs=1e-12) and got["kendall"] == pytest.approx(kt, abs=1e-12)


def test_undefined_correlations_are_none_without_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy warns on constant input: we never hand it any
        assert spearman([1, 1, 1], [1, 2, 3]) is None and kendall_tau_b([2, 2], [1, 2]) is None
        assert spearman([1], [1]) is None and kendall_tau_b([], []) is None
    assert ks_2samp([], [1.0]) == {"statistic": None, "pvalue": None}
    assert ks_2samp([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]) == {"statistic": 0.0, "pvalue": 1.0}


# =============================================================================================
# the report says what the state says, after every phase (it used to stop at compare/rollout)
# =============================================================================================


def _page(store, m) -> str:
    return store.read_bytes(m.key("report.html")).decode()


def _phase_status(page: str, phase: str) -> str:
    row = re.search(rf"<tr><td>{phase}</td><td><span class=\"pill (\w+)\">", page)
    assert row, f"no row for phase {phase} in the report"
    return row.group(1)


def test_report_is_rewritten_at_every_phase_end_through_cutover(tmp_path):
    setup = make_blue(tmp_path, str(tmp_path / "store"), n_docs=24)
    store = setup["store"]
    m = Migration.start(store, plan_for(setup, weights=(50.0, 100.0)))
    for i, phase in enumerate(PHASES):
        m.phase(phase)
        page = _page(store, m)
        assert _phase_status(page, phase) == "done", phase
        if i + 1 < len(PHASES):
            nxt = PHASES[i + 1]
            assert _phase_status(page, nxt) == "pending" and f"Phase: {nxt}." in page, phase
            assert 'status <span class="pill running">running</span>' in page
    page = _page(store, m)
    assert m.read()["status"] == "cut_over" and m.read()["phase"] is None
    assert 'status <span class="pill cut_over">cut_over</span>' in page
    assert "Cut over: the alias serves green alone" in page
    assert "status running" not in page and "Phase: rollout" not in page and "Phase:" not in page
    # The rollout steps and the cutover are on the page as the state records them.
    assert page.count('<span class="pill passed">passed</span>') == 2
    # A rollback after cutover rewrites it again.
    m.rollback("checking the report")
    page = _page(store, m)
    assert "Rolled back to blue: checking the report" in page and _phase_status(page, "cutover") == "pending"


# =============================================================================================
# the runner lock: one engine.core.lease lease, kept in the state document's `lock` field
# =============================================================================================


def test_runner_lock_is_a_core_lease_in_the_state_document(tmp_path):
    from engine.core.lease import lease_state
    from engine.core.storage import open_store

    store = open_store(tmp_path / "store")
    plan = plan_for({"bench": "b.json"}, embed={"model": "hash:8"})
    MigrationState(store, IDX, "m1").create(plan, "tester")
    m = Migration.open(store, IDX, "m1", by="runner-1")
    with m.state.locked(by="runner-1"):
        lock = m.read()["lock"]
        # the core lease record: who, where, expiry, and the old runner_id for older readers
        assert lock["what"] == "migration" and lock["by"] == "runner-1" and lock["runner_id"] == lock["lease_id"]
        assert lease_state(lock)[0] is False
        st = m.status()
        assert st["runner"]["by"] == "runner-1" and st["runner_state"].startswith("held by runner-1")
        from click.testing import CliRunner

        from engine.cli.app import cli

        res = CliRunner().invoke(cli, ["migrate", "status", "--store", store.uri, "--index", IDX, "--migration", "m1"])
        assert res.exit_code == 0 and "runner: held by runner-1 (pid" in res.stdout, res.output
        with pytest.raises(ConflictError, match=r"is being run: its lock is held by runner-1 \(pid \d+ on .*--break-lock"):
            Migration.open(store, IDX, "m1").state.acquire(by="runner-2")
        # --break-lock takes it from a live holder; the first runner can no longer write
        other = MigrationState(store, IDX, "m1")
        other.acquire(by="runner-2", break_lock=True)
        try:
            assert m.read()["lock"]["took_over"]["by"] == "runner-1"
            with pytest.raises(ConflictError, match="does not hold the lock"):
                m.state.update(lambda d: d.update(x=1))
        finally:
            other.release()
    assert m.read()["lock"] is None and m.status()["runner"] is None
    events = [e["event"] for e in m.read()["events"]]
    assert events.count("runner") == 2  # one event per runner that took the lock, none per heartbeat


def test_heartbeat_renews_the_lease_in_the_state(tmp_path):
    import time

    from engine.core.storage import open_store

    store = open_store(tmp_path / "store")
    st = MigrationState(store, IDX, "m1", lock_ttl_s=0.8)  # renewed every 0.2 s
    st.create(plan_for({"bench": "b.json"}, embed={"model": "hash:8"}), "tester")
    with st.locked(by="runner-1"):
        first = st.read()["lock"]
        time.sleep(0.9)
        later = st.read()["lock"]
        assert later["renewals"] >= 2 and later["expires_at"] > first["expires_at"]
        st.update(lambda d: d.update(still_ours=True))  # the lease never lapsed
    assert st.read()["lock"] is None


def test_http_probe_routes_long_queries_by_their_text(tmp_path):
    """The gate's HTTP probe sends no explicit routing key: the server routes by the query text,
    and explicit keys are limited to 256 characters (3 of Cranfield's 225 queries are longer)."""
    from engine.migrate.gates import probe_http
    from engine.migrate.tools import default_loader
    from engine.serve.alias import AliasSearcher
    from engine.serve.server import SearchServer

    setup = make_blue(tmp_path, str(tmp_path / "store"), n_docs=12)
    searcher = AliasSearcher(setup["store"], IDX, "live", poll_interval=3600, loader=default_loader).start()
    server = SearchServer(searcher, port=0).start()
    try:
        long_query = " ".join(d["text"] for d in setup["docs"][:3])[:400]
        assert len(long_query) > 256
        got = probe_http(server.url, [long_query, "short query"], 3, 1, {setup["blue"]}, wait_s=10)
    finally:
        server.shutdown()
        searcher.stop()
    assert got["errors"] == 0 and got["failures"] == [] and got["by_version"] == {setup["blue"]: 2}


# =============================================================================================
# plan keys through engine.core.config
# =============================================================================================


def test_plan_keys_nested_and_flat_through_core_config():
    plan, run = plan_from_flat({"index": IDX, "benchmark": "b.json", "embed": {"model": "hash:8", "dim": 4},
                                "build": {"kind": "flat"}, "index-factory": "IVF4,Flat", "until": "compare",
                                "break_lock": True, "min_recall": None})
    assert plan.embed == {"model": "hash:8", "truncate_dim": 4}
    assert plan.build == {"kind": "flat", "factory": "IVF4,Flat"} and plan.min_recall is None
    assert run == {"until": "compare", "break_lock": True}
    with pytest.raises(ConfigError, match="unknown"):
        plan_from_flat({"index": IDX, "benchmark": "b.json", "embed": {"model": "hash:8", "modle": 1}})
    with pytest.raises(ConfigError, match="soak must be a duration"):
        plan_from_flat({"index": IDX, "benchmark": "b.json", "model": "hash:8", "soak": "soon"})


def test_green_build_keeps_blues_sparse_shards():
    from engine.migrate.build import green_build_options
    from engine.migrate.evaluation import version_facts

    blue = version_facts({"version_id": "v1", "kind": "flat", "params": {}, "sparse": {"kind": "bm25", "shards": []}})
    assert green_build_options({}, blue)["sparse"] == "bm25"
    assert green_build_options({"sparse": "none"}, blue)["sparse"] == "none"  # the plan's word wins
    assert "sparse" not in green_build_options({}, version_facts({"version_id": "v0", "kind": "flat"}))
    # document-level BM25 stays document-level on green; a chunk build (or an older manifest) adds nothing
    doc = version_facts({"version_id": "v2", "kind": "flat", "params": {},
                         "sparse": {"kind": "bm25", "granularity": "doc", "shards": []}})
    assert green_build_options({}, doc)["sparse_granularity"] == "doc"
    assert "sparse_granularity" not in green_build_options({}, blue)
