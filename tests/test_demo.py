"""The README's first command: `embedctl demo` runs embed -> build-index -> publish -> search."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from engine.embed.stdlib_corpus import stdlib_docs

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_stdlib_corpus_is_real_text():
    rows = stdlib_docs(20)
    assert len(rows) == 20 and all(len(r["text"]) >= 200 for r in rows)
    assert len({r["doc_id"] for r in rows}) == 20


def test_demo_end_to_end(ray_session, tmp_path):
    from engine.cli.app import cli

    result = CliRunner().invoke(cli, ["demo", "--store", str(tmp_path / "s"), "--docs", "40", "--model", "hash:64",
                                      "--query", "compressed archive files", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded" and summary["steps"] == ["embed", "build-index", "publish", "search"]
    assert summary["counts"]["accepted"] == 40 and summary["hits"]
    assert (tmp_path / "s" / "indexes" / "demo" / "aliases" / "live.json").exists()
