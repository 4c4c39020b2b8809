"""Inference backends through the workflows: migrate carries green's backend to its embed job and its
query encoder; a refresh embeds on the live run's backend, reports it, and refuses another."""

from __future__ import annotations

import numpy as np
import pytest

from engine.core import layout
from engine.core.errors import ConfigError
from engine.embed.encoders import load_encoder
from tests.backend_utils import tiny_bert_with_cache
from tests.corpus_utils import make_docs, write_corpus


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    yield from tiny_bert_with_cache(tmp_path_factory.mktemp("backend-workflows"))


# -- migrate ---------------------------------------------------------------------------------------


def test_migration_keys_take_backend_and_quantize_and_refuse_bad_ones(tmp_path):
    from engine.migrate.plan import default_migration_id, plan_from_flat

    bench = tmp_path / "bench.json"
    bench.write_text("{}")
    base = {"index": "docs", "benchmark": str(bench)}
    plan, _run = plan_from_flat({**base, "model": "hash:16", "backend": "onnx", "quantize": "int8"})
    assert plan.embed == {"model": "hash:16", "backend": "onnx", "quantize": "int8"}
    # Another runtime of the same model is a migration of its own (every vector changes) ...
    same_model, _ = plan_from_flat({**base, "embed": {"quantize": "int8"}})
    assert same_model.embed == {"quantize": "int8"}
    # ... with its own id: the runtime is part of what the migration does.
    assert default_migration_id(plan) != default_migration_id(plan_from_flat({**base, "model": "hash:16"})[0])
    with pytest.raises(ConfigError, match="backend must be one of"):
        plan_from_flat({**base, "model": "hash:16", "backend": "tensorrt"})
    with pytest.raises(ConfigError, match="needs a runtime backend"):
        plan_from_flat({**base, "model": "hash:16", "backend": "torch", "quantize": "int8"})
    with pytest.raises(ConfigError, match="needs a new model"):
        plan_from_flat(base)


def test_green_runtime_follows_blue_unless_the_plan_names_one():
    from engine.migrate.build import _green_runtime

    def green(blue: dict, plan: dict) -> tuple:
        flat = {**blue, **plan}
        _green_runtime(flat, plan)
        return flat.get("backend", "torch"), flat.get("quantize", "none")

    assert green({"backend": "onnx", "quantize": "int8"}, {"model": "other"}) == ("onnx", "int8")  # carried over
    assert green({"backend": "torch", "quantize": "none"}, {"quantize": "int8"}) == ("auto", "int8")
    assert green({"backend": "onnx", "quantize": "int8"}, {"backend": "torch"}) == ("torch", "none")
    assert green({"backend": "onnx", "quantize": "int8"}, {"backend": "onnx", "quantize": "none"}) == ("onnx", "none")


def test_cli_migrate_has_backend_flags():
    from click.testing import CliRunner

    from engine.cli.app import cli

    out = CliRunner().invoke(cli, ["migrate", "run", "--help"])
    assert out.exit_code == 0 and "--backend" in out.output and "--quantize" in out.output
    bad = CliRunner().invoke(cli, ["migrate", "run", "--store", "/nonexistent", "--index", "docs",
                                   "--backend", "tensorrt"])
    assert bad.exit_code != 0 and "tensorrt" in bad.output


@pytest.mark.slow
def test_migration_to_int8_of_the_same_model_embeds_and_searches_on_onnx(tiny, tmp_path):
    from engine.embed.backends.onnx_encoder import OnnxEncoder
    from engine.migrate.migration import Migration
    from engine.migrate.tools import default_loader
    from tests.test_migrate import IDX, make_blue, plan_for

    setup = make_blue(tmp_path, str(tmp_path / "store"), model=str(tiny))
    store = setup["store"]
    m = Migration.start(store, plan_for(setup, embed={"backend": "onnx", "quantize": "int8"}))
    m.run(until="baseline")
    cfg = m.green_embed_config()
    assert (cfg.embed.backend, cfg.embed.quantize, cfg.embed.model) == ("onnx", "int8", str(tiny))
    m.run(until="build")
    doc = m.read()
    blue_v, green_v = doc["blue"]["version"], doc["green"]["version"]
    green_model = store.read_json(layout.version_manifest_key(IDX, green_v))["model"]
    assert (green_model["backend"], green_model["quantize"]) == ("onnx", "int8")
    assert "backend" not in doc["blue"]["model"] or doc["blue"]["model"]["backend"] == "torch"
    # Each version's searcher embeds queries on its own runtime.
    green, blue = default_loader(store, IDX, green_v), default_loader(store, IDX, blue_v)
    try:
        assert isinstance(green.encoder, OnnxEncoder) and green.encoder.quantize == "int8"
        assert not isinstance(blue.encoder, OnnxEncoder)
        q = " ".join(setup["docs"][0]["text"].split()[2:9])
        assert green.search([q], k=3)[0] and blue.search([q], k=3)[0]
    finally:
        green.close()
        blue.close()


# -- refresh ---------------------------------------------------------------------------------------


def _refresh_setup(tiny, tmp_path, **embed):
    from tests.test_refresh import change, live_index

    docs = make_docs(30, seed=41)
    uri = str(tmp_path / "store")
    store, run, v1 = live_index(uri, tmp_path / "v1", docs, model=str(tiny), device="cpu", **embed)
    write_corpus(tmp_path / "v2", change(docs, modify=[3], delete=[4], add=1), files=2)
    return store, run, uri


@pytest.mark.slow
def test_refresh_of_an_onnx_index_loads_onnx_validates_it_and_says_so(tiny, tmp_path):
    from engine.distributed.refresh import run_refresh_job
    from tests.test_refresh import refresh_cfg

    store, run, uri = _refresh_setup(tiny, tmp_path, backend="onnx", quantize="int8")
    s = run_refresh_job(refresh_cfg(tmp_path / "v2", uri))
    assert s["status"] == "published" and s["executor"] == "driver" and s["embedding_calls"] >= 2
    loader = s["model_loader"]
    assert (loader["loader"], loader["backend"], loader["quantize"]) == ("onnx", "onnx", "int8")
    assert loader["validated_on"] == 4 and loader["min_cosine"] > 0.9999
    man = store.read_json(layout.run_manifest_key(s["run_id"]))
    assert (man["model"]["backend"], man["model"]["quantize"]) == ("onnx", "int8")


def test_refresh_with_a_model_of_another_backend_is_refused_and_a_matching_one_works(tiny, tmp_path):
    from engine.refresh.session import run_refresh_locally
    from tests.test_refresh import refresh_cfg

    _store, _run, uri = _refresh_setup(tiny, tmp_path, backend="torch")  # live: torch fp32
    int8 = load_encoder(str(tiny), device="cpu", backend="onnx", quantize="int8")
    with pytest.raises(ConfigError, match=r"runs on onnx/int8, but the live run's vectors were made on torch/none"):
        run_refresh_locally(refresh_cfg(tmp_path / "v2", uri), encoder=int8)
    s = run_refresh_locally(refresh_cfg(tmp_path / "v2", uri), encoder=load_encoder(str(tiny), device="cpu"))
    assert s["status"] == "published" and s["chunks"]["new"] >= 1


@pytest.mark.slow
def test_model_process_refuses_an_onnx_model_that_does_not_reproduce_the_stored_vectors(tiny):
    from engine.refresh.model import ModelProcess

    ident = load_encoder(str(tiny), device="cpu", backend="onnx").identity
    texts = ["wing lift in a slipstream", "boundary layer transition"]
    right = load_encoder(str(tiny), device="cpu", backend="onnx").encode_passages(texts)
    wrong = [(t, (-v).tolist()) for t, v in zip(texts, right, strict=True)]
    proc = ModelProcess(ident, device="cpu", dtype="auto", batch_tokens=4096, samples=wrong)
    try:
        assert proc.identity == {}  # failed to load: no identity to compare, the error comes on use
        with pytest.raises(ConfigError, match="does not reproduce the live run's stored vectors"):
            proc.encode_passages(texts)
    finally:
        proc.close()
    good = ModelProcess(ident, device="cpu", dtype="auto", batch_tokens=4096,
                        samples=[(t, v.tolist()) for t, v in zip(texts, right, strict=True)])
    try:
        np.testing.assert_allclose(good.encode_passages(texts), right, atol=1e-5)
        assert good.identity["backend"] == "onnx" and good.info["loader"] == "onnx"
    finally:
        good.close()


def test_cli_migrate_records_the_backend_flags_in_the_plan(tmp_path):
    import json

    from click.testing import CliRunner

    from engine.cli.app import cli
    from tests.test_migrate import IDX, make_blue

    setup = make_blue(tmp_path, str(tmp_path / "store"))
    out = CliRunner().invoke(cli, ["migrate", "run", "--store", str(tmp_path / "store"), "--index", IDX,
                                   "--model", "hash:16", "--backend", "onnx", "--quantize", "int8",
                                   "--benchmark", setup["bench"], "--until", "baseline", "--in-process", "--json"])
    assert out.exit_code == 0, out.output
    mid = json.loads(out.stdout)["migration_id"]
    state = setup["store"].read_json(f"indexes/{IDX}/migrations/{mid}/state.json")
    assert state["plan"]["embed"] == {"model": "hash:16", "backend": "onnx", "quantize": "int8"}
