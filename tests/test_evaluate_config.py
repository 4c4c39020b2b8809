"""The evaluate job's config on engine.core.config: the same keys, defaults, dry-run output and errors
as the key table it replaced (offline: a dry run never touches the store)."""

from __future__ import annotations

import json

import pytest

from engine.distributed.evaluate import EvaluateJobConfig, main

# The key table the job used before (engine/distributed/evaluate.py KEYS), with its defaults.
OLD_KEYS = {"store": None, "index": None, "version": None, "alias": None, "benchmark": None, "queries": None,
            "qrels": None, "k": 10, "gain": "cranfield", "per_query": None, "endpoint_url": None}


def run(tmp_path, capsys, cfg, *extra):
    path = tmp_path / "job.json"
    path.write_text(json.dumps(cfg))
    code = main(["--config", str(path), *extra])
    out = capsys.readouterr()
    return code, out.out.strip(), out.err


def test_dry_run_prints_every_key_with_its_default(tmp_path, capsys):
    cfg = {"store": "s3://nowhere/x", "index": "docs", "alias": "live", "queries": "q.jsonl", "qrels": "r.tsv",
           "per-query": "pq.jsonl", "address": "ray://ignored:10001"}  # dashes and a driver's address, as before
    code, out, err = run(tmp_path, capsys, cfg, "--dry-run")
    assert code == 0, err
    expected = {**OLD_KEYS, **{k.replace("-", "_"): v for k, v in cfg.items() if k != "address"}}
    assert json.loads(out) == expected
    assert sorted(EvaluateJobConfig().to_dict()) == sorted(OLD_KEYS)


@pytest.mark.parametrize("cfg, message", [
    ({"store": "s", "index": "i", "version": "v", "benchmark": "b", "colour": 1},
     "unknown config keys ['colour']; allowed: " + ", ".join(sorted(OLD_KEYS))),
    ({"index": "i", "version": "v", "benchmark": "b"}, "the config needs store"),
    ({"store": "s", "index": "", "version": "v", "benchmark": "b"}, "the config needs index"),
    ({"store": "s", "index": "i", "benchmark": "b"}, "give exactly one of version or alias"),
    ({"store": "s", "index": "i", "version": "v", "alias": "a", "benchmark": "b"}, "give exactly one of version or alias"),
    ({"store": "s", "index": "i", "version": "v", "queries": "q"}, "give a benchmark file, or queries and qrels"),
    ({"store": "s", "index": "i", "version": "v", "benchmark": "b", "k": 0}, "k must be a positive integer, got 0"),
    ({"store": "s", "index": "i", "version": "v", "benchmark": "b", "k": "10"}, "k must be a positive integer, got '10'"),
    ({"store": "s", "index": "i", "version": "v", "benchmark": "b", "k": None}, "k must be a positive integer, got None"),
])
def test_config_errors_are_the_same_as_before(tmp_path, capsys, cfg, message):
    code, _out, err = run(tmp_path, capsys, cfg, "--dry-run")
    assert code == 2 and f"error: {message}" in err
