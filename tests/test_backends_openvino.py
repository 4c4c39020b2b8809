"""The OpenVINO backend: missing packages are clear errors; fp32 matches ONNX Runtime, int8 weights stay
close; identity, cache and the searcher's refusal work as for onnx."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from engine.core.errors import ConfigError
from engine.embed import backends
from engine.embed.encoders import encoder_from_identity, load_encoder
from tests.backend_utils import tiny_bert_with_cache

TEXTS = ["boundary layer transition on a flat plate", "heat transfer in hypersonic flow " * 3, "flutter " * 120, "x"]


def test_missing_openvino_or_nncf_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec

    def without(*names):
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in names else real(n, *a))

    without("openvino")
    with pytest.raises(ConfigError, match="needs the 'openvino' package"):
        backends.resolve_backend("openvino", "none", "cpu")
    without("nncf")
    with pytest.raises(ConfigError, match="needs the 'nncf' package"):
        backends.resolve_backend("openvino", "int8", "cpu")


pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    yield from tiny_bert_with_cache(tmp_path_factory.mktemp("openvino"))


def test_openvino_fp32_matches_onnx_and_records_its_identity(tiny):
    from engine.embed.backends.onnx_export import cache_root

    ov = load_encoder(str(tiny), device="cpu", backend="openvino", threads=1)
    onnx = load_encoder(str(tiny), device="cpu", backend="onnx", threads=1)
    assert (ov.encode(TEXTS) * onnx.encode(TEXTS)).sum(1).min() > 0.9999  # padded rows included
    ident = ov.identity
    assert (ident["backend"], ident["quantize"]) == ("openvino", "none") and "int8_recipe" not in ident
    assert ident["export_fingerprint"] != onnx.identity["export_fingerprint"]  # the unfused export, its own key
    assert (cache_root() / ident["export_fingerprint"] / "model.onnx").exists()
    again = encoder_from_identity(ident)
    assert type(again) is type(ov) and again.identity == ident
    with pytest.raises(ConfigError, match="openvino/none"):
        backends.check_same_backend(ident, onnx.identity)


def test_openvino_int8_is_cached_close_to_fp32_and_refused_for_an_fp32_index(tiny, tmp_path):
    pytest.importorskip("nncf")
    from engine.core.storage import open_store
    from engine.index.build import build_index
    from engine.index.params import BuildConfig
    from engine.index.searcher import Searcher
    from tests.index_utils import make_run

    int8 = load_encoder(str(tiny), device="cpu", backend="openvino", quantize="int8")
    fp32 = load_encoder(str(tiny), device="cpu", backend="openvino")
    assert (int8.encode(TEXTS) * fp32.encode(TEXTS)).sum(1).min() > 0.99
    ident = int8.identity
    assert (ident["backend"], ident["quantize"]) == ("openvino", "int8")
    assert load_encoder(str(tiny), device="cpu", backend="openvino", quantize="int8").identity == ident  # cached
    texts = [f"{w} flow over a wing section {i}" for i, w in enumerate(["shock", "heat", "flutter", "drag"] * 3)]
    store = open_store(tmp_path / "store")
    make_run(store, "r1", fp32.encode_passages(texts), parts=1, model=fp32.identity,
             chunk_ids=[f"c{i}" for i in range(len(texts))], doc_ids=[f"d{i}" for i in range(len(texts))])
    vid = build_index(store, "r1", "docs", BuildConfig(kind="flat")).version_id
    with Searcher.load(store, "docs", vid) as s:
        assert s.encoder.identity["backend"] == "openvino"
        assert s.search(["shock flow over a wing section 0"], k=1)[0][0].chunk_id == "c0"
    with pytest.raises(ConfigError, match="built with openvino/none"):
        Searcher.load(store, "docs", vid, encoder=int8)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_openvino_embed_job_reruns_are_byte_identical(tiny, tmp_path, quantize):
    import glob

    from engine.embed.config import EmbedJobConfig
    from engine.embed.pipeline import run_locally
    from tests.corpus_utils import make_docs, write_corpus

    if quantize == "int8":
        pytest.importorskip("nncf")
    write_corpus(tmp_path / "corpus", make_docs(16, seed=4), files=2)
    out = []
    for k in range(2):
        m = run_locally(EmbedJobConfig.from_flat({
            "corpus": str(tmp_path / "corpus"), "store": str(tmp_path / f"s{k}"), "model": str(tiny), "device": "cpu",
            "backend": "openvino", "quantize": quantize, "chunk_tokens": 48, "chunk_overlap": 8, "unit_rows": 8}))
        assert m["status"] == "succeeded" and m["model"]["backend"] == "openvino"
        files = sorted(glob.glob(str(tmp_path / f"s{k}" / "runs" / m["run_id"] / "embeddings" / "*.parquet")))
        out.append((m["run_id"], [Path(f).read_bytes() for f in files]))
    assert out[0] == out[1] and out[0][1]
    if quantize == "int8":
        assert m["quality"]["reference"] == {"backend": "openvino", "quantize": "none"}


def test_a_folder_that_cannot_be_exported_names_openvino(tmp_path, monkeypatch):
    from tests.test_embedding import _tiny_bert

    monkeypatch.setenv("EMBEDCTL_CACHE_DIR", str(tmp_path / "cache"))
    folder = _tiny_bert(tmp_path / "maxpool", "max")
    with pytest.raises(ConfigError, match=rf"model folder {folder} cannot run with --backend openvino: pooling"):
        load_encoder(str(folder), device="cpu", backend="openvino")
