"""The migration report: a self-contained page (nothing fetched, everything escaped), and a
screenshot in headless Chromium proving it renders with its charts."""

from __future__ import annotations

import re

import numpy as np
import pytest

from engine.migrate.compare_metrics import compare_query, summarize_comparisons
from engine.migrate.report import find_chromium, render_migration_report, screenshot


def report_data() -> dict:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        blue = [{"doc_id": f"d{j}", "score": float(0.8 - j * 0.03 + rng.normal(0, 0.01))} for j in range(10)]
        shift = int(rng.integers(0, 6))
        green = [{"doc_id": f"d{j + shift}", "score": float(0.55 - j * 0.02 + rng.normal(0, 0.01))} for j in range(10)]
        rows.append(compare_query(f"q{i}", f"query {i}", blue, green, k=10))
    summary = summarize_comparisons(rows, 10)
    phases = {p: {"status": "done", "attempts": 1, "seconds": 1.5} for p in
              ("baseline", "build", "compare", "calibrate")}
    phases.update(rollout={"status": "pending", "attempts": 0}, cutover={"status": "pending", "attempts": 0})
    state = {
        "migration_id": "mig-test", "index": "docs", "alias": "live", "status": "running", "phase": "rollout",
        "created_at": "2026-11-27T00:00:00Z", "created_by": "tester",
        "plan": {"k": 10, "embed": {"model": "hash:16"}, "weights": [5.0, 25.0, 100.0]},
        "blue": {"version": "v1", "dim": 32, "model": {"name": "hash:32", "fingerprint": "a" * 64}, "kind": "flat"},
        "green": {"version": "v2", "dim": 16, "model": {"name": "hash:16", "fingerprint": "b" * 64}, "kind": "flat"},
        "phases": phases,
        "rollout": {"steps": [{"weight": 5.0, "status": "passed", "generation": 2,
                               "gates": {"green_recall": 0.8, "blue_recall": 0.82, "error_rate": 0.0, "queries": 40}}]},
    }
    disagreements = [{"query_id": "q7", "text": "wing <script>alert(1)</script> & flutter", "jaccard": 0.1,
                      "top1_agree": False, "spearman": -0.2, "ndcg_blue": 0.5, "ndcg_green": 0.1,
                      "blue": [{"doc_id": "d1", "score": 0.8, "title": "Flutter of <b>panels</b>", "relevant": True}],
                      "green": [{"doc_id": "d9", "score": 0.5, "title": "Heat transfer", "relevant": False}]}]
    compare = {"k": 10, "summary": summary,
               "benchmark": {"name": "tiny", "queries": 40, "blue": {"recall@10": 0.6, "mrr@10": 0.5, "ndcg@10": 0.45},
                             "green": {"recall@10": 0.62, "mrr@10": 0.48, "ndcg@10": 0.46}},
               "scores": {side: {"top1": [r.__getattribute__(side)[0][1] for r in rows],
                                 "topk": [s for r in rows for _, s in r.__getattribute__(side)]}
                          for side in ("blue", "green")},
               "per_query": {"jaccard": [r.jaccard[10] for r in rows], "spearman": [r.spearman for r in rows]},
               "disagreements": disagreements}
    calibration = {"blue": {"calibration_id": "c1", "absolute": {"threshold": 0.7, "precision": 0.8, "recall": 0.7,
                                                                 "f_beta": 0.75}},
                   "green": {"calibration_id": "c2", "absolute": {"threshold": 0.45, "precision": 0.78,
                                                                  "recall": 0.72, "f_beta": 0.75}}}
    return {"state": state, "baseline": {"canary": {"canary_recall": 0.82}}, "compare": compare,
            "calibration": calibration, "generated_at": "now", "engine_version": "0.1.0", "store": "/tmp/store"}


def test_page_is_self_contained_and_escaped():
    page = render_migration_report(report_data())
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # Nothing is fetched: no script, no external stylesheet, font or image.
    assert "<script" not in page.replace("&lt;script&gt;", "")
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page), "a reference to something outside the page"
    assert "@import" not in page and "url(" not in page
    assert len(re.findall(r'<img class="chart"[^>]+src="data:image/png;base64,', page)) == 4
    # Query text and titles from the corpus are escaped, never markup.
    assert "wing &lt;script&gt;alert(1)&lt;/script&gt; &amp; flutter" in page and "<b>panels</b>" not in page
    for section in ("Versions", "Metrics", "Charts", "Score-distribution shift", "Thresholds", "Rollout",
                    "Queries that disagree most", "Phases"):
        assert f"<h2>{section}" in page
    assert "hash:32" in page and "hash:16" in page and "0.4500" in page  # green's threshold


def test_page_without_comparison_yet():
    data = report_data()
    data["compare"] = None
    data["calibration"] = {}
    data["state"]["rollout"] = {"steps": []}
    page = render_migration_report(data)
    assert "No comparison yet" in page and "Not calibrated yet" in page and "data:image/png" not in page


def test_screenshot_in_headless_chromium(tmp_path):
    if find_chromium() is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium); the report's rendering "
                    "check needs a headless browser")
    import matplotlib.image

    html = tmp_path / "report.html"
    html.write_text(render_migration_report(report_data()), encoding="utf-8")
    png = screenshot(html, tmp_path / "report.png", width=1280, height=2400)
    img = matplotlib.image.imread(str(png))  # [h, w, 3|4] floats in [0, 1]
    assert img.shape[0] == 2400 and img.shape[1] == 1280
    rgb = img[..., :3]
    assert rgb.std() > 0.05, "the page rendered blank"
    # The charts rendered: pixels in the blue and green of the bars and histograms.
    blueish = (rgb[..., 2] > 0.55) & (rgb[..., 0] < 0.35) & (rgb[..., 1] < 0.55)
    greenish = (rgb[..., 1] > 0.5) & (rgb[..., 0] < 0.35) & (rgb[..., 2] < 0.5)
    assert blueish.sum() > 2000 and greenish.sum() > 2000
