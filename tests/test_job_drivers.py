"""The I/O-only job drivers (publish, evaluate) as `ray job submit` runs them: --config, --dry-run, summary line."""

from __future__ import annotations

import json

import pytest

from engine.core.storage import open_store
from engine.publish.aliases import read_alias
from tests.version_utils import build_version


def run_main(main, cfg: dict, tmp_path, capsys, *extra: str) -> tuple[int, dict | None, str]:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(cfg))
    code = main(["--config", str(path), *extra])
    out = capsys.readouterr()
    lines = [ln for ln in out.out.splitlines() if ln.strip()]
    summary = None
    if lines and lines[-1].startswith("EMBEDCTL_SUMMARY "):
        summary = json.loads(lines[-1].split(" ", 1)[1])
    elif lines:
        summary = json.loads(lines[-1])
    return code, summary, out.err


def test_publish_driver_latest_then_refusals(tmp_path, capsys):
    from engine.distributed.publish import main

    store = open_store(str(tmp_path / "s"))
    v1 = build_version(store, "docs", "a")
    v2 = build_version(store, "docs", "b")
    code, summary, err = run_main(main, {"store": store.uri, "index": "docs", "version": "latest"}, tmp_path, capsys)
    assert code == 0, err
    assert summary["version"] == max(v1, v2) and read_alias(store, "docs").version == max(v1, v2)
    # --expect-current that is stale: a clear conflict, alias unchanged
    code, _s, err = run_main(main, {"store": store.uri, "index": "docs", "version": min(v1, v2),
                                    "expect_current": "v-nope"}, tmp_path, capsys)
    assert code == 5 and "error:" in err and read_alias(store, "docs").version == max(v1, v2)
    # unknown key and a dry run that touches nothing
    code, _s, err = run_main(main, {"store": store.uri, "index": "docs", "version": "x", "colour": 1}, tmp_path, capsys)
    assert code == 2 and "unknown config keys ['colour']" in err
    code, resolved, _e = run_main(main, {"store": "s3://nowhere/x", "index": "docs", "version": "latest"}, tmp_path,
                                  capsys, "--dry-run")
    assert code == 0 and resolved["alias"] == "live"


def test_evaluate_driver_with_queries_and_qrels(tmp_path, capsys):
    from engine.distributed.evaluate import main
    from tests.version_utils import DIM  # noqa: F401 - same tiny versions as the publish tests

    store = open_store(str(tmp_path / "s"))
    vid = build_version(store, "docs", "a")
    (tmp_path / "q.jsonl").write_text('{"query_id": "1", "text": "alpha beta"}\n')
    (tmp_path / "qrels.tsv").write_text("query_id\tdoc_id\tgrade\n1\ta-d000\t1\n")
    code, summary, err = run_main(main, {"store": store.uri, "index": "docs", "version": vid,
                                         "queries": str(tmp_path / "q.jsonl"), "qrels": str(tmp_path / "qrels.tsv"),
                                         "k": 5}, tmp_path, capsys)
    # hash:16 is the version's model: the query embeds, the metrics come back beside exact search
    assert code == 0, err
    assert summary["version"] == vid and "exact" in json.dumps(summary)
    code, _s, err = run_main(main, {"store": store.uri, "index": "docs", "queries": "q"}, tmp_path, capsys)
    assert code == 2 and "exactly one of version or alias" in err


@pytest.mark.parametrize("job", ["publish", "evaluate"])
def test_drivers_help(job):
    import subprocess
    import sys

    from tests.conftest import REPO

    out = subprocess.run([sys.executable, f"jobs/{job}.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "--dry-run" in out.stdout
