"""The quality loop: PR curve and F-beta calibration, relative rule and floor, applying
thresholds, benchmarks, canaries (stats, baseline gate, Prometheus), drift, and the stored
calibration records (newest wins, inherited ones say so, stale ones are refused)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest

from engine import quality as Q
from engine.errors import ConfigError, GateError, NotFoundError, SchemaError
from engine.storage import open_store

# ---------------------------------------------------------------------------------------------
# PR curve and F-beta
# ---------------------------------------------------------------------------------------------


def brute_force_curve(scores, labels):
    """Every distinct score as a threshold, counted one pair at a time."""
    pts = []
    retrieved = [(s, y) for s, y in zip(scores, labels) if not math.isnan(s)]
    positives = sum(labels)
    for t in sorted({s for s, _ in retrieved}, reverse=True):
        tp = sum(1 for s, y in retrieved if s >= t and y)
        fp = sum(1 for s, y in retrieved if s >= t and not y)
        pts.append((t, tp / (tp + fp), tp / positives))
    return pts


def test_pr_curve_matches_brute_force_with_ties_and_unretrieved():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 15, size=200) / 15.0  # many ties
    scores[rng.random(200) < 0.1] = np.nan  # not retrieved
    labels = rng.random(200) < 0.4
    curve = Q.pr_curve(scores, labels)
    ref = brute_force_curve(scores.tolist(), labels.tolist())
    assert len(curve.thresholds) == len(ref)
    for (t, p, r), t2, p2, r2 in zip(ref, curve.thresholds, curve.precision, curve.recall):
        assert t == pytest.approx(t2) and p == pytest.approx(p2) and r == pytest.approx(r2)
    assert curve.positives == int(labels.sum())  # unretrieved positives still count in recall


def test_best_fbeta_hand_computed():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    labels = [1, 1, 0, 1, 0]
    # t=.9 P1 R1/3 F1 .5 | .8 P1 R2/3 F1 .8 | .7 P2/3 R2/3 F1 .667 | .6 P3/4 R1 F1 .857 | .5 P.6 R1 F1 .75
    op = Q.best_fbeta(Q.pr_curve(scores, labels), beta=1.0)
    assert op.at_score == 0.6 and op.threshold == pytest.approx(0.55)
    assert op.precision == pytest.approx(0.75) and op.recall == 1.0 and op.f_beta == pytest.approx(6 / 7)
    assert (op.tp, op.fp, op.fn) == (3, 1, 0)
    # beta 0.5 weighs precision: F0.5 at .8 = 1.25*(2/3)/(0.25+2/3) = 0.909 beats .6 (0.789)
    op = Q.best_fbeta(Q.pr_curve(scores, labels), beta=0.5)
    assert op.at_score == 0.8 and op.threshold == pytest.approx(0.75) and op.f_beta == pytest.approx(10 / 11)
    # beta 2 weighs recall: the lowest threshold that reaches recall 1 with the best precision
    assert Q.best_fbeta(Q.pr_curve(scores, labels), beta=2.0).at_score == 0.6


def test_ties_cannot_be_split():
    # the two 0.7 pairs (one relevant, one not) move together
    op = Q.best_fbeta(Q.pr_curve([0.9, 0.7, 0.7, 0.5], [1, 1, 0, 0]))
    assert op.at_score == 0.7 and op.threshold == pytest.approx(0.6)
    assert op.precision == pytest.approx(2 / 3) and op.recall == 1.0 and op.f_beta == pytest.approx(0.8)


def test_f_beta_equal_ties_take_the_higher_threshold():
    # F1 is 2/3 at .85 (P 1, R 1/2) and 2/3 at .45 (P 1/2, R 1): the higher one wins
    op = Q.best_fbeta(Q.pr_curve([0.9, 0.85, 0.8, 0.7, 0.6, 0.55, 0.5, 0.45], [1, 1, 0, 0, 0, 0, 1, 1]))
    assert op.at_score == pytest.approx(0.85) and op.f_beta == pytest.approx(2 / 3)


def test_synthetic_separable_set_has_its_known_optimum():
    rng = np.random.default_rng(0)
    pos = rng.uniform(0.6, 0.95, 500)
    neg = rng.uniform(0.05, 0.5, 500)
    op = Q.best_fbeta(Q.pr_curve(np.concatenate([pos, neg]), np.r_[np.ones(500), np.zeros(500)].astype(bool)))
    assert op.f_beta == 1.0 and neg.max() < op.threshold <= pos.min()


def test_synthetic_overlapping_set_has_its_known_optimum():
    # relevant ~ U[0.4, 1.0], non-relevant ~ U[0, 0.6], equal counts. For t in [0.4, 0.6]:
    # F1 = 2(1-t) / (2(1-t) + 0.2), for t < 0.4: F1 = 2 / (2 + (0.6-t)/0.6): the optimum is
    # t* = 0.4 exactly, where F1 = 6/7.
    rng = np.random.default_rng(1)
    n = 20000
    scores = np.concatenate([rng.uniform(0.4, 1.0, n), rng.uniform(0.0, 0.6, n)])
    labels = np.r_[np.ones(n), np.zeros(n)].astype(bool)
    op = Q.best_fbeta(Q.pr_curve(scores, labels))
    assert op.threshold == pytest.approx(0.4, abs=0.01)
    assert op.f_beta == pytest.approx(6 / 7, abs=0.01)
    assert 0.8 < Q.pr_curve(scores, labels).average_precision() < 1.0


def test_no_retrieved_pair_is_a_clear_error():
    with pytest.raises(SchemaError, match="no calibration pair was retrieved"):
        Q.best_fbeta(Q.pr_curve([np.nan, np.nan], [1, 0]))


def test_relative_rule_separates_what_no_absolute_threshold_can():
    # Each query's relevant docs sit within 0.04 of its top score, non-relevant ones 0.1-0.3
    # below; the top scores themselves range over 0.3-0.9, so absolute scores overlap.
    rng = np.random.default_rng(2)
    scores, tops, labels = [], [], []
    for _ in range(200):
        top = rng.uniform(0.3, 0.9)
        for _ in range(3):
            scores.append(top - rng.uniform(0, 0.04)); tops.append(top); labels.append(True)
            scores.append(top - rng.uniform(0.1, 0.3)); tops.append(top); labels.append(False)
    scores, tops, labels = np.array(scores), np.array(tops), np.array(labels)
    absolute = Q.best_fbeta(Q.pr_curve(scores, labels))
    rel = Q.best_relative(scores, tops, labels)
    assert absolute.f_beta < 0.9
    assert rel.f_beta == 1.0 and 0.04 <= rel.threshold < 0.1


def test_floor_keeps_the_requested_share_of_relevant_pairs():
    scores = np.r_[np.arange(1, 101) / 100.0, [0.0, 0.5]]
    labels = np.r_[np.ones(100), [0, 0]].astype(bool)
    assert Q.choose_floor(scores, labels, 0.99) == pytest.approx(0.02)  # drops only 0.01
    assert Q.choose_floor(scores, labels, 1.0) == pytest.approx(0.01)
    assert Q.choose_floor(np.array([0.3, np.nan]), np.array([True, True]), 0.9) == pytest.approx(0.3)


# ---------------------------------------------------------------------------------------------
# applying thresholds
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    doc_id: str
    score: float


HITS = [Hit("a#0", "a", 0.81), Hit("b#0", "b", 0.74), Hit("c#0", "c", 0.52)]


def test_apply_absolute_threshold_and_floor():
    kept, why = Q.apply_thresholds(HITS, Q.Thresholds("absolute", threshold=0.7))
    assert [h.doc_id for h in kept] == ["a", "b"] and why is None
    kept, why = Q.apply_thresholds(HITS, 0.5)  # a bare number is an absolute threshold
    assert len(kept) == 3 and why is None
    kept, why = Q.apply_thresholds(HITS, Q.Thresholds("absolute", threshold=0.5, floor=0.8))
    assert [h.doc_id for h in kept] == ["a"]
    kept, why = Q.apply_thresholds(HITS, None)
    assert kept == HITS and why is None


def test_apply_relative_rule():
    kept, _ = Q.apply_thresholds(HITS, Q.Thresholds("relative", delta=0.1))
    assert [h.doc_id for h in kept] == ["a", "b"]
    kept, why = Q.apply_thresholds(HITS, Q.Thresholds("relative", delta=0.1, floor=0.9))
    assert kept == [] and "floor 0.9000" in why


def test_empty_results_are_explained_not_silent():
    kept, why = Q.apply_thresholds(HITS, Q.Thresholds("absolute", threshold=0.9, source="20261127T0Z",
                                                      calibrated_on="v1"))
    assert kept == []
    assert "all 3 candidates scored below 0.9000" in why and "doc a at 0.8100" in why and "on v1" in why
    kept, why = Q.apply_thresholds([], 0.1)
    assert kept == [] and "no candidates" in why
    # mapping hits and calibration records work too
    record = {"calibration_id": "c1", "version_id": "v1", "rule": "absolute", "absolute": {"threshold": 0.6},
              "relative": {"delta": 0.05}, "floor": {"score": 0.3}}
    kept, why = Q.apply_thresholds([{"chunk_id": "x", "doc_id": "x", "score": 0.65}], record)
    assert len(kept) == 1 and why is None
    hits, reasons = Q.apply_thresholds_batch([HITS, []], record)
    assert [len(h) for h in hits] == [2, 0] and reasons[0] is None and "no candidates" in reasons[1]


def test_thresholds_refuse_bad_rules():
    with pytest.raises(ConfigError):
        Q.Thresholds("fuzzy")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="delta"):
        Q.Thresholds("relative")


# ---------------------------------------------------------------------------------------------
# benchmarks
# ---------------------------------------------------------------------------------------------


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def bench_files(tmp_path):
    q = write_lines(tmp_path / "queries.jsonl", [
        json.dumps({"query_id": "1", "text": "wing lift", "lang": "en", "type": "keyword"}),
        json.dumps({"query_id": "2", "text": "portance de l'aile", "lang": "fr", "type": "question"}),
        json.dumps({"query_id": "3", "text": "shock waves", "lang": "en", "type": "question"}),
    ])
    r = write_lines(tmp_path / "qrels.tsv", ["query_id\tdoc_id\tgrade", "1\td1\t1", "1\td2\t3", "1\td3\t-1",
                                             "2\td1\t2", "3\td9\t1", "3\td4\t4"])
    return q, r


def test_benchmark_refuses_unknown_docs_and_says_how_many(bench_files):
    q, r = bench_files
    gains = Q.parse_gain_map("cranfield")
    queries, qrels = Q.read_queries(q), Q.read_qrels(r, gains)
    assert qrels["1"] == {"d1": 4.0, "d2": 2.0, "d3": 0.0}
    corpus = {"d1", "d2", "d3", "d4", "d5"}
    with pytest.raises(SchemaError, match=r"1 of 6 judgments point at documents that are not in the corpus.*d9"):
        Q.build_benchmark(queries, qrels, corpus_ids=corpus)
    b = Q.build_benchmark(queries, qrels, corpus_ids=corpus, drop_unknown=True, name="t",
                          grades={"scheme": "cranfield", "relevant_min_gain": 2})
    s = b.summary
    assert s["unknown_doc_judgments_dropped"] == 1 and s["judgments"] == 5 and s["queries"] == 3
    assert s["judged_docs_per_query"]["max"] == 3 and s["corpus_coverage"] == pytest.approx(4 / 5)
    assert s["by_lang"] == {"en": 2, "fr": 1} and s["by_type"] == {"keyword": 1, "question": 2}
    assert b.relevant("1") == {"d1", "d2"} and b.relevant("3") == set()  # d4 is grade 4 -> gain 1 < 2
    assert s["queries_with_relevant"] == 2
    assert b.corpus["fingerprint"] == Q.corpus_fingerprint(sorted(corpus)) and b.corpus["docs"] == 5


def test_benchmark_round_trip_and_version_check(tmp_path, bench_files):
    q, r = bench_files
    b = Q.build_benchmark(Q.read_queries(q), Q.read_qrels(r, Q.parse_gain_map("cranfield")), name="t")
    for name in ("b.json", "b.json.gz"):
        Q.save_benchmark(b, tmp_path / name)
        back = Q.load_benchmark(tmp_path / name)
        assert back.qrels == b.qrels and back.queries == b.queries and back.benchmark_id == b.benchmark_id
    d = json.loads((tmp_path / "b.json").read_text())
    d["format_version"] = 99
    (tmp_path / "future.json").write_text(json.dumps(d))
    with pytest.raises(SchemaError, match="upgrade embedctl"):
        Q.load_benchmark(tmp_path / "future.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(SchemaError, match="not an embedctl benchmark"):
        Q.load_benchmark(tmp_path / "list.json")


def test_qrels_formats_and_orphans(tmp_path):
    trec = write_lines(tmp_path / "qrels.trec", ["q1 0 d1 2", "q1 0 d2 0", "q2 0 d3 1"])
    assert Q.read_qrels(trec) == {"q1": {"d1": 2.0, "d2": 0.0}, "q2": {"d3": 1.0}}
    bad = write_lines(tmp_path / "bad.tsv", ["query_id\tdoc_id\tgrade", "1\td1\t7"])
    with pytest.raises(SchemaError, match="not in the gain map"):
        Q.read_qrels(bad, Q.parse_gain_map("cranfield"))
    with pytest.raises(ConfigError):
        Q.parse_gain_map("1=a")
    with pytest.raises(SchemaError, match="not in the query file"):
        Q.build_benchmark([{"query_id": "1", "text": "x"}], {"2": {"d": 1.0}})


# ---------------------------------------------------------------------------------------------
# canary statistics, baseline comparison, Prometheus
# ---------------------------------------------------------------------------------------------

CANARIES = [Q.Canary("q1", ("a",), "c1"), Q.Canary("q2", ("b", "x"), "c2"), Q.Canary("q3", ("z",), "c3")]
RANKINGS = [
    [("a", 0.9), ("b", 0.8), ("c", 0.7)],  # expected at rank 1
    [("c", 0.6), ("d", 0.5), ("b", 0.4)],  # one of two expected at rank 3
    [("a", 0.3), ("b", 0.2), ("c", 0.1)],  # expected missing
]


def test_canary_stats_hand_computed():
    st = Q.canary_stats(CANARIES, RANKINGS, k=3)
    assert st["recall@3"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert st["mrr@3"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert st["hit_rate@3"] == pytest.approx(2 / 3)
    assert st["top1_scores"]["mean"] == pytest.approx(0.6) and st["top1_scores"]["median"] == pytest.approx(0.6)
    assert st["topk_scores"]["n"] == 9 and st["topk_scores"]["mean"] == pytest.approx(0.5)
    assert st["topk_scores"]["p5"] == pytest.approx(np.percentile([.9, .8, .7, .6, .5, .4, .3, .2, .1], 5))
    assert st["empty_rate"] == 0.0 and st["missed"] == 1 and st["misses"][0]["id"] == "c3"
    # k=1 cuts the second canary's hit
    assert Q.canary_stats(CANARIES, RANKINGS, k=1)["recall@1"] == pytest.approx(1 / 3)
    # under a threshold of 0.55, the third query's answer is empty, the second keeps only 'c'
    st = Q.canary_stats(CANARIES, RANKINGS, k=3, thresholds=Q.Thresholds("absolute", threshold=0.55))
    assert st["empty_rate"] == pytest.approx(1 / 3) and st["hit_rate_under_threshold"] == pytest.approx(1 / 3)


def test_canary_baseline_gate():
    base = Q.canary_stats(CANARIES, RANKINGS, k=3)
    worse = [RANKINGS[0], [("c", 0.5), ("d", 0.45), ("e", 0.4)], RANKINGS[2]]
    cur = Q.canary_stats(CANARIES, worse, k=3)
    diff, failures = Q.compare_canary(cur, base, Q.CanaryLimits())
    assert diff["recall@3"] == pytest.approx(-1 / 6, abs=1e-6)
    assert any("recall@3 dropped" in f for f in failures) and any("mrr@3 dropped" in f for f in failures)
    assert not any("top1_mean" in f for f in failures)  # top-1 mean fell by 0.033 < 0.05
    _, failures = Q.compare_canary(cur, base, Q.CanaryLimits(max_recall_drop=0.2, max_mrr_drop=0.2))
    assert failures == []
    _, failures = Q.compare_canary(base, None, Q.CanaryLimits(min_recall=0.6))
    assert failures and "below the minimum" in failures[0]
    with pytest.raises(ConfigError, match="k="):
        Q.compare_canary(Q.canary_stats(CANARIES, RANKINGS, k=2), base, Q.CanaryLimits())


def test_prometheus_text_is_parseable_and_escaped():
    parser = pytest.importorskip("prometheus_client.parser")
    text = Q.prometheus_text([
        ("embedctl_x", "An x.", {"index": 'we"ird\\name\n'}, 0.5),
        ("embedctl_x", "An x.", {"index": "b"}, 1.0),
        ("embedctl_y", "A y.", {}, float("nan")),
        ("embedctl_z", "skipped", {}, None),
    ])
    assert text.count("# TYPE embedctl_x gauge") == 1 and "embedctl_z" not in text
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    assert [s.labels["index"] for s in families["embedctl_x"].samples] == ['we"ird\\name\n', "b"]
    assert math.isnan(families["embedctl_y"].samples[0].value)
    with pytest.raises(ValueError):
        Q.prometheus_text([("bad-name", "", {}, 1.0)])


# ---------------------------------------------------------------------------------------------
# drift statistics
# ---------------------------------------------------------------------------------------------


def test_psi_and_ks():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0.6, 0.05, 4000), rng.normal(0.6, 0.05, 4000)
    assert Q.psi(a, b) < 0.02 and Q.ks_statistic(a, b) < 0.05
    shifted = rng.normal(0.5, 0.05, 4000)
    assert Q.psi(a, shifted) > 0.5 and Q.ks_statistic(a, shifted) > 0.6
    assert Q.ks_statistic([1, 2, 3], [4, 5, 6]) == 1.0 and Q.ks_statistic([1, 2], [1, 2]) == 0.0
    assert Q.psi([], [1.0]) is None


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_embedding_drift_sees_new_topics():
    rng = np.random.default_rng(6)
    centres = unit(rng.normal(size=(5, 32)))
    ref = unit(centres[rng.integers(0, 5, 400)] + 0.1 * rng.normal(size=(400, 32)))
    same = unit(centres[rng.integers(0, 5, 300)] + 0.1 * rng.normal(size=(300, 32)))
    new = unit(unit(rng.normal(size=(1, 32)))[[0] * 300] + 0.1 * rng.normal(size=(300, 32)))
    d_same, d_new = Q.embedding_drift(ref, same), Q.embedding_drift(ref, new)
    assert d_same["novel_rate"] < 0.15 and d_same["centroid_similarity"] > 0.9
    assert d_new["novel_rate"] > 0.8 and d_new["centroid_similarity"] < d_same["centroid_similarity"]
    with pytest.raises(SchemaError):
        Q.embedding_drift(ref, new[:, :16])


def test_drift_stats_alerts():
    rng = np.random.default_rng(7)
    emb = unit(rng.normal(size=(50, 8)))
    ref = {"top1": rng.normal(0.7, 0.05, 50).tolist(), "topk_mean": [0.5] * 50, "lengths": [8] * 50, "empty_rate": 0.02}
    calm = {"top1": rng.normal(0.7, 0.05, 50).tolist(), "topk_mean": [0.5] * 50, "lengths": [8] * 50, "empty_rate": 0.02}
    rep = Q.drift_stats(ref, emb, calm, emb)
    assert not rep["drifted"], rep["alerts"]
    hot = {"top1": rng.normal(0.4, 0.05, 50).tolist(), "topk_mean": [0.3] * 50, "lengths": [3] * 50, "empty_rate": 0.5}
    rep = Q.drift_stats(ref, emb, hot, emb)
    assert rep["drifted"] and len(rep["alerts"]) == 3  # scores, lengths, empty rate (embeddings unchanged)


# ---------------------------------------------------------------------------------------------
# calibration records, canaries and drift against stored versions (tiny exact-search versions)
# ---------------------------------------------------------------------------------------------

from tests.version_utils import embed as tiny_embed  # noqa: E402
from tests.version_utils import make_version, tiny_loader  # noqa: E402

TOPICS = ["wing lift airfoil", "shock wave supersonic", "heat transfer plate", "boundary layer laminar",
          "flutter panel vibration", "nozzle jet exhaust", "buckling cylinder shell", "cone pressure hypersonic"]
DOCS = {f"d{i}": f"{t} report {i}" for i, t in enumerate(TOPICS)}


def tiny_pairs() -> list[Q.LabelledPair]:
    pairs = []
    for i, t in enumerate(TOPICS):
        pairs.append(Q.LabelledPair(t, f"d{i}", True))
        pairs += [Q.LabelledPair(t, f"d{j}", False) for j in (i + 1, i + 3) if j < len(TOPICS)]
    return pairs


@pytest.fixture
def tiny_store(tmp_path):
    store = open_store(str(tmp_path / "store"))
    make_version(store, "docs", "v1", DOCS, manifest_extra={"source_run": "r1", "params": {"nlist": 1}})
    return store


def calibrate_tiny(store, version="v1", **kw):
    return Q.calibrate(store, "docs", version, tiny_pairs(), Q.CalibrationConfig(depth=8, **kw), loader=tiny_loader,
                       query_encoder=tiny_embed, pairs_source="tiny")


def test_calibration_record_png_and_newest_wins(tiny_store):
    rec = calibrate_tiny(tiny_store)
    prefix = Q.calibration_prefix("docs", "v1")
    keys = set(tiny_store.list(prefix))
    cid = rec["calibration_id"]
    assert {f"{prefix}/{cid}.json", f"{prefix}/{cid}.png", f"{prefix}/{cid}.queries.npy"} == keys
    assert tiny_store.read_bytes(f"{prefix}/{cid}.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert rec["version_id"] == "v1" and rec["source_run"] == "r1" and rec["index_kind"] == "flat"
    assert rec["pairs"]["n"] == len(tiny_pairs()) and rec["pairs"]["relevant"] == 8
    a = rec["absolute"]
    assert 0 < a["f_beta"] <= 1 and a["tp"] + a["fn"] == 8
    # the stored point is what the stored curve and threshold give
    assert min(rec["curve"]["threshold"]) <= a["threshold"] <= max(rec["curve"]["threshold"])
    assert rec["floor"]["score"] is not None and rec["relative"]["delta"] >= 0
    assert len(rec["reference"]["top1"]) == len(TOPICS)
    # re-scoring the pairs and applying the stored rule reproduces the stored operating point
    sp = Q.score_pairs(tiny_loader(tiny_store, "docs", "v1"), tiny_pairs(), depth=8)
    again = Q.evaluate_thresholds(sp, Q.Thresholds.from_calibration(rec, rule="absolute"))
    assert again == rec["absolute"]["with_floor"]
    rec2 = calibrate_tiny(tiny_store, beta=2.0, rule="relative")
    assert Q.list_calibrations(tiny_store, "docs", "v1") == sorted([cid, rec2["calibration_id"]])
    newest = Q.load_calibration(tiny_store, "docs", "v1")
    assert newest["calibration_id"] == rec2["calibration_id"] and newest["rule"] == "relative"
    th = Q.resolve_threshold(tiny_store, "docs", "v1", "auto")
    assert th.rule == "relative" and th.source == rec2["calibration_id"]
    st = Q.calibration_status(tiny_store, "docs", "v1")
    assert st["calibrated"] and not st["needs_recalibration"] and st["reasons"] == [] and not st["inherited"]


def test_status_says_when_thresholds_come_from_another_version(tiny_store):
    assert Q.calibration_status(tiny_store, "docs", "v1")["needs_recalibration"]
    with pytest.raises(NotFoundError, match="no calibration"):
        Q.resolve_threshold(tiny_store, "docs", "v1", "auto")
    rec = calibrate_tiny(tiny_store)
    # same model, index and corpus, rebuilt as v2: inherited, says so, still fits
    make_version(tiny_store, "docs", "v2", DOCS, manifest_extra={"source_run": "r1", "params": {"nlist": 1},
                                                                "parent_version": "v1"})
    st = Q.calibration_status(tiny_store, "docs", "v2")
    assert st["calibrated_on"] == "v1" and st["inherited"] and not st["needs_recalibration"]
    assert st["reasons"] == ["calibrated on another version (v1)"]
    assert Q.resolve_threshold(tiny_store, "docs", "v2", "auto").calibrated_on == "v1"
    # refreshed corpus (v3, child of v2) and a new quantization (v4): recalibration required
    make_version(tiny_store, "docs", "v3", DOCS, manifest_extra={"source_run": "r2", "params": {"nlist": 1},
                                                                "parent_version": "v2"})
    make_version(tiny_store, "docs", "v4", DOCS, manifest_extra={"source_run": "r1", "params": {"pq": 4},
                                                                "parent_version": "v1"})
    make_version(tiny_store, "docs", "v5", DOCS, manifest_extra={"source_run": "r1", "params": {"nlist": 1},
                                                                "parent_version": "v1",
                                                                "model": {"name": "other", "dim": 16}})
    for v, why in (("v3", "corpus changed"), ("v4", "quantization changed"), ("v5", "model changed")):
        st = Q.calibration_status(tiny_store, "docs", v)
        assert st["needs_recalibration"] and st["calibrated_on"] == "v1", v
        assert any(why in r for r in st["reasons"]), (v, st["reasons"])
        with pytest.raises(ConfigError, match="no longer fit"):
            Q.resolve_threshold(tiny_store, "docs", v, "auto")
        assert Q.resolve_threshold(tiny_store, "docs", v, "auto", allow_stale=True).threshold == \
            rec["absolute"]["threshold"]
    # a record copied into another version's folder still names the version it was fitted on
    src = Q.calibration_prefix("docs", "v1")
    for key in tiny_store.list(src):
        tiny_store.write_bytes(key.replace("/v1/", "/v3/"), tiny_store.read_bytes(key))
    st = Q.calibration_status(tiny_store, "docs", "v3")
    assert st["calibrated_on"] == "v1" and st["needs_recalibration"] and st["inherited"]
    assert Q.resolve_threshold(tiny_store, "docs", "v1", "0.25").threshold == 0.25
    assert Q.resolve_threshold(tiny_store, "docs", "v1", None) is None


def publish(store, version):
    from engine.publish import publish_version

    publish_version(store, "docs", version, "live", check_conditional_writes=False)


def test_canary_fails_when_the_alias_moves_to_a_worse_version(tiny_store, tmp_path):
    calibrate_tiny(tiny_store)
    publish(tiny_store, "v1")
    canaries = [Q.Canary(text, (doc,), f"c{doc}") for doc, text in DOCS.items()]  # exact texts: rank 1
    good = Q.run_canary(tiny_store, "docs", canaries, k=3, loader=tiny_loader)
    assert good["passed"] and good["versions"][0]["version"] == "v1"
    st = good["versions"][0]["stats"]
    assert st["recall@3"] == 1.0 and st["mrr@3"] == 1.0 and st["empty_rate"] == 0.0
    assert good["versions"][0]["calibration"]["calibrated"]
    # a deliberately worse version: the same ids on shuffled texts
    ids = list(DOCS)
    make_version(tiny_store, "docs", "bad", {ids[i]: DOCS[ids[(i + 3) % len(ids)]] for i in range(len(ids))},
                 manifest_extra={"source_run": "r1", "params": {"nlist": 1}})
    publish(tiny_store, "bad")
    bad = Q.run_canary(tiny_store, "docs", canaries, k=3, baseline=good, loader=tiny_loader)
    assert not bad["passed"] and bad["versions"][0]["version"] == "bad"
    failures = bad["versions"][0]["failures"]
    assert any("recall@3 dropped" in f for f in failures)
    assert bad["versions"][0]["baseline_diff"]["recall@3"] < -0.5
    assert not bad["versions"][0]["calibration"]["calibrated"]
    with pytest.raises(GateError, match="canary failed on docs/live"):
        Q.canary_gate(bad)
    Q.canary_gate(good)  # passes silently
    # weighted rollout: both versions are checked; Prometheus labels them apart
    from engine.publish import publish_version

    publish_version(tiny_store, "docs", "v1", "live", check_conditional_writes=False)
    publish_version(tiny_store, "docs", "bad", "live", weighted=20, check_conditional_writes=False)
    both = Q.run_canary(tiny_store, "docs", canaries, k=3, baseline=good, loader=tiny_loader)
    assert [r["version"] for r in both["versions"]] == ["v1", "bad"]
    assert [r["passed"] for r in both["versions"]] == [True, False] and not both["passed"]
    parser = pytest.importorskip("prometheus_client.parser")
    fams = {f.name: f for f in parser.text_string_to_metric_families(Q.canary_prometheus(both))}
    passed = {s.labels["version"]: s.value for s in fams["embedctl_canary_passed"].samples}
    assert passed == {"v1": 1.0, "bad": 0.0}


def test_drift_against_calibration_time(tiny_store):
    calibrate_tiny(tiny_store)
    publish(tiny_store, "v1")
    same = Q.run_drift(tiny_store, "docs", TOPICS * 3, loader=tiny_loader, query_encoder=tiny_embed)
    assert same["version"] == "v1" and same["calibration_fits"]
    assert same["embedding"]["novel_rate"] == 0.0 and same["embedding"]["centroid_similarity"] > 0.99
    assert not same["drifted"], same["alerts"]
    odd = [f"zq{i} xr{i} unrelated words{i} here{i} and{i} more{i} tokens{i}" for i in range(40)]
    moved = Q.run_drift(tiny_store, "docs", odd, loader=tiny_loader, query_encoder=tiny_embed)
    assert moved["drifted"] and moved["embedding"]["novel_rate"] >= 0.3  # 16-dim hashed vectors collide
    with pytest.raises(GateError, match="drift on docs/live"):
        Q.drift_gate(moved)
    assert "embedctl_drift_alerting" in Q.drift_prometheus(moved)


# ---------------------------------------------------------------------------------------------
# the CLI (benchmark verbs; calibrate/canary/drift run against real index versions below)
# ---------------------------------------------------------------------------------------------


def run_cli(args, capsys):
    from engine.cli import main

    code = 0
    try:
        main(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_benchmark_build_refuses_unknown_docs_then_drops_them(tmp_path, bench_files, capsys):
    q, r = bench_files
    corpus = write_lines(tmp_path / "corpus.jsonl", [json.dumps({"doc_id": d, "text": "x"}) for d in
                                                     ("d1", "d2", "d3", "d4", "d5")])
    args = ["benchmark", "build", "--queries", str(q), "--qrels", str(r), "--corpus", str(corpus), "--gains",
            "cranfield", "--out", str(tmp_path / "b.json")]
    code, out, err = run_cli(args, capsys)
    assert code == 3 and "1 of 6 judgments point at documents that are not in the corpus" in err
    assert "--drop-unknown" in err and not (tmp_path / "b.json").exists()
    code, out, err = run_cli(args + ["--drop-unknown", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["summary"]["unknown_doc_judgments_dropped"] == 1 and doc["corpus"]["docs"] == 5
    code, out, _ = run_cli(["benchmark", "show", str(tmp_path / "b.json")], capsys)
    assert code == 0 and "coverage 80.0%" in out and "by lang" in out
    code, out, _ = run_cli(["benchmark", "pairs", str(tmp_path / "b.json"), "--out", str(tmp_path / "pairs.jsonl")], capsys)
    assert code == 0 and "pairs" in out
    pairs = Q.read_pairs(tmp_path / "pairs.jsonl")
    # query 1: d1 (gain 4) and d2 (gain 2) relevant, d3 (-1 -> 0) non-relevant; query 2: d1; query 3: d4 (gain 1)
    assert sorted((p.doc_id, p.relevant) for p in pairs) == [("d1", True), ("d1", True), ("d2", True),
                                                             ("d3", False), ("d4", True)]


def test_cli_benchmark_build_against_an_embed_run(tmp_path, bench_files, capsys):
    from engine.config import EmbedJobConfig
    from engine.pipeline import run_locally
    from tests.corpus_utils import write_corpus

    docs = [{"doc_id": d, "title": d, "text": f"text of {d}"} for d in ("d1", "d2", "d3", "d4", "d9")]
    write_corpus(tmp_path / "corpus", docs)
    m = run_locally(EmbedJobConfig.from_flat({"corpus": str(tmp_path / "corpus"), "store": str(tmp_path / "store"),
                                              "model": "hash:8"}))
    q, r = bench_files
    code, out, err = run_cli(["benchmark", "build", "--queries", str(q), "--qrels", str(r), "--store",
                              str(tmp_path / "store"), "--corpus-run", m["run_id"], "--out", str(tmp_path / "b.json"),
                              "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["corpus"]["source"]["run"] == m["run_id"] and doc["corpus"]["docs"] == 5
    assert doc["corpus"]["fingerprint"] == Q.corpus_fingerprint(d["doc_id"] for d in docs)
