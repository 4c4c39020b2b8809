"""OpenVINO static int8 (recipe 4): built offline from the folder with a fixed calibration set, cached and
keyed by recipe + calibration fingerprint, recorded in the identity, byte-identical rebuilds; old openvino
int8 identities still reload the weight-only recipe 3; a query encoder of another recipe is refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from engine.core.errors import ConfigError
from engine.embed import backends
from engine.embed.encoders import encoder_from_identity, load_encoder
from tests.backend_utils import tiny_bert_with_cache

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from engine.embed.backends import openvino_int8  # noqa: E402  (needs openvino/nncf only when building)

TEXTS = ["boundary layer transition on a flat plate", "heat transfer in hypersonic flow " * 3, "flutter " * 120, "x",
         "the pressure distribution on a slender cone at incidence", "shock wave boundary layer interaction"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    yield from tiny_bert_with_cache(tmp_path_factory.mktemp("static_int8"))


def test_calibration_set_is_fixed_and_fits_the_model(tiny):
    samples, fp = openvino_int8.calibration_set(tiny)
    again, fp2 = openvino_int8.calibration_set(tiny)
    assert fp == fp2 and len(samples) == 128 and all(np.array_equal(a, b) for a, b in zip(samples, again, strict=True))
    assert max(len(s) for s in samples) == 96  # the tiny model reads 96 tokens: windows fit it, [CLS]/[SEP] included
    assert all(s[0] == 101 and s[-1] == 102 for s in samples)
    other = openvino_int8.calibration_set(tiny, {**openvino_int8.CALIBRATION, "samples": 64})[1]
    assert other != fp


def test_the_key_follows_recipe_and_calibration():
    k = openvino_int8.ir_key("onnx-key", 4, "calib-a")
    assert k == openvino_int8.ir_key("onnx-key", 4, "calib-a")
    assert len({k, openvino_int8.ir_key("onnx-key", 4, "calib-b"), openvino_int8.ir_key("onnx-key", 3),
                openvino_int8.ir_key("other", 4, "calib-a")}) == 4
    with pytest.raises(ConfigError, match="int8 recipe 2 is not an openvino recipe"):
        openvino_int8.ensure_int8_ir(__import__("pathlib").Path("x.onnx"), "k", 2)


def test_static_int8_builds_offline_is_cached_and_lands_in_the_identity(tiny, monkeypatch):
    import nncf

    calls = []
    real = nncf.quantize
    monkeypatch.setattr(nncf, "quantize", lambda *a, **k: calls.append(k) or real(*a, **k))
    enc = load_encoder(str(tiny), device="cpu", backend="openvino", quantize="int8", threads=1)
    ident = enc.identity
    assert (ident["backend"], ident["quantize"], ident["int8_recipe"]) == ("openvino", "int8", 4)
    assert ident["int8_calibration"] == openvino_int8.calibration_set(tiny)[1]
    folder = openvino_int8.cache_root().parent / "openvino" / ident["export_fingerprint"]
    assert (folder / "model.xml").exists() and len(calls) == 1
    assert calls[0]["model_type"] == nncf.ModelType.TRANSFORMER
    fp32 = load_encoder(str(tiny), device="cpu", backend="openvino", threads=1)
    cos = (enc.encode(TEXTS) * fp32.encode(TEXTS)).sum(1)
    # A random 2-layer BERT measured 0.99+ here; 0.97 leaves room for library versions while a broken
    # recipe (ranges from padded or wrong inputs, a graph quantized without calibration) falls far below.
    assert cos.min() > 0.97, cos

    # Warm: neither the calibration corpus nor nncf runs again, and the bytes are the same.
    def no_rebuild(*a, **k):
        raise AssertionError("rebuilt from the cache's inputs")

    monkeypatch.setattr(openvino_int8, "calibration_set", no_rebuild)
    monkeypatch.setattr(openvino_int8, "_quantize_static", no_rebuild)
    again = load_encoder(str(tiny), device="cpu", backend="openvino", quantize="int8", threads=1)
    assert again.identity == ident
    assert again.encode(TEXTS).tobytes() == enc.encode(TEXTS).tobytes()
    assert encoder_from_identity(ident, threads=1).identity == ident


def test_a_rebuild_is_byte_identical(tiny, tmp_path, capfd):
    enc = load_encoder(str(tiny), device="cpu", backend="openvino", quantize="int8", threads=1)
    folder = openvino_int8.cache_root().parent / "openvino" / enc.identity["export_fingerprint"]
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    shutil.move(str(folder), str(tmp_path / "old"))
    capfd.readouterr()
    rebuilt = load_encoder(str(tiny), device="cpu", backend="openvino", quantize="int8", threads=1)
    assert capfd.readouterr().out == ""  # nncf's progress bars stay off stdout (the CLI's --json channel)
    assert rebuilt.identity == enc.identity
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert rebuilt.encode(TEXTS).tobytes() == enc.encode(TEXTS).tobytes()


def test_an_old_openvino_int8_identity_reloads_weight_only_int8(tiny):
    new = load_encoder(str(tiny), device="cpu", backend="openvino", quantize="int8", threads=1).identity
    old = {k: v for k, v in new.items() if k not in ("int8_recipe", "int8_calibration", "export_fingerprint")}
    v3 = encoder_from_identity(old, threads=1)
    assert v3.identity["int8_recipe"] == 3 and "int8_calibration" not in v3.identity
    export = load_encoder(str(tiny), device="cpu", backend="openvino").identity["export_fingerprint"]
    assert v3.identity["export_fingerprint"] == openvino_int8.ir_key(export, 3)  # the key it always had
    backends.check_same_backend(old, v3.identity)  # absent and 3 are the same recipe


def test_a_searcher_refuses_a_query_encoder_of_another_recipe(tiny, tmp_path):
    from engine.core.storage import open_store
    from engine.index.build import build_index
    from engine.index.params import BuildConfig
    from engine.index.searcher import Searcher
    from tests.index_utils import make_run

    v3 = load_encoder(str(tiny), device="cpu", backend="openvino", quantize="int8", int8_recipe=3, threads=1)
    v4 = load_encoder(str(tiny), device="cpu", backend="openvino", quantize="int8", threads=1)
    texts = [f"{w} flow over a wing section {i}" for i, w in enumerate(["shock", "heat", "flutter", "drag"] * 3)]
    store = open_store(tmp_path / "store")
    make_run(store, "r1", v3.encode_passages(texts), parts=1, model=v3.identity,
             chunk_ids=[f"c{i}" for i in range(len(texts))], doc_ids=[f"d{i}" for i in range(len(texts))])
    vid = build_index(store, "r1", "docs", BuildConfig(kind="flat")).version_id
    with Searcher.load(store, "docs", vid) as s:  # the query encoder follows the index: recipe 3
        assert s.encoder.identity["int8_recipe"] == 3
        assert s.search(["shock flow over a wing section 0"], k=1)[0][0].chunk_id == "c0"
    with pytest.raises(ConfigError, match=r"openvino/int8 \(int8 recipe 4\).*built with openvino/int8 \(int8 recipe 3\)"):
        Searcher.load(store, "docs", vid, encoder=v4)


@pytest.mark.integration
@pytest.mark.slow
def test_minilm_static_int8_stays_close_to_fp32():
    texts = ["Supersonic flutter of panels. " * k for k in (1, 5, 40, 90)] + ["x", "naïve café, e.g. 3.5 Mach"]
    fp32 = load_encoder(None, device="cpu", backend="openvino").encode(texts)
    int8 = load_encoder(None, device="cpu", backend="openvino", quantize="int8")
    cos = (int8.encode(texts) * fp32).sum(1)
    # Cranfield chunks measured mean ~0.996 (benchmarks/backend_quality_cranfield.py); ONNX recipe 1 at mean
    # 0.9958 lost 1.6% nDCG@10, so a drop below these bounds means the recipe broke, not noise.
    assert cos.mean() > 0.99 and cos.min() > 0.98, cos
    assert int8.identity["int8_recipe"] == 4 and int8.identity["dim"] == 384
