"""The quality loop: PR curve and F-beta calibration, relative rule and floor, applying
thresholds, benchmarks, canaries (stats, baseline gate, Prometheus), drift, and the stored
calibration records (newest wins, inherited ones say so, stale ones are refused)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest

from engine.core.errors import ConfigError, GateError, NotFoundError, SchemaError
from engine.core.storage import open_store
from engine.index.hits import doc_scores
from engine.quality import calibration
from engine.quality.benchmark import (
    Benchmark,
    build_benchmark,
    corpus_fingerprint,
    evaluate_benchmark,
    load_benchmark,
    save_benchmark,
)
from engine.quality.calibration import CalibrationConfig
from engine.quality.calibration_store import (
    calibration_line,
    calibration_prefix,
    calibration_status,
    copy_calibrations,
    list_calibrations,
    load_calibration,
    reference_embeddings,
    resolve_threshold,
)
from engine.quality.canary import (
    Canary,
    CanaryLimits,
    canary_gate,
    canary_prometheus,
    canary_stats,
    compare_canary,
    read_canaries,
    run_canary,
)
from engine.quality.drift import (
    drift_gate,
    drift_prometheus,
    drift_stats,
    embedding_drift,
    ks_statistic,
    psi,
    read_query_texts,
    run_drift,
)
from engine.quality.judgments import parse_gain_map, read_qrels, read_queries
from engine.quality.pairs import LabelledPair, evaluate_thresholds, read_pairs, score_pairs
from engine.quality.prcurve import best_fbeta, best_relative, choose_floor, pr_curve
from engine.quality.reports import prometheus_text
from engine.quality.thresholds import Thresholds, apply_thresholds, apply_thresholds_batch

# ---------------------------------------------------------------------------------------------
# PR curve and F-beta
# ---------------------------------------------------------------------------------------------


def brute_force_curve(scores, labels):
    """Every distinct score as a threshold, counted one pair at a time."""
    pts = []
    retrieved = [(s, y) for s, y in zip(scores, labels, strict=True) if not math.isnan(s)]
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
    curve = pr_curve(scores, labels)
    ref = brute_force_curve(scores.tolist(), labels.tolist())
    assert len(curve.thresholds) == len(ref)
    for (t, p, r), t2, p2, r2 in zip(ref, curve.thresholds, curve.precision, curve.recall, strict=True):
        assert t == pytest.approx(t2) and p == pytest.approx(p2) and r == pytest.approx(r2)
    assert curve.positives == int(labels.sum())  # unretrieved positives still count in recall


def test_best_fbeta_hand_computed():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    labels = [1, 1, 0, 1, 0]
    # t=.9 P1 R1/3 F1 .5 | .8 P1 R2/3 F1 .8 | .7 P2/3 R2/3 F1 .667 | .6 P3/4 R1 F1 .857 | .5 P.6 R1 F1 .75
    op = best_fbeta(pr_curve(scores, labels), beta=1.0)
    assert op.at_score == 0.6 and op.threshold == pytest.approx(0.55)
    assert op.precision == pytest.approx(0.75) and op.recall == 1.0 and op.f_beta == pytest.approx(6 / 7)
    assert (op.tp, op.fp, op.fn) == (3, 1, 0)
    # beta 0.5 weighs precision: F0.5 at .8 = 1.25*(2/3)/(0.25+2/3) = 0.909 beats .6 (0.789)
    op = best_fbeta(pr_curve(scores, labels), beta=0.5)
    assert op.at_score == 0.8 and op.threshold == pytest.approx(0.75) and op.f_beta == pytest.approx(10 / 11)
    # beta 2 weighs recall: the lowest threshold that reaches recall 1 with the best precision
    assert best_fbeta(pr_curve(scores, labels), beta=2.0).at_score == 0.6


def test_ties_cannot_be_split():
    # the two 0.7 pairs (one relevant, one not) move together
    op = best_fbeta(pr_curve([0.9, 0.7, 0.7, 0.5], [1, 1, 0, 0]))
    assert op.at_score == 0.7 and op.threshold == pytest.approx(0.6)
    assert op.precision == pytest.approx(2 / 3) and op.recall == 1.0 and op.f_beta == pytest.approx(0.8)


def test_f_beta_equal_ties_take_the_higher_threshold():
    # F1 is 2/3 at .85 (P 1, R 1/2) and 2/3 at .45 (P 1/2, R 1): the higher one wins
    op = best_fbeta(pr_curve([0.9, 0.85, 0.8, 0.7, 0.6, 0.55, 0.5, 0.45], [1, 1, 0, 0, 0, 0, 1, 1]))
    assert op.at_score == pytest.approx(0.85) and op.f_beta == pytest.approx(2 / 3)


def test_synthetic_separable_set_has_its_known_optimum():
    rng = np.random.default_rng(0)
    pos = rng.uniform(0.6, 0.95, 500)
    neg = rng.uniform(0.05, 0.5, 500)
    op = best_fbeta(pr_curve(np.concatenate([pos, neg]), np.r_[np.ones(500), np.zeros(500)].astype(bool)))
    assert op.f_beta == 1.0 and neg.max() < op.threshold <= pos.min()


def test_synthetic_overlapping_set_has_its_known_optimum():
    # relevant ~ U[0.4, 1.0], non-relevant ~ U[0, 0.6], equal counts. For t in [0.4, 0.6]:
    # F1 = 2(1-t) / (2(1-t) + 0.2), for t < 0.4: F1 = 2 / (2 + (0.6-t)/0.6): the optimum is
    # t* = 0.4 exactly, where F1 = 6/7.
    rng = np.random.default_rng(1)
    n = 20000
    scores = np.concatenate([rng.uniform(0.4, 1.0, n), rng.uniform(0.0, 0.6, n)])
    labels = np.r_[np.ones(n), np.zeros(n)].astype(bool)
    op = best_fbeta(pr_curve(scores, labels))
    assert op.threshold == pytest.approx(0.4, abs=0.01)
    assert op.f_beta == pytest.approx(6 / 7, abs=0.01)
    assert 0.8 < pr_curve(scores, labels).average_precision() < 1.0


def test_no_retrieved_pair_is_a_clear_error():
    with pytest.raises(SchemaError, match="no calibration pair was retrieved"):
        best_fbeta(pr_curve([np.nan, np.nan], [1, 0]))


def test_relative_rule_separates_what_no_absolute_threshold_can():
    # Each query's relevant docs sit within 0.04 of its top score, non-relevant ones 0.1-0.3
    # below; the top scores themselves range over 0.3-0.9, so absolute scores overlap.
    rng = np.random.default_rng(2)
    scores, tops, labels = [], [], []
    for _ in range(200):
        top = rng.uniform(0.3, 0.9)
        for _ in range(3):
            for gap, relevant in (((0, 0.04), True), ((0.1, 0.3), False)):
                scores.append(top - rng.uniform(*gap))
                tops.append(top)
                labels.append(relevant)
    scores, tops, labels = np.array(scores), np.array(tops), np.array(labels)
    absolute = best_fbeta(pr_curve(scores, labels))
    rel = best_relative(scores, tops, labels)
    assert absolute.f_beta < 0.9
    assert rel.f_beta == 1.0 and 0.04 <= rel.threshold < 0.1


def test_floor_keeps_the_requested_share_of_relevant_pairs():
    scores = np.r_[np.arange(1, 101) / 100.0, [0.0, 0.5]]
    labels = np.r_[np.ones(100), [0, 0]].astype(bool)
    assert choose_floor(scores, labels, 0.99) == pytest.approx(0.02)  # drops only 0.01
    assert choose_floor(scores, labels, 1.0) == pytest.approx(0.01)
    assert choose_floor(np.array([0.3, np.nan]), np.array([True, True]), 0.9) == pytest.approx(0.3)


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
    kept, why = apply_thresholds(HITS, Thresholds("absolute", threshold=0.7))
    assert [h.doc_id for h in kept] == ["a", "b"] and why is None
    kept, why = apply_thresholds(HITS, 0.5)  # a bare number is an absolute threshold
    assert len(kept) == 3 and why is None
    kept, why = apply_thresholds(HITS, Thresholds("absolute", threshold=0.5, floor=0.8))
    assert [h.doc_id for h in kept] == ["a"]
    kept, why = apply_thresholds(HITS, None)
    assert kept == HITS and why is None


def test_apply_relative_rule():
    kept, _ = apply_thresholds(HITS, Thresholds("relative", delta=0.1))
    assert [h.doc_id for h in kept] == ["a", "b"]
    kept, why = apply_thresholds(HITS, Thresholds("relative", delta=0.1, floor=0.9))
    assert kept == [] and "floor 0.9000" in why


def test_empty_results_are_explained_not_silent():
    kept, why = apply_thresholds(HITS, Thresholds("absolute", threshold=0.9, source="20261127T0Z",
                                                      calibrated_on="v1"))
    assert kept == []
    assert "all 3 candidates scored below 0.9000" in why and "doc a at 0.8100" in why and "on v1" in why
    kept, why = apply_thresholds([], 0.1)
    assert kept == [] and "no candidates" in why
    # mapping hits and calibration records work too
    record = {"calibration_id": "c1", "version_id": "v1", "rule": "absolute", "absolute": {"threshold": 0.6},
              "relative": {"delta": 0.05}, "floor": {"score": 0.3}}
    kept, why = apply_thresholds([{"chunk_id": "x", "doc_id": "x", "score": 0.65}], record)
    assert len(kept) == 1 and why is None
    hits, reasons = apply_thresholds_batch([HITS, []], record)
    assert [len(h) for h in hits] == [2, 0] and reasons[0] is None and "no candidates" in reasons[1]


def test_thresholds_refuse_bad_rules():
    with pytest.raises(ConfigError):
        Thresholds("fuzzy")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="delta"):
        Thresholds("relative")


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
    gains = parse_gain_map("cranfield")
    queries, qrels = read_queries(q), read_qrels(r, gains)
    assert qrels["1"] == {"d1": 4.0, "d2": 2.0, "d3": 0.0}
    corpus = {"d1", "d2", "d3", "d4", "d5"}
    with pytest.raises(SchemaError, match=r"1 of 6 judgments point at documents that are not in the corpus.*d9"):
        build_benchmark(queries, qrels, corpus_ids=corpus)
    b = build_benchmark(queries, qrels, corpus_ids=corpus, drop_unknown=True, name="t",
                          grades={"scheme": "cranfield", "relevant_min_gain": 2})
    s = b.summary
    assert s["unknown_doc_judgments_dropped"] == 1 and s["judgments"] == 5 and s["queries"] == 3
    assert s["judged_docs_per_query"]["max"] == 3 and s["corpus_coverage"] == pytest.approx(4 / 5)
    assert s["by_lang"] == {"en": 2, "fr": 1} and s["by_type"] == {"keyword": 1, "question": 2}
    assert b.relevant("1") == {"d1", "d2"} and b.relevant("3") == set()  # d4 is grade 4 -> gain 1 < 2
    assert s["queries_with_relevant"] == 2
    assert b.corpus["fingerprint"] == corpus_fingerprint(sorted(corpus)) and b.corpus["docs"] == 5


def test_benchmark_round_trip_and_version_check(tmp_path, bench_files):
    q, r = bench_files
    b = build_benchmark(read_queries(q), read_qrels(r, parse_gain_map("cranfield")), name="t")
    for name in ("b.json", "b.json.gz"):
        save_benchmark(b, tmp_path / name)
        back = load_benchmark(tmp_path / name)
        assert back.qrels == b.qrels and back.queries == b.queries and back.benchmark_id == b.benchmark_id
    d = json.loads((tmp_path / "b.json").read_text())
    d["format_version"] = 99
    (tmp_path / "future.json").write_text(json.dumps(d))
    with pytest.raises(SchemaError, match="upgrade embedctl"):
        load_benchmark(tmp_path / "future.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(SchemaError, match="not an embedctl benchmark"):
        load_benchmark(tmp_path / "list.json")


def test_qrels_formats_and_orphans(tmp_path):
    trec = write_lines(tmp_path / "qrels.trec", ["q1 0 d1 2", "q1 0 d2 0", "q2 0 d3 1"])
    assert read_qrels(trec) == {"q1": {"d1": 2.0, "d2": 0.0}, "q2": {"d3": 1.0}}
    bad = write_lines(tmp_path / "bad.tsv", ["query_id\tdoc_id\tgrade", "1\td1\t7"])
    with pytest.raises(SchemaError, match="not in the gain map"):
        read_qrels(bad, parse_gain_map("cranfield"))
    with pytest.raises(ConfigError):
        parse_gain_map("1=a")
    with pytest.raises(SchemaError, match="not in the query file"):
        build_benchmark([{"query_id": "1", "text": "x"}], {"2": {"d": 1.0}})


# ---------------------------------------------------------------------------------------------
# canary statistics, baseline comparison, Prometheus
# ---------------------------------------------------------------------------------------------

CANARIES = [Canary("q1", ("a",), "c1"), Canary("q2", ("b", "x"), "c2"), Canary("q3", ("z",), "c3")]
RANKINGS = [
    [("a", 0.9), ("b", 0.8), ("c", 0.7)],  # expected at rank 1
    [("c", 0.6), ("d", 0.5), ("b", 0.4)],  # one of two expected at rank 3
    [("a", 0.3), ("b", 0.2), ("c", 0.1)],  # expected missing
]


def test_canary_stats_hand_computed():
    st = canary_stats(CANARIES, RANKINGS, k=3)
    assert st["recall@3"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert st["mrr@3"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert st["hit_rate@3"] == pytest.approx(2 / 3)
    assert st["top1_scores"]["mean"] == pytest.approx(0.6) and st["top1_scores"]["median"] == pytest.approx(0.6)
    assert st["topk_scores"]["n"] == 9 and st["topk_scores"]["mean"] == pytest.approx(0.5)
    assert st["topk_scores"]["p5"] == pytest.approx(np.percentile([.9, .8, .7, .6, .5, .4, .3, .2, .1], 5))
    assert st["empty_rate"] == 0.0 and st["missed"] == 1 and st["misses"][0]["id"] == "c3"
    # k=1 cuts the second canary's hit
    assert canary_stats(CANARIES, RANKINGS, k=1)["recall@1"] == pytest.approx(1 / 3)
    # under a threshold of 0.55, the third query's answer is empty, the second keeps only 'c'
    st = canary_stats(CANARIES, RANKINGS, k=3, thresholds=Thresholds("absolute", threshold=0.55))
    assert st["empty_rate"] == pytest.approx(1 / 3) and st["hit_rate_under_threshold"] == pytest.approx(1 / 3)


def test_canary_baseline_gate():
    base = canary_stats(CANARIES, RANKINGS, k=3)
    worse = [RANKINGS[0], [("c", 0.5), ("d", 0.45), ("e", 0.4)], RANKINGS[2]]
    cur = canary_stats(CANARIES, worse, k=3)
    diff, failures = compare_canary(cur, base, CanaryLimits())
    assert diff["recall@3"] == pytest.approx(-1 / 6, abs=1e-6)
    assert any("recall@3 dropped" in f for f in failures) and any("mrr@3 dropped" in f for f in failures)
    assert not any("top1_mean" in f for f in failures)  # top-1 mean fell by 0.033 < 0.05
    _, failures = compare_canary(cur, base, CanaryLimits(max_recall_drop=0.2, max_mrr_drop=0.2))
    assert failures == []
    _, failures = compare_canary(base, None, CanaryLimits(min_recall=0.6))
    assert failures and "below the minimum" in failures[0]
    with pytest.raises(ConfigError, match="k="):
        compare_canary(canary_stats(CANARIES, RANKINGS, k=2), base, CanaryLimits())


def test_prometheus_text_is_parseable_and_escaped():
    parser = pytest.importorskip("prometheus_client.parser")
    text = prometheus_text([
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
        prometheus_text([("bad-name", "", {}, 1.0)])


# ---------------------------------------------------------------------------------------------
# drift statistics
# ---------------------------------------------------------------------------------------------


def test_psi_and_ks():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0.6, 0.05, 4000), rng.normal(0.6, 0.05, 4000)
    assert psi(a, b) < 0.02 and ks_statistic(a, b) < 0.05
    shifted = rng.normal(0.5, 0.05, 4000)
    assert psi(a, shifted) > 0.5 and ks_statistic(a, shifted) > 0.6
    assert ks_statistic([1, 2, 3], [4, 5, 6]) == 1.0 and ks_statistic([1, 2], [1, 2]) == 0.0
    assert psi([], [1.0]) is None


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_embedding_drift_sees_new_topics():
    rng = np.random.default_rng(6)
    centres = unit(rng.normal(size=(5, 32)))
    ref = unit(centres[rng.integers(0, 5, 400)] + 0.1 * rng.normal(size=(400, 32)))
    same = unit(centres[rng.integers(0, 5, 300)] + 0.1 * rng.normal(size=(300, 32)))
    new = unit(unit(rng.normal(size=(1, 32)))[[0] * 300] + 0.1 * rng.normal(size=(300, 32)))
    d_same, d_new = embedding_drift(ref, same), embedding_drift(ref, new)
    assert d_same["novel_rate"] < 0.15 and d_same["centroid_similarity"] > 0.9
    assert d_new["novel_rate"] > 0.8 and d_new["centroid_similarity"] < d_same["centroid_similarity"]
    with pytest.raises(SchemaError):
        embedding_drift(ref, new[:, :16])


def test_drift_stats_alerts():
    rng = np.random.default_rng(7)
    emb = unit(rng.normal(size=(50, 8)))
    ref = {"top1": rng.normal(0.7, 0.05, 50).tolist(), "topk_mean": [0.5] * 50, "lengths": [8] * 50, "empty_rate": 0.02}
    calm = {"top1": rng.normal(0.7, 0.05, 50).tolist(), "topk_mean": [0.5] * 50, "lengths": [8] * 50,
            "empty_rate": 0.02}
    rep = drift_stats(ref, emb, calm, emb)
    assert not rep["drifted"], rep["alerts"]
    hot = {"top1": rng.normal(0.4, 0.05, 50).tolist(), "topk_mean": [0.3] * 50, "lengths": [3] * 50, "empty_rate": 0.5}
    rep = drift_stats(ref, emb, hot, emb)
    assert rep["drifted"] and len(rep["alerts"]) == 3  # scores, lengths, empty rate (embeddings unchanged)


# ---------------------------------------------------------------------------------------------
# calibration records, canaries and drift against real index versions (hash encoders, flat)
# ---------------------------------------------------------------------------------------------

TOPICS = ["wing lift airfoil stall", "shock wave supersonic inlet", "heat transfer flat plate",
          "boundary layer laminar transition", "flutter panel vibration", "nozzle jet exhaust noise",
          "buckling cylinder shell compression", "cone pressure hypersonic flow"]


def topic_docs(extra: int = 0) -> list[dict[str, str]]:
    """Three documents per topic (d<topic><n>), sharing the topic's words, plus fillers."""
    docs = []
    for t, words in enumerate(TOPICS):
        for n in range(3):
            docs.append({"doc_id": f"d{t}{n}", "title": words.split()[0],
                         "text": f"{words} report {n} measured {words.split()[n % 3]} results"})
    docs += [{"doc_id": f"x{i}", "title": "misc", "text": f"unrelated note {i} about budgets"} for i in range(extra)]
    return docs


def tiny_pairs() -> list[LabelledPair]:
    """Per topic: its three docs relevant, two docs of other topics not."""
    pairs = []
    for t, words in enumerate(TOPICS):
        pairs += [LabelledPair(words, f"d{t}{n}", True) for n in range(3)]
        pairs += [LabelledPair(words, f"d{(t + j) % len(TOPICS)}0", False) for j in (1, 3)]
    return pairs


def build(store, tmp_path, *, model="hash:32", kind="flat", docs=None, parent=None, tag="a") -> str:
    """Embed a topic corpus with ``model`` and build an index version of ``kind``; its id."""
    from engine.embed.config import EmbedJobConfig
    from engine.embed.pipeline import run_locally
    from engine.index.build import build_index
    from engine.index.params import BuildConfig
    from tests.corpus_utils import write_corpus

    corpus = write_corpus(tmp_path / f"corpus-{tag}", docs or topic_docs())
    m = run_locally(EmbedJobConfig.from_flat({"corpus": str(corpus), "store": str(tmp_path / "store"), "model": model,
                                              "progress": False}))
    cfg = BuildConfig(kind=kind, rescore="int8" if kind == "binary-rerank" else "none", gate_queries=8,
                      gate_recall=None)
    return build_index(store, m["run_id"], "docs", cfg, parent_version=parent, force=True).version_id


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path / "store"))


@pytest.fixture
def v1(store, tmp_path):
    return build(store, tmp_path)


def calibrate(store, version, **kw):
    return calibration.calibrate(store, "docs", version, tiny_pairs(), CalibrationConfig(depth=10, **kw), pairs_source="tiny")


def test_calibration_record_png_and_newest_wins(store, v1):
    rec = calibrate(store, v1)
    prefix = calibration_prefix("docs", v1)
    cid = rec["calibration_id"]
    assert {f"{prefix}/{cid}.json", f"{prefix}/{cid}.png", f"{prefix}/{cid}.queries.npy"} == set(store.list(prefix))
    assert store.read_bytes(f"{prefix}/{cid}.png")[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = store.read_json(f"indexes/docs/versions/{v1}/manifest.json")
    assert rec["version_id"] == v1 and rec["source_run"] == manifest["source_run"] and rec["index_kind"] == "flat"
    assert rec["model"]["fingerprint"] == manifest["model"]["fingerprint"]
    assert rec["pairs"]["n"] == len(tiny_pairs()) and rec["pairs"]["relevant"] == 24
    a = rec["absolute"]
    assert 0.5 < a["f_beta"] <= 1 and a["tp"] + a["fn"] == 24
    assert min(rec["curve"]["threshold"]) <= a["threshold"] <= max(rec["curve"]["threshold"])
    assert rec["floor"]["score"] is not None and rec["relative"]["delta"] >= 0
    assert len(rec["reference"]["top1"]) == len(TOPICS)
    ref = reference_embeddings(store, "docs", {**rec, "found_on": v1})
    assert ref.shape == (len(TOPICS), 32)
    # re-scoring the pairs and applying the stored rule reproduces the stored operating point
    from engine.index.searcher import Searcher

    with Searcher.load(store, "docs", v1) as searcher:
        sp = score_pairs(searcher, tiny_pairs(), depth=10)
    again = evaluate_thresholds(sp, Thresholds.from_calibration(rec, rule="absolute"))
    assert again == rec["absolute"]["with_floor"]
    rec2 = calibrate(store, v1, beta=2.0, rule="relative")
    assert list_calibrations(store, "docs", v1) == sorted([cid, rec2["calibration_id"]])
    newest = load_calibration(store, "docs", v1)
    assert newest["calibration_id"] == rec2["calibration_id"] and newest["rule"] == "relative"
    th = resolve_threshold(store, "docs", v1, "auto")
    assert th.rule == "relative" and th.source == rec2["calibration_id"]
    st = calibration_status(store, "docs", v1)
    assert st["calibrated"] and not st["needs_recalibration"] and st["reasons"] == [] and not st["inherited"]


def test_status_says_when_thresholds_come_from_another_version(store, v1, tmp_path):
    assert calibration_status(store, "docs", v1)["needs_recalibration"]
    assert calibration_line(calibration_status(store, "docs", v1)).startswith("not calibrated")
    with pytest.raises(NotFoundError, match="no calibration"):
        resolve_threshold(store, "docs", v1, "auto")
    rec = calibrate(store, v1)
    # the same run and index settings rebuilt as a child: inherited, says so, still fits
    twin = build(store, tmp_path, parent=v1)
    st = calibration_status(store, "docs", twin)
    assert st["calibrated_on"] == v1 and st["inherited"] and not st["needs_recalibration"]
    assert st["reasons"] == [f"calibrated on another version ({v1})"]
    assert resolve_threshold(store, "docs", twin, "auto").calibrated_on == v1
    # new corpus, new quantization, new model: recalibration required
    changed = {
        "corpus changed": build(store, tmp_path, docs=topic_docs(extra=3), parent=twin, tag="b"),
        "quantization changed": build(store, tmp_path, kind="binary-rerank", parent=v1),
        "model changed": build(store, tmp_path, model="hash:16", parent=v1, tag="c"),
    }
    for why, v in changed.items():
        st = calibration_status(store, "docs", v)
        assert st["needs_recalibration"] and st["calibrated_on"] == v1, why
        assert any(why in r for r in st["reasons"]), (why, st["reasons"])
        with pytest.raises(ConfigError, match="no longer fit"):
            resolve_threshold(store, "docs", v, "auto")
        assert resolve_threshold(store, "docs", v, "auto", allow_stale=True).threshold == rec["absolute"]["threshold"]
    # a record copied into another version's folder still names the version it was fitted on
    v = changed["corpus changed"]
    for key in store.list(calibration_prefix("docs", v1)):
        store.write_bytes(key.replace(f"/{v1}/", f"/{v}/"), store.read_bytes(key))
    st = calibration_status(store, "docs", v)
    assert st["calibrated_on"] == v1 and st["needs_recalibration"] and st["inherited"]
    assert calibration_line(st).startswith("RECALIBRATE: calibrated on another version")
    assert "inherited from" in calibration_line(calibration_status(store, "docs", twin))
    # recalibrating the version itself clears it
    calibrate(store, v)
    st = calibration_status(store, "docs", v)
    assert st["calibrated_on"] == v and not st["needs_recalibration"] and st["reasons"] == []
    assert calibration_line(st).startswith(st["calibration_id"] + " [absolute rule, threshold ")
    assert resolve_threshold(store, "docs", v1, "0.25").threshold == 0.25
    assert resolve_threshold(store, "docs", v1, None) is None


def test_index_status_reports_stale_calibrations(store, v1, tmp_path, capsys):
    from engine.publish.status import index_status

    calibrate(store, v1)
    other = build(store, tmp_path, model="hash:16", parent=v1, tag="c")
    rows = {r["version"]: r for r in index_status(store, "docs", calibration=calibration_status)["versions"]}
    assert rows[v1]["calibration"]["calibrated"] and not rows[v1]["calibration"]["needs_recalibration"]
    assert rows[other]["calibration"]["needs_recalibration"]
    code, out, _err = run_cli(["status", "--store", store.uri, "--index", "docs"], capsys)
    assert code == 0
    assert "calibration: RECALIBRATE: calibrated on another version" in out


def test_search_cli_threshold_auto_and_explained_empty_results(store, v1, capsys):
    code, _out, err = run_cli(["search", "--store", store.uri, "--index", "docs", "--version", v1, "-q", "x",
                               "--threshold", "auto"], capsys)
    assert code == 4 and "no calibration" in err  # refused, not silently unfiltered
    calibrate(store, v1)
    code, out, err = run_cli(["search", "--store", store.uri, "--index", "docs", "--version", v1, "-q", "alpha",
                              "-q", "zzz-unknown-words", "--threshold", "auto", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)["results"]
    for r in res:
        assert r["hits"] or r["empty_reason"]  # an empty result always says why
    code, out, _err = run_cli(["search", "--store", store.uri, "--index", "docs", "--version", v1, "-q", "alpha",
                               "--threshold", "0.9999", "--json"], capsys)
    r = json.loads(out)["results"][0]
    assert r["hits"] == [] and "0.9999" in r["empty_reason"]


def test_evaluate_cli_accepts_a_benchmark(store, v1, tmp_path, capsys):
    bench = topic_benchmark(tmp_path)
    path = tmp_path / "bench.json"
    save_benchmark(bench, path)
    code, out, err = run_cli(["evaluate", "--store", store.uri, "--index", "docs", "--version", v1, "--benchmark",
                              str(path), "-k", "5", "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert d["version"] == v1 and "lang" in json.dumps(d)


def test_thresholds_on_real_search_results(store, v1):
    from engine.index.searcher import Searcher

    calibrate(store, v1)
    th = resolve_threshold(store, "docs", v1, "auto")
    with Searcher.load(store, "docs", v1) as searcher:
        hits = searcher.search([TOPICS[0], "zzz qqq"], k=10, collapse_docs=True)
    kept, reasons = apply_thresholds_batch(hits, th)
    assert reasons[0] is None and {h.doc_id for h in kept[0]} >= {"d00", "d01", "d02"}
    assert all(h.score >= th.threshold for h in kept[0]) and len(kept[0]) < len(hits[0])
    assert kept[1] == [] and "no result passed the absolute rule" in reasons[1]


def publish(store, version, **kw):
    from engine.publish.aliases import publish_version

    return publish_version(store, "docs", version, "live", **kw)


def test_canary_fails_when_the_alias_moves_to_a_worse_version(store, v1, tmp_path):
    calibrate(store, v1)
    publish(store, v1)
    canaries = [Canary(words, (f"d{t}0", f"d{t}1", f"d{t}2"), f"c{t}") for t, words in enumerate(TOPICS)]
    good = run_canary(store, "docs", canaries, k=3)
    assert good["passed"] and good["versions"][0]["version"] == v1
    st = good["versions"][0]["stats"]
    assert st["recall@3"] >= 0.9 and st["mrr@3"] == 1.0 and st["empty_rate"] == 0.0
    assert good["versions"][0]["calibration"]["calibrated"]
    # a deliberately worse version: a 2-dim hashing model cannot tell the topics apart (its
    # scores are *higher*, so only recall and MRR catch it)
    worse = build(store, tmp_path, model="hash:2", parent=v1, tag="w")
    publish(store, worse)
    bad = run_canary(store, "docs", canaries, k=3, baseline=good)
    assert not bad["passed"] and bad["versions"][0]["version"] == worse
    failures = bad["versions"][0]["failures"]
    assert any("recall@3 dropped" in f for f in failures), failures
    # the worse version inherits v1's calibration of another model: not applied, and said so
    assert bad["versions"][0]["calibration"]["needs_recalibration"] and good["versions"][0]["warnings"] == []
    assert "model changed" in bad["versions"][0]["warnings"][0] and bad["versions"][0]["stats"]["thresholds"] is None
    with pytest.raises(GateError, match="canary failed on docs/live"):
        canary_gate(bad)
    canary_gate(good)  # passes silently
    # weighted rollout: both versions are checked; Prometheus labels them apart
    publish(store, v1)
    publish(store, worse, weighted=20)
    both = run_canary(store, "docs", canaries, k=3, baseline=good)
    assert [r["version"] for r in both["versions"]] == [v1, worse]
    assert [r["passed"] for r in both["versions"]] == [True, False] and not both["passed"]
    parser = pytest.importorskip("prometheus_client.parser")
    fams = {f.name: f for f in parser.text_string_to_metric_families(canary_prometheus(both))}
    passed = {s.labels["version"]: s.value for s in fams["embedctl_canary_passed"].samples}
    assert passed == {v1: 1.0, worse: 0.0}


def test_drift_against_calibration_time(store, v1):
    calibrate(store, v1)
    publish(store, v1)
    same = run_drift(store, "docs", TOPICS * 3)
    assert same["version"] == v1 and same["calibration_fits"]
    assert same["embedding"]["novel_rate"] == 0.0 and same["embedding"]["centroid_similarity"] > 0.99
    assert not same["drifted"], same["alerts"]
    odd = [f"zq{i} xr{i} unrelated words{i} here{i} and{i} more{i} tokens{i}" for i in range(40)]
    moved = run_drift(store, "docs", odd)
    # eight mutually unlike calibration queries make novelty blind here (see the unit test
    # above for it); the scores and lengths of the odd queries move, and that alerts
    assert moved["drifted"] and any("top-1 score" in a for a in moved["alerts"]), moved["alerts"]
    assert moved["top1_score"]["current"]["mean"] < same["top1_score"]["current"]["mean"]
    with pytest.raises(GateError, match="drift on docs/live"):
        drift_gate(moved)
    assert "embedctl_drift_alerting" in drift_prometheus(moved)


# ---------------------------------------------------------------------------------------------
# the CLI (benchmark verbs; calibrate/canary/drift run against real index versions below)
# ---------------------------------------------------------------------------------------------


def run_cli(args, capsys):
    from engine.cli.app import main

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
    code, out, _ = run_cli(["benchmark", "pairs", str(tmp_path / "b.json"), "--out", str(tmp_path / "pairs.jsonl")],
                           capsys)
    assert code == 0 and "pairs" in out
    pairs = read_pairs(tmp_path / "pairs.jsonl")
    # query 1: d1 (gain 4) and d2 (gain 2) relevant, d3 (-1 -> 0) non-relevant; query 2: d1; query 3: d4 (gain 1)
    assert sorted((p.doc_id, p.relevant) for p in pairs) == [("d1", True), ("d1", True), ("d2", True),
                                                             ("d3", False), ("d4", True)]


def test_cli_benchmark_build_against_an_embed_run(tmp_path, bench_files, capsys):
    from engine.embed.config import EmbedJobConfig
    from engine.embed.pipeline import run_locally
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
    assert doc["corpus"]["fingerprint"] == corpus_fingerprint(d["doc_id"] for d in docs)


def topic_benchmark(tmp_path) -> Benchmark:
    queries = [{"query_id": f"q{t}", "text": words, "lang": "en" if t % 2 else "fr",
                "type": "keyword" if t < 4 else "question"} for t, words in enumerate(TOPICS)]
    qrels = {f"q{t}": {f"d{t}0": 3.0, f"d{t}1": 2.0, f"d{t}2": 1.0, f"d{(t + 1) % 8}0": 0.0}
             for t in range(len(TOPICS))}
    qrels["q7"] = {"d00": 0.0}  # no relevant doc: skipped and counted
    return build_benchmark(queries, qrels, corpus_ids={d["doc_id"] for d in topic_docs()}, name="topics",
                             grades={"scheme": "identity", "relevant_min_gain": 2})


def test_evaluate_benchmark_breaks_down_by_lang_and_type(store, v1, tmp_path):
    from engine.index.searcher import Searcher
    from engine.quality import metrics

    bench = topic_benchmark(tmp_path)
    with Searcher.load(store, "docs", v1) as searcher:
        res = evaluate_benchmark(searcher, bench, ks=(3, 10), store=store)
        hits = searcher.search([q["text"] for q in bench.queries], k=10, collapse_docs=True)
    assert res["evaluated"] == 7 and res["skipped_no_relevant"] == 1 and res["corpus_match"] is True
    assert res["index"] == res["exact"]  # flat index: exact search
    # by hand: nDCG on graded gains, recall/MRR on gain >= 2
    rows = []
    for q, h in zip(bench.queries[:7], hits, strict=False):  # the first 7 queries: hits may hold more
        docs = [x.doc_id for x in h]
        g = {d: v for d, v in bench.qrels[q["query_id"]].items() if v > 0}
        rel = {d: 1.0 for d in bench.relevant(q["query_id"])}
        rows.append({"ndcg@3": metrics.ndcg_at_k(docs, g, 3), "recall@3": metrics.recall_at_k(docs, rel, 3)})
    assert res["index"]["ndcg@3"] == pytest.approx(np.mean([r["ndcg@3"] for r in rows]), abs=1e-6)
    assert res["index"]["recall@3"] == pytest.approx(np.mean([r["recall@3"] for r in rows]), abs=1e-6)
    assert set(res["by_lang"]) == {"en", "fr"}
    assert res["by_lang"]["en"]["queries"] + res["by_lang"]["fr"]["queries"] == 7
    assert res["by_type"]["keyword"]["queries"] == 4 and res["by_type"]["question"]["queries"] == 3
    n = res["by_lang"]["en"]["queries"]
    weighted = (n * res["by_lang"]["en"]["index"]["mrr@10"] + (7 - n) * res["by_lang"]["fr"]["index"]["mrr@10"]) / 7
    assert weighted == pytest.approx(res["index"]["mrr@10"], abs=1e-5)


def test_cli_calibrate_canary_drift_end_to_end(store, v1, tmp_path, capsys):
    root = str(tmp_path / "store")
    bench = topic_benchmark(tmp_path)
    save_benchmark(bench, tmp_path / "b.json")
    code, out, err = run_cli(["benchmark", "pairs", str(tmp_path / "b.json"), "--store", root, "--index", "docs",
                              "--version", v1, "--unjudged-per-query", "2", "--out", str(tmp_path / "pairs.jsonl"),
                              "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    # q7 has no relevant doc: left out; the others give their judged 0 plus 2 unjudged negatives each
    assert summary["relevant"] == 14 and summary["non_relevant"] == 7 + 7 * 2
    code, out, err = run_cli(["calibrate", "--store", root, "--index", "docs", "--version", v1, "--pairs",
                              str(tmp_path / "pairs.jsonl"), "--plot-out", str(tmp_path / "pr.png")], capsys)
    assert code == 0, err
    assert "absolute  score >=" in out and (tmp_path / "pr.png").read_bytes()[:4] == b"\x89PNG"
    code, out, err = run_cli(["benchmark", "evaluate", str(tmp_path / "b.json"), "--store", root, "--index", "docs",
                              "--version", v1, "-k", "3", "--json"], capsys)
    assert code == 0, err and json.loads(out)["ks"] == [3]
    publish(store, v1)
    canaries = tmp_path / "canaries.jsonl"
    write_lines(canaries, [json.dumps({"query": w, "doc_id": f"d{t}0"}) for t, w in enumerate(TOPICS)])
    base = tmp_path / "base.json"
    args = ["canary", "--store", root, "--index", "docs", "--set", str(canaries), "--k", "3"]
    code, out, err = run_cli(args + ["--write-baseline", str(base)], capsys)
    assert code == 0 and out.startswith("PASS") and base.exists(), (out, err)
    worse = build(store, tmp_path, model="hash:2", parent=v1, tag="w")
    publish(store, worse)
    prom, report = tmp_path / "canary.prom", tmp_path / "canary.json"
    code, out, err = run_cli(args + ["--baseline", str(base), "--prom", str(prom), "--out", str(report), "--json"],
                             capsys)
    assert code == 7 and "canary failed" in err
    doc = json.loads(out)  # --json: the one object on stdout, even on failure
    assert doc["passed"] is False and json.loads(report.read_text())["passed"] is False
    assert f'embedctl_canary_passed{{index="docs",alias="live",version="{worse}"}} 0.0' in prom.read_text()
    # drift: the worse version only inherits v1's calibration, of another model -> a clear error;
    # v1 on its calibration queries again -> fine
    recent = write_lines(tmp_path / "recent.txt", TOPICS * 2)
    code, out, err = run_cli(["drift", "--store", root, "--index", "docs", "--queries", str(recent)], capsys)
    assert code == 2 and "no calibration of its own model" in err and "model changed" in err
    code, out, err = run_cli(["drift", "--store", root, "--index", "docs", "--version", v1, "--queries", str(recent)],
                             capsys)
    assert code == 0 and out.startswith("OK"), (out, err)


class RankingSearcher:
    """A stand-in searcher with fixed document rankings (for hand-computed metrics)."""

    index, version_id, kind = "fake", "v0", "flat"
    manifest = {"kind": "flat"}

    def __init__(self, rankings: dict[str, list[tuple[str, float]]]):
        self.texts = list(rankings)
        self.rankings = rankings

    def encode_queries(self, texts):
        return np.array([[self.texts.index(t)] for t in texts], dtype=np.float32)  # [n, 1]: the query's position

    def search_vectors(self, vectors, k=10, **_):
        return [[Hit(f"{d}#0", d, s) for d, s in self.rankings[self.texts[int(v[0])]][:k]] for v in vectors]

    def search(self, queries, k=10, **_):
        return self.search_vectors(self.encode_queries(queries), k)


def test_graded_ndcg_recall_mrr_by_hand_with_ties():
    # A: d1 (gain 1, below the relevant cut of 2), d3 (gain 3) at rank 3, d5 (gain 2) not retrieved.
    #   DCG@3 = 1/log2(2) + 3/log2(4) = 2.5; IDCG@3 = 3 + 2/log2(3) + 1/log2(4) = 4.76186 -> 0.525005
    #   recall@3 = |{d3}| / |{d3, d5}| = 0.5; MRR@3 = 1/3 (d1 does not count as relevant)
    # B: two equally graded docs, tied scores, in either order: nDCG 1, recall 1, MRR 1
    rankings = {"a": [("d1", 0.9), ("d2", 0.8), ("d3", 0.7), ("d4", 0.6)], "b": [("e2", 0.5), ("e1", 0.5)]}
    bench = build_benchmark([{"query_id": "A", "text": "a"}, {"query_id": "B", "text": "b"}],
                              {"A": {"d1": 1.0, "d3": 3.0, "d5": 2.0}, "B": {"e1": 2.0, "e2": 2.0}},
                              grades={"scheme": "identity", "relevant_min_gain": 2})
    res = evaluate_benchmark(RankingSearcher(rankings), bench, ks=(3,), exact=False)
    ndcg_a = 2.5 / (3 + 2 / math.log2(3) + 0.5)
    assert ndcg_a == pytest.approx(0.525005, abs=1e-6)
    assert res["index"]["ndcg@3"] == pytest.approx((ndcg_a + 1) / 2, abs=1e-6)
    assert res["index"]["recall@3"] == pytest.approx(0.75) and res["index"]["mrr@3"] == pytest.approx((1 / 3 + 1) / 2)
    rankings["b"].reverse()  # the tie broken the other way: nothing changes
    assert evaluate_benchmark(RankingSearcher(rankings), bench, ks=(3,), exact=False)["index"] == res["index"]
    # doc collapse: a document counts once, at its best chunk; equal scores keep the searcher's order
    hits = [Hit("x#1", "x", 0.7), Hit("y#0", "y", 0.9), Hit("x#0", "x", 0.95), Hit("z#0", "z", 0.7)]
    assert doc_scores(hits) == [("x", 0.95), ("y", 0.9), ("z", 0.7)]
    assert doc_scores([Hit("b#0", "b", 0.5), Hit("a#0", "a", 0.5)]) == [("b", 0.5), ("a", 0.5)]


@pytest.mark.s3
def test_calibrations_live_on_s3_and_travel_with_a_copy(store, v1, s3_bucket, tmp_path, monkeypatch):
    from engine.publish.copy import copy_version

    monkeypatch.setenv("EMBEDCTL_CACHE_DIR", str(tmp_path / "cache"))
    s3 = open_store(s3_bucket + "/store")
    rec = calibrate(store, v1)
    copy_version(store, s3, "docs", v1)
    assert load_calibration(s3, "docs", v1) is None  # the copy carries only the manifest's artifacts...
    assert copy_calibrations(store, s3, "docs", v1) == 1  # ...calibrations follow explicitly
    assert copy_calibrations(store, s3, "docs", v1) == 0  # idempotent
    assert load_calibration(s3, "docs", v1)["calibration_id"] == rec["calibration_id"]
    rec2 = calibrate(s3, v1)  # calibrating straight on S3 (search through the downloaded version)
    assert list_calibrations(s3, "docs", v1) == [rec["calibration_id"], rec2["calibration_id"]]
    assert rec2["absolute"]["threshold"] == rec["absolute"]["threshold"]  # same version, same pairs
    st = calibration_status(s3, "docs", v1)
    assert st["calibration_id"] == rec2["calibration_id"] and not st["needs_recalibration"]
    assert reference_embeddings(s3, "docs", load_calibration(s3, "docs", v1)).shape == (len(TOPICS), 32)


def test_canary_and_query_file_formats(tmp_path, bench_files):
    q, r = bench_files
    b = build_benchmark(read_queries(q), read_qrels(r, parse_gain_map("cranfield")), name="t",
                          grades={"scheme": "cranfield", "relevant_min_gain": 2})
    save_benchmark(b, tmp_path / "b.json")
    from_bench = read_canaries(tmp_path / "b.json")  # a benchmark is a canary set: its relevant docs
    assert [(c.id, c.expected) for c in from_bench] == [("1", ("d1", "d2")), ("2", ("d1",)), ("3", ("d9",))]
    jl = write_lines(tmp_path / "c.jsonl", [json.dumps({"query": "wing", "doc_id": "a"}),
                                            json.dumps({"query": "wing", "doc_id": "b"}),  # merged
                                            json.dumps({"query": "shock", "expected": ["c", "d"], "id": "s"})])
    assert [(c.query, c.expected, c.id) for c in read_canaries(jl)] == [("wing", ("a", "b"), "wing"),
                                                                         ("shock", ("c", "d"), "s")]
    tsv = write_lines(tmp_path / "c.tsv", ["query\tdoc_id", "heat\tx|y"])
    assert read_canaries(tsv)[0].expected == ("x|y",)  # a TSV doc_id column is taken as is
    assert read_query_texts(write_lines(tmp_path / "q.txt", ["a b", "", "c"])) == ["a b", "c"]
    assert read_query_texts(jl) == ["wing", "wing", "shock"]
    with pytest.raises(SchemaError, match="both relevant and non-relevant"):
        read_pairs(write_lines(tmp_path / "p.jsonl", [json.dumps({"query": "a", "doc_id": "d", "relevant": 1})]))
